"""Blocks: the repeated children traced once, their signatures, and the opaque
``tpcompile.block`` op that stands for each call in the parent's graph."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

TracerName = Literal["auto", "export", "fx"]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False  # in the traced run: whether a gradient can flow back to it

    @property
    def rank(self) -> int:
        return len(self.shape)


# ----------------------------------------------------------------------------- blocks

def find_blocks(module: nn.Module) -> dict[str, nn.Module]:
    """Module path -> block, for every child of a ModuleList/ModuleDict below ``module``
    that is reachable without entering another block."""
    found: dict[str, nn.Module] = {}

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}{name}"
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and not _is_torch_leaf(child):
                found[path] = child
            else:
                visit(child, path + ".")

    visit(module, "")
    return found


def is_output_capture_hook(hook: Any) -> bool:
    """transformers' output-capturing forward hook (``output_attentions`` /
    ``output_hidden_states`` in transformers 5): installed for good on the attention
    modules and decoder layers by the first call that asks for those outputs, and inert
    unless that call's collector is active. A trace runs it with the forward (what it
    collects is traced as outputs); a layer computed inline never runs it."""
    return getattr(hook, "__module__", "").startswith("transformers.") and \
        getattr(hook, "__qualname__", "").endswith(".output_capturing_hook")


def captured_inside(block: nn.Module) -> bool:
    """Whether the call being traced has transformers collect an output (MoE router
    logits, attention weights) from a layer inside ``block``: those hooks must run, so
    the block is traced inline in its parent, what they collect traced with it. The
    block's own hook (its hidden states) runs on the opaque call."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collecting = _active_collector.get()
    return bool(collecting) and any(
        is_output_capture_hook(h) and inspect.getclosurevars(h).nonlocals.get("key") in collecting
        for name, m in block.named_modules() if name for h in m._forward_hooks.values())


def _is_torch_leaf(m: nn.Module) -> bool:
    return m.__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)


def block_signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures trace to the same graph (the same class for the block
    and every submodule, same parameter and buffer shapes, same plain Python settings,
    the very same other attribute objects: an activation function held as an attribute is
    baked into the traced graph), so one analysis serves them all. Submodule classes
    count on their own: ``nn.ReLU()`` and ``nn.SiLU()`` hold the same settings."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers())
    settings = []
    for path, sub in block.named_modules():
        settings.append((path, "__class__", type(sub)))
        for k, v in sorted(vars(sub).items()):
            if k in ("training", "_tpcompile_devices") or k.startswith("_") and k != "_forward_hooks":
                continue
            if k in INDEX_ATTRS and isinstance(v, int):
                continue  # the block's position (HF: for the KV cache); what it changes,
                # HF stores as attributes of their own (sliding_window, is_sliding)
            settings.append((path, k, _plain(v)))
    return (type(block), params, buffers, tuple(settings))


class _TensorSlot:
    """Where a tensor goes in a flattened structure of leaves (None is a leaf too)."""

    def __repr__(self) -> str:
        return "TENSOR"


TENSOR = _TensorSlot()


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)
INDEX_ATTRS = {"layer_idx", "layer_id", "layer_number", "block_idx"}


def _plain(v: Any, depth: int = 0) -> Any:
    """A hashable stand-in for an attribute value: plain values as they are, containers
    and config-like objects by their contents, anything else (a function, a tensor) by
    identity (the very same object)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)) and depth < 3:
        return (type(v).__name__, tuple(_plain(x, depth + 1) for x in v))
    if isinstance(v, dict) and depth < 3:
        return ("dict", tuple(sorted((str(k), _plain(x, depth + 1)) for k, x in v.items())))
    if depth < 2 and not isinstance(v, (nn.Module, torch.Tensor)) and not callable(v) and \
            hasattr(v, "__dict__"):
        return (type(v), tuple(sorted((k, _plain(x, depth + 1)) for k, x in vars(v).items())))
    return ("id", _Same(v))


class _Same:
    """An attribute value that counts by identity. Not its bare ``id``: once the object
    is gone a new one can get the same address, and a remembered trace would be taken for
    the new one's. It holds the object weakly where it can (a tensor attribute is not
    kept alive by the trace cache) and equals only the very same living object."""

    __slots__ = ("_id", "_ref")

    def __init__(self, obj: Any) -> None:
        self._id = id(obj)
        try:
            self._ref: Callable[[], Any] = weakref.ref(obj)
        except TypeError:  # not weakly referable: held
            self._ref = lambda: obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same) or other._id != self._id:
            return False
        mine = self._ref()
        return mine is not None and mine is other._ref()

    def __hash__(self) -> int:
        return self._id

    def __repr__(self) -> str:
        return f"<the object at {self._id:#x}>"


@dataclass
class BlockShapes:
    """What the parent's export needs to know of a block: its output structure, and for
    each tensor output the tensor input whose shape it has (and its dtype)."""

    out_leaves: list[Any]  # non-tensor leaves as they are, TENSOR where a tensor goes
    out_spec: pytree.TreeSpec
    like: list[tuple[int, torch.dtype]]


_SHAPES: dict[str, BlockShapes] = {}  # member path of a block call -> its shapes


@torch.library.custom_op("tpcompile::block", mutates_args=())
def block_op(member: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    raise RuntimeError("tpcompile::block is a tracing placeholder; it never runs")


@block_op.register_fake
def _block_fake(member: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[i].new_empty(tensors[i].shape, dtype=d) for i, d in _SHAPES[member].like]


BLOCK_OP = torch.ops.tpcompile.block.default


@dataclass
class BlockCall:
    """One call of a block in a parent graph: how to rebuild its (args, kwargs)."""

    member: str  # path relative to the parent module
    in_spec: pytree.TreeSpec
    in_leaves: list[Any]  # TENSOR where a tensor goes
    out_spec: pytree.TreeSpec
    out_leaves: list[Any]


def canonical_call(forward: Callable, args: tuple, kwargs: dict,
                   sig: inspect.Signature | None = None) -> tuple[tuple, dict]:
    """A call in one canonical form: arguments that can be named are passed by name, in
    the signature's order (extra keywords sorted), and optional ones passed as None are
    left out (the same, for a forward that defaults them to None). A None given for a
    parameter without that default (the reference Llama's ``mask`` for one token) is
    kept. Traces and the programs' lookups both use this form, so one structure means
    one program. ``sig``: ``forward``'s signature, where the caller holds it."""
    try:
        sig = sig or signature_of(forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(args), {k: v for k, v in sorted(kwargs.items()) if v is not None}
    pos: list[Any] = []
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            pos.append(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            pos.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update((k, v) for k, v in sorted(value.items()) if v is not None)
        elif value is not None or sig.parameters[name].default is not None:
            named[name] = value
    if any(p is None for p in pos):
        return tuple(args), {k: v for k, v in sorted(kwargs.items()) if v is not None}
    return tuple(pos), named


_SIGNATURES: dict[Any, inspect.Signature] = {}


def signature_of(fn: Callable) -> inspect.Signature:
    key = getattr(fn, "__func__", fn)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(fn)
    return _SIGNATURES[key]


class _NeedBlock(Exception):
    def __init__(self, member: str, args: tuple, kwargs: dict) -> None:
        super().__init__(f"block {member} not exported yet")
        self.member, self.args, self.kwargs = member, args, kwargs
