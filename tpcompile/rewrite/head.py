"""The colwise head whose logits are gathered to full (the logits a loss reads on every
rank): its row chunks' matmuls pipelined with their gathers (``colwise_head``, one call
of a rewritten graph, made by the ``overlap`` pass). Eager, each chunk is gathered
straight into its block of the output's columns (``_gather_columns``): by the process
group's all-gather, or on gloo, for large chunks, by sends and receives; compiled, by the
functional all-gather into a buffer of its own.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from . import collectives as C
from .collectives import (_all_gather, _c10d, _group, _launch_all_reduce,
                          _launch_reduce_scatter, _pg, _rank, _size)

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
        # eager, one chunk: this rank's columns are its result itself, not a copy of it
        own = keep and in_place and len(parts) == 1
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
                    if keep and not own:
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
                if own:  # (waited on below: read, not written, while the gather reads it)
                    mine = y.view(*full.shape[:-1], cols)
                elif mine is not None:  # read, not written, while the gather reads it
                    mine.view(-1, cols)[start:start + r].copy_(y)
                pending.append((launched, start, r, received))
                start += r
        except BaseException:  # (an out-of-memory in a later chunk, say) no work left
            for launched, *_ in pending:  # registered, holding the output, for good
                with contextlib.suppress(Exception):
                    _c10d.wait_tensor(launched)
            raise
        for item in pending:
            _land(item, flat, n, cols, in_place, keep=own)
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
          cols: int, in_place: bool, keep: bool = False) -> None:
    """Wait for one chunk's gather; unless it was gathered ``in_place`` (eager), its result,
    ``(n * r, cols)``, rank after rank, r rows each, is then written into its rows of the
    output, rank by rank along the columns; gathered by sends and receives, the received
    parts are copied into their columns. ``keep``: the chunk itself is returned (this
    rank's columns), so its memory stays."""
    launched, start, r, received = item
    got = _c10d.wait_tensor(launched)
    if in_place:  # done with: its memory goes now, not when the work object does
        for o, buf in received or ():
            flat[start:start + r].narrow(1, o * cols, cols).copy_(buf)
            buf.untyped_storage().resize_(0)  # (the receive's work object holds it too)
        if not keep:
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


# its call holds the input's conversion; its item 0 is the gathered output, item 1 this
# rank's columns of it (no collective of their own)
C.HOLDS_CONVERSION.add(colwise_head)
C.ITEMS[colwise_head] = lambda i: C.COLLECTIVES[C.gather] if i == 0 else (None, None)
