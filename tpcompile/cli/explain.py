"""What a plan does to a model, in numbers: segments and placements per block, every
collective the rewrite inserts (shape, bytes, forward and backward), per-rank memory.

Everything is derived from the Plan and the traced graphs (``Compiled.units``), the same
facts the rewrite reads, so it needs no process group: a meta-device 70B model explains
in seconds. Byte counts are of the full (logical) tensor a collective moves; ``wire``
bytes are what each rank sends in a ring implementation: ``2 (t-1)/t`` of the tensor for
an all-reduce, ``(t-1)/t`` for an all-gather or reduce-scatter.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..analysis import ops
from ..analysis.layers import is_block, layer_of, layer_params, param_role
from ..analysis.layout import R, info
from ..planning.build import Compiled, Unit
from ..planning.value import PLACEMENTS, placement
from ..rewrite import collectives as C
from ..rewrite.codegen import Site, rewrite
from ..suggest import Suggestion

Kind = Literal["all_reduce", "all_gather", "reduce_scatter"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerReport(_M):
    name: str
    style: str
    placements: dict[str, str]  # parameter -> placement on the tp mesh


class SegmentReport(_M):
    kind: str
    layers: list[LayerReport]


class BlockReport(_M):
    path: str
    module_type: str
    members: int
    inputs: list[str]
    output: str
    segments: list[SegmentReport]
    norms: list[LayerReport]
    # replicated parameters each rank reads a slice of (a q/k norm over the whole sharded
    # projection, gpt-oss's sinks): their compute is sharded, their gradient summed over tp
    sliced: list[LayerReport] = []


class CollectiveReport(_M):
    module: str  # the traced module (root or block group) it sits in
    at: str  # the graph node or layer it serves
    kind: Kind
    phase: Literal["forward", "backward"]
    why: str
    shape: list[int]  # the full tensor
    dtype: str
    bytes: int  # of the full tensor, per call
    count: int  # calls per step (blocks of the group times one)
    wire_bytes_per_rank: int  # per step, all calls


class MemoryReport(_M):
    params_per_rank_bytes: int
    params_sharded_bytes: int
    params_replicated_bytes: int
    params_total_bytes: int
    activations_sp_bytes: int
    activations_no_sp_bytes: int


class CommReport(_M):
    forward_wire_bytes: int
    backward_wire_bytes: int
    total_wire_bytes: int
    megatron_min_wire_bytes: int
    dp_wire_bytes: int


class Replicated(_M):
    layer: str
    reason: str


class Explanation(_M):
    schema_version: Literal[1] = 1
    model: str
    tp: int
    dp: int
    batch: int
    seq: int
    dtype: str
    sequence_parallel: bool
    plan_seconds: float
    blocks: list[BlockReport]
    collectives: list[CollectiveReport]
    memory: MemoryReport
    comm: CommReport
    replicated: list[Replicated]
    # the cost model's memory and step time for this mesh and batch (tpcompile.suggest),
    # with AdamW, on the device preset explain was given; None without one, or for a
    # given plan
    predicted: Suggestion | None = None


def _bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _wire(kind: str, nbytes: int, tp: int) -> int:
    frac = (tp - 1) / tp
    return int(round(nbytes * frac * (2 if kind == "all_reduce" else 1)))


# ------------------------------------------------------------------- collectives

def unit_collectives(u: Unit, tp: int) -> list[tuple]:
    """(at, kind, phase, why, full shape, dtype, (from node, to node)) for one call of the
    unit's program, read off the program the rewrite builds (no process group needed: the
    group is only a name in the graph), so explain and the rewrite cannot disagree."""
    rw = rewrite(u.t, u.prop, u.styles, u.q_nodes, tp, "explain", u.contracts)
    out = []
    for node in rw.graph.nodes:
        site: Site | None = node.meta.get("tpc_site")
        if site is None:
            continue
        t = site.tensor
        for kind, phase in zip(C.collectives_of(node), ("forward", "backward")):
            # no gradient reaches a constant (the rope tables): its backward never runs
            if kind and (phase == "forward" or t.requires_grad):
                out.append((site.at, kind, phase, site.why, t.shape, t.dtype,
                            (site.src, site.dst)))
    return out


def collectives(c: Compiled) -> list[CollectiveReport]:
    tp = c.plan.tp
    out = []
    for u in c.units:
        count = len(u.members)
        for at, kind, phase, why, shape, dtype, _ in unit_collectives(u, tp):
            b = _bytes(shape, dtype)
            out.append(CollectiveReport(
                module=u.plan.path or "<root>", at=at, kind=kind, phase=phase, why=why,  # type: ignore[arg-type]
                shape=list(shape), dtype=str(dtype).removeprefix("torch."), bytes=b, count=count,
                wire_bytes_per_rank=_wire(kind, b, tp) * count))
    return out


def megatron_min(c: Compiled) -> int:
    """Per step: every segment one all-reduce of its output in forward (none for a head,
    whose logits a vocab-parallel loss could keep sharded) and one of its input gradient in
    backward; a vocab-parallel embedding one all-reduce in forward."""
    tp, total = c.plan.tp, 0
    for u in c.units:
        mods = {l.name: n for n in u.gm.graph.nodes if (l := layer_of(n)) is not None}
        per_call = 0
        for seg in u.plan.segments:
            inputs = {mods[x].args[0] for x in seg.colwise if x in mods}
            per_call += sum(_wire("all_reduce", _bytes(info(i).shape, info(i).dtype), tp)
                            for i in inputs if info(i) is not None)
            for r in seg.rowwise if seg.kind != "head" else []:
                t = info(mods[r])
                per_call += _wire("all_reduce", _bytes(t.shape, t.dtype), tp)
        for name, style in u.styles.items():
            if style == "vocab_parallel" and name in mods:
                t = info(mods[name])
                per_call += _wire("all_reduce", _bytes(t.shape, t.dtype), tp)
        total += per_call * len(u.members)
    return total


# ------------------------------------------------------------------- blocks, memory

def _placements(style: str, owner: nn.Module, layer: str, packed: int | None,
                kind: str | None = None) -> dict[str, str]:
    out = {}
    for pn in layer_params(owner, layer):
        pl = placement(kind or ("conv1d" if _is_conv1d(owner, layer) else "linear"), style, pn,
                       packed)
        out[pn] = repr(pl) if pl is not None else (
            "Replicate (grad summed over tp)" if style == "sequence_parallel" else
            "Replicate (added once, after the reduction)" if style == "rowwise" else "Replicate")
    return out


def _is_conv1d(owner: nn.Module, layer: str) -> bool:
    try:
        return type(owner.get_submodule(layer)).__name__ == "Conv1D"
    except AttributeError:  # a Parameter pair (in_proj_weight), used as a Linear's
        return False


def blocks(c: Compiled, model: nn.Module) -> list[BlockReport]:
    out = []
    for u in c.units:
        mp, owner = u.plan, model.get_submodule(u.members[0])
        layer = lambda n: LayerReport(name=n, style=mp.styles[n],  # noqa: E731
                                      placements=_placements(mp.styles[n], owner, n,
                                                             mp.packed.get(n), mp.experts.get(n)))
        segs = [SegmentReport(kind=s.kind, layers=[layer(n) for n in s.colwise + s.rowwise])
                for s in mp.segments]
        in_seg = {n for s in mp.segments for n in s.colwise + s.rowwise}
        lone = [layer(n) for n, st in mp.styles.items() if n not in in_seg and st != "sequence_parallel"]
        if lone:
            segs.append(SegmentReport(kind="embedding", layers=lone))
        norms = [layer(n) for n, st in mp.styles.items() if st == "sequence_parallel"]
        sliced: dict[str, dict[str, str]] = {}
        for name in mp.sliced:
            owner_name, role = param_role(name)  # "mlp.router", "weight"; "attn", "sinks"
            sliced.setdefault(owner_name, {})[role] = \
                "Replicate (each rank reads its slice; grad summed over tp)"
        out.append(BlockReport(path=mp.path or "<root>", module_type=mp.module_type,
                               members=len(u.members), inputs=list(mp.inputs), output=mp.output,
                               segments=segs, norms=norms,
                               sliced=[LayerReport(name=n, style="read in slices", placements=pl)
                                       for n, pl in sliced.items()]))
    return out


def param_memory(c: Compiled, model: nn.Module, dp: int) -> tuple[int, int, int]:
    """(sharded, replicated, total) parameter bytes on one rank; FSDP divides by dp."""
    styles, tp = c.plan.layer_styles(), c.plan.tp
    shared = {f"{m}.{rel}" if m else rel for mp in c.plan.modules for m in mp.members
              for rel in mp.grouped}  # kv heads shared by groups of ranks: held whole
    sharded = replicated = total = 0
    experts = {f"{m}.{rel}" if m else rel for mp in c.plan.modules for m in mp.members
               for rel in mp.experts}  # a Parameter of experts: a layer of its own
    for name, p in model.named_parameters():
        owner, pn = (name, "weight") if name in experts else param_role(name)
        b = p.numel() * p.dtype.itemsize
        total += b
        if (styles.get(owner), pn) in PLACEMENTS and owner not in shared:
            sharded += b // tp
        else:
            replicated += b
    return sharded // dp, replicated // dp, total


def activation_memory(c: Compiled) -> int:
    """Bytes of every intermediate tensor the traced programs produce on one rank (what
    autograd could keep for backward; attention internals not counted): sharded tensors
    count 1/tp, each block once per member."""
    tp, total = c.plan.tp, 0
    for u in c.units:
        per_call = 0
        for n in u.gm.graph.nodes:
            t = info(n)
            if t is None or n.op in ("placeholder", "get_attr", "output") or ops.is_meta_op(n):
                continue
            if is_block(n) or n.target is operator.getitem and is_block(n.args[0]):
                continue  # a block's tensors are counted in its own program
            per_call += _bytes(t.shape, t.dtype) // (tp if u.prop.layouts.get(n, R).sharded else 1)
        total += per_call * len(u.members)
    return total


def replicated(c: Compiled, model: nn.Module) -> list[Replicated]:
    """The plan's notes, named from the model's root (a block's as ``layers.*.wo``), then
    every other Linear or Embedding no style covers."""
    out, noted = [], set()
    for m in c.plan.modules:
        for n in m.notes:
            out.append(Replicated(layer=f"{m.path}.{n.layer}" if m.path else n.layer,
                                  reason=n.reason))
            noted.update(f"{member}.{n.layer}" if member else n.layer for member in m.members)
    styles = c.plan.layer_styles()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and name not in styles and name not in noted:
            out.append(Replicated(layer=name, reason="not part of any segment the analysis "
                                  "could prove safe to shard"))
    return out


def explain(model: nn.Module, *, tp: int, dp: int = 1, batch: int = 1, seq: int = 2048,
            sequence_parallel: bool = True, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, name: str = "", plan: object = None,
            tracer: str = "auto", device: str | None = None,
            checkpointing: int | str = "none") -> tuple[Explanation, Compiled]:
    """Plan ``model`` (meta device is fine) at ``tp`` and say what the rewrite would do for
    inputs of ``batch`` x ``seq`` (or ``example_inputs``); with ``device`` (a preset name or
    file) also the cost model's predicted memory and step time (``predicted``), with
    ``checkpointing`` blocks (``"block"``: every one) under activation checkpointing."""
    from ..api import load_plan
    from ..planning.build import compile_model, synthesize_inputs
    for what, value in (("dp", dp), ("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if example_inputs is None and example_kwargs is None:
        example_inputs = synthesize_inputs(model, batch=batch, seq=seq)
    given = load_plan(plan)  # type: ignore[arg-type]
    kw = dict(tp=tp, example_inputs=example_inputs, example_kwargs=example_kwargs, given=given,
              tracer=tracer)
    c = compile_model(model, sequence_parallel=sequence_parallel, **kw)  # type: ignore[arg-type]
    with warnings.catch_warnings():  # planned again only to compare activations: the
        warnings.simplefilter("ignore")  # same layers' warnings were just given once
        other = compile_model(model, sequence_parallel=not sequence_parallel, **kw)  # type: ignore[arg-type]
    sp_c, no_c = (c, other) if sequence_parallel else (other, c)
    if sequence_parallel and seq % tp and any(u.q_nodes for u in c.units):
        from ..errors import RuntimeShapeError
        raise RuntimeShapeError(
            f"seq = {seq} is not divisible by tp = {tp}: under sequence parallelism each rank "
            f"holds seq / tp positions, so the run would be refused. Pick a multiple of {tp}, "
            "or explain without sequence parallelism (--no-sp)")
    colls = collectives(c)
    fwd = sum(x.wire_bytes_per_rank for x in colls if x.phase == "forward")
    bwd = sum(x.wire_bytes_per_rank for x in colls if x.phase == "backward")
    sh, rep, total = param_memory(c, model, dp)
    per_rank = sh + rep
    dp_wire = int(round(3 * per_rank * dp * (dp - 1) / dp)) if dp > 1 else 0
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return Explanation(
        model=name or type(model).__name__, tp=tp, dp=dp, batch=batch, seq=seq,
        dtype=str(dtype).removeprefix("torch."), sequence_parallel=sequence_parallel,
        plan_seconds=round(c.seconds, 4), blocks=blocks(c, model), collectives=colls,
        memory=MemoryReport(params_per_rank_bytes=per_rank, params_sharded_bytes=sh,
                            params_replicated_bytes=rep, params_total_bytes=total,
                            activations_sp_bytes=activation_memory(sp_c),
                            activations_no_sp_bytes=activation_memory(no_c)),
        comm=CommReport(forward_wire_bytes=fwd, backward_wire_bytes=bwd, total_wire_bytes=fwd + bwd,
                        megatron_min_wire_bytes=megatron_min(c), dp_wire_bytes=dp_wire),
        replicated=replicated(c, model),
        predicted=None if plan is not None or device is None else _predict(
            model, tp, dp, batch, seq, sequence_parallel, dtype, device, checkpointing)), c


def _predict(model: nn.Module, tp: int, dp: int, batch: int, seq: int, sp: bool,
             dtype: torch.dtype, device: str, checkpointing: int | str = "none") -> Suggestion | None:
    from ..suggest.search import price_mesh
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return price_mesh(model, dp=dp, tp=tp, batch=batch, seq_len=seq, sequence_parallel=sp,
                      dtype=name, device=device, checkpoint_blocks=checkpointing)
