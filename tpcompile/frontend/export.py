"""``torch.export`` of one module behind a flat tensor-only call, and fx's lowering to
the same ATen IR (``tracer='fx'``)."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram

from ..errors import UnsupportedError, warn
from .blocks import TENSOR, BlockCall, _is_torch_leaf
from .guards import Condition

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
    unchecked: list[str] = field(default_factory=list)  # Functions whose own backward
    #   a frozen plan could not check (export._refuse_custom_backward)
    input_grads: list[bool] = field(default_factory=list)  # per flat input: needs a gradient
    param_grads: dict[fx.Node, bool] = field(default_factory=dict)
    # the export's shape conditions beyond ranges (guards.conditions_of)
    conditions: list[Condition] = field(default_factory=list)
    # blocks traced inline because the call has transformers collect outputs inside them
    # (frontend.blocks.captured_inside): what runs there per block (FSDP2's gathers,
    # checkpointing) does not run for them
    for_outputs: list[str] = field(default_factory=list)


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
    applied: dict[type, tuple[str, list]] = {}
    try:
        flat_module = _Flat(module, spec, leaves)
        with warnings.catch_warnings(), _functions_applied(applied):
            warnings.filterwarnings("ignore", "The tensor attribute .* was assigned during export")
            ep = torch.export.export(flat_module, tensors, strict=False,
                                     dynamic_shapes={"tensors": dims})
        ep.__dict__["_tpcompile_out_type"] = getattr(flat_module, "out_type", None)
    finally:
        log.setLevel(level)
    _refuse_assignments(module, getattr(flat_module, "assigned", {}))
    ep.__dict__["_tpcompile_unchecked"] = _refuse_custom_backward(module, applied) + \
        getattr(module, "_tpcompile_unchecked", [])  # fx: found by symbolic_trace
    return ep, (leaves, spec)


# Whether the model being planned wants gradients (any parameter requires them), decided
# once for the whole model by compile_model: a block traced alone, or the root traced with
# its blocks hidden, cannot tell from its own parameters (a frozen first block whose trace
# the trainable ones share; LoRA-style, the root frozen and the blocks trained).
GRADS = {"wanted": True}


@contextlib.contextmanager
def grads_wanted(wanted: bool) -> Iterator[None]:
    old = GRADS["wanted"]
    GRADS["wanted"] = wanted
    try:
        yield
    finally:
        GRADS["wanted"] = old


@contextlib.contextmanager
def _functions_applied(applied: dict[type, tuple[str, list]]) -> Iterator[None]:
    """Record each ``torch.autograd.Function`` of the model's own code (not torch's)
    applied while tracing: the line that applied it and what it was applied to (shapes
    and dtypes of the tensors, the other arguments as they are). The trace keeps only the
    ops of its forward; the rewritten program differentiates those, not its backward."""
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith(("torch.", "tpcompile.")) and cls not in applied:
            caller = sys._getframe(1)
            applied[cls] = (f"{caller.f_code.co_filename}:{caller.f_lineno}",
                            [_described(a) for a in args] if not kwargs else ["kwargs"])
        return original.__func__(cls, *args, **kwargs)

    base.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        base.apply = original  # type: ignore[method-assign]


@dataclass
class _TensorArg:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def _described(a: Any) -> Any:
    if isinstance(a, fx.Proxy):
        return None  # symbolic_trace's values have no shape to probe with
    if not isinstance(a, torch.Tensor):
        return a
    try:  # symbolic sizes (a dynamic trace) by their example values
        shape = tuple(int(s) if isinstance(s, int) else int(s.node.hint) for s in a.shape)
    except (TypeError, AttributeError):
        return None  # no size to probe with: the check below cannot run
    return _TensorArg(shape, a.dtype, a.requires_grad)


class _Ctx:
    """Stands in for a Function's ctx when its forward runs as plain differentiable ops."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None  # save_for_backward, mark_dirty, ...


def _backward_is_the_derivative(cls: type, described: list) -> str | None:
    """Why ``cls``'s own backward is not shown to give the gradients autograd takes of
    its forward's ops (what the traced program will compute), or None where it does, on
    random float64 inputs: a hand-written derivative (BLOOM's GeLU) passes; a
    straight-through or jittered estimator does not. Tried with every dim cut to at most
    8 (cheap at any model size), then, if that does not run, at the traced shapes when
    they are small."""
    if described == ["kwargs"]:
        return "it could not be checked: it is applied with keyword arguments"
    if not described or any(d is None for d in described):
        return "it could not be checked: no shapes to try it on (tracer='fx')"
    if any(isinstance(d, _TensorArg) and not d.dtype.is_floating_point for d in described):
        return "it could not be checked: it takes integer tensors, whose valid values are unknown"
    small = [_TensorArg(tuple(min(n, 8) for n in d.shape), d.dtype, d.requires_grad)
             if isinstance(d, _TensorArg) else d for d in described]
    verdict = _probe(cls, small)
    if verdict is None and sum(math.prod(d.shape) for d in described
                               if isinstance(d, _TensorArg)) <= 1 << 22:
        verdict = _probe(cls, described)
    if verdict is None:
        return "it could not be checked: it did not run on random CPU inputs"
    return None if verdict else "it is not the derivative of its forward (on random inputs)"


def _probe(cls: type, described: list) -> bool | None:
    """The comparison of ``_backward_is_the_derivative`` at these shapes (None: it did
    not run)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    g = torch.Generator()

    def inputs() -> list:
        g.manual_seed(0)
        return [torch.randn(d.shape, generator=g, dtype=torch.float64).requires_grad_(
            d.requires_grad) if isinstance(d, _TensorArg) else d for d in described]

    try:
        with unset_fake_temporarily(), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            xs, ys = inputs(), inputs()
            torch.manual_seed(0)  # a forward that draws (dropout): the same draws both times
            theirs = pytree.tree_leaves(cls.apply(*xs))
            torch.manual_seed(0)
            takes_ctx = not torch.autograd.function._is_setup_context_defined(cls.setup_context)
            plain = pytree.tree_leaves(cls.forward(_Ctx(), *ys) if takes_ctx else cls.forward(*ys))
            pairs = [(a, b) for a, b in zip(theirs, plain) if isinstance(a, torch.Tensor)
                     and a.requires_grad and isinstance(b, torch.Tensor) and b.requires_grad]
            wanted = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
            mine = [y for y in ys if isinstance(y, torch.Tensor) and y.requires_grad]
            if not wanted or not pairs or len(theirs) != len(plain):
                return False
            ups = [torch.randn(a.shape, generator=g, dtype=a.dtype) for a, _ in pairs]
            a = torch.autograd.grad([a for a, _ in pairs], wanted, ups, allow_unused=True)
            b = torch.autograd.grad([b for _, b in pairs], mine, ups, allow_unused=True)
    except Exception:  # noqa: BLE001 - did not run at these shapes
        return None
    # relative to each gradient's size: a backward computed in float32 inside (an RMSNorm
    # kernel's) is the derivative to ~1e-5; an estimator is off by O(1)
    return all((u is None and v is None) or (u is not None and v is not None and
               float((u - v).norm()) <= 1e-4 * max(float(v.norm()), 1e-12))
               for u, v in zip(a, b))


def _refuse_custom_backward(module: nn.Module, applied: dict[type, tuple[str, list]]
                            ) -> list[str]:
    """A Function's own backward (a straight-through estimator, a router's gradient
    estimator) cannot survive the trace: where the model wants gradients and it is not
    shown to be the derivative of its forward, refused, rather than differentiating its
    forward into wrong gradients. A frozen model plans; the reasons are returned, for
    the runtime to refuse a call that wants gradients after all."""
    unchecked = []
    for cls, (line, described) in applied.items():
        why = _backward_is_the_derivative(cls, described)
        if why is None:
            continue
        said = (f"{type(module).__name__} applies {cls.__module__}.{cls.__qualname__}, a "
                f"torch.autograd.Function with a backward of its own (at {line}); {why}. "
                "tpcompile traces the ops of its forward, and the parallel program would "
                "differentiate those instead of running that backward: its gradients could "
                "be wrong")
        if GRADS["wanted"]:
            raise UnsupportedError(
                f"{said}. For inference, freeze the parameters first "
                "(model.requires_grad_(False)); for training, write it with plain tensor "
                "ops, or keep this model unparallelized.")
        unchecked.append(said)
    return unchecked


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
    applied: dict[type, tuple[str, list]] = {}
    try:
        with _functions_applied(applied):  # symbolic_trace runs its forward inline too
            graph = _Tracer().trace(module)
    finally:
        assigned = _restore_attributes(module, before)
    _refuse_assignments(module, assigned)
    unchecked = _refuse_custom_backward(module, applied)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm.__dict__["_tpcompile_unchecked"] = unchecked
    return gm
