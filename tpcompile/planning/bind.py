"""Bind a given plan to a model: expand globs, check every name and style, regroup.

A plan names layers by fully qualified name (FQN) or glob; the compiler needs one
:class:`ModulePlan` per traced module (the root, and each group of identical blocks) with
names relative to it. ``bind`` does that translation and refuses, with the reason:

* a name or glob that matches no layer (listing the nearest names),
* a style that does not fit the layer (``rowwise`` on an Embedding, ``colwise`` on a norm,
  any sharding style on a container),
* two identical blocks given different styles (they share one compiled program).

Whether the styles give correct numbers is checked afterwards on the graph
(:func:`check_graph` here, and the layout propagation of :mod:`tpcompile.analysis`).
"""

from __future__ import annotations

import difflib
import re

import torch.fx as fx
import torch.nn as nn

from ..analysis.layers import PACKED_WEIGHT, UNEMBED, layer_of
from ..errors import PlanError
from ..frontend.blocks import block_signature, find_blocks
from .files import is_flat
from .value import ModulePlan, Plan, SegmentPlan

SHARDING = ("colwise", "rowwise", "vocab_parallel")


def check_written_for(plan: Plan, model: nn.Module, tp: int) -> None:
    """A full-schema plan was detected for one model type at one tp: refuse it elsewhere.
    (A flat ``{layer: style}`` plan carries neither; the mesh and the names decide.)"""
    if is_flat(plan):
        return
    root = plan.module_for("")
    if root is not None and root.module_type != type(model).__name__:
        raise PlanError(f"the plan was written for a {root.module_type}, not a "
                        f"{type(model).__name__}: write one for this model with `python -m "
                        "tpcompile plan`")
    if plan.tp != tp:
        raise PlanError(f"the plan was written for tp = {plan.tp}, but the mesh has tp = {tp}: "
                        f"its block contracts and sizes are for tp = {plan.tp}. Write one for "
                        f"tp = {tp} (`python -m tpcompile plan MODEL --tp {tp}`), or use the "
                        "flat {layer: style} form, which carries no tp")


def glob_regex(pattern: str) -> re.Pattern:
    """``*`` matches one dotted name component, ``**`` any number of them (one or more)."""
    parts = []
    for comp in pattern.split("."):
        if comp == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(".*".join(re.escape(s) for s in comp.split("*")).replace(".*", "[^.]*"))
    return re.compile(r"\.".join(parts) + r"\Z")


def _join(base: str, rel: str) -> str:
    return f"{base}.{rel}" if base and rel else base or rel


def traced_modules(model: nn.Module) -> dict[str, tuple]:
    """Path of every module the compiler traces on its own (root and blocks) -> the key of
    the compiled unit it shares (its block signature; the root has its own)."""
    out: dict[str, tuple] = {"": ("<root>",)}

    def visit(module: nn.Module, path: str) -> None:
        for rel, block in find_blocks(module).items():
            member = _join(path, rel)
            out[member] = block_signature(block)
            visit(block, member)

    visit(model, "")
    return out


def nearest(pattern: str, names: list[str]) -> str:
    globbed = {re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names}
    near = difflib.get_close_matches(pattern, sorted(set(names) | globbed), n=3, cutoff=0.6)
    return f"nearest: {', '.join(near)}" if near else "no layer has a similar name"


def expand(plan: Plan, model: nn.Module) -> dict[str, str]:
    """Absolute layer name -> style. Exact names override globs; two globs that give one
    layer different styles are an error."""
    names = [n for n, _ in model.named_modules() if n] + [  # and packed Parameter pairs
        n[:-len("_weight")] for n, _ in model.named_parameters() if n.endswith(PACKED_WEIGHT)] + [
        n + UNEMBED for n, m in model.named_modules() if isinstance(m, nn.Embedding)] + [
        n for n, p in model.named_parameters() if p.dim() == 3]  # Parameters of experts
    traced = list(traced_modules(model))
    globbed: dict[str, tuple[str, str]] = {}
    exact: dict[str, str] = {}
    for mp in plan.modules:
        bases = [p for p in traced if glob_regex(mp.path).match(p)] if "*" in mp.path else mp.members
        for base in bases:
            for rel, style in mp.styles.items():
                pattern = _join(base, rel)
                if "*" not in pattern:
                    if pattern not in names:
                        raise PlanError(f"plan names layer {pattern!r}, which the model "
                                        f"({type(model).__name__}) does not have; {nearest(pattern, names)}")
                    exact[pattern] = style
                    continue
                hits = [n for n in names if glob_regex(pattern).match(n)]
                if not hits:
                    raise PlanError(f"plan glob {pattern!r} matches no layer of "
                                    f"{type(model).__name__}; {nearest(pattern, names)}")
                for n in hits:
                    old = globbed.get(n)
                    if old and old[1] != style:
                        raise PlanError(f"{n}: glob {old[0]!r} says {old[1]} but glob "
                                        f"{pattern!r} says {style}; make them agree or name "
                                        f"{n} exactly")
                    globbed[n] = (pattern, style)
    out = {n: s for n, (_, s) in globbed.items()}
    out.update(exact)
    return out


def check_fit(name: str, module: nn.Module, style: str) -> None:
    """Raise PlanError if ``style`` cannot apply to ``module``, saying why and what fits."""
    kind = type(module).__name__
    if style == "replicate":
        return
    if style in ("colwise", "rowwise"):
        if isinstance(module, nn.Linear):
            return
        what = "out_features (its output)" if style == "colwise" else "in_features (its input)"
        fix = _fix_for(module)
        raise PlanError(f"{name}: {style} splits a Linear's {what}, but {name} is {kind}; {fix}")
    if style == "vocab_parallel":
        if isinstance(module, nn.Embedding):
            if module.max_norm is None:  # padding_idx: kept by the rank holding its row
                return
            raise PlanError(f"{name}: vocab_parallel needs an Embedding without max_norm (got "
                            f"max_norm={module.max_norm}, which renormalizes rows of the whole "
                            "table in place); use replicate")
        raise PlanError(f"{name}: vocab_parallel splits an Embedding's vocabulary, but {name} "
                        f"is {kind}; {_fix_for(module)}")
    if style == "sequence_parallel":
        if _norm_like(module):
            return
        raise PlanError(f"{name}: sequence_parallel runs a norm on sequence shards, but {name} "
                        f"is {kind}, not a norm; {_fix_for(module)}")


def _norm_like(module: nn.Module) -> bool:
    """A norm module: a torch norm, or a leaf whose parameters are all 1-D (per feature)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.dim() == 1 for p in params)


def _fix_for(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "use colwise, rowwise or replicate"
    if isinstance(module, nn.Embedding):
        return "use vocab_parallel (splits the vocabulary) or replicate"
    if _norm_like(module):
        return "a norm has no matrix to split: use sequence_parallel or replicate"
    inner = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    if inner:
        return f"it is a container: give styles to its layers ({', '.join(inner[:4])})"
    return "use replicate"


def bind(plan: Plan, model: nn.Module) -> Plan:
    """The plan in the compiler's form for ``model``: one ModulePlan per traced unit."""
    styles = expand(plan, model)
    modules = dict(model.named_modules())
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    for name, style in styles.items():
        if name in modules:
            check_fit(name, modules[name], style)
        elif name in experts:
            if style not in ("colwise", "rowwise", "replicate"):
                raise PlanError(f"{name}: a Parameter of experts (read by a grouped matmul) "
                                f"is colwise, rowwise or replicate, not {style}")
        elif style not in ("colwise", "replicate"):  # nn.MultiheadAttention's in_proj
            raise PlanError(f"{name}: a packed q/k/v projection is colwise (sharded per part) "
                            f"or replicate, not {style}")
    traced = traced_modules(model)
    per_member: dict[str, dict[str, str]] = {p: {} for p in traced}
    for name, style in sorted(styles.items()):
        owner = max((p for p in traced if p == "" or name.startswith(p + ".")), key=len)
        per_member[owner][name[len(owner) + 1:] if owner else name] = style
    groups: dict[tuple, list[str]] = {}
    for path, key in traced.items():
        groups.setdefault(key, []).append(path)
    out = []
    for key, members in groups.items():
        first = per_member[members[0]]
        for m in members[1:]:
            if per_member[m] != first:
                diff = sorted(set(first.items()) ^ set(per_member[m].items()))[0][0]
                raise PlanError(
                    f"{m} and {members[0]} are identical blocks and share one compiled program, "
                    f"but the plan styles them differently (first difference: {diff}: "
                    f"{_join(members[0], diff)} is {first.get(diff, 'unset')}, {_join(m, diff)} is "
                    f"{per_member[m].get(diff, 'unset')}); give every such block the same styles, "
                    "e.g. with a glob")
        if first:
            owner = modules[members[0]] if members[0] else model
            out.append(ModulePlan(path=members[0], members=members,
                                  module_type=type(owner).__name__, styles=first,
                                  segments=_segments(plan, members[0], first)))
    return Plan(tracer=plan.tracer, tp=plan.tp, sequence_parallel=plan.sequence_parallel,
                mesh_dim_names=plan.mesh_dim_names, modules=out)


def _segments(plan: Plan, member: str, styles: dict[str, str]) -> list[SegmentPlan]:
    """Segments the given plan states for this member (names made relative to it)."""
    out: list[SegmentPlan] = []
    for mp in plan.modules:
        base = member if member in mp.members or ("*" in mp.path and glob_regex(mp.path).match(member)) else None
        if base is None and mp.path == "" and mp.members == [""]:
            base = ""
        if base is None:
            continue
        for s in mp.segments:
            rel = [_rel(_join(base, n), member) for n in s.colwise + s.rowwise]
            if all(r is not None and r in styles for r in rel) and rel:
                seg = SegmentPlan(kind=s.kind, colwise=rel[:len(s.colwise)], rowwise=rel[len(s.colwise):])  # type: ignore[arg-type]
                if seg not in out:
                    out.append(seg)
    return out


def _rel(name: str, member: str) -> str | None:
    if not member:
        return name
    return name[len(member) + 1:] if name.startswith(member + ".") else None


def check_graph(gm: fx.GraphModule, styles: dict[str, str], where: str) -> None:
    """Every sharded layer must be a layer of the traced graph (an ATen linear or
    embedding on its own weight); a layer used any other way (its weight read directly,
    or tied to another layer) cannot be rewritten."""
    called = {l.name for n in gm.graph.nodes if (l := layer_of(n)) is not None}
    for name, style in styles.items():
        if style in SHARDING and name not in called:
            full = _join(where, name)
            raise PlanError(f"{full}: the plan makes it {style}, but the traced graph of "
                            f"{where or 'the root'} never calls it as a layer (its weight is "
                            "used directly, tied, or inside another module); use replicate for it")
