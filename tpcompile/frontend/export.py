"""``torch.export`` of one module behind a flat tensor-only call, and fx's lowering to
the same ATen IR (``tracer='fx'``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram

from ..errors import UnsupportedError, warn
from .blocks import TENSOR, BlockCall, _is_torch_leaf

# ----------------------------------------------------------------------------- export

@dataclass
class Traced:
    """One module's ATen graph and how its placeholders and outputs map to the module."""

    gm: fx.GraphModule
    ep: ExportedProgram
    tracer: str
    in_spec: pytree.TreeSpec  # of the call's (args, kwargs), in canonical form
    inputs: list[fx.Node]  # tensor-input placeholders, in the order of the flat call
    constants: dict[int, Any]  # flat position -> non-tensor leaf baked into the graph
    params: dict[fx.Node, str]  # placeholder -> parameter FQN (relative to the module)
    buffers: dict[fx.Node, str]
    consts: dict[fx.Node, str]  # lifted constant tensors: placeholder -> name in ep.constants
    out_spec: pytree.TreeSpec
    outputs: list[Any]  # user outputs (nodes or constants)
    mutations: list[tuple[fx.Node, str]] = field(default_factory=list)  # (value, buffer FQN)
    blocks: dict[fx.Node, BlockCall] = field(default_factory=dict)
    ranges: dict[Any, tuple[int, float]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)  # flat position of each input
    out_type: Any = None  # the type of the module's output object
    input_grads: list[bool] = field(default_factory=list)  # per flat input: needs a gradient
    param_grads: dict[fx.Node, bool] = field(default_factory=dict)


class _Flat(nn.Module):
    """The traced module behind a forward of its tensor inputs alone: the call's other
    leaves (None, flags, ints) are constants of the trace, and any structure (kwargs,
    tuples, dataclasses) is rebuilt inside, so export sees only a tuple of tensors."""

    def __init__(self, inner: nn.Module, spec: pytree.TreeSpec, leaves: list[Any]) -> None:
        super().__init__()
        self.inner = inner
        self._spec, self._leaves = spec, leaves

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        a, k = pytree.tree_unflatten([next(it) if x is TENSOR else x for x in self._leaves],
                                     self._spec)
        before = _attributes(self.inner)
        try:
            out = self.inner(*a, **k)
        finally:
            self.assigned = _restore_attributes(self.inner, before)
        self.out_type = type(out)
        if isinstance(out, dict) and type(out) not in pytree.SUPPORTED_NODES:
            out = dict(out)  # a dict subclass pytree does not know: rebuilt by the runtime
        return out


def _export(module: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
            ) -> tuple[ExportedProgram, Any]:
    """Export ``module(*args, **kwargs)``. ``dynamic``: every dim of every tensor input is
    ``Dim.AUTO`` (export keeps dynamic what the code allows, batch and sequence, and
    specialises the rest, widths fixed by weights); otherwise the shapes are the example's
    (an export 5-8 times cheaper: a Llama-7B block takes 0.1 s instead of 0.7 s). Returns
    the program and the flat (leaves, spec) of the call."""
    import logging
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors = tuple(x for x in flat if isinstance(x, torch.Tensor))
    leaves = [TENSOR if isinstance(x, torch.Tensor) else x for x in flat]
    dims = tuple({i: Dim.AUTO for i in range(t.dim())} if t.dim() and dynamic else None
                 for t in tensors)
    log = logging.getLogger("torch._export.non_strict_utils")
    level = log.level
    log.setLevel(logging.ERROR)  # "0/1 specialized" notes for size-1 dims are expected
    try:
        flat_module = _Flat(module, spec, leaves)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The tensor attribute .* was assigned during export")
            ep = torch.export.export(flat_module, tensors, strict=False,
                                     dynamic_shapes={"tensors": dims})
        ep.__dict__["_tpcompile_out_type"] = getattr(flat_module, "out_type", None)
    finally:
        log.setLevel(level)
    _refuse_assignments(module, getattr(flat_module, "assigned", {}))
    return ep, (leaves, spec)


_NOT_STATE = frozenset({"forward", "training"})


def _attributes(module: nn.Module) -> dict[tuple[str, str], Any]:
    """Every plain attribute of every submodule (parameters, buffers and submodules live
    in their own dicts and are not here)."""
    return {(path, k): v for path, m in module.named_modules(remove_duplicate=False)
            for k, v in vars(m).items() if not k.startswith("_") and k not in _NOT_STATE}


def _restore_attributes(module: nn.Module, before: dict[tuple[str, str], Any]
                        ) -> dict[tuple[str, str], Any]:
    """Put back what the traced forward assigned; return {(module, attribute): value}."""
    after = _attributes(module)
    changed = {k: v for k, v in after.items() if k not in before or before[k] is not v}
    for (path, k), v in changed.items():
        m = module.get_submodule(path)
        if (path, k) in before:
            m.__dict__[k] = before[(path, k)]
        else:
            m.__dict__.pop(k, None)
    return changed


def _refuse_assignments(module: nn.Module, changed: dict[tuple[str, str], Any]) -> None:
    """The parallel program runs no Python, so an attribute the forward assigns (``self.last
    = x``, ``self.calls += 1``) would never change at run time: a tensor is refused, any
    other value is a warning."""
    for (path, k), v in sorted(changed.items(), key=lambda kv: kv[0]):
        owner = module.get_submodule(path)
        name = f"{path}.{k}" if path else k
        if any(isinstance(x, (torch.Tensor, fx.Proxy)) for x in pytree.tree_leaves(v)):
            raise UnsupportedError(
                f"{type(owner).__name__}.forward assigns a tensor to self.{k} ({name}), which "
                "the parallel program would never update (it runs no Python). Register it as "
                f"a buffer (self.register_buffer({k!r}, ..., persistent=False)) and update it "
                "in place, or return the tensor from forward.")
        warn(f"tpcompile: {type(owner).__name__}.forward assigns self.{k} ({name}); "
             "the parallel program runs no Python, so it will not change at run time")


def _fx_lowered(module: nn.Module, blocks: dict[str, nn.Module]) -> nn.Module:
    """``tracer='fx'``: symbolic_trace (blocks and torch layers as leaves), to be exported."""
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return any(m is b for b in blocks.values()) or _is_torch_leaf(m)

    before = _attributes(module)
    try:
        graph = _Tracer().trace(module)
    finally:
        assigned = _restore_attributes(module, before)
    _refuse_assignments(module, assigned)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)
