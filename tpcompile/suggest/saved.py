"""The tensors autograd keeps for backward, found by running a traced graph.

The graph is run on the meta device (no memory, no arithmetic) under
``torch.autograd.graph.saved_tensors_hooks``; every tensor packed is charged once (by
storage) to the node that made it, so views and tensors shared between ops count once.
Attention runs as the fused kernels run it, keeping q, k, v, its output and the row
log-sum-exp, never the ``s x s`` scores. An op without a meta kernel keeps nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ..analysis import is_block, layer_of
from ..planning import Unit
from .terms import Term, seq_power, split_of

ATTENTION = {torch.ops.aten.scaled_dot_product_attention.default}


class _Fused(torch.autograd.Function):
    """Attention as the fused kernels run it: keeps q, k, v, the output, the row
    log-sum-exp and the mask if one is given (never the ``s x s`` scores)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, shape: tuple) -> torch.Tensor:
        out = q.new_empty(shape)
        lse = q.new_empty(shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:  # never run
        return None, None, None, None, None


def _fresh(val: Any, grad: bool) -> Any:
    if isinstance(val, torch.Tensor):
        t = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
        return t.requires_grad_(grad and (t.is_floating_point() or t.is_complex()))
    if isinstance(val, (list, tuple)):
        return type(val)(_fresh(v, grad) for v in val)
    return val


def _sid(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


class _SavedTensors(fx.Interpreter):
    """Runs a traced graph on the meta device and records what autograd saves."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.owner: dict[int, fx.Node] = {}
        self.saved: dict[int, tuple[int, tuple[int, ...], fx.Node]] = {}
        self.keep: list[torch.Tensor] = []  # alive, so storage ids are never reused
        self.node: fx.Node | None = None
        self.failed: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        try:
            out = super().run_node(n)
        except Exception:  # noqa: BLE001 - an op without a meta kernel: no saves counted
            self.failed.append(str(n.target))
            info = n.meta.get("tpc")
            grad = any(getattr(i, "requires_grad", False) for i in (info if isinstance(info, list) else [info]))
            out = _fresh(n.meta.get("val"), grad)
        for x in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(x, torch.Tensor):
                self.owner.setdefault(_sid(x), n)
                self.keep.append(x)
        return out

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        info = self.node.meta.get("tpc")  # type: ignore[union-attr]
        return _fresh(self.node.meta.get("val"), bool(getattr(info, "requires_grad", False)))  # type: ignore[union-attr]

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        n = self.node
        assert n is not None
        if is_block(n):  # its tensors are counted in its own unit
            return _fresh(n.meta.get("val"), True)
        if target in ATTENTION:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            mask = mask if isinstance(mask, torch.Tensor) else None
            return _Fused.apply(args[0], args[1], args[2], mask, tuple(n.meta["val"].shape))
        return super().call_function(target, args, kwargs)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        s = _sid(x)
        if s not in self.saved:
            self.saved[s] = (x.untyped_storage().nbytes(), tuple(x.shape), self.node)  # type: ignore[assignment]
        return x


def saved_terms(u: Unit, s0: int) -> tuple[list[Term], list[str]]:
    """The bytes kept for backward by one call of the unit, one term per saved tensor, and
    the ops that had no meta kernel."""
    it = _SavedTensors(u.gm)
    with torch.autograd.graph.saved_tensors_hooks(it.pack, lambda x: x):
        it.run()
    weights = set(u.t.params) | set(u.t.buffers) | set(u.t.consts)
    colwise = {k for k, v in u.styles.items() if v == "colwise"}
    out = []
    for s, (nbytes, shape, consumer) in it.saved.items():
        producer = it.owner.get(s)
        if producer is None or producer in weights:
            continue
        split = split_of(u.prop.layouts.get(producer))
        layer = layer_of(consumer) if consumer is not None else None
        if layer is not None and layer.name in colwise and split:
            split = 0  # the rewrite keeps the gathered (whole) input of colwise layers
        out.append(Term(float(nbytes), seq_power(shape, s0), split))
    return out, it.failed
