"""The closed-form price of one candidate: memory at the peak and time per step.

Everything here is arithmetic on :mod:`facts` (no planning, no tracing): a candidate is a
mesh ``(dp, tp)``, sequence parallelism on or off, how many blocks are checkpointed, the
micro-batch, and which lone layers stay replicated.

Memory per device: fp32 master parameters, gradients and optimizer states, each sharded
over tp as the plan places it and over dp by FSDP2 (rounded up as FSDP2 pads); the
activations autograd keeps (per micro-batch; a checkpointed block keeps its inputs only,
and one block's worth is rebuilt at a time), the logits and the loss's fp32 buffers; and
the transient: the root's and two blocks' gathered parameters (one running, one
prefetched), one unit's unsharded gradients before its reduce-scatter, the buffers.

Time per step: per micro-batch every matmul at the roofline (FLOPs at the device's
achieved rate, or its bytes at the memory bandwidth, whichever is longer), every other
op's bytes at the memory bandwidth, a host overhead per op; tensor-parallel collectives
are on the critical path; FSDP's all-gathers (forward and backward) and reduce-scatter of
each unit run under the unit's compute up to ``fsdp_overlap``; checkpointed blocks run
their forward (and its collectives) twice. Then the optimizer step, memory-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .devices import GiB, DevicePreset
from .facts import ModelFacts, Param, UnitFacts
from .terms import B0, Term, div
from .value import MemoryBreakdown, Suggestion, TimeBreakdown

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "adafactor": 1}
MASTER = 4  # bytes: fp32 master weights, gradients and optimizer states
# per logit at the loss's backward: the fp32 log-softmax kept, its gradient and the input's
# (the caller drops its reference to the logits before backward, as torchtitan does)
LOSS_BYTES = 12


@dataclass(frozen=True)
class Setup:
    world: int
    gpus_per_node: int
    global_batch: int
    seq_len: int
    dtype: str
    states: int  # optimizer states per parameter
    device: DevicePreset


@dataclass(frozen=True)
class Candidate:
    dp: int
    tp: int
    sp: bool
    ckpt: int  # checkpointed blocks
    mb: int
    replicate: frozenset[str] = field(default_factory=frozenset)


def pdiv(split: int, tp: int) -> int:
    """How a parameter divides over tp: a shared kv head's weight is whole on each rank
    once tp exceeds the heads."""
    return 1 if split == 0 else tp if split < 0 or tp <= split else 1


def scale(t: Term, tp: int, mb: int, seq: int, s0: int) -> float:
    per = (mb / B0) * (seq / s0) ** t.es if t.es else 1.0
    return t.value * per / div(t.split, tp)


def local_numel(p: Param, tp: int, dp: int, replicated: bool) -> int:
    shape = list(p.shape)
    if p.tp_dim is not None and not replicated:
        shape[p.tp_dim] = -(-shape[p.tp_dim] // pdiv(p.split, tp))
    if p.dp_dim is not None and dp > 1 and shape:
        shape[p.dp_dim] = -(-shape[p.dp_dim] // dp)
    return math.prod(shape)


def _level(group_span: int, gpn: int) -> str:
    return "intra" if group_span <= gpn else "inter"


@dataclass
class _Unit:
    """One unit's per-member numbers for a candidate."""

    fwd: float  # compute seconds, one call
    bwd: float
    tp_fwd: float  # tp collective seconds
    tp_bwd: float
    gathered: float  # parameter bytes after the tp shard (compute dtype)
    saved: float  # bytes kept for backward
    inputs: float  # bytes a checkpoint keeps


def _unit(f: ModelFacts, u: UnitFacts, c: Candidate, s: Setup) -> _Unit:
    d, seq, s0 = s.device, s.seq_len, f.s0
    bw = d.memory_bandwidth
    rep = c.replicate if not u.path else frozenset()
    fwd = bwd = 0.0
    for m in u.matmuls:
        t = Term(m.flops.value, m.flops.es, 0 if m.layer in rep else m.flops.split)
        flops = scale(t, c.tp, c.mb, seq, s0)
        moved = scale(m.act_bytes, c.tp, c.mb, seq, s0) + m.weight_bytes / div(t.split, c.tp)
        smallest = float("inf")
        if m.rows is not None:
            parts = div(t.split, c.tp)
            smallest = min(scale(m.rows, 1, c.mb, seq, s0), m.n / (parts if m.shard == "n" else 1),
                           m.k / (parts if m.shard == "k" else 1))
        once = d.matmul_seconds(flops, s.dtype, smallest)
        fwd += max(once, moved / bw)
        bwd += max(m.backward * once, 2 * moved / bw)
    traffic = sum(scale(t, c.tp, c.mb, seq, s0) for t in u.traffic) / bw
    fwd += traffic + u.ops * d.op_overhead / 3
    bwd += 2 * traffic + 2 * u.ops * d.op_overhead / 3
    tp_fwd = tp_bwd = 0.0
    if c.tp > 1:
        level = _level(c.tp, s.gpus_per_node)
        for col in u.collectives:
            if rep & set(col.layers):
                continue
            sec = d.collective_seconds(col.kind, level, c.tp, scale(col.nbytes, 1, c.mb, seq, s0))
            if col.phase == "forward":
                tp_fwd += sec
            else:
                tp_bwd += sec
    itemsize = f.dtype.itemsize
    gathered = sum(p.numel / (1 if p.layer in rep or p.tp_dim is None else pdiv(p.split, c.tp))
                   for p in u.params) * itemsize
    saved = sum(scale(t, c.tp, c.mb, seq, s0) for t in u.saved)
    inputs = sum(scale(t, c.tp if c.sp else 1, c.mb, seq, s0) for t in u.inputs)
    return _Unit(fwd, bwd, tp_fwd, tp_bwd, gathered, saved, inputs)


def price(f: ModelFacts, c: Candidate, s: Setup) -> Suggestion:
    """One candidate's peak memory and step time, as a :class:`Suggestion`."""
    units = [(u, _unit(f, u, c, s)) for u in f.modes[c.sp and c.tp > 1].units]
    memory = _memory(f, c, s, units)
    time = _time(f, c, s, units, memory)
    feasible = memory.total <= s.device.usable_bytes
    return Suggestion(
        mesh_shape=(c.dp, c.tp), sequence_parallel=c.sp and c.tp > 1,
        activation_checkpointing="block" if c.ckpt else "none", checkpoint_blocks=c.ckpt,
        blocks=f.blocks, micro_batch=c.mb, grad_accumulation=max(s.global_batch // c.dp // c.mb, 1),
        global_batch=s.global_batch, seq_len=s.seq_len, dtype=s.dtype, device=s.device.name,
        feasible=feasible, reason="" if feasible else over_memory(memory),
        step_time_s=time.step, tokens_per_s_per_device=s.global_batch * s.seq_len / time.step / s.world,
        memory=memory, time=time, replicate=sorted(c.replicate))


def _memory(f: ModelFacts, c: Candidate, s: Setup, units: list[tuple[UnitFacts, _Unit]]
            ) -> MemoryBreakdown:
    blocks = [(u, x) for u, x in units if u.path]
    frac = c.ckpt / max(f.blocks, 1)
    numel = sum(local_numel(p, c.tp, c.dp, p.layer in c.replicate and not u.path) * u.members
                for u, _ in units for p in u.params)
    block_saved = sum(x.saved * u.members for u, x in blocks)
    ckpt_kept = sum(x.inputs * u.members for u, x in blocks if u.top_block)
    rebuild = max((x.saved for u, x in blocks if u.top_block), default=0.0) if c.ckpt else 0.0
    acts = (sum(x.saved for u, x in units if not u.path) + block_saved * (1 - frac)
            + ckpt_kept * frac + _logits(f, c, s) * LOSS_BYTES)
    # FSDP2 (or the mixed-precision cast) holds the root's parameters unsharded through
    # forward, its gradients through backward (its reduce-scatter comes last), and a
    # block's while it runs with the next one prefetched
    held = c.dp > 1 or f.dtype.itemsize < MASTER
    root = sum(x.gathered for u, x in units if not u.path) if held else 0.0
    biggest = max((x.gathered for _, x in blocks), default=0.0)
    transient = 2 * root + (3 * biggest if held else biggest) + rebuild + f.buffers_bytes
    state = numel * MASTER
    total = state * (2 + s.states) + acts + transient
    return MemoryBreakdown(params=int(state), grads=int(state), optimizer=int(state * s.states),
                           activations=int(acts), transient=int(transient), total=int(total),
                           available=s.device.usable_bytes)


def _logits(f: ModelFacts, c: Candidate, s: Setup) -> float:
    """Values of the model's floating outputs (the logits) per micro-batch, on every rank."""
    return sum(scale(t, 1, c.mb, s.seq_len, f.s0) for u in f.modes[True].units
               for t in u.outputs) / f.dtype.itemsize


def _time(f: ModelFacts, c: Candidate, s: Setup, units: list[tuple[UnitFacts, _Unit]],
          memory: MemoryBreakdown) -> TimeBreakdown:
    d = s.device
    frac = c.ckpt / max(f.blocks, 1)
    blocks = [(u, x) for u, x in units if u.path]
    compute = sum((x.fwd + x.bwd) * u.members for u, x in units) + d.loss_seconds(_logits(f, c, s))
    recompute = frac * sum(x.fwd * u.members for u, x in blocks)
    tp_comm = sum((x.tp_fwd + x.tp_bwd) * u.members for u, x in units)
    tp_comm += frac * sum(x.tp_fwd * u.members for u, x in blocks)  # rebuilt blocks talk again
    fsdp = hidden = 0.0
    level = _level(c.dp * c.tp, s.gpus_per_node)
    per_node = max(s.gpus_per_node // c.tp, 1)  # the dp group's ranks on one node
    for i, (u, x) in enumerate(units):
        unsharded = x.gathered / f.dtype.itemsize * MASTER  # gradients, in the reduce dtype
        ag = d.collective_seconds("all_gather", level, c.dp, x.gathered, per_node)
        rs = d.collective_seconds("reduce_scatter", level, c.dp, unsharded, per_node)
        comm = 2 * ag + rs
        # FSDP2's copies into and out of its flat buffers (both all-gathers, the
        # reduce-scatter), and a few ops per parameter: on the critical path
        host = (4 * x.gathered + 2 * unsharded) / d.memory_bandwidth + 4 * len(u.params) * d.op_overhead
        under = x.fwd + x.bwd + (frac * x.fwd if u.path else 0.0)
        # the first unit's forward all-gather has nothing to hide under
        h = min(comm, d.fsdp_overlap * under) if i else min(comm - ag, d.fsdp_overlap * under)
        fsdp += (comm + host) * u.members
        hidden += max(h, 0.0) * u.members
    # AdamW: read the parameter, its gradient and states, write the parameter and states
    optimizer = memory.params * (3 + 2 * s.states + (2 if s.states else 0)) / d.memory_bandwidth
    accum = max(s.global_batch // c.dp // c.mb, 1)
    step = accum * (compute + recompute + tp_comm + fsdp - hidden) + optimizer
    return TimeBreakdown(compute=accum * compute + optimizer, recompute=accum * recompute,
                         tp_comm=accum * tp_comm, fsdp_comm=accum * fsdp,
                         fsdp_comm_hidden=accum * hidden, fsdp_comm_exposed=accum * (fsdp - hidden),
                         step=step)


def over_memory(m: MemoryBreakdown) -> str:
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    return (f"needs {g(m.total)} GiB per device, {g(m.available)} GiB available (params "
            f"{g(m.params)}, grads {g(m.grads)}, optimizer {g(m.optimizer)}, activations "
            f"{g(m.activations)}, transient {g(m.transient)})")


def checkpoint_needed(f: ModelFacts, c: Candidate, s: Setup) -> int | None:
    """The fewest checkpointed blocks that fit (memory falls linearly with their number),
    0 when none are needed, None when even all do not fit."""
    none = price(f, Candidate(c.dp, c.tp, c.sp, 0, c.mb, c.replicate), s)
    if none.feasible:
        return 0
    full = price(f, Candidate(c.dp, c.tp, c.sp, f.blocks, c.mb, c.replicate), s)
    if not full.feasible or f.blocks == 0:
        return None
    one = price(f, Candidate(c.dp, c.tp, c.sp, 1, c.mb, c.replicate), s)
    per_block = (one.memory.total - full.memory.total) / max(f.blocks - 1, 1)
    over = one.memory.total - s.device.usable_bytes
    k = 1 + math.ceil(over / per_block) if per_block > 0 and over > 0 else 1
    return min(max(k, 1), f.blocks)
