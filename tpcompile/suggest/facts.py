"""What the cost model knows about a model, read off tpcompile's own plan and programs.

One planning run at the largest tensor-parallel degree ``T`` the search may use (with
and without sequence parallelism) gives, per traced module (the root, each group of
identical blocks):

* every parameter, its tp placement (colwise ``Shard(0)``, rowwise ``Shard(1)``, a kv
  head shared by groups of ranks, replicated) and the FSDP unit it is gathered with;
* every collective the rewrite writes into the program, with the full tensor it moves
  (the rewritten graph's ``tpc_site``, as ``explain`` reads it);
* the FLOPs of every matmul and attention, and the bytes every other op reads and writes,
  each with the layout the propagation gave it (sharded: 1/tp per rank);
* the tensors autograd keeps for backward: the traced graph is run on the meta device
  under ``saved_tensors_hooks`` (attention as a fused kernel keeps q, k, v and its
  output), each saved tensor charged to the node that made it and divided by tp where
  its layout is sharded. Colwise layers keep their *gathered* input (the rewrite's
  ``colwise_linears`` saves it for the weight gradient), so that one counts whole.

The example call is ``b0 x s0`` with ``s0`` a multiple of ``T`` that no parameter dim
equals; a tensor dim equal to ``s0`` (or ``b0 * s0``, a flattened batch) marks a sequence
dim, so every number scales in closed form to other batch sizes and lengths (an
``s x s`` attention mask: quadratically). Sizes at a smaller tp follow from the
layouts: a sharded dim divides by tp, a shared kv head by ``min(tp, heads)``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..analysis import is_block, layer_of, layer_params
from ..planning import Compiled, Unit, placement
from ..rewrite import collectives as C
from ..rewrite.codegen import rewrite
from .saved import ATTENTION, saved_terms
from .terms import B0, Term, seq_power, split_of

aten = torch.ops.aten
MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten.matmul.default, aten.baddbmm.default}


@dataclass(frozen=True)
class Matmul:
    flops: Term  # forward FLOPs
    act_bytes: Term  # activations read and written
    weight_bytes: float  # of the whole weight (divided like ``flops``)
    backward: float  # backward FLOPs / forward FLOPs
    layer: str | None = None
    rows: Term | None = None  # (M, N, K) of a plain matmul: M rows (scaling like a tensor),
    n: int = 0  # N and K whole; ``shard`` says which one tp divides ("n", "k" or "")
    k: int = 0
    shard: str = ""


@dataclass(frozen=True)
class Collective:
    kind: str
    phase: str
    nbytes: Term  # the full tensor, per call
    at: str
    layers: tuple[str, ...] = ()  # the layers at either end of the edge it serves


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shape: tuple[int, ...]
    tp_dim: int | None  # the dim tp shards
    split: int  # as Term.split
    dp_dim: int | None  # the dim FSDP shards (None: replicated over dp)
    layer: str | None


@dataclass
class UnitFacts:
    """One traced module: the root (``path`` "") or a group of identical blocks."""

    path: str
    members: int
    top_block: bool  # a block no other block contains: what activation checkpointing wraps
    params: list[Param] = field(default_factory=list)  # of one member, nested blocks excluded
    inputs: list[Term] = field(default_factory=list)  # a block's tensor inputs (what a checkpoint keeps)
    saved: list[Term] = field(default_factory=list)  # kept for backward, one call
    matmuls: list[Matmul] = field(default_factory=list)
    traffic: list[Term] = field(default_factory=list)  # bytes other ops read and write
    ops: int = 0
    collectives: list[Collective] = field(default_factory=list)
    outputs: list[Term] = field(default_factory=list)  # the root's floating outputs (logits)


@dataclass
class ModeFacts:
    sequence_parallel: bool
    units: list[UnitFacts]


@dataclass
class ModelFacts:
    name: str
    tp: int  # the degree planned at; smaller tps are derived
    s0: int
    dtype: torch.dtype
    modes: dict[bool, ModeFacts]  # by sequence_parallel
    buffers_bytes: int
    lone_layers: dict[str, str]  # embeddings and heads sharded on their own -> style
    styles: dict[str, str]  # the plan as a flat {layer or glob: style} mapping
    notes: list[str]
    plan_seconds: float
    indivisible: bool = False  # a layer left replicated for a size this tp does not divide

    @property
    def blocks(self) -> int:
        return sum(u.members for u in self.modes[True].units if u.top_block)


def _shape(n: Any) -> tuple[int, ...] | None:
    t = n.meta.get("tpc") if isinstance(n, fx.Node) else None
    return tuple(t.shape) if t is not None and hasattr(t, "shape") else None


def _nbytes(n: fx.Node) -> float:
    t = n.meta.get("tpc")
    if t is None or not hasattr(t, "shape"):
        return 0.0
    numel = 1
    for d in t.shape:
        numel *= d
    return float(numel * t.dtype.itemsize)


# ------------------------------------------------------------------- parameters

def unit_params(u: Unit, model: nn.Module, nested: list[str]) -> list[Param]:
    """Parameters of the unit's first member (minus nested blocks), each with its tp and
    dp placement: the placement ``auto_parallelize`` gives (``planning.placement``), and
    FSDP2's dp dim as ``runtime.distribute`` chooses it (dim 0; dim 1 under a strided tp
    shard of dim 0; a strided vector stays replicated over dp)."""
    member = u.members[0]
    module = model.get_submodule(member)
    kinds = {l.name: l.kind for n in u.gm.graph.nodes if (l := layer_of(n)) is not None}
    owner: dict[str, tuple[str, Any, int]] = {}
    for rel, style in u.styles.items():
        for pname, name in layer_params(module, rel).items():
            pl = placement(kinds.get(rel, "linear"), style, pname, u.prop.packed.get(rel))
            split = 0 if pl is None else u.prop.grouped.get(rel, -1)
            owner[name] = (rel, pl, split)
    out = []
    for name, p in module.named_parameters():
        if any(name == m or name.startswith(m + ".") for m in nested):
            continue
        rel, pl, split = owner.get(name, (None, None, 0))
        strided = pl is not None and type(pl).__name__ == "_StridedShard"
        dp_dim: int | None = 0
        if strided and pl.dim == 0:
            dp_dim = 1 if p.dim() > 1 else None
        out.append(Param(name, p.numel(), tuple(p.shape), pl.dim if pl is not None else None,
                         split, dp_dim, rel))
    return out


# ------------------------------------------------------------------- compute

def _layout_split(u: Unit, nodes: list[Any]) -> int:
    for n in nodes:
        sp = split_of(u.prop.layouts.get(n)) if isinstance(n, fx.Node) else 0
        if sp:
            return sp
    return 0


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _matmul(u: Unit, n: fx.Node, s0: int) -> Matmul | None:
    out = _shape(n)
    ins = [a for a in n.args if isinstance(a, fx.Node)]
    if out is None or len(ins) < 2 or any(_shape(a) is None for a in ins):
        return None
    numel = 1
    for d in out:
        numel *= d
    weights = set(u.t.params)
    backward = 2.0
    if n.target in ATTENTION:
        q, k = _shape(ins[0]), _shape(ins[1])
        v = _shape(ins[2]) if len(ins) > 2 else k
        flops = 2.0 * numel / q[-1] * k[-2] * (q[-1] + v[-1])  # type: ignore[index]
        if _arg(n, 4, "is_causal", False):
            flops /= 2
        es, backward = seq_power(q, s0) + seq_power(k[-2:-1], s0), 2.5  # type: ignore[index]
        rows = None
        n_dim = k_dim = 0
        shard = ""
    else:
        a, b = (ins[1], ins[2]) if n.target in (aten.addmm.default, aten.baddbmm.default) else (ins[0], ins[1])
        k_dim = _shape(a)[-1]  # type: ignore[index]
        n_dim = out[-1]
        flops = 2.0 * numel * k_dim
        es = seq_power(out, s0) + (1 if k_dim in (s0, B0 * s0) else 0)
        rows = Term(float(numel // n_dim), seq_power(out[:-1], s0), 0)
        out_lay, in_lay = u.prop.layouts.get(n), u.prop.layouts.get(a)
        shard = "n" if split_of(out_lay) and out_lay.dim in (-1, len(out) - 1) else \
            "k" if split_of(in_lay) and in_lay.dim in (-1, len(_shape(a)) - 1) else ""  # type: ignore[union-attr, arg-type]
    split = _layout_split(u, [n, *ins])
    wbytes = sum(_nbytes(a) for a in ins if a in weights)
    act = sum(_nbytes(a) for a in [n, *ins] if a not in weights)
    layer = layer_of(n)
    return Matmul(Term(flops, es, split), Term(act, seq_power(out, s0), split), wbytes, backward,
                  layer.name if layer is not None else None, rows, n_dim, k_dim, shard)


def compute_terms(u: Unit, s0: int) -> tuple[list[Matmul], list[Term], int]:
    matmuls, traffic, ops = [], [], 0
    weights = set(u.t.params) | set(u.t.buffers) | set(u.t.consts)
    for n in u.gm.graph.nodes:
        if n.op != "call_function" or is_block(n) or n.target is operator.getitem:
            continue
        if getattr(n.target, "is_view", False) or n.meta.get("tpc") is None:
            continue
        ops += 1
        if n.target in MATMULS or n.target in ATTENTION:
            m = _matmul(u, n, s0)
            if m is not None:
                matmuls.append(m)
            continue
        for x in [n, *n.all_input_nodes]:
            if x in weights or _shape(x) is None:
                continue
            traffic.append(Term(_nbytes(x), seq_power(_shape(x), s0),  # type: ignore[arg-type]
                                split_of(u.prop.layouts.get(x))))
    return matmuls, traffic, ops


# ------------------------------------------------------------------- collectives

def unit_collectives(u: Unit, tp: int, s0: int) -> list[Collective]:
    """The collectives of one call of the unit's program, read off the rewritten graph."""
    rw = rewrite(u.t, u.prop, u.styles, u.q_nodes, tp, "suggest", u.contracts)
    named = {n.name: n for n in u.gm.graph.nodes}
    out = []
    for node in rw.graph.nodes:
        site = node.meta.get("tpc_site")
        if site is None:
            continue
        ends = [layer_of(named.get(x)) for x in (site.src, site.dst) if x in named]
        layers = tuple({l.name for l in ends if l is not None} | ({site.at} & set(u.styles)))
        t = site.tensor
        numel = 1
        for d in t.shape:
            numel *= d
        for kind, phase in zip(C.collectives_of(node), ("forward", "backward")):
            if kind and (phase == "forward" or t.requires_grad):
                out.append(Collective(kind, phase, Term(float(numel * t.dtype.itemsize),
                                                        seq_power(tuple(t.shape), s0), 0), site.at,
                                      layers))
    return out


# ------------------------------------------------------------------- one plan

def mode_facts(c: Compiled, model: nn.Module, s0: int) -> tuple[ModeFacts, list[str]]:
    tp = c.plan.tp
    paths = {m for u in c.units for m in u.members if m}
    units, failed = [], []
    for u in c.units:
        first = u.members[0]
        nested = sorted(m[len(first) + 1:] if first else m for m in paths
                        if not first or m.startswith(first + "."))
        # what activation checkpointing wraps: a group of a ModuleList's blocks inside no
        # other block (a lone module traced on its own, a final norm, is not one)
        top = "*" in u.plan.path and not any(first.startswith(p + ".") for p in paths)
        f = UnitFacts(u.plan.path, len(u.members), top)
        f.params = unit_params(u, model, nested)
        f.saved, bad = saved_terms(u, s0)
        failed += bad
        f.matmuls, f.traffic, f.ops = compute_terms(u, s0)
        f.collectives = unit_collectives(u, tp, s0)
        if top:
            f.inputs = [Term(_nbytes(p), seq_power(_shape(p) or (), s0), split_of(u.prop.layouts.get(p)))
                        for p in u.t.inputs if getattr(p.meta.get("tpc"), "requires_grad", False)]
        if not first:
            f.outputs = [Term(_nbytes(o), seq_power(_shape(o) or (), s0), 0) for o in u.t.outputs
                         if isinstance(o, fx.Node) and _floating(o)]
        units.append(f)
    return ModeFacts(c.plan.sequence_parallel, units), failed


def _floating(n: fx.Node) -> bool:
    t = n.meta.get("tpc")
    return t is not None and hasattr(t, "dtype") and t.dtype.is_floating_point


def lone_layers(c: Compiled, model: nn.Module) -> dict[str, str]:
    """Sharded layers that are a segment of their own (a vocab-parallel embedding, a head)
    with a weight of their own (not tied): the candidates for replicating when their
    collectives cost more than sharding saves."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name.rpartition(".")[0])
    tied = {layer for names in seen.values() if len(names) > 1 for layer in names}
    out = {}
    for u in c.units:
        in_seg = {n for s in u.plan.segments if s.kind != "head" for n in s.colwise + s.rowwise}
        for name, style in u.styles.items():
            if style in ("vocab_parallel", "colwise") and name not in in_seg:
                for member in u.members:
                    full = f"{member}.{name}" if member else name
                    if full not in tied:
                        out[full] = style
    return out


def flat_styles(c: Compiled) -> dict[str, str]:
    """The plan's layer styles as a flat mapping, one glob per group of blocks (what a
    hand-written plan file holds; sequence parallelism is re-derived, so left out)."""
    return {f"{m.path}.{rel}" if m.path else rel: style for m in c.plan.modules
            for rel, style in sorted(m.styles.items()) if style != "sequence_parallel"}
