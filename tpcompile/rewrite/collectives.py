"""Functions the rewritten graphs call: layout conversions with the right backward.

Each conversion is a pair (forward collective, backward collective), built on
``torch.distributed._functional_collectives`` so that every collective is a c10d
functional op (visible to a ``TorchDispatchMode`` and to compilers); the one exception is
the eager head's all-gather into the output's column blocks (``_gather_columns``), a
c10d in-place op (or, for large chunks on gloo, c10d sends and receives), which a
dispatch mode sees too. The process group
is named by its c10d group name, a string, so the graphs print and pickle.

    conversion          forward             backward        used for
    enter   R -> E      identity            all-reduce      input of colwise layers
    all_reduce P -> R   all-reduce          identity        output of rowwise layers
    sp_gather Q -> E    all-gather(seq)     reduce-scatter  colwise input under SP
    reduce_scatter P->Q reduce-scatter(seq) all-gather      rowwise output under SP
    split  R -> S/Q     keep local chunk    all-gather      replicated -> sharded
    gather S/Q -> R     all-gather          keep chunk      sharded -> replicated consumers
"""

from __future__ import annotations

import contextlib
import operator
from functools import lru_cache
from typing import Any, NoReturn, Sequence

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake
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


class _ColwiseLinears(torch.autograd.Function):
    """The colwise layers that read one input (q, k and v; w1 and w3) together with that
    input's conversion: forward enters it (``dim`` None: identity) or all-gathers it
    from sequence shards, then runs each Linear. Backward sums the input gradient,
    launches its reduction (all-reduce, or reduce-scatter back to sequence shards), and
    computes every weight and bias gradient while the reduction runs, waiting for it
    only at the end: the same one collective as ``enter``/``sp_gather``, overlapped with
    the weight-gradient matmuls (Megatron's overlap of the input-gradient all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int | None, group: str, n: int,
                *wb: torch.Tensor | None) -> tuple:
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


# A colwise head's gathered output (the logits a loss reads on every rank) is computed
# in chunks of rows, each chunk's all-gather launched as soon as its matmul is done, so
# the gather runs while the next chunks compute (micro-pipelining). A chunk holds at
# least ``bytes`` of gathered logits and ``rows`` rows, and there are at most ``max`` of
# them: logits under ``bytes`` (every test model; batch 2 x seq 64 of a 32000-word
# vocabulary at tp 2) are one chunk, one all-gather, exactly as without it. The size is
# the process group's: gloo gathers into a buffer of its own, and on the CPU a buffer
# under glibc's 32 MiB mmap threshold is reused from the heap where a larger one is
# fresh memory, page faults and all, every time (measured at tp 2, 2048 rows x 32000:
# the head's forward 544 ms with 32 MiB chunks, 486-491 ms with 16 MiB ones, 468 ms with
# 24 MiB, 526 ms with 12 MiB). Eager, at most ``depth`` gathers are in flight: the oldest
# is waited on before another is launched (each holds this rank's chunk and, in the
# process group, a buffer for the gathered one).
HEAD_CHUNKS = {"bytes": 16 << 20, "rows": 128, "max": 32, "depth": 2}  # depth >= 1


def _chunks(rows: int, gathered_row_bytes: int) -> int:
    return max(1, min(HEAD_CHUNKS["max"], rows // HEAD_CHUNKS["rows"],
                      rows * gathered_row_bytes // HEAD_CHUNKS["bytes"]))


class _ColwiseHead(torch.autograd.Function):
    """A colwise layer whose output is gathered to full on its last dim (a head whose
    logits the model returns), with its input's conversion (``dim`` None: enter; else
    sp_gather). Forward: the rows in chunks; each chunk's all-gather is launched as soon
    as its matmul is done and runs while the next chunks compute. Eager, the process
    group writes every rank's columns straight into their block of the output's rows
    (``_gather_columns``): no gather buffer of ours and no copy after it (on the CPU a
    fresh buffer that size costs ~0.4 ms per MiB in page faults, a copy as much again);
    at most ``HEAD_CHUNKS["depth"]`` gathers are in flight. With ``keep``, this rank's
    columns are returned too (for a vocab-parallel loss), each chunk copied into its
    rows of them. Backward: this rank's columns of the output gradient as a strided view
    (no copy), plus the local columns' gradient, the input gradient's reduction launched,
    the weight and bias gradients computed while it runs, then waited on. The same
    collectives as enter/sp_gather + linear + gather, the head's all-gather split into
    chunks when it is large."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int | None, group: str, w: torch.Tensor,
                b: torch.Tensor | None, dtype: torch.dtype | None, keep: bool) -> Any:
        full = x if dim is None else _all_gather(x, dim, group)
        ctx.dim, ctx.group, ctx.ydtype = dim, group, w.dtype  # the matmul's (autocast: lower)
        ctx.bias = None if b is None else b.dtype  # None: no bias
        ctx.save_for_backward(full, w)
        ctx.set_materialize_grads(False)
        n, cols = _size(group), w.shape[0]
        rows = full.reshape(-1, full.shape[-1])
        # no cast, no autocast: the matmul runs in w's dtype; else its result is cast.
        # Eager, each chunk's result has a storage of its own: its gather's work is
        # registered under it, and a wait waits for every work registered under the
        # storage it is given (hence kept columns are copied out, not gathered from).
        # Compiled (and on fake or meta tensors, or a backend not known to gather into
        # strided views), each chunk's gather is the functional one into a buffer of its
        # own, then copied into its rows: under Inductor the buffers are its to plan (it
        # lowers an out= or in-place collective as a plain kernel, and once gave such a
        # gather's input to the next chunk's matmul while the gather was still reading it).
        compiled = torch.compiler.is_compiling()
        in_place = not compiled and not full.is_meta and not is_fake(full) and \
            _gathers_into_views(group)
        autocast = torch.is_autocast_enabled(full.device.type)
        direct = dtype in (None, w.dtype) and full.dtype == w.dtype and not compiled and \
            not autocast
        itemsize = (dtype or w.dtype).itemsize if dtype or not autocast else 2  # 16-bit
        parts = rows.tensor_split(_chunks(rows.shape[0], n * cols * itemsize))
        out = flat = mine = None
        pending: list[tuple[torch.Tensor, int, int, list | None]] = []
        start = 0
        try:
            for i, part in enumerate(parts):
                r, z = part.shape[0], None
                if not direct:
                    z = torch.nn.functional.linear(part, w, b)
                    ctx.ydtype = z.dtype
                if out is None:  # the output's dtype: w's, the autocast's, or the model's
                    # cast; made in its final shape (returned as a view of a 2-D buffer,
                    # Inductor, torch 2.13, let the compiled backward overwrite it in place)
                    ydtype = w.dtype if z is None else dtype or z.dtype
                    out = full.new_empty(*full.shape[:-1], n * cols, dtype=ydtype)
                    flat = out.view(-1, n * cols)
                    if keep:
                        mine = full.new_empty(*full.shape[:-1], cols, dtype=ydtype)
                if z is None:  # this chunk's own columns, in a tensor of its own
                    y = torch.mm(part, w.t())
                    if b is not None:
                        y.add_(b)
                else:  # with the model's cast of its logits (``.float()``), if any
                    y = z.to(ydtype)
                if in_place:
                    if len(pending) == HEAD_CHUNKS["depth"]:  # enough in flight: land one
                        _land(pending.pop(0), flat, n, cols, True)
                    launched, received = _gather_columns(y, flat[start:start + r], cols, group, i)
                else:
                    launched = _c10d.all_gather_into_tensor(y.contiguous(), n, group)
                    received = None
                if mine is not None:  # read, not written, while the gather reads it
                    mine.view(-1, cols)[start:start + r].copy_(y)
                pending.append((launched, start, r, received))
                start += r
        except BaseException:  # (an out-of-memory in a later chunk, say) no work left
            for launched, *_ in pending:  # registered, holding the output, for good
                with contextlib.suppress(Exception):
                    _c10d.wait_tensor(launched)
            raise
        for item in pending:
            _land(item, flat, n, cols, in_place)
        return (out, mine) if keep else out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None, g_mine: torch.Tensor | None = None) -> tuple:
        full, w = ctx.saved_tensors
        cols = w.shape[0]
        mine = None
        if g is not None:
            mine = g.reshape(-1, g.shape[-1]).narrow(1, _rank(ctx.group) * cols, cols)
        if g_mine is not None:
            mine = g_mine.reshape(-1, cols) if mine is None else mine + g_mine.reshape(-1, cols)
        if mine is None:
            return (None,) * 7
        mine = mine.to(ctx.ydtype)  # back through the cast (a view when there is none)
        low = ctx.ydtype  # what forward's matmul ran in (autocast: lower than w's dtype)
        pending = None
        if ctx.needs_input_grad[0]:
            gx = mine.mm(w.to(low)).view(full.shape).to(full.dtype)
            pending = _launch_all_reduce(gx, ctx.group) if ctx.dim is None else \
                _launch_reduce_scatter(gx, ctx.dim, ctx.group)
        gw = mine.t().mm(full.reshape(-1, full.shape[-1]).to(low)).to(w.dtype) \
            if ctx.needs_input_grad[3] else None
        gb = mine.sum(0).to(ctx.bias) if ctx.bias is not None and ctx.needs_input_grad[4] else None
        gx = _c10d.wait_tensor(pending) if pending is not None else None
        return gx, None, None, gw, gb, None, None


def _gathers_into_views(group: str) -> bool:
    """Whether every backend of the group all-gathers correctly into strided output
    tensors: gloo and NCCL gather into a flat buffer of their own and copy each rank's part
    out of it (fake does nothing at all)."""
    backend = str(dist.get_backend(_pg(group)))
    return {part.split(":")[-1] for part in backend.split(",")} <= {"gloo", "nccl", "fake"}


# Above this many bytes of a chunk's own columns, a gloo head gathers them by sends and
# receives (``_gather_columns``): gloo's all-gather moved ~0.7 GB/s on the 2-core CPU
# machine where a pair's batched send and receive moved 1.7-2.2 GB/s (world 2, 8 MiB a
# rank: 12.1 ms all-gathered into the columns, 5.7 ms sent, received and copied into
# them; 31 MiB: 96 and 29 ms; world 4, 16 MiB: 144 and 75 ms). Below ~256 KiB the one
# all-gather was as fast or faster. NCCL's all-gather is the ring of sends itself.
P2P_GATHER_BYTES = 256 << 10


def _p2p_gathers(y: torch.Tensor, group: str) -> bool:
    """Whether this chunk is gathered by sends and receives: a CPU tensor, gloo its
    group's backend, and large enough that gloo's all-gather is the slower way."""
    if y.device.type != "cpu" or y.numel() * y.element_size() < P2P_GATHER_BYTES or \
            _size(group) == 1:
        return False
    try:
        backend = _pg(group)._get_backend(y.device)
    except RuntimeError:  # no backend for this device in the group
        return False
    return isinstance(backend, getattr(dist, "ProcessGroupGloo", ()))  # () on builds without gloo


def _gather_columns(y: torch.Tensor, dest: torch.Tensor, cols: int, group: str, tag: int
                    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]] | None]:
    """Launch the all-gather of ``y`` (r, cols) into the column blocks of ``dest`` (r,
    n * cols; rows of the output), rank by rank. Returns ``y``, under which the work is
    registered (a ``wait_tensor`` on it waits for the gather, as the functional
    collectives do), and the receive buffers still to be copied into their columns once
    it lands (``None``: nothing to copy). Usually the process group writes every rank's
    part straight into its block (no buffer of ours, no copy after); a large chunk on gloo
    is sent to every other rank and received from each into a buffer of its own
    (``P2P_GATHER_BYTES``), ``tag`` telling the chunks in flight apart."""
    pg = _pg(group)
    if not _p2p_gathers(y, group):
        work = dist.all_gather(list(dest.split(cols, dim=1)), y, group=pg, async_op=True)
        torch._C._distributed_c10d._register_work(y, work)
        return y, None
    me, n = _group(group)
    received = [(o, torch.empty_like(y)) for o in range(n) if o != me]
    ops = [op for o, buf in received for op in (
        dist.P2POp(dist.isend, y, group=pg, tag=tag, group_peer=o),
        dist.P2POp(dist.irecv, buf, group=pg, tag=tag, group_peer=o))]
    for work in dist.batch_isend_irecv(ops):
        torch._C._distributed_c10d._register_work(y, work)
    dest.narrow(1, me * cols, cols).copy_(y)  # read, not written, while it is sent
    return y, received


def _land(item: tuple[torch.Tensor, int, int, list | None], flat: torch.Tensor, n: int,
          cols: int, in_place: bool) -> None:
    """Wait for one chunk's gather; unless it was gathered ``in_place`` (eager), its result,
    ``(n * r, cols)``, rank after rank, r rows each, is then written into its rows of the
    output, rank by rank along the columns; gathered by sends and receives, the received
    parts are copied into their columns."""
    launched, start, r, received = item
    got = _c10d.wait_tensor(launched)
    if in_place:  # done with: its memory goes now, not when the work object does
        for o, buf in received or ():
            flat[start:start + r].narrow(1, o * cols, cols).copy_(buf)
            buf.untyped_storage().resize_(0)  # (the receive's work object holds it too)
        launched.untyped_storage().resize_(0)
    else:
        flat[start:start + r].view(r, n, cols).copy_(got.view(n, r, cols).transpose(0, 1))


def colwise_head(x: torch.Tensor, dim: int | None, group: str, w: torch.Tensor,
                 b: torch.Tensor | None, dtype: torch.dtype | None = None,
                 keep: bool = False) -> tuple:
    """``(gather(linear(enter(x)).to(dtype), -1),)`` (``dim`` None; ``dtype`` None: no
    cast) or the same after ``sp_gather(x, dim)``, pipelined and overlapped
    (``_ColwiseHead``); with ``keep``, this rank's columns (before the gather) as a second
    item. The first item in the graph holds the gather's site."""
    out = _ColwiseHead.apply(x, dim, group, w, b, dtype, keep)
    return out if keep else (out,)


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
    def forward(ctx: Any, group: str, *ps: torch.Tensor) -> tuple:
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
        "read the full weight as its shard. Load full weights with torch.distributed."
        "checkpoint.state_dict.set_model_state_dict(model, state_dict, options="
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


def collectives_of(node: Any) -> tuple[str | None, str | None]:
    """(forward, backward) collective of a node of a rewritten graph calling one of the
    functions above; ``colwise_linears`` and ``colwise_head`` have those of the conversion
    they hold, the item of ``colwise_head`` those of its output's gather."""
    if node.target in (colwise_linears, colwise_head):
        return COLLECTIVES[enter if node.args[1] is None else sp_gather]
    if node.target is operator.getitem and getattr(node.args[0], "target", None) is colwise_head:
        # item 0: the head's output gathered; item 1: this rank's columns of it
        return COLLECTIVES[gather] if node.args[1] == 0 else (None, None)
    return COLLECTIVES[node.target]
