"""A Plan in other tools' terms: PyTorch ``parallelize_module`` styles, Hugging Face
``tp_plan`` strings, and back.

PyTorch: each sharded layer gets the ParallelStyle that shards it the same way, with the
input/output layouts of sequence parallelism where the plan has it (as in the PyTorch
tutorial's Llama plan). One thing a plan cannot carry into PyTorch: modules that store
head counts (``self.n_heads``) and view activations with them must have those counts
divided by tp by the caller, as with any hand-written ``parallelize_module`` plan;
tpcompile's own rewrite divides them in the graph.
"""

from __future__ import annotations

from typing import Any, Callable

from ..analysis.layers import UNEMBED
from ..errors import PlanError
from .files import flat_plan
from .value import ModulePlan, Plan, SegmentPlan

# HF tp_plan string -> tpcompile style; the first HF name listed per style is the one written
_FROM_HF = {
    "colwise": "colwise", "colwise_rep": "colwise", "local_colwise": "colwise",
    "rowwise": "rowwise", "rowwise_rep": "rowwise", "local_rowwise": "rowwise",
    "embedding_rowwise": "vocab_parallel", "sequence_parallel": "sequence_parallel",
    "replicate": "replicate",
    # a replicated layer whose gradient is summed over tp (per-head q/k norms): tpcompile
    # finds that sum itself, so the layer is plainly replicated in the plan
    "replicated_with_grad_allreduce": "replicate",
}
SUMMED_HF = "replicated_with_grad_allreduce"
_TO_HF = {"colwise": "colwise", "rowwise": "rowwise", "vocab_parallel": "embedding_rowwise",
          "sequence_parallel": "sequence_parallel", "replicate": "replicate"}
HEAD_HF = "colwise_rep"  # a colwise head whose output is gathered (tpcompile's I/O contract)


def _keys(mp: ModulePlan) -> list[str]:
    """Prefixes naming the module plan's members: its glob path, or each member."""
    return [mp.path] if "*" in mp.path else list(mp.members)


def _heads(mp: ModulePlan) -> set[str]:
    return {n for s in mp.segments if s.kind == "head" for n in s.colwise}


def _abs(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix else rel


def to_hf_tp_plan(plan: Plan) -> dict[str, str]:
    """``{fqn_or_glob: hf_style}``; a colwise head is ``colwise_rep`` (output gathered)."""
    _check_unembed(plan, "Hugging Face's tp_plan")
    _check_experts(plan, "Hugging Face's tp_plan")
    _check_packed(plan, "a Hugging Face 'colwise'")
    _check_grouped(plan, "a Hugging Face 'colwise'")
    _check_sliced(plan, "Hugging Face's tp_plan")
    out: dict[str, str] = {}
    for mp in plan.modules:
        heads = _heads(mp)
        for prefix in _keys(mp):
            for rel, style in mp.styles.items():
                out[_abs(prefix, rel)] = HEAD_HF if rel in heads else _TO_HF[style]
            for name in mp.summed:
                out[_abs(prefix, name.rpartition(".")[0])] = SUMMED_HF
    return dict(sorted(out.items()))


def from_hf_tp_plan(tp_plan: dict[str, str]) -> Plan:
    """A flat plan from a Hugging Face ``tp_plan``; names and globs are kept as given and
    checked against the model when the plan is applied."""
    bad = {k: v for k, v in tp_plan.items() if v not in _FROM_HF}
    if bad:
        k, v = next(iter(bad.items()))
        raise PlanError(f"{k}: Hugging Face style {v!r} has no tpcompile equivalent (supported: "
                        f"{', '.join(_FROM_HF)}); replace it, or leave the layer out to let "
                        "tpcompile detect it")
    plan = flat_plan({k: _FROM_HF[v] for k, v in tp_plan.items()}, "<hf tp_plan>")
    heads = [k for k, v in tp_plan.items() if v == HEAD_HF]
    plan.modules[0].segments = [SegmentPlan(kind="head", colwise=[h]) for h in heads]
    return plan


def to_parallelize_plan(plan: Plan) -> dict[str, Any]:
    """``{fqn_or_glob: ParallelStyle}`` for ``torch.distributed.tensor.parallel.
    parallelize_module``. In a module with sequence parallelism colwise layers take
    sequence-sharded inputs (``Shard(1)``, gathered inside the style) and rowwise layers and
    the embedding give sequence-sharded outputs (reduce-scattered)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel
    _check_unembed(plan, "parallelize_module")
    _check_experts(plan, "parallelize_module")
    _check_sp_entry(plan)
    _check_packed(plan, "a parallelize_module ColwiseParallel")
    _check_grouped(plan, "a parallelize_module ColwiseParallel")
    _check_summed(plan)
    _check_sliced(plan, "parallelize_module")
    out: dict[str, Any] = {}
    for mp in plan.modules:
        sp = plan.sequence_parallel and _has_sp(mp)
        seq = Shard(1) if sp else Replicate()
        heads = _heads(mp)
        for prefix in _keys(mp):
            for rel, style in mp.styles.items():
                if style == "colwise":
                    st: Any = ColwiseParallel(input_layouts=seq, output_layouts=Replicate()) \
                        if rel in heads else ColwiseParallel(input_layouts=seq)
                elif style == "rowwise":
                    st = RowwiseParallel(output_layouts=seq)
                elif style == "vocab_parallel":  # PyTorch's rowwise Embedding splits the vocab
                    # a position table looked up by [T] positions gives [T, d]: its
                    # sequence is dim 0, reduce-scattered there to meet [B, T/tp, d]
                    at = Shard(mp.seq_dims[rel]) if sp and rel in mp.seq_dims else seq
                    st = RowwiseParallel(input_layouts=Replicate(), output_layouts=at)
                elif style == "sequence_parallel":
                    st = SequenceParallel()
                else:
                    continue
                out[_abs(prefix, rel)] = st
    return dict(sorted(out.items()))  # every rank must apply the styles in the same order


def _refuse(plan: Plan, found: Callable[[ModulePlan], list[tuple[str, str]]], why: str) -> None:
    """Raise a PlanError naming every layer ``found`` reports in any module (each with
    its detail), followed by ``why``; nothing found, nothing raised."""
    named = sorted(_abs(prefix, rel) + detail for mp in plan.modules for prefix in _keys(mp)
                   for rel, detail in found(mp))
    if named:
        raise PlanError(f"{', '.join(named)}: {why}")


def _check_packed(plan: Plan, style: str) -> None:
    """A fused projection (nanoGPT's ``c_attn``: q, k and v in one weight) is sharded per
    part, each rank holding its slice of every part; ``ColwiseParallel`` would shard the
    fused weight contiguously, giving rank 0 all of q and part of k: wrong numbers."""
    _refuse(plan, lambda mp: [(rel, f" ({parts} parts)") for rel, parts in mp.packed.items()],
            "fused projection(s) sharded per part (each rank holds its slice of q, k and v), "
            f"which {style} cannot express (it splits the fused weight contiguously and would "
            "compute wrong numbers). Use tpcompile.auto_parallelize, or split the projection "
            "into one Linear per part")


def _check_grouped(plan: Plan, style: str) -> None:
    """Fewer kv heads than tp: each kv head is computed by a group of ranks from a
    replicated weight; a colwise style would split the heads over every rank."""
    _refuse(plan, lambda mp: [(rel, f" ({n} heads at tp {plan.tp})")
                              for rel, n in mp.grouped.items()],
            "fewer heads than tp, each head computed by a group of tp / heads ranks from a "
            f"replicated weight, which {style} cannot express (it cuts the weight into tp "
            "pieces, smaller than one head). Use tpcompile.auto_parallelize, or a tp that the "
            "kv heads divide")


def _check_summed(plan: Plan) -> None:
    """A replicated weight used on each rank's heads (a per-head q/k norm) gets a partial
    gradient on each rank; no parallelize_module style sums it, so the ranks' copies would
    drift apart in training."""
    _refuse(plan, lambda mp: [(name, "") for name in mp.summed],
            "replicated, but used on each rank's share of the heads, so each rank's gradient "
            "is partial and must be summed over tp; no parallelize_module style does that "
            "(the copies would drift apart). Use tpcompile.auto_parallelize, or Hugging "
            f"Face's tp_plan ('{SUMMED_HF}', from tpcompile.to_hf_tp_plan)")


def _check_sliced(plan: Plan, tool: str) -> None:
    """A norm over a whole sharded projection (OLMo 2's q/k norms) needs its statistics
    summed over tp and its weight read in slices; a style that hands the module its local
    shard would normalize each rank's slice alone: wrong numbers."""
    _refuse(plan, lambda mp: [(name, "") for name in mp.sliced],
            "read in slices by a norm over a sharded projection, whose row statistics "
            f"tpcompile sums over tp; {tool} has no style for that (the module would "
            "normalize each rank's slice on its own and compute wrong numbers). Use "
            "tpcompile.auto_parallelize")


def _check_unembed(plan: Plan, tool: str) -> None:
    """An output head that is an embedding's weight read by F.linear (``wte@linear``) is no
    module: a style keyed by module name has nothing to attach to."""
    _refuse(plan, lambda mp: [(rel, "") for rel in mp.styles if rel.endswith(UNEMBED)],
            f"an output head that reads the embedding's weight through F.linear (no module "
            f"of its own), sharded by tpcompile on the embedding's vocabulary shards; {tool} "
            "styles modules by name and has nothing to style here. Use "
            "tpcompile.auto_parallelize, or give the head an nn.Linear tied to the embedding")


def _check_experts(plan: Plan, tool: str) -> None:
    """A 3-D Parameter of experts read by a grouped matmul is sharded by tpcompile on its
    feature dims; it is no module, so a style keyed by module name cannot reach it."""
    _refuse(plan, lambda mp: [(rel, "") for rel in mp.experts],
            f"a Parameter of experts (read by a grouped matmul), sharded by tpcompile on "
            f"its feature dims like a colwise or rowwise Linear; {tool} styles modules by "
            "name and has no style for it. Use tpcompile.auto_parallelize")


def _has_sp(mp: ModulePlan) -> bool:
    return "sequence_parallel" in mp.styles.values() or "Q" in mp.inputs or mp.output == "Q"


def _check_sp_entry(plan: Plan) -> None:
    """parallelize_module enters and leaves sequence parallelism only through layer styles
    (a vocab-parallel embedding or rowwise layer in, a colwise layer out). A model whose own
    inputs or outputs are sequence-sharded in the plan would need PrepareModuleInput/Output
    on the root, which a parallelize_module dict cannot hold."""
    if not plan.sequence_parallel or not any(_has_sp(m) for m in plan.modules):
        return
    root = next((m for m in plan.modules if "" in m.members), None)
    styles = set(root.styles.values()) if root else set()
    if not ({"vocab_parallel", "rowwise"} & styles and "colwise" in styles):
        raise PlanError(
            "this plan runs sequence parallel from the model's own inputs to its outputs "
            f"(the root module styles are {sorted(styles) or 'none'}; no vocab-parallel "
            "embedding or rowwise layer enters the region and no colwise head leaves it), "
            "which a parallelize_module dict cannot express; plan with "
            "sequence_parallel=False for parallelize_module, or use tpcompile.auto_parallelize")
