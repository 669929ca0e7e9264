"""Stage 3: the Plan, a pydantic value that says everything the rewrite will do.

``compile_model`` runs trace -> analyze for the root module and, recursively, once per
distinct block signature; it returns the Plan plus the traced graphs the rewrite needs.
Nothing here touches the user's model or needs a process group.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import Shard

from . import analyze as A
from . import sequence as SQ
from .analyze import Contract, Propagation
from .errors import IndivisibleError
from .trace import TracerName, block_signature, find_blocks, propagate_shapes, synthesize_inputs, trace

Style = Literal["colwise", "rowwise", "vocab_parallel", "sequence_parallel", "replicate"]

# (layer style, parameter name) -> the parameter's placement on the tp mesh; others Replicate
PLACEMENTS: dict[tuple[str | None, str], Shard] = {
    ("colwise", "weight"): Shard(0), ("colwise", "bias"): Shard(0),
    ("rowwise", "weight"): Shard(1), ("vocab_parallel", "weight"): Shard(0),
}


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


class Plan(_Model):
    version: Literal[1] = 1
    tracer: TracerName = "fx"
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

    # -- files and interop (tpcompile/plan_io.py, tpcompile/interop.py)
    def to_yaml(self) -> str:
        from .plan_io import to_yaml
        return to_yaml(self)

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        from .plan_io import from_yaml
        return from_yaml(text)

    def save(self, path: Any) -> Any:
        from .plan_io import save
        return save(self, path)

    @classmethod
    def load(cls, path: Any) -> "Plan":
        from .plan_io import load
        return load(path)

    def to_parallelize_plan(self) -> dict[str, Any]:
        from .interop import to_parallelize_plan
        return to_parallelize_plan(self)

    def to_hf_tp_plan(self) -> dict[str, str]:
        from .interop import to_hf_tp_plan
        return to_hf_tp_plan(self)

    @classmethod
    def from_hf_tp_plan(cls, tp_plan: dict[str, str]) -> "Plan":
        from .interop import from_hf_tp_plan
        return from_hf_tp_plan(tp_plan)


@dataclass
class Unit:
    """One traced module and everything the rewrite needs for it."""

    gm: fx.GraphModule
    prop: Propagation
    styles: dict[str, str]
    q_nodes: set[fx.Node]
    contracts: dict[str, Contract]
    contract: Contract | None
    plan: ModulePlan
    members: list[str] = field(default_factory=list)


@dataclass
class Compiled:
    plan: Plan
    units: list[Unit]
    seconds: float


def _group_path(members: list[str], blocks_by_parent: dict[str, int]) -> str:
    if len(members) <= 1:
        return members[0] if members else ""
    parent = members[0].rsplit(".", 1)[0]
    same = all(m.rsplit(".", 1)[0] == parent for m in members)
    return f"{parent}.*" if same and blocks_by_parent.get(parent) == len(members) else members[0]


def compile_model(model: nn.Module, *, tp: int, sequence_parallel: bool = True,
                  example_inputs: tuple | None = None, on_indivisible: str = "error",
                  given: Plan | None = None, tracer: TracerName = "fx") -> Compiled:
    if on_indivisible not in ("error", "replicate"):
        raise ValueError("on_indivisible must be 'error' or 'replicate'")
    t0 = time.perf_counter()
    if given is not None:
        from .plan_bind import bind
        given = bind(given, model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    seen = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = frozenset(k for k, n in seen.items() if n > 1)  # tied weights
    units: dict[Any, Unit] = {}
    order: list[Any] = []
    parents: dict[str, int] = {}

    def add_nested_members(block: nn.Module, member: str) -> None:
        for rel, nested in find_blocks(block).items():
            path = f"{member}.{rel}"
            add_nested_members(nested, path)
            units[block_signature(nested)].members.append(path)

    def process(module: nn.Module, path: str, args: tuple, kwargs: dict, is_root: bool,
                key: Any) -> tuple[Unit, Any]:
        gm = trace(module, tracer=tracer, where=path or type(module).__name__)
        blocks = find_blocks(module)
        for rel in blocks:
            parent = f"{path}.{rel}".strip(".").rsplit(".", 1)[0]
            parents[parent] = parents.get(parent, 0) + 1
        sigs = {rel: block_signature(b) for rel, b in blocks.items()}
        contracts: dict[str, Contract] = {}
        outs: dict[Any, Any] = {}

        def on_block(target: str, a: tuple, k: dict) -> Any:
            sig = sigs[target]
            member = f"{path}.{target}".strip(".")
            key = (sig, _shapes(a), tuple(k), _shapes(tuple(k.values())))
            if sig not in units:
                unit, out = process(blocks[target], member, a, k, False, sig)
                outs[key] = out
            else:  # a repeat: its own nested blocks repeat the first one's
                add_nested_members(blocks[target], member)
            units[sig].members.append(member)
            contracts[target] = units[sig].contract  # type: ignore[assignment]
            if key not in outs:
                with mode:
                    outs[key] = blocks[target](*a, **k)
            return outs[key]

        if is_root and not args:
            args = synthesize_inputs(model, gm, batch=2, seq=2 * max(tp, 1))
        if kwargs:  # a block called with keywords: values in the forward's (placeholders') order
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) and not
                          isinstance(a, torch._subclasses.FakeTensor) else a for a in args)
        out = propagate_shapes(gm, fake_args, mode, set(blocks), on_block, where=path)
        unit = _analyze(gm, module, path, contracts, tp, sequence_parallel, on_indivisible,
                        is_root, given, shared)
        units[key] = unit
        order.append(key)
        return unit, out

    process(model, "", tuple(example_inputs or ()), {}, True, "<root>")
    units["<root>"].members.append("")
    plans = []
    for key in reversed(order):  # root first, then blocks in the order first met
        u = units[key]
        u.plan.members = list(u.members)
        u.plan.path = _group_path(u.members, parents)
        plans.append(u.plan)
    plan = Plan(tracer=tracer, tp=tp, sequence_parallel=sequence_parallel, modules=plans)
    return Compiled(plan, [units[k] for k in reversed(order)], time.perf_counter() - t0)


def _shapes(a: tuple) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in a)


def _tied_layers(module: nn.Module, shared: frozenset[int]) -> set[str]:
    """Layers (relative names) holding a parameter that is also held elsewhere."""
    return {name.rpartition(".")[0] for name, p in
            module.named_parameters(remove_duplicate=False) if id(p) in shared}


def _analyze(gm: fx.GraphModule, module: nn.Module, path: str, contracts: dict[str, Contract],
             tp: int, sp: bool, on_indivisible: str, is_root: bool, given: Plan | None,
             shared: frozenset[int] = frozenset()) -> Unit:
    prefix = f"{path}." if path else ""
    notes: list[A.Note] = []
    if given is not None:
        mp = given.module_for(path)
        styles = {k: v for k, v in (mp.styles if mp else {}).items() if v != "sequence_parallel"}
        segments = [A.Segment(s.kind, s.colwise, s.rowwise) for s in (mp.segments if mp else [])]
        from .plan_bind import check_graph
        check_graph(gm, styles, path)
        try:
            prop = A.propagate(gm, styles, tp, contracts=contracts)
        except A.Unsafe as u:
            raise A.PlanError(
                f"the given plan does not fit {path or 'the root'}: {u.reason}. It would compute "
                "wrong numbers: make every Linear that feeds the segment colwise and every "
                "Linear it feeds rowwise, or replicate them (`python -m tpcompile plan` writes "
                "a plan that fits)") from None
    else:
        styles, segments, notes = A.detect_segments(gm, contracts)
        _report_unsharded(notes, prefix, tp, on_indivisible)
        styles.update(A.embedding_styles(gm))
        for layer in sorted(_tied_layers(module, shared) & set(styles)):
            if layer in styles:  # a segment dropped for an earlier tied layer took it too
                notes.append(A.replicate_layer(styles, segments, layer,
                                               "its weight is tied to another layer's"))
        styles, segments, more = A.check_divisibility(gm, styles, segments, tp, on_indivisible,
                                                      prefix, contracts)
        for n in more:
            warnings.warn(f"tpcompile: {prefix}{n.layer} {n.reason}", stacklevel=4)
        notes += more
        prop = A.propagate(gm, styles, tp, contracts=contracts)
    SQ.apply_block_needs(gm, prop, contracts)
    q = SQ.sequence_parallel(gm, prop, styles, contracts, is_root) if sp else set()
    contract = None if is_root else SQ.block_contract(gm, prop)
    all_styles: dict[str, Style] = dict(styles)  # type: ignore[arg-type]
    for name in SQ.norm_layers(gm, q):
        all_styles[name] = "sequence_parallel"
    mp = ModulePlan(
        path=path, members=[], module_type=type(module).__name__, styles=all_styles,
        segments=[SegmentPlan(kind=s.kind, colwise=s.colwise, rowwise=s.rowwise) for s in segments],  # type: ignore[arg-type]
        inputs=[l.kind if l.kind == "Q" else "R" for l in contract.inputs] if contract else [],  # type: ignore[misc]
        output=contract.output.kind if contract and contract.output.kind == "Q" else "R",  # type: ignore[arg-type]
        notes=[NotePlan(layer=n.layer, reason=n.reason) for n in notes],
    )
    return Unit(gm, prop, styles, q, contracts, contract, mp)


def _report_unsharded(notes: list[A.Note], prefix: str, tp: int, on_indivisible: str) -> None:
    """Linears the analysis leaves replicated are never silent at tp > 1: a size that
    cannot be split (one kv head at tp 4) raises under ``on_indivisible='error'``; every
    other reason is a warning (and stays in the plan's notes)."""
    if tp == 1:
        return
    for n in notes:
        if n.indivisible is not None and on_indivisible == "error":
            what, size = n.indivisible
            raise IndivisibleError(prefix + n.layer, what, size, tp)
        warnings.warn(f"tpcompile: {prefix}{n.layer} stays {n.reason}", stacklevel=5)


def plan(model: nn.Module, *, tp: int, sequence_parallel: bool = True,
         example_inputs: tuple | None = None, on_indivisible: str = "error",
         tracer: TracerName = "fx") -> Plan:
    """Detect a tensor-parallel plan for ``model`` at tensor-parallel degree ``tp``.

    Needs no process group and no real weights: a model built under
    ``torch.device("meta")`` plans the same as a real one.
    """
    return compile_model(model, tp=tp, sequence_parallel=sequence_parallel,
                         example_inputs=example_inputs, on_indivisible=on_indivisible,
                         tracer=tracer).plan
