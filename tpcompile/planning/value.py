"""The Plan: a pydantic value that says everything the rewrite will do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.tensor import Shard

from ..frontend import TracerName

Style = Literal["colwise", "rowwise", "vocab_parallel", "sequence_parallel", "replicate"]

# (layer style, parameter name) -> the parameter's placement on the tp mesh; others Replicate
PLACEMENTS: dict[tuple[str | None, str], Shard] = {
    ("colwise", "weight"): Shard(0), ("colwise", "bias"): Shard(0),
    ("rowwise", "weight"): Shard(1), ("vocab_parallel", "weight"): Shard(0),
}


def placement(kind: str, style: str | None, pname: str, parts: int | None = None,
              grouped: bool = False) -> Any:
    """A layer parameter's placement on the tp mesh (None: replicated). ``kind``
    "conv1d" (GPT-2's Conv1D) stores its weight as (in, out), the transpose of a Linear's;
    "experts" a weight per expert, [E, out, in], and "experts_io" [E, in, out];
    ``parts``: a fused projection, each rank holding its slice of every part;
    ``grouped``: a colwise layer shared by groups of ranks (fewer kv heads than tp), whose
    weight each rank holds whole and slices its group's rows from."""
    pl = PLACEMENTS.get((style, pname))
    if pl is None or grouped:
        return None
    dim = pl.dim
    if kind == "conv1d" and pname == "weight":
        dim = 1 - dim
    elif kind == "experts":
        dim += 1
    elif kind == "experts_io":
        dim = 2 - dim
    if parts and style == "colwise":
        from torch.distributed.tensor.placement_types import _StridedShard
        return _StridedShard(dim, split_factor=parts)
    return Shard(dim)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentPlan(_Model):
    kind: Literal["mlp", "gated_mlp", "attention", "head", "generic"]
    colwise: list[str]
    rowwise: list[str] = []


class NotePlan(_Model):
    layer: str
    reason: str


class ModulePlan(_Model):
    """The plan of one traced module: the root (``path=""``) or a group of identical
    blocks (``path="layers.*"``). Layer names in ``styles`` are relative to the module."""

    path: str
    members: list[str]
    module_type: str
    styles: dict[str, Style] = {}
    segments: list[SegmentPlan] = []
    inputs: list[Literal["R", "Q"]] = []
    output: Literal["R", "Q"] = "R"
    notes: list[NotePlan] = []
    # fused colwise projections (nanoGPT's c_attn: q, k, v) -> number of parts; each rank
    # holds its slice of every part. Found by the analysis, not read from a plan file.
    packed: dict[str, int] = {}
    # layers whose sequence-sharded output has the sequence on a dim other than 1 (a
    # position embedding looked up by [T] positions gives [T, d]: dim 0). Found by the
    # analysis; read by to_parallelize_plan, not from plan files.
    seq_dims: dict[str, int] = {}
    # colwise layers with fewer heads than tp (kv heads under GQA) -> their head count n:
    # each head computed by tp // n ranks from a replicated weight whose gradient is summed
    # over tp. Found by the analysis, not read from plan files.
    grouped: dict[str, int] = {}
    # parameters of no styled layer used on sharded activations (per-head q/k norms), whose
    # gradient the rewrite sums over tp. Found by the analysis, not read from plan files.
    summed: list[str] = []
    # replicated parameters read in slices like a sharded activation (the weight of a
    # norm over a whole sharded projection: OLMo 2's q/k norms), their gradient summed
    # over tp. Found by the analysis, not read from plan files.
    sliced: list[str] = []
    # Parameters of experts (3-D, read by a grouped matmul) that are layers of their own ->
    # their layout: "experts" [E, out, in], "experts_io" [E, in, out]. Found by the
    # analysis, not read from plan files.
    experts: dict[str, Literal["experts", "experts_io"]] = {}


class Plan(_Model):
    version: Literal[1] = 1
    tracer: TracerName = "export"  # the front end that traced the model
    tp: int = Field(ge=1)
    sequence_parallel: bool = True
    mesh_dim_names: tuple[str, ...] = ("tp",)
    modules: list[ModulePlan]

    def layer_styles(self) -> dict[str, Style]:
        """Absolute layer name -> style, every block expanded."""
        out: dict[str, Style] = {}
        for m in self.modules:
            for member in m.members:
                for rel, style in m.styles.items():
                    out[f"{member}.{rel}" if member else rel] = style
        return dict(sorted(out.items()))

    def module_for(self, path: str) -> ModulePlan | None:
        return next((m for m in self.modules if path in m.members), None)

    def notes(self) -> list[NotePlan]:
        return [n for m in self.modules for n in m.notes]

