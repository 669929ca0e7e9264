"""Stage 4: rewrite a traced graph into an SPMD graph on local shards.

The new graph computes on plain local tensors. It reads each parameter through the
live module (``self.attention.wq.weight``), takes its local shard (``p.to_local()``),
and calls the conversions of :mod:`tpcompile.collectives` where a producer's layout
differs from what its consumer needs. The generated Python is bound as ``forward`` of
the original module objects, so parameter names, ``state_dict`` keys and module hooks
(FSDP2's included) stay exactly the user's.
"""

from __future__ import annotations

import operator
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from . import collectives as C
from . import ops
from .analyze import NORM_MODULES, Contract, Propagation, submodule, where
from .errors import PlanError
from .ops import Layout, R, info
from .plan import PLACEMENTS
from .trace import TensorInfo


@dataclass
class Rewritten:
    graph: fx.Graph
    forward: Callable  # unbound: forward(self, *args)
    code: str


@dataclass(frozen=True)
class Site:
    """Why a collective node is in the rewritten graph (``node.meta["tpc_site"]``): the
    layer or edge it serves, and the full (logical) tensor it moves."""

    at: str
    why: str
    tensor: TensorInfo
    src: str | None = None  # the original graph's node names of the edge, if any
    dst: str | None = None


_WHY = {
    ("R", "E"): "input of colwise layers: gradient summed over tp",
    ("Q", "E"): "sequence-parallel input of colwise layers",
    ("S", "R"): "sharded tensor read replicated",
    ("Q", "R"): "sequence-sharded tensor read replicated",
    ("R", "S"): "replicated tensor split (gradient gathered)",
    ("R", "Q"): "replicated tensor split on the sequence",
}


def _conversion(x: fx.Node, src: Layout, dst: Layout, g: fx.Graph, group: str) -> fx.Node:
    k = (src.kind, dst.kind)
    if k == ("R", "E"):
        return g.call_function(C.enter, (x, group))
    if k == ("Q", "E"):
        return g.call_function(C.sp_gather, (x, src.dim, group))
    if src.sharded and dst.kind == "R":
        return g.call_function(C.gather, (x, src.dim, group))
    if src.kind == "R" and dst.sharded:
        return g.call_function(C.split, (x, dst.dim, group))
    raise PlanError(f"no conversion from {src} to {dst}")


_RANDOM_MODULES = (nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _random_name(target: Any) -> str:
    return next(name for name, fn in C.RANDOM_OPS.items() if fn is target)


def _draws_random(n: fx.Node, mod: nn.Module | None) -> bool:
    """Dropout (a function, a module, or sdpa's ``dropout_p``): on a sharded tensor every
    rank must draw its own mask, or the shards' masks repeat each other."""
    if n.op == "call_module":
        return isinstance(mod, _RANDOM_MODULES)
    if n.target is F.scaled_dot_product_attention:
        p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        return p != 0.0
    return n.op == "call_function" and any(n.target is fn for fn in C.RANDOM_OPS.values())


class _Builder:
    def __init__(self, gm: fx.GraphModule, prop: Propagation, styles: dict[str, str],
                 q_nodes: set[fx.Node], tp: int, group: str, contracts: dict[str, Contract],
                 loss_parallel: bool = False):
        self.gm, self.prop, self.styles, self.q = gm, prop, styles, q_nodes
        self.tp, self.group, self.contracts = tp, group, contracts
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.conv: dict[tuple[fx.Node, Layout], fx.Node] = {}
        self.params: dict[str, fx.Node] = {}
        self.loss_parallel = loss_parallel
        self.gathered: dict[Any, fx.Node] = {}

    # -- parameters: read once at the top; replicated ones feeding Q ops get synced grads
    def _params(self) -> None:
        names = dict(self.gm.named_parameters())
        used: list[str] = []
        sync: set[str] = set()
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and n.target in names:
                used.append(n.target)
                if any(u in self.q for u in n.users):
                    sync.add(n.target)
            mod = submodule(self.gm, n)
            if mod is not None and n.target not in self.contracts and not self._opaque(mod):
                for pn, _ in mod.named_parameters(recurse=False):
                    full = f"{n.target}.{pn}"
                    used.append(full)
                    if n in self.q and (isinstance(mod, NORM_MODULES) or pn == "bias"):
                        sync.add(full)
        for name in dict.fromkeys(used):
            self.params[name] = self.g.call_function(C.local, (self.g.get_attr(name),))
        if sync:
            order = [s for s in self.params if s in sync]
            out = self.g.call_function(C.sync_grads, (self.group, *[self.params[s] for s in order]))
            ps = [self.gm.get_parameter(s) for s in order]
            out.meta["tpc_site"] = Site(
                ", ".join(order), "gradients of replicated parameters used on sequence shards",
                TensorInfo((sum(p.numel() for p in ps),), ps[0].dtype, True))
            for i, s in enumerate(order):
                self.params[s] = self.g.call_function(operator.getitem, (out, i))

    @staticmethod
    def _opaque(mod: nn.Module) -> bool:
        return not isinstance(mod, (nn.Linear, nn.Embedding, *NORM_MODULES))

    # -- values with conversions
    def value(self, p: fx.Node, consumer: fx.Node) -> Any:
        v = self.env[p]
        if not isinstance(v, fx.Node) or p.meta.get("tpc") is None:
            return v
        src = self.prop.layouts.get(p, R)
        dst = self.prop.need.get(consumer, {}).get(p, R)
        if src == dst:
            return v
        key = (p, dst)
        if key not in self.conv:
            node = _conversion(v, src, dst, self.g, self.group)
            node.meta["tpc_site"] = Site(f"{p.name} -> {where(consumer)}", _WHY[(src.kind, dst.kind)],
                                         info(p), p.name, consumer.name)  # type: ignore[arg-type]
            self.conv[key] = node
        return self.conv[key]

    def args(self, node: fx.Node) -> tuple[Any, Any]:
        f = lambda p: self.value(p, node)  # noqa: E731
        return map_arg(node.args, f), map_arg(node.kwargs, f)

    # -- the walk
    def build(self) -> fx.Graph:
        nodes = list(self.gm.graph.nodes)
        for n in nodes:
            if n.op == "placeholder":
                self.env[n] = self.g.node_copy(n, lambda x: self.env[x])
        self._params()
        for n in nodes:
            if n.op == "placeholder":
                continue
            self.env[n] = self._node(n)
        return self.g

    def _node(self, n: fx.Node) -> Any:
        g = self.g
        if n.op == "get_attr":
            return self._direct_read(n)
        if n.op == "output":
            if self.loss_parallel:
                return g.output(map_arg(n.args[0], self._sharded_output))
            a, _ = self.args(n)
            return g.output(a[0])
        mod = submodule(self.gm, n)
        if isinstance(mod, nn.Linear):
            return self._linear(n, mod)
        if isinstance(mod, nn.Embedding):
            return self._embedding(n, mod)
        if isinstance(mod, NORM_MODULES):
            return self._norm(n, mod)
        if mod is not None and n.target not in self.contracts and any(
                True for _ in mod.parameters()):
            a, k = self.args(n)
            return g.call_function(C.module_call, (g.get_attr(n.target), *a), k)
        src_lay = self._sharded_input(n)
        if src_lay is not None and ops.is_meta_op(n):
            return self._meta(n, src_lay)
        lay = self.prop.layouts.get(n, R)
        if lay.sharded and _draws_random(n, mod):  # each rank's shard its own mask
            a, k = self.args(n)
            # a module is passed as itself; a function by its name in C.RANDOM_OPS
            fn = g.get_attr(n.target) if n.op == "call_module" else _random_name(n.target)
            return g.call_function(C.on_rank_rng, (fn, self.group, *a), k)
        if lay.kind == "S" and n.op in ("call_method", "call_function") and (
                n.target in ops.SIZED_METHODS or n.target in ops.SIZED_FUNCTIONS):
            return self._sized_view(n, lay)
        a, k = self.args(n)
        return g.create_node(n.op, n.target, a, k, n.name)

    def _direct_read(self, n: fx.Node) -> fx.Node:
        """``self.w1.weight`` read in the forward itself (a regulariser, a tied head):
        a sharded parameter is gathered to full, so the code sees what it saw before."""
        p = self.params.get(n.target)
        if p is None:
            return self.g.get_attr(n.target)
        owner, _, pname = str(n.target).rpartition(".")
        placement = PLACEMENTS.get((self.styles.get(owner), pname))
        if placement is None:
            return p
        if n.target not in self.gathered:
            full = self.gm.get_parameter(str(n.target))
            node = self.g.call_function(C.gather, (p, placement.dim, self.group))
            node.meta["tpc_site"] = Site(str(n.target), "sharded parameter read directly",
                                         TensorInfo(tuple(full.shape), full.dtype, True))
            self.gathered[n.target] = node
        return self.gathered[n.target]

    def _sharded_output(self, p: fx.Node) -> Any:
        lay = self.prop.layouts.get(p, R)
        if lay.kind == "S":
            return self.g.call_function(C.as_dtensor, (self.env[p], lay.dim, self.group))
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        return self.value(p, out)

    def _sharded_input(self, n: fx.Node) -> Layout | None:
        x = n.args[0] if n.args else None
        if isinstance(x, fx.Node):
            lay = self.prop.layouts.get(x, R)
            return lay if lay.sharded else None
        return None

    def _linear(self, n: fx.Node, mod: nn.Linear) -> fx.Node:
        g, style = self.g, self.styles.get(n.target)
        x = self.value(n.args[0], n)
        w, b = self.params[f"{n.target}.weight"], self.params.get(f"{n.target}.bias")
        if style != "rowwise":
            return g.call_function(F.linear, (x, w, b))
        y = g.call_function(F.linear, (x, w, None))
        y = self._reduce(n, y)
        return g.call_function(torch.add, (y, b)) if b is not None else y

    def _reduce(self, n: fx.Node, partial: fx.Node) -> fx.Node:
        style = self.styles.get(n.target)
        if n in self.q:
            out = self.g.call_function(C.reduce_scatter, (partial, 1, self.group))
            why = f"{style} partial sums, to sequence shards"
        else:
            out = self.g.call_function(C.all_reduce, (partial, self.group))
            why = f"{style} partial sums"
        out.meta["tpc_site"] = Site(str(n.target), why, info(n), n.name)  # type: ignore[arg-type]
        return out

    def _embedding(self, n: fx.Node, mod: nn.Embedding) -> fx.Node:
        ids, w = self.value(n.args[0], n), self.params[f"{n.target}.weight"]
        if self.styles.get(n.target) == "vocab_parallel":
            return self._reduce(n, self.g.call_function(C.vocab_embedding, (ids, w, self.group)))
        return self.g.call_function(C.module_call, (self.g.get_attr(n.target), ids))

    def _norm(self, n: fx.Node, mod: nn.Module) -> fx.Node:
        x = self.value(n.args[0], n)
        w, b = self.params.get(f"{n.target}.weight"), self.params.get(f"{n.target}.bias")
        shape = tuple(mod.normalized_shape)
        if isinstance(mod, nn.LayerNorm):
            return self.g.call_function(F.layer_norm, (x, shape, w, b, mod.eps))
        return self.g.call_function(F.rms_norm, (x, shape, w, mod.eps))

    def _meta(self, n: fx.Node, lay: Layout) -> fx.Node:
        x = self.env[n.args[0]]
        g = self.g
        if n.target == "numel":
            return g.call_function(C.logical_numel, (x, lay.dim, self.tp))
        if n.target == "size":
            rest = map_arg(n.args[1:], lambda p: self.env[p])
            return g.call_function(C.logical_size, (x, lay.dim, self.tp, *rest),
                                   {k: self.env.get(v, v) for k, v in n.kwargs.items()})
        if n.op == "call_function" and n.args[1] == "shape":
            return g.call_function(C.logical_shape, (x, lay.dim, self.tp))
        a, k = self.args(n)
        return g.create_node(n.op, n.target, a, k, n.name)

    def _sized_view(self, n: fx.Node, lay: Layout) -> fx.Node:
        """``x.view(b, s, n_heads, hd)`` on a shard -> ``x.view(b, s, n_heads // tp, hd)``."""
        x = self.value(n.args[0], n)
        rest = map_arg(n.args[1:], lambda p: self.env[p])
        if n.target in ("unflatten", torch.unflatten):
            d0 = ops.norm_dim(rest[0], info(n.args[0]).rank)  # type: ignore[union-attr]
            sizes = self.g.call_function(C.localize_shape, (tuple(rest[1]), lay.dim - d0, self.tp))
            return self.g.create_node(n.op, n.target, (x, rest[0], sizes), {}, n.name)
        shape = rest[0] if len(rest) == 1 else tuple(rest)
        if not shape and "shape" in n.kwargs:
            shape = self.env.get(n.kwargs["shape"], n.kwargs["shape"])
        if isinstance(shape, fx.Node):
            shape = (shape,)
        sizes = self.g.call_function(C.localize_shape, (tuple(shape), lay.dim, self.tp))
        return self.g.create_node(n.op, n.target, (x, sizes), {}, n.name)


def rewrite(gm: fx.GraphModule, prop: Propagation, styles: dict[str, str],
            q_nodes: set[fx.Node], tp: int, group: str, contracts: dict[str, Contract],
            loss_parallel: bool = False) -> Rewritten:
    """The SPMD program of one traced module. ``loss_parallel``: outputs sharded on their
    features (a colwise head's logits) are returned as DTensors ``Shard(-1)`` on the tp
    mesh instead of being gathered, for a vocab-parallel loss."""
    graph = _Builder(gm, prop, styles, q_nodes, tp, group, contracts, loss_parallel).build()
    graph.lint()
    code = graph.python_code(root_module="self")
    scope: dict[str, Any] = dict(code.globals)
    exec(compile(code.src, f"<tpcompile:{type(gm).__name__}>", "exec"), scope)
    return Rewritten(graph, scope["forward"], code.src)


def install(module: nn.Module, rw: Rewritten, rw_eval: Rewritten | None = None) -> None:
    """Make ``module`` run the rewritten program (an instance attribute shadows the class
    ``forward``; parameters are still looked up on the module at every call). With
    ``rw_eval`` (a forward that reads ``self.training``), the program follows the mode."""
    if rw_eval is None or rw_eval.code == rw.code:
        module.forward = types.MethodType(rw.forward, module)  # type: ignore[method-assign]
        module.__dict__["_tpcompile_code"] = rw.code
        return
    train_forward, eval_forward = rw.forward, rw_eval.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return (train_forward if self.training else eval_forward)(self, *args, **kwargs)

    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    module.__dict__["_tpcompile_code"] = rw.code
    module.__dict__["_tpcompile_code_eval"] = rw_eval.code
