"""Tracing a module: export (or fx, then export) with its blocks kept as opaque calls,
the block requests learnt on the way, and the graph read into a :class:`Traced`."""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from ..errors import TPCompileError, TraceError, UnsupportedError
from .blocks import (_SHAPES, BLOCK_OP, TENSOR, BlockCall, BlockShapes, TensorInfo, TracerName,
                     _NeedBlock, _plain, block_signature, canonical_call, captured_inside,
                     find_blocks)
from .export import GRADS, Traced, _export, _fx_lowered
from .fake import _describe, _Described, _hint, fake_like
from .guards import broken_condition, conditions_of, guards_for, shape_mismatch

_CACHE: "OrderedDict[Any, list[tuple[Traced, list]]]" = OrderedDict()
_CACHE_SIZE = 64
_PER_KEY = 4  # dynamic traces of one key, each for the sizes its guards admit


def clear_cache() -> None:
    """Forget remembered traces (benchmarks time tracing itself)."""
    _CACHE.clear()


def _trace_key(module: nn.Module, args: tuple, kwargs: dict, tracer: str, where: str,
               dynamic: bool) -> Any:
    flat, spec = pytree.tree_flatten((args, kwargs))
    # a dynamic trace serves other sizes too (within its guards, checked on a hit): only
    # the sizes export specialises whatever the code (0 and 1) are part of its key (a
    # symbolic size stays itself: unhashable, no key)
    leaves = tuple((tuple(None if dynamic and isinstance(d, int) and d > 1 else d
                          for d in x.shape), x.dtype, x.device, x.requires_grad)
                   if isinstance(x, torch.Tensor) else ("leaf", _plain(x)) for x in flat)
    modes = tuple(m.training for m in module.modules())
    devices = tuple(t.device for t in [*module.parameters(), *module.buffers()])
    grads = GRADS["wanted"]  # a custom backward is refused only where gradients are
    #   wanted (export._refuse_custom_backward)
    return (block_signature(module), modes, devices, grads, repr(spec), leaves, tracer, where,
            dynamic)


def _serves(t: Traced, args: tuple, kwargs: dict, requested: list) -> list | None:
    """Whether a dynamic trace made on other sizes serves these inputs' sizes: if it
    does, its block requests at these sizes (each block's own trace then decides whether
    it serves them), else None."""
    flat = pytree.tree_leaves((args, kwargs))
    bound: dict[Any, int] = {}
    guards = guards_for(t.inputs, t.positions, {}, 1)
    try:
        if shape_mismatch(guards, t.ranges, flat, bound) or \
                broken_condition(t.conditions, guards, flat):
            return None
    except (TypeError, ValueError):
        return None

    def resized(x: Any) -> Any:
        if isinstance(x, torch.SymInt):  # a size passed as a number: not re-sized here
            raise LookupError
        if not isinstance(x, _Described) or x.exprs is None:
            return x
        if any(not isinstance(e, int) and not e.free_symbols <= bound.keys() for e in x.exprs):
            raise LookupError  # a size these inputs do not give
        return dataclasses.replace(x, shape=tuple(
            e if isinstance(e, int) else int(e.subs(bound)) for e in x.exprs))

    try:
        return [(rel, *pytree.tree_map(resized, (a, k), is_leaf=lambda x: isinstance(x, _Described)))
                for rel, a, k in requested]
    except (LookupError, TypeError):
        return None


def trace(module: nn.Module, args: tuple, kwargs: dict, *, tracer: TracerName, where: str,
          on_block: Callable[[str, nn.Module, tuple, dict], BlockShapes],
          mode: FakeTensorMode, dynamic: bool = False) -> Traced:
    """:func:`trace_module`, remembered: a model of the same structure traced on inputs
    of the same description (shapes, dtypes, structure, mode) gives the same graph, so
    the second time only the block requests are replayed (planning the same model again
    costs milliseconds). A dynamic trace serves every size its guards admit, its block
    requests replayed at the new sizes."""
    try:
        key = _trace_key(module, args, kwargs, tracer, where, dynamic)
        hash(key)
    except TypeError:
        key = None
    held = _CACHE.get(key, []) if key is not None else []
    for t, requested in held:
        replay = _serves(t, args, kwargs, requested) if dynamic else requested
        if replay is None:
            continue
        _CACHE.move_to_end(key)
        blocks = find_blocks(module)
        for rel, a, k in replay:
            a, k = pytree.tree_map(lambda x: fake_like(mode, x), (a, k),
                                   is_leaf=lambda x: isinstance(x, _Described))
            on_block(rel, blocks[rel], a, k)
        return t
    requested: list = []
    t = trace_module(module, args, kwargs, tracer=tracer, where=where, on_block=on_block,
                     mode=mode, requested=requested, dynamic=dynamic)
    if key is not None:  # the newest few per key (one whose block sizes it cannot
        # re-size is traced again at each new size)
        _CACHE[key] = [*held, (t, requested)][-_PER_KEY:]
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return t


def trace_module(module: nn.Module, args: tuple, kwargs: dict, *, tracer: TracerName,
                 where: str, on_block: Callable[[str, nn.Module, tuple, dict], BlockShapes],
                 mode: FakeTensorMode, requested: list | None = None,
                 dynamic: bool = False) -> Traced:
    """Export ``module`` (part of a skeleton in :func:`fake_state`) on ``args``/``kwargs``
    (fake tensors of ``mode``) with its blocks opaque. ``on_block(member, block, args,
    kwargs)`` is called for each block signature not seen yet and returns its shapes (it
    exports the block, recursively)."""
    blocks = find_blocks(module)
    sigs = {rel: block_signature(b) for rel, b in blocks.items()}
    known: dict[tuple, BlockShapes] = {}
    calls: list[BlockCall] = []
    raised: list[Exception] = []  # this trace's own requests (not a nested trace's)
    for_outputs: set[str] = set()
    label = where or type(module).__name__

    def patched(rel: str) -> Callable:
        def forward(*a: Any, **k: Any) -> Any:
            a, k = canonical_call(type(blocks[rel]).forward.__get__(blocks[rel]), a, k)
            flat, spec = pytree.tree_flatten((a, k))
            captured = captured_inside(blocks[rel])
            if captured:
                for_outputs.update(r for r in blocks if sigs[r] == sigs[rel])
            if captured or any(isinstance(x, torch.Tensor) and free_unbacked_symbols(x) for x in flat):
                # data-dependent sizes (the tokens routed to one expert of a MoE): no one
                # example stands for every call, so the block is traced inline instead
                raised.append(_InlineBlock(rel))
                raise raised[-1]
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
        for _ in range(2 * len(set(sigs.values())) + 1):
            calls.clear()
            for rel, b in blocks.items():
                b.forward = patched(rel)  # type: ignore[method-assign]
            try:
                with _hollow(module, blocks):
                    target = module if front == "export" else _fx_lowered(module, blocks)
                    ep, (leaves, spec) = _export(target, args, kwargs, dynamic)
            except _InlineBlock as need:
                _unpatch(blocks)
                _inline(blocks, sigs, need.member)
                continue
            except _NeedBlock as need:
                _unpatch(blocks)
                try:
                    known[sigs[need.member]] = _on_need(need, blocks, on_block, mode, requested)
                except OpaqueBlockError:  # returns more than hidden states: traced inline
                    _inline(blocks, sigs, need.member)
                continue
            except TPCompileError:
                _unpatch(blocks)
                raise
            except Exception as e:  # noqa: BLE001 - export raises many types
                _unpatch(blocks)
                need = _find_need(e, raised)
                if isinstance(need, _InlineBlock):
                    _inline(blocks, sigs, need.member)
                    continue
                if need is not None:
                    known[sigs[need.member]] = _on_need(need, blocks, on_block, mode, requested)
                    continue
                errors[front] = f"{type(e).__name__}: {_first_line(e)}{_user_frame(e)}"
                break
            _unpatch(blocks)
            t = _read(ep, front, calls, leaves, spec)
            t.conditions = conditions_of(ep)
            t.out_type = ep.__dict__.get("_tpcompile_out_type")
            t.unchecked = ep.__dict__.get("_tpcompile_unchecked", [])
            t.for_outputs = sorted(for_outputs)
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


class OpaqueBlockError(UnsupportedError):
    """A block whose outputs its parent cannot describe from its inputs' shapes: the
    parent traces it (and every block of its signature) inline instead."""


class _InlineBlock(Exception):
    def __init__(self, member: str) -> None:
        super().__init__(f"block {member} is called with data-dependent shapes")
        self.member = member


def _inline(blocks: dict[str, nn.Module], sigs: dict[str, Any], member: str) -> None:
    """Trace ``member`` and every block of its signature as part of the parent."""
    for rel in [r for r in blocks if sigs[r] == sigs[member]]:
        del blocks[rel]


def _on_need(need: _NeedBlock, blocks: dict[str, nn.Module], on_block: Callable,
             mode: FakeTensorMode, requested: list | None) -> BlockShapes:
    a, k = pytree.tree_map(lambda x: fake_like(mode, x), (need.args, need.kwargs),
                           is_leaf=lambda x: isinstance(x, _Described))
    shapes = on_block(need.member, blocks[need.member], a, k)
    if requested is not None:  # replayed on a cached trace: only the blocks kept opaque
        requested.append((need.member, need.args, need.kwargs))
    return shapes


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


def _find_need(e: BaseException | None, raised: list[Exception]) -> Any:
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
            raise OpaqueBlockError(
                f"output {len(leaves)} of the block, of shape {list(o.shape)}, is shaped like "
                "none of its inputs (attention weights, a position bias); a block stays one "
                "opaque call in its parent only when each output has the shape of an input "
                "(hidden states in, hidden states out)")
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
