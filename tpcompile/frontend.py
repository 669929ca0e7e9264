"""Stage 1: the front end. A module goes in, an ATen graph (``torch.export``'s training IR)
comes out, with its blocks kept as opaque calls.

Every trace runs on a *skeleton*: a structural copy of the user's model whose parameters
and buffers live on the meta device. Tracing therefore never touches the user's model
(no proxies left in its buffers, nothing changed when a trace fails) and costs no memory.

Repeated blocks (the children of an ``nn.ModuleList`` / ``nn.ModuleDict``) are exported
once per distinct signature. In the graph of their parent each call of a block is one
node, ``torch.ops.tpcompile.block(member, tensors)``: an opaque custom op whose fake
implementation gives the shapes the block's own export found. The block inputs are
learnt while exporting the parent: the first call of an unknown block stops that export,
the block is exported on the inputs it was about to get, and the parent is exported again.

``tracer="fx"`` runs ``torch.fx.symbolic_trace`` first and exports the traced
``GraphModule``: both front ends end in the same ATen IR, read by one op table.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
import inspect
import warnings
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from .errors import TPCompileError, TraceError, UnsupportedError

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


def _is_torch_leaf(m: nn.Module) -> bool:
    return m.__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)


def block_signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures trace to the same graph (same class, same parameter and
    buffer shapes, same plain Python settings, the very same other attribute objects: an
    activation function held as an attribute is baked into the traced graph), so one
    analysis serves them all."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers())
    settings = []
    for path, sub in block.named_modules():
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
    return ("id", id(v))


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


def canonical_call(forward: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call in one canonical form: arguments that can be named are passed by name, in
    the signature's order (extra keywords sorted), and optional ones passed as None are
    left out (the same, for a forward that defaults them to None). A None given for a
    parameter without that default (the reference Llama's ``mask`` for one token) is
    kept. Traces and the programs' lookups both use this form, so one structure means
    one program."""
    try:
        sig = _signature(forward)
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


def _signature(fn: Callable) -> inspect.Signature:
    key = getattr(fn, "__func__", fn)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(fn)
    return _SIGNATURES[key]


class _NeedBlock(Exception):
    def __init__(self, member: str, args: tuple, kwargs: dict) -> None:
        super().__init__(f"block {member} not exported yet")
        self.member, self.args, self.kwargs = member, args, kwargs


# ----------------------------------------------------------------------------- skeleton

def skeleton(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device (tied
    parameters stay tied; hooks and Python attributes are copied). The device each
    tensor really lives on is kept, so traces see the devices the model runs on.
    ``param_dtype``: floating parameters in this dtype (FSDP2's mixed precision computes
    with parameters cast to it, and a trace bakes dtypes in)."""
    memo: dict[int, Any] = {}
    devices: dict[int, torch.device] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        cast = param_dtype if isinstance(t, nn.Parameter) and t.is_floating_point() else None
        meta = torch.empty_like(t, device="meta", dtype=cast or t.dtype)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        devices[id(memo[id(t)])] = t.device
    try:
        sk = copy.deepcopy(model, memo)
    except Exception as e:  # noqa: BLE001 - an object deepcopy cannot take
        raise TraceError(f"could not copy {type(model).__name__} for tracing: {e}. tpcompile "
                         "traces a meta-device copy so your model is never changed; make "
                         "its attributes copyable (copy.deepcopy)") from e
    sk.__dict__["_tpcompile_devices"] = devices
    return sk


@contextlib.contextmanager
def fake_state(sk: nn.Module) -> Iterator[FakeTensorMode]:
    """Give the skeleton fake parameters and buffers on their real devices (no storage),
    in a fresh FakeTensorMode, for the duration of a trace."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    devices: dict[int, torch.device] = sk.__dict__.get("_tpcompile_devices", {})
    fakes: dict[int, Any] = {}
    saved = []
    for mod in sk.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is None:
                    continue
                device = devices.get(id(t), t.device)
                if device.type == "meta":
                    continue  # export fakes a meta tensor as it is: nothing to swap
                if id(t) not in fakes:
                    with mode:
                        f = torch.empty(t.shape, dtype=t.dtype, device=device)
                    fakes[id(t)] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f
                saved.append((store, k, t))
                store[k] = fakes[id(t)]
    try:
        yield mode
    finally:
        for store, k, t in saved:
            store[k] = t


def fake_like(mode: FakeTensorMode, x: Any) -> Any:
    """A fake tensor of the same shape, dtype and device (a described tensor too)."""
    if isinstance(x, _Described):
        shape, dtype, device, grad = x.shape, x.dtype, x.device, x.requires_grad
    elif isinstance(x, torch.Tensor):
        shape, dtype, device, grad = tuple(x.shape), x.dtype, x.device, x.requires_grad
    else:
        return x
    with mode:
        return torch.empty(shape, dtype=dtype, device=device,
                           requires_grad=grad and (dtype.is_floating_point or dtype.is_complex))


@dataclass
class _Described:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _Described(tuple(_hint(s) for s in x.shape), x.dtype, x.device, x.requires_grad)
    return x


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        h = s.node.hint
        return int(h) if h is not None else int(s)
    return int(s)


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


def _export(module: nn.Module, args: tuple, kwargs: dict) -> tuple[ExportedProgram, Any]:
    """Export ``module(*args, **kwargs)``; every dim of every tensor input is
    ``Dim.AUTO`` (export keeps dynamic what the code allows, batch and sequence, and
    specialises the rest, widths fixed by weights). Returns the program and the flat
    (leaves, spec) of the call."""
    import logging
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors = tuple(x for x in flat if isinstance(x, torch.Tensor))
    leaves = [TENSOR if isinstance(x, torch.Tensor) else x for x in flat]
    dims = tuple({i: Dim.AUTO for i in range(t.dim())} if t.dim() else None for t in tensors)
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
        warnings.warn(f"tpcompile: {type(owner).__name__}.forward assigns self.{k} ({name}); "
                      "the parallel program runs no Python, so it will not change at run "
                      "time", stacklevel=2)


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


_CACHE: "OrderedDict[Any, tuple[Traced, list]]" = OrderedDict()
_CACHE_SIZE = 64


def clear_cache() -> None:
    """Forget remembered traces (benchmarks time tracing itself)."""
    _CACHE.clear()


def _trace_key(module: nn.Module, args: tuple, kwargs: dict, tracer: str, where: str) -> Any:
    flat, spec = pytree.tree_flatten((args, kwargs))
    leaves = tuple((tuple(x.shape), x.dtype, x.device, x.requires_grad)
                   if isinstance(x, torch.Tensor) else ("leaf", _plain(x)) for x in flat)
    modes = tuple(m.training for m in module.modules())
    devices = tuple(t.device for t in [*module.parameters(), *module.buffers()])
    return (block_signature(module), modes, devices, repr(spec), leaves, tracer, where)


def trace(module: nn.Module, args: tuple, kwargs: dict, *, tracer: TracerName, where: str,
          on_block: Callable[[str, nn.Module, tuple, dict], BlockShapes],
          mode: FakeTensorMode) -> Traced:
    """:func:`trace_module`, remembered: a model of the same structure traced on inputs
    of the same description (shapes, dtypes, structure, mode) gives the same graph, so
    the second time only the block requests are replayed (planning the same model again
    costs milliseconds)."""
    try:
        key = _trace_key(module, args, kwargs, tracer, where)
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        t, requested = _CACHE[key]
        blocks = find_blocks(module)
        for rel, a, k in requested:
            a, k = pytree.tree_map(lambda x: fake_like(mode, x), (a, k),
                                   is_leaf=lambda x: isinstance(x, _Described))
            on_block(rel, blocks[rel], a, k)
        return t
    requested: list = []
    t = trace_module(module, args, kwargs, tracer=tracer, where=where, on_block=on_block,
                     mode=mode, requested=requested)
    if key is not None:
        _CACHE[key] = (t, requested)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return t


def trace_module(module: nn.Module, args: tuple, kwargs: dict, *, tracer: TracerName,
                 where: str, on_block: Callable[[str, nn.Module, tuple, dict], BlockShapes],
                 mode: FakeTensorMode, requested: list | None = None) -> Traced:
    """Export ``module`` (part of a skeleton in :func:`fake_state`) on ``args``/``kwargs``
    (fake tensors of ``mode``) with its blocks opaque. ``on_block(member, block, args,
    kwargs)`` is called for each block signature not seen yet and returns its shapes (it
    exports the block, recursively)."""
    blocks = find_blocks(module)
    sigs = {rel: block_signature(b) for rel, b in blocks.items()}
    known: dict[tuple, BlockShapes] = {}
    calls: list[BlockCall] = []
    raised: list[_NeedBlock] = []  # this trace's own requests (not a nested trace's)
    label = where or type(module).__name__

    def patched(rel: str) -> Callable:
        def forward(*a: Any, **k: Any) -> Any:
            a, k = canonical_call(type(blocks[rel]).forward.__get__(blocks[rel]), a, k)
            flat, spec = pytree.tree_flatten((a, k))
            shapes = known.get(sigs[rel])
            if shapes is None:
                ex = pytree.tree_unflatten([_describe(x) for x in flat], spec)
                raised.append(_NeedBlock(rel, *ex))
                raise raised[-1]
            key = f"{where}/{rel}#{len(calls)}"
            _SHAPES[key] = shapes
            calls.append(BlockCall(rel, spec, [TENSOR if isinstance(x, torch.Tensor) else x
                                               for x in flat], shapes.out_spec, shapes.out_leaves))
            outs = iter(torch.ops.tpcompile.block(key, [x for x in flat if isinstance(x, torch.Tensor)]))
            leaves = [next(outs) if o is TENSOR else o for o in shapes.out_leaves]
            return pytree.tree_unflatten(leaves, shapes.out_spec)
        return forward

    errors: dict[str, str] = {}
    for front in (["export", "fx"] if tracer == "auto" else [tracer]):
        for _ in range(len(set(sigs.values())) + 1):
            calls.clear()
            for rel, b in blocks.items():
                b.forward = patched(rel)  # type: ignore[method-assign]
            try:
                with _hollow(module, blocks):
                    target = module if front == "export" else _fx_lowered(module, blocks)
                    ep, (leaves, spec) = _export(target, args, kwargs)
            except _NeedBlock as need:
                _unpatch(blocks)
                known[sigs[need.member]] = _on_need(need, blocks, on_block, mode, requested)
                continue
            except TPCompileError:
                _unpatch(blocks)
                raise
            except Exception as e:  # noqa: BLE001 - export raises many types
                _unpatch(blocks)
                need = _find_need(e, raised)
                if need is not None:
                    known[sigs[need.member]] = _on_need(need, blocks, on_block, mode, requested)
                    continue
                errors[front] = f"{type(e).__name__}: {_first_line(e)}{_user_frame(e)}"
                break
            _unpatch(blocks)
            t = _read(ep, front, calls, leaves, spec)
            t.out_type = ep.__dict__.get("_tpcompile_out_type")
            flat = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            t.input_grads = [bool(x.requires_grad) for x in flat]
            t.param_grads = {ph: module.get_parameter(fqn).requires_grad for ph, fqn in t.params.items()}
            return t
    said = "; ".join(f"torch.{'export' if f == 'export' else 'fx'} said: {m}" for f, m in errors.items())
    shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    raise TraceError(
        f"could not trace {label} ({type(module).__name__}) on inputs of shapes {shapes}: "
        f"{said}. Make the forward free of "
        "Python control flow on tensor values, or pass example_inputs=(...) / "
        "example_kwargs={...} that the model accepts.")


def _on_need(need: _NeedBlock, blocks: dict[str, nn.Module], on_block: Callable,
             mode: FakeTensorMode, requested: list | None) -> BlockShapes:
    if requested is not None:
        requested.append((need.member, need.args, need.kwargs))
    a, k = pytree.tree_map(lambda x: fake_like(mode, x), (need.args, need.kwargs),
                           is_leaf=lambda x: isinstance(x, _Described))
    return on_block(need.member, blocks[need.member], a, k)


@contextlib.contextmanager
def _hollow(module: nn.Module, blocks: dict[str, nn.Module]) -> Iterator[None]:
    """While the parent is exported its blocks are opaque calls: hide their parameters
    and buffers (export would lift every one of them, 80 blocks' worth), except those
    the parent's own modules hold too (a weight tied across the boundary)."""
    inside = {id(m) for b in blocks.values() for m in b.modules()}
    outside = {id(t) for m in module.modules() if id(m) not in inside
               for t in [*m._parameters.values(), *m._buffers.values()] if t is not None}
    saved = []
    for b in blocks.values():
        for m in b.modules():
            for store in (m._parameters, m._buffers):
                for k, t in list(store.items()):
                    if t is not None and id(t) not in outside:
                        saved.append((store, k, t))
                        del store[k]
    try:
        yield
    finally:
        for store, k, t in saved:
            store[k] = t


def _unpatch(blocks: dict[str, nn.Module]) -> None:
    for b in blocks.values():
        b.__dict__.pop("forward", None)


def _find_need(e: BaseException | None, raised: list[_NeedBlock]) -> _NeedBlock | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if any(e is r for r in raised):
            return e  # type: ignore[return-value]
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:400] if text else ""


def _user_frame(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/tpcompile/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}: {f.line})"


def _inner(fqn: str) -> str:
    return fqn.removeprefix("inner.")


def _read(ep: ExportedProgram, tracer: str, calls: list[BlockCall], leaves: list[Any],
          in_spec: pytree.TreeSpec) -> Traced:
    gm = ep.graph_module
    sig = ep.graph_signature
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs: list[fx.Node] = []
    constants = {i: x for i, x in enumerate(leaves) if x is not TENSOR}
    params: dict[fx.Node, str] = {}
    buffers: dict[fx.Node, str] = {}
    consts: dict[fx.Node, str] = {}
    for ph, spec in zip(phs, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            if isinstance(spec.arg, ConstantArgument):
                raise UnsupportedError("export kept a non-tensor input; please report this")
            inputs.append(ph)
        elif spec.kind == InputKind.PARAMETER:
            params[ph] = _inner(spec.target)  # type: ignore[arg-type]
        elif spec.kind == InputKind.BUFFER:
            buffers[ph] = _inner(spec.target)  # type: ignore[arg-type]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            consts[ph] = spec.target  # type: ignore[assignment]
        else:
            raise UnsupportedError(f"exported input of kind {spec.kind.name} is not supported yet")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    outputs: list[Any] = []
    mutations: list[tuple[fx.Node, str]] = []
    for o, spec in zip(outs, sig.output_specs):
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(o)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            mutations.append((o, _inner(spec.target)))  # type: ignore[arg-type]
        else:
            raise UnsupportedError(f"exported output of kind {spec.kind.name} (an input "
                                   "changed in place) is not supported yet")
    block_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is BLOCK_OP]
    blocks = {n: calls[int(n.args[0].rsplit("#", 1)[1])] for n in block_nodes}
    ranges = {s: (int(r.lower), float(r.upper)) for s, r in ep.range_constraints.items()}
    positions = [i for i, x in enumerate(leaves) if x is TENSOR]
    return Traced(gm, ep, tracer, in_spec, inputs, constants, params, buffers,
                  consts, ep.call_spec.out_spec, outputs, mutations, blocks, ranges, positions)


def shapes_of(t: Traced) -> BlockShapes:
    """A block's output structure and the input each tensor output is shaped like."""
    tensor_inputs = [p for p in t.inputs if isinstance(p.meta.get("val"), torch.Tensor)]
    leaves: list[Any] = []
    like: list[tuple[int, torch.dtype]] = []
    flat_outs = [o.meta["val"] if isinstance(o, fx.Node) else o for o in t.outputs]
    for o in flat_outs:
        if not isinstance(o, torch.Tensor):
            leaves.append(o)
            continue
        j = next((j for j, p in enumerate(tensor_inputs)
                  if tuple(p.meta["val"].shape) == tuple(o.shape)), None)
        if j is None:
            raise UnsupportedError(
                f"a block output of shape {list(o.shape)} is shaped like none of the block's "
                "inputs; tpcompile keeps blocks opaque in their parent only when each output "
                "has the shape of an input (hidden states in, hidden states out)")
        leaves.append(TENSOR)
        like.append((j, o.dtype))
    return BlockShapes(leaves, t.out_spec, like)


def annotate(t: Traced) -> None:
    """``node.meta['tpc']``: a TensorInfo (example sizes; whether a gradient reaches it,
    from the dataflow) per tensor node, a list for tuple outputs, None otherwise."""
    grads: dict[fx.Node, bool] = {}
    inputs = {p: g for p, g in zip(t.inputs, t.input_grads)}
    for n in t.gm.graph.nodes:
        if n.op == "placeholder":
            g = inputs.get(n, t.param_grads.get(n, False))
        else:
            g = any(grads.get(p, False) for p in n.all_input_nodes)
        grads[n] = g
        n.meta["tpc"] = _info(n.meta.get("val"), g)


def _info(val: Any, grad: bool) -> Any:
    if isinstance(val, torch.Tensor):
        differentiable = val.dtype.is_floating_point or val.dtype.is_complex
        return TensorInfo(tuple(_hint(s) for s in val.shape), val.dtype, grad and differentiable)
    if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
        return [_info(v, grad) for v in val]
    return None


def example_for(mode: FakeTensorMode, args: tuple | None, kwargs: dict | None) -> tuple[tuple, dict]:
    """The example inputs as fake tensors of ``mode`` (values do not matter to tracing)."""
    a, k = pytree.tree_map(lambda x: fake_like(mode, x), (tuple(args or ()), dict(kwargs or {})))
    return a, k
