"""Functions the rewritten graphs call: layout conversions with the right backward.

Each conversion is a pair (forward collective, backward collective), built on
``torch.distributed._functional_collectives`` so that every collective is a c10d
functional op (visible to a ``TorchDispatchMode`` and to compilers; the eager head's
gather, in ``head``, is the one exception). The process group is named by its c10d group
name, a string, so the graphs print and pickle.

    conversion          forward             backward        used for
    enter   R -> E      identity            all-reduce      input of colwise layers
    all_reduce P -> R   all-reduce          identity        output of rowwise layers
    sp_gather Q -> E    all-gather(seq)     reduce-scatter  colwise input under SP
    reduce_scatter P->Q reduce-scatter(seq) all-gather      rowwise output under SP
    split  R -> S/Q     keep local chunk    all-gather      replicated -> sharded
    gather S/Q -> R     all-gather          keep chunk      sharded -> replicated consumers
"""

from __future__ import annotations

import operator
from functools import lru_cache
from typing import Any, Callable, NoReturn, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..errors import RuntimeShapeError, UnsupportedError


@lru_cache(maxsize=None)
def _pg(group: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group)


# (rank, size) of each tp group by name, filled eagerly (``remember``, at rewrite time) so
# that a compiler tracing a program reads constants here instead of calling into c10d
_GROUPS: dict[str, tuple[int, int]] = {}


def remember(group: str) -> None:
    """Read the group's rank and size now, when it exists (planning without processes,
    ``explain``, names a group no process group is registered under)."""
    try:
        _group(group)
    except (RuntimeError, ValueError):
        pass


def _rank(group: str) -> int:
    return _group(group)[0]


def _size(group: str) -> int:
    return _group(group)[1]


def _group(group: str) -> tuple[int, int]:
    if group not in _GROUPS:
        pg = _pg(group)  # raises, naming the group, where none is registered
        _GROUPS[group] = (dist.get_rank(pg), dist.get_world_size(pg))
    return _GROUPS[group]


# The c10d functional ops themselves, not the ``funcol`` wrappers: those wrap every result
# in an AsyncCollectiveTensor (a Python subclass, through a Python custom op) that the
# wait then unwraps again, which costs more than a small collective on CPU. Here every
# collective is waited at once anyway. A dispatch mode still sees the same ops.
_c10d = torch.ops._c10d_functional


# Each collective is launched, then waited on (``_c10d.wait_tensor``): between the two the
# tensor must not be read, and the process group's own thread (gloo) or stream (NCCL)
# moves the data while this thread computes (see _ColwiseLinears.backward).

def _launch_all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return _c10d.all_reduce(x.contiguous(), "sum", group)


def _launch_reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Sum over ranks, this rank's chunk along ``dim`` (the op scatters along dim 0)."""
    _check_divisible(x, dim, group, "reduce-scatter")
    n = _size(group)
    if dim % x.dim() != 0:
        x = torch.cat(x.chunk(n, dim), 0)
    return _c10d.reduce_scatter_tensor(x.contiguous(), "sum", n, group)


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return _c10d.wait_tensor(_launch_all_reduce(x, group))


def _all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Concatenation over ranks along ``dim`` (the op gathers along dim 0)."""
    n = _size(group)
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), n, group))
    return out if dim % x.dim() == 0 else torch.cat(out.chunk(n, 0), dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _c10d.wait_tensor(_launch_reduce_scatter(x, dim, group))


def _chunk(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    _check_divisible(x, dim, group, "split")
    return x.chunk(_size(group), dim)[_rank(group)].contiguous()


def _check_divisible(x: torch.Tensor, dim: int, group: str, what: str) -> None:
    n = _size(group)
    if x.shape[dim] % n:
        raise RuntimeShapeError(
            f"sequence parallelism: cannot {what} a tensor of shape {list(x.shape)} along "
            f"dim {dim} over tp = {n} ranks ({x.shape[dim]} % {n} != 0). Use a sequence "
            f"length divisible by {n}, or sequence_parallel=False."
        )


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: str) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return _all_reduce(g, ctx.group), None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: str) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return g, None


class _AddTerms(torch.autograd.Function):
    """Each rank's term, summed over tp, read by a sharded op: all-reduced both ways (the
    value in forward; in backward the op's partial gradients, which every term shares)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: str) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return _all_reduce(g, ctx.group), None


def _pair(fwd: Any, bwd: Any, name: str) -> type:
    """An autograd Function whose forward is ``fwd(x, dim, group)`` and backward ``bwd``."""
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return fwd(x, dim, group)

    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return bwd(g, ctx.dim, ctx.group), None, None

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_SpGather = _pair(_all_gather, _reduce_scatter, "_SpGather")
_ReduceScatter = _pair(_reduce_scatter, _all_gather, "_ReduceScatter")
_Split = _pair(_chunk, _all_gather, "_Split")
_Gather = _pair(_all_gather, _chunk, "_Gather")


# ONE_PARAMETER: the forward of a Function applied to a varying number of tensors takes
# one ``*args`` (ctx first). Under torch.no_grad, dynamo (torch 2.13) inlines a Function's
# forward and drops ctx whenever the number of arguments given equals the number of
# parameters the signature declares; with ``(ctx, group, *ps)`` that happened at two
# parameters (a block's two norm weights under SP), and the forward ran with its
# arguments shifted by one (``ctx`` = the group name), failing to compile.
class _ColwiseLinears(torch.autograd.Function):
    """The colwise layers that read one input (q, k and v; w1 and w3) together with that
    input's conversion: forward enters it (``dim`` None: identity) or all-gathers it
    from sequence shards, then runs each Linear. Backward sums the input gradient,
    launches its reduction (all-reduce, or reduce-scatter back to sequence shards), and
    computes every weight and bias gradient while the reduction runs, waiting for it
    only at the end: the same one collective as ``enter``/``sp_gather``, overlapped with
    the weight-gradient matmuls (Megatron's overlap of the input-gradient all-reduce)."""

    @staticmethod
    def forward(*args: Any) -> tuple:  # (ctx, x, dim, group, n, *weights, *biases): ONE_PARAMETER
        ctx, x, dim, group, n, *wb = args
        ws, bs = wb[:n], wb[n:]
        full = x if dim is None else _all_gather(x, dim, group)
        ctx.dim, ctx.group, ctx.n = dim, group, n
        ctx.bias = [None if b is None else b.dtype for b in bs]  # None: no bias
        ctx.save_for_backward(full, *ws)
        return tuple(torch.nn.functional.linear(full, w, b) for w, b in zip(ws, bs))

    @staticmethod
    def backward(ctx: Any, *gys: torch.Tensor | None) -> tuple:
        full, *ws = ctx.saved_tensors
        n, live = ctx.n, [(i, g) for i, g in enumerate(gys) if g is not None]
        pending = None
        low = live[0][1].dtype if live else full.dtype  # what autocast ran forward in
        if ctx.needs_input_grad[0] and live:
            gx = sum((g.matmul(ws[i].to(low)) for i, g in live[1:]),
                     live[0][1].matmul(ws[live[0][0]].to(low))).to(full.dtype)
            pending = _launch_all_reduce(gx, ctx.group) if ctx.dim is None else \
                _launch_reduce_scatter(gx, ctx.dim, ctx.group)
        gws: list[torch.Tensor | None] = [None] * n
        gbs: list[torch.Tensor | None] = [None] * n
        rows = full.reshape(-1, full.shape[-1]).to(low)
        for i, g in live:  # while the input gradient is on the wire
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[4 + i]:
                gws[i] = g2.t().mm(rows).to(ws[i].dtype)
            if ctx.bias[i] is not None and ctx.needs_input_grad[4 + n + i]:
                gbs[i] = g2.sum(0).to(ctx.bias[i])
        gx = _c10d.wait_tensor(pending) if pending is not None else None
        return (gx, None, None, None, *gws, *gbs)


def colwise_linears(x: torch.Tensor, dim: int | None, group: str, ws: Sequence[torch.Tensor],
                    bs: Sequence[torch.Tensor | None]) -> tuple:
    """``[linear(enter(x)) for each layer]`` (``dim`` None) or ``[linear(sp_gather(x, dim))
    ...]``, with the backward reduction overlapped (``_ColwiseLinears``)."""
    return _ColwiseLinears.apply(x, dim, group, len(ws), *ws, *bs)


def enter(x: torch.Tensor, group: str) -> torch.Tensor:
    return _Enter.apply(x, group)


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return _AllReduce.apply(x, group)


def add_terms(x: torch.Tensor, group: str) -> torch.Tensor:
    return _AddTerms.apply(x, group)


def norm_input(x: torch.Tensor) -> torch.Tensor:
    """A norm's input as it computes: float32 at least, as ATen's norms do."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def row_term(v: torch.Tensor, dims: int, chunks: int, group: str) -> torch.Tensor:
    """This rank's term of the sums over the last ``dims`` dims of rows it holds a slice
    of (each of ``chunks`` slices held by tp / chunks ranks): the terms add up to the sums."""
    return v.sum(tuple(range(-dims, 0)), keepdim=True) * (chunks / _size(group))


def norm_output(x: torch.Tensor, xf: torch.Tensor, mean_square: torch.Tensor,
                eps: float | None, weight: Any, bias: Any) -> torch.Tensor:
    """The end of a norm whose row statistics came summed over tp (``row_term``,
    ``add_terms``); ``weight``/``bias``: this rank's slices; the result in ``x``'s dtype."""
    if eps is None:  # rms_norm's default
        eps = torch.finfo(xf.dtype).eps
    y = xf * torch.rsqrt(mean_square + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def sp_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _SpGather.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _ReduceScatter.apply(x, dim, group)


def split(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _Split.apply(x, dim, group)


def gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _Gather.apply(x, dim, group)


class _SyncGrads(torch.autograd.Function):
    """Identity on replicated parameters read by sequence-sharded activations; in backward
    their gradients are partial per rank, so they are summed over tp, all in one
    all-reduce."""

    @staticmethod
    def forward(*args: Any) -> tuple:  # (ctx, group, *params): ONE_PARAMETER
        ctx, group, *ps = args
        ctx.group = group
        ctx.meta = [(p.shape, p.dtype) for p in ps]
        return tuple(p.view_as(p) for p in ps)

    @staticmethod
    def backward(ctx: Any, *gs: torch.Tensor) -> tuple:
        grads = [torch.zeros(s, dtype=d, device=_device(gs)) if g is None else g
                 for g, (s, d) in zip(gs, ctx.meta)]
        flat = _all_reduce(torch.cat([g.reshape(-1) for g in grads]), ctx.group)
        out, i = [], 0
        for g in grads:
            out.append(flat[i:i + g.numel()].view_as(g))
            i += g.numel()
        return (None, *out)


def _device(gs: Sequence[Any]) -> torch.device:
    return next(g.device for g in gs if g is not None)


def sync_grads(group: str, *ps: torch.Tensor) -> tuple:
    return _SyncGrads.apply(group, *ps)


@lru_cache(maxsize=None)
def _mesh(group: str, device_type: str) -> Any:
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(_pg(group), device_type)


def as_dtensor(x: torch.Tensor, dim: int, group: str) -> DTensor:
    """A feature-sharded output (a colwise head's logits) as a DTensor ``Shard(dim)`` on
    the tp mesh, not gathered: ``torch.distributed.tensor.parallel.loss_parallel`` then
    computes the cross-entropy on the shards."""
    from torch.distributed.tensor import Shard
    return DTensor.from_local(x, _mesh(group, x.device.type), [Shard(dim)], run_check=False)


_RANK_RNG: dict[tuple[str, str], torch.Tensor] = {}


def on_rank_rng(fn: Any, group: str, *args: Any, **kwargs: Any) -> Any:
    """``fn`` (a dropout) drawn from this tp rank's own random stream, as Megatron's RNG
    tracker does for sharded regions: seeded once from ``torch.initial_seed()`` and the
    rank (reproducible, different per rank), advanced call by call, and kept apart from
    the global stream, which replicated regions share across ranks."""
    fn = CONSTANTS[fn] if isinstance(fn, int) else fn
    if torch.compiler.is_compiling():
        raise UnsupportedError(
            f"torch.compile cannot trace {getattr(fn, '__name__', fn)} inside a sharded region: "
            "each tp rank draws its mask from a random stream of its own (its generator state "
            "is not traceable). Compile the model with dropout 0 or in eval mode, or run this "
            "one eagerly")
    x = next(a for a in args if isinstance(a, torch.Tensor))
    dev = x.device
    key = (group, str(dev))
    if key not in _RANK_RNG:
        g = torch.Generator(device=dev)
        g.manual_seed((torch.initial_seed() + 1_000_003 * (1 + _rank(group))) % 2**63)
        _RANK_RNG[key] = g.get_state()
    cuda = dev.type == "cuda"
    with torch.random.fork_rng(devices=[dev] if cuda else [], device_type=dev.type):
        if cuda:
            torch.cuda.set_rng_state(_RANK_RNG[key], dev)
        else:
            torch.set_rng_state(_RANK_RNG[key])
        out = fn(*args, **kwargs)
        _RANK_RNG[key] = torch.cuda.get_rng_state(dev) if cuda else torch.get_rng_state()
    return out


# Python objects a rewritten program refers to (block call specs, constant tensors, ops
# passed as values), by number: generated code holds only printable arguments.
CONSTANTS: list[Any] = []


def keep_constant(value: Any) -> int:
    CONSTANTS.append(value)
    return len(CONSTANTS) - 1


def kept(key: int) -> Any:
    return CONSTANTS[key]


def constant(key: int, device: torch.device) -> Any:
    value = CONSTANTS[key]
    return value.to(device) if isinstance(value, torch.Tensor) else value


def device_of(x: torch.Tensor) -> torch.device:
    return x.device


def call_block(module: torch.nn.Module, key: int, tensors: list[torch.Tensor]) -> list:
    """Call a block as its parent's code did (same args and kwargs, rebuilt from the
    traced call's structure), and return its tensor outputs in flat order."""
    import torch.utils._pytree as pytree

    from ..frontend.blocks import TENSOR
    call = CONSTANTS[key]
    it = iter(tensors)
    leaves = [next(it) if leaf is TENSOR else leaf for leaf in call.in_leaves]
    args, kwargs = pytree.tree_unflatten(leaves, call.in_spec)
    out = module(*args, **kwargs)
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


class _Locals(torch.autograd.Function):
    """The local shards of all the parameters a program reads, one autograd node for all
    of them. ``DTensor.to_local`` makes a node per parameter, and a Python backward per
    parameter; with ~10 parameters a block that is ~2 ms a training step on the CPU.
    Each gradient becomes a DTensor exactly as ``to_local``'s backward makes it (its
    code is called)."""

    @staticmethod
    def forward(ctx: Any, *params: DTensor) -> tuple[torch.Tensor, ...]:
        ctx.specs = [p._spec for p in params]
        ctx.set_materialize_grads(False)
        out = tuple(p._local_tensor.view_as(p._local_tensor) for p in params)
        frozen = [o for o, p in zip(out, params) if not p.requires_grad]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        from types import SimpleNamespace

        from torch.distributed.tensor._api import _ToTorchTensor
        return tuple(
            None if g is None else
            _ToTorchTensor.backward(SimpleNamespace(dtensor_spec=s, grad_placements=None), g)[0]
            for g, s in zip(grads, ctx.specs))


def locals_of(names: tuple[str, ...], *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The local shards of a program's parameters (DTensors on the tp mesh), read at once,
    as plain tensors. Under torch.compile each is read with ``to_local``, which Dynamo
    knows. A plain tensor here is a parameter replaced after ``auto_parallelize`` (a full
    weight the program would read as its shard: wrong numbers), refused by name."""
    for p, name in zip(params, names):
        if not isinstance(p, DTensor):
            _not_ours(p, name)
    if torch.compiler.is_compiling() or not params:
        return tuple(p.to_local() for p in params)  # type: ignore[union-attr]
    return _Locals.apply(*params)


def _not_ours(p: torch.Tensor, name: str) -> NoReturn:
    raise UnsupportedError(
        f"parameter {name or '?'} (in the module whose program reads it: the root or a "
        f"block) is a plain {type(p).__name__} of shape {list(p.shape)}, not "
        "the DTensor auto_parallelize made: it was replaced after parallelizing "
        "(load_state_dict(..., assign=True), or a new nn.Parameter), and the program would "
        "read the full weight as its shard. Load full weights with model.load_state_dict("
        "state_dict) (without assign=True: each rank keeps its shards of them), torch."
        "distributed.checkpoint.state_dict.set_model_state_dict(model, state_dict, options="
        "StateDictOptions(full_state_dict=True)) or tpcompile.checkpoint, or change them "
        "before auto_parallelize")


def group_chunk(x: torch.Tensor, dim: int, groups: int, group: str) -> torch.Tensor:
    """The chunk of ``x`` (``groups`` chunks on ``dim``) that this rank's group of
    ``tp // groups`` ranks computes with: the rows of its kv heads in a replicated weight."""
    rank, size = _group(group)
    step = x.shape[dim] // groups
    return x.narrow(dim, rank // (size // groups) * step, step)


def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, group: str,
                    padding_idx: int = -1) -> torch.Tensor:
    """Embedding with the vocabulary split over tp: rows outside this rank's range give
    zeros, so the per-rank results are partial sums of the full lookup. ``padding_idx``
    (no gradient to that row) applies on the rank that holds the row."""
    rows = weight.shape[0]
    start = _rank(group) * rows
    outside = (ids < start) | (ids >= start + rows)
    local_pad = padding_idx - start if padding_idx >= 0 and start <= padding_idx < start + rows else -1
    out = torch.ops.aten.embedding.default(weight, (ids - start).masked_fill(outside, 0), local_pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def logical_shape(x: torch.Tensor, dim: int, tp: int) -> torch.Size:
    """The shape of the full tensor a shard stands for (what the original code saw)."""
    s = list(x.shape)
    s[dim] *= tp
    return torch.Size(s)


def logical_size(x: torch.Tensor, dim: int, tp: int, *args: Any) -> Any:
    s = logical_shape(x, dim, tp)
    return s[args[0]] if args else s


def localize_shape(sizes: Sequence[Any], pos: int, tp: int) -> list:
    """Sizes for a view of a shard: the sharded position divided by tp (-1 stays)."""
    out = list(sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes)
    if out[pos] != -1:
        out[pos] = out[pos] // tp
    return out


def logical_numel(x: torch.Tensor, dim: int, tp: int) -> int:
    return x.numel() * tp


# What each conversion runs: (collective in forward, collective in backward). The rewrite
# calls these functions; ``explain`` reads a rewritten graph's calls against this table.
COLLECTIVES: dict[Any, tuple[str | None, str | None]] = {
    enter: (None, "all_reduce"),
    all_reduce: ("all_reduce", None),
    add_terms: ("all_reduce", "all_reduce"),
    sp_gather: ("all_gather", "reduce_scatter"),
    reduce_scatter: ("reduce_scatter", "all_gather"),
    split: (None, "all_gather"),
    gather: ("all_gather", None),
    sync_grads: (None, "all_reduce"),
}


# Calls that hold an input's conversion inside (its kind: ``node.args[1]``, the dim, None
# for enter) and what each item of a call returning several tensors runs (the item's
# index -> (forward, backward)); ``head`` adds its own.
HOLDS_CONVERSION: set[Any] = {colwise_linears}
ITEMS: dict[Any, Callable[[int], tuple[str | None, str | None]]] = {}


def collectives_of(node: Any) -> tuple[str | None, str | None]:
    """(forward, backward) collective of a node of a rewritten graph calling one of the
    functions above (or registered here by ``head`` and ``loss``)."""
    if node.target in HOLDS_CONVERSION:
        return COLLECTIVES[enter if node.args[1] is None else sp_gather]
    if node.target is operator.getitem and getattr(node.args[0], "target", None) in ITEMS:
        return ITEMS[node.args[0].target](node.args[1])
    return COLLECTIVES[node.target]
