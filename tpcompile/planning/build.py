"""Planning: trace -> analyze for the root module and, once per distinct block
signature, each block; the result is the Plan plus the traced graphs the rewrite needs.
Nothing here touches the user's model or needs a process group."""

from __future__ import annotations

import inspect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .. import analysis as A
from .. import frontend as FE
from ..analysis import Contract, Propagation, ops
from ..analysis import sequence as SQ
from ..analysis.layout import R, Unsafe
from ..debug import dump
from ..errors import (ExampleInputsError, IndivisibleError, PlanError, TraceError,
                      UnsupportedError, warn)
from ..frontend import BlockShapes, Traced, TracerName
from ..frontend.fake import cast_floats
from .bind import bind, check_graph, check_written_for
from .calls import without_kv_cache
from .value import ModulePlan, NotePlan, Plan, SegmentPlan, Style


@dataclass
class Unit:
    """One traced module (the root, or a group of identical blocks) and everything the
    rewrite needs for it."""

    t: Traced
    prop: Propagation
    styles: dict[str, str]
    q_nodes: set[fx.Node]
    contracts: dict[fx.Node, Contract]
    contract: Contract | None
    plan: ModulePlan
    members: list[str] = field(default_factory=list)
    shapes: BlockShapes | None = None
    nested: list[tuple[str, Any]] = field(default_factory=list)  # (relative member, unit key)
    said: list[str] = field(default_factory=list)  # the analysis's warnings

    @property
    def gm(self) -> fx.GraphModule:
        return self.t.gm


@dataclass
class Compiled:
    plan: Plan
    units: list[Unit]
    seconds: float
    keys: list[Any] = field(default_factory=list)  # unit keys, in ``units`` order


def _group_path(members: list[str], blocks_by_parent: dict[str, int]) -> str:
    if len(members) <= 1:
        return members[0] if members else ""
    parent = members[0].rsplit(".", 1)[0]
    same = all(m.rsplit(".", 1)[0] == parent for m in members)
    return f"{parent}.*" if same and blocks_by_parent.get(parent) == len(members) else members[0]


def _join(base: str, rel: str) -> str:
    return f"{base}.{rel}" if base and rel else base or rel


def _positional(example_inputs: Any, example_kwargs: Any) -> tuple | None:
    """``example_inputs`` as the tuple of positional arguments it stands for: a lone
    tensor is the one argument; a dict is refused (keyword inputs are example_kwargs)."""
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, dict):
        keys = ", ".join(map(str, example_inputs))
        raise ExampleInputsError(
            f"example_inputs is a dict (keys {keys}): keyword inputs go in "
            f"example_kwargs={{...}}{' (example_kwargs is given too)' if example_kwargs else ''}; "
            "a dict the forward takes as its one positional argument goes in "
            "example_inputs=(d,)")
    raise ExampleInputsError(
        f"example_inputs is a {type(example_inputs).__name__}: pass a tuple of the forward's "
        "positional arguments (example_inputs=(x,)) or keyword inputs as example_kwargs={...}")


def compile_model(model: nn.Module, *, tp: int, sequence_parallel: bool = True,
                  example_inputs: tuple | None = None, example_kwargs: dict | None = None,
                  on_indivisible: str = "error", given: Plan | None = None,
                  tracer: TracerName = "auto", skeleton: nn.Module | None = None,
                  bound: bool = False, input_dtype: torch.dtype | None = None,
                  packing: bool = True, dynamic: bool = False) -> Compiled:
    """Trace -> analyze for the root and, once per distinct block signature, each block.
    ``given``: a plan to apply instead of detecting one (``bound``: already bound to this
    model). Works on a meta-device skeleton of ``model``; ``model`` is never changed.
    ``dynamic``: batch and sequence dims symbolic (``Dim.AUTO``); by default the graphs
    are specialised to the example's shapes, as torch.compile's first compile is."""
    if on_indivisible not in ("error", "replicate"):
        raise ValueError("on_indivisible must be 'error' or 'replicate'")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if tracer not in ("auto", "export", "fx"):
        raise UnsupportedError(f"tracer {tracer!r} does not exist; use tracer='auto' (export, "
                               "then fx), 'export' or 'fx'")
    t0 = time.perf_counter()
    if given is not None and not bound:
        check_written_for(given, model, tp)
        given = bind(given, model)
    sk = skeleton if skeleton is not None else FE.skeleton(model)
    for (_, mine), (_, theirs) in zip(sk.named_modules(), model.named_modules()):
        mine.training = theirs.training
    if example_inputs is None and example_kwargs is None:
        example_inputs = synthesize_inputs(model, batch=2, seq=2 * max(tp, 2))
    example_inputs = _positional(example_inputs, example_kwargs)
    kwargs = dict(example_kwargs or {})
    without_kv_cache(sk, example_inputs, kwargs)
    seen = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = frozenset(k for k, n in seen.items() if n > 1)  # tied weights
    shared_names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in shared}
    units: dict[Any, Unit] = {}
    order: list[Any] = []
    parents: dict[str, int] = {}
    used_tracer: list[str] = []

    def add_member(key: Any, member: str) -> None:
        unit = units[key]
        if member in unit.members:
            return
        unit.members.append(member)
        for rel, nested_key in unit.nested:
            add_member(nested_key, _join(member, rel))

    def process(module: nn.Module, path: str, a: tuple, k: dict, key: Any) -> Unit:
        # the blocks' signatures as they are before the trace: a forward may change what
        # they read (transformers' sequence classifier sets config.problem_type on first
        # use, in the config every block holds), and a unit is filed under what it was
        # asked for by
        sigs = {rel: FE.block_signature(b) for rel, b in FE.find_blocks(module).items()}
        is_root = key == "<root>"

        def on_block(rel: str, block: nn.Module, ba: tuple, bk: dict) -> FE.BlockShapes:
            sig = sigs[rel]  # (the trace's blocks are find_blocks' too)
            if input_dtype is not None:  # FSDP2 casts each block's floating inputs
                ba, bk = cast_floats((ba, bk), input_dtype)
            if sig not in units:
                unit = process(block, _join(path, rel), ba, bk, sig)
                assert unit.shapes is not None
            return units[sig].shapes  # type: ignore[return-value]

        a, k = FE.canonical_call(type(module).forward.__get__(module), a, k)
        t = FE.trace(module, a, k, tracer=tracer, where=path,
                     on_block=on_block, mode=mode, dynamic=dynamic)
        used_tracer.append(t.tracer)
        dump(f"{path or 'root'}.1-traced.txt", t.gm.code)
        FE.annotate(t)
        A.canonical_linears(t)  # x @ w.T (+ b) -> linear: FalconLinear and the like
        A.mark_layers(t, module)
        for rel in FE.find_blocks(module):
            parent = _join(path, rel).rsplit(".", 1)[0]
            parents[parent] = parents.get(parent, 0) + 1
        contracts: dict[fx.Node, Contract] = {}
        nested: list[tuple[str, Any]] = []
        for node, call in t.blocks.items():
            sig = sigs[call.member]
            contracts[node] = units[sig].contract  # type: ignore[assignment]
            if (call.member, sig) not in nested:
                nested.append((call.member, sig))
        said: list[str] = []  # warnings, said once the plan keeps the unit (or on an error)
        spoken.append(said)
        unit = _analyze(t, module, path, contracts, tp, sequence_parallel, on_indivisible,
                        is_root, given, shared_names, said, bound)
        dump(f"{path or 'root'}.2-layouts.txt", "\n".join(
            f"{n.name:40s} {unit.prop.layouts.get(n, '-')!r:8s} {n.format_node()}"
            for n in t.gm.graph.nodes))
        unit.nested = nested
        if not is_root:
            unit.shapes = FE.shapes_of(t)
        units[key] = unit
        order.append(key)
        return unit

    grads = any(p.requires_grad for p in model.parameters())  # for the whole model
    spoken: list[list[str]] = []
    try:
        with FE.fake_state(sk) as mode, ops.packing(packing), FE.grads_wanted(grads):
            args, kwargs = FE.example_for(mode, example_inputs, kwargs)
            process(sk, "", args, kwargs, "<root>")
    except BaseException:
        for message in (m for said in spoken for m in said):  # what was found before it
            warn(message)
        raise
    add_member("<root>", "")
    plans = []
    keys = list(reversed(order))  # root first, then blocks in the order first met
    for key in reversed(keys):  # blocks then the root, as analysed; not a block's whose
        for message in units[key].said if units[key].members else []:  # parent traced it inline
            warn(message)
    for key in keys:
        u = units[key]
        u.plan.members = list(u.members)
        u.plan.path = _group_path(u.members, parents)
        plans.append(u.plan)
    plan = Plan(tracer=used_tracer[0], tp=tp, sequence_parallel=sequence_parallel,  # type: ignore[arg-type]
                modules=[p for p in plans if p.members])
    return Compiled(plan, [units[k] for k in keys if units[k].members],
                    time.perf_counter() - t0, [k for k in keys if units[k].members])






def synthesize_inputs(model: nn.Module, batch: int, seq: int) -> tuple:
    """Example inputs when the user gives none, for a forward of one required tensor:
    token ids if the model's first layer is an Embedding, [batch, seq, features] if it is
    a Linear or a norm."""
    required = [p for p in inspect.signature(model.forward).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (
                    p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Linear,
                                                               nn.LayerNorm, nn.RMSNorm))), None)
    if len(required) != 1 or first is None:
        raise TraceError(f"cannot guess example inputs for {type(model).__name__}.forward"
                         f"{inspect.signature(model.forward)}; pass example_inputs=(...) "
                         "(and/or example_kwargs={...}) to tpcompile")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(first, nn.Embedding):
        return (torch.zeros(batch, seq, dtype=torch.long, device=device),)
    width = first.in_features if isinstance(first, nn.Linear) else first.normalized_shape[-1]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return (torch.zeros(batch, seq, width, dtype=dtype, device=device),)


def _called_or_needed(t: Traced, module: nn.Module, styles: dict[str, str]) -> dict[str, str]:
    """The model's own styles for a call of another structure: a layer this trace does not
    call is left out where each read of its parameters (under any of their names: export
    lifts a tied weight once) is by another layer the trace calls with a style of its own
    (a tied head reading the embedding's weight) or there is none (``inputs_embeds`` in
    place of ids); a layer whose weight is read any other way keeps its style, for
    ``check_graph`` to refuse."""
    called = {l.name for n in t.gm.graph.nodes if (l := A.layer_of(n)) is not None}
    aliases: dict[str, set[str]] = {}  # parameter name -> every name of that parameter
    by_id: dict[int, set[str]] = {}
    for n, q in module.named_parameters(remove_duplicate=False):
        aliases[n] = by_id.setdefault(id(q), set())
        aliases[n].add(n)
    readers: dict[str, list[Any]] = {}  # parameter name (every alias) -> the layers reading it
    for node, name in t.params.items():
        for alias in aliases.get(name, {name}):
            readers.setdefault(alias, []).extend(A.layer_of(u) for u in node.users)

    def left_out(layer: str) -> bool:  # (a reader in ``called`` is never ``layer`` itself)
        return layer not in called and all(
            r is not None and r.name in called and r.name in styles
            for p in A.layer_params(module, layer).values() for r in readers.get(p, []))
    return {k: v for k, v in styles.items() if not left_out(k)}


def _given_within(given: Plan, path: str, gm: fx.GraphModule) -> tuple[dict[str, str], list[A.Segment]]:
    """The given plan's styles and segments for the layers a trace of ``path`` computes,
    named from ``path``: its own; those of the modules planned below it that this trace
    calls inline (blocks, which a call having transformers collect outputs inside them
    traces inline); and, for a module planned inline in an ancestor's program (planned
    on such a call), the ancestor's styles of its layers. Parameters are sharded as the
    plan that placed them says."""
    prefix = f"{path}." if path else ""
    called = {l.name for n in gm.graph.nodes if (l := A.layer_of(n)) is not None}
    styles: dict[str, str] = {}
    segments: list[A.Segment] = []

    def add(mp: Any, rename: Any, keep: Any) -> None:
        named = {rename(k): v for k, v in mp.styles.items() if v != "sequence_parallel"}
        styles.update({k: v for k, v in named.items() if k is not None and keep(k)})
        for s in mp.segments:
            layers = [rename(x) for x in s.colwise + s.rowwise]
            if all(x is not None and keep(x) for x in layers):
                segments.append(A.Segment(s.kind, layers[:len(s.colwise)], layers[len(s.colwise):]))

    for mp in given.modules:
        for member in mp.members:
            if member == path:
                add(mp, lambda k: k, lambda layer: True)
            elif member.startswith(prefix) and member:  # below: inline in this trace
                rel = f"{member[len(prefix):]}."
                add(mp, lambda k, rel=rel: rel + k, called.__contains__)
            elif path.startswith(f"{member}." if member else ""):  # above: planned inline there
                above = f"{member}." if member else ""
                add(mp, lambda k, above=above: (above + k)[len(prefix):]
                    if (above + k).startswith(prefix) else None, called.__contains__)
    return styles, segments


def _analyze(t: Traced, module: nn.Module, path: str, contracts: dict[fx.Node, Contract],
             tp: int, sp: bool, on_indivisible: str, is_root: bool, given: Plan | None,
             shared_names: set[str], said: list[str], bound: bool = False) -> Unit:
    """One traced module's analysis; its warnings are added to ``said`` as found (said by
    the caller once the plan keeps the unit, or on an error). ``bound``: ``given`` is the
    model's own plan and this a call of another structure, which may leave layers of it
    unread (``inputs_embeds`` given, the embedding never called): they are not in its
    program."""
    gm = t.gm
    prefix = f"{path}." if path else ""
    notes: list[A.Note] = []
    if given is not None:
        styles, segments = _given_within(given, path, gm)
        if bound:
            styles = _called_or_needed(t, module, styles)
            segments = [s for s in segments if set(s.colwise + s.rowwise) <= styles.keys()]
        check_graph(gm, styles, path)
        heads = A.head_layers(gm, styles, segments, 1, contracts)
        try:
            prop = A.propagate(gm, styles, tp, contracts=contracts, heads=heads)
        except Unsafe as u:
            raise PlanError(
                f"the given plan does not fit {path or 'the root'}: {u.reason}. It would compute "
                "wrong numbers: make every Linear that feeds the segment colwise and every "
                "Linear it feeds rowwise, or replicate them (`python -m tpcompile plan` writes "
                "a plan that fits)") from None
    else:
        styles, segments, notes = A.detect_segments(gm, contracts)
        notes += _stock_attention(t, module, styles)
        said += _report_unsharded(notes, prefix, tp, on_indivisible)
        styles.update(A.embedding_styles(gm))
        pairs = A.tied_pairs(gm)
        for emb, head in pairs:
            # one weight, Shard(0) for both uses: vocab-parallel lookup, colwise head
            if styles.get(emb.name) == "vocab_parallel" and styles.get(head.name) == "colwise":
                continue
            for layer in (emb.name, head.name):
                if layer in styles:
                    notes.append(A.replicate_layer(
                        styles, segments, layer, "its weight is tied to another layer's, "
                        "which cannot be sharded the same way"))
        local = {l.name for n in gm.graph.nodes if (l := A.layer_of(n)) is not None}
        for layer in sorted(set(styles) & local):  # by its parameters' names: a module's
            # weight, a packed in_proj_weight, a Parameter of experts (a layer of its own)
            names = {f"{prefix}{p}" for p in A.layer_params(module, layer).values()}
            if names & shared_names and not any(layer in (e.name, h.name) for e, h in pairs):
                notes.append(A.replicate_layer(styles, segments, layer,
                                               "its weight is tied to a layer in another module"))
                if tp > 1:
                    said.append(f"tpcompile: {prefix}{notes[-1].layer} stays {notes[-1].reason}")
        heads = A.head_layers(gm, styles, segments, 1, contracts)
        styles, segments, more = A.check_divisibility(gm, styles, segments, tp, on_indivisible,
                                                      prefix, contracts, heads)
        said += [f"tpcompile: {prefix}{n.layer} {n.reason}" for n in more]
        notes += more
        prop = A.propagate(gm, styles, tp, contracts=contracts, heads=heads & set(styles))
        sliced = _sliced(t, prop)  # read in slices: their compute is sharded
        # a rowwise expert's bias per expert (gpt-oss's down_proj_bias) is added after the
        # reduction, replicated like a rowwise Linear's: no note
        biases = {f"{prefix}{layer}_bias" for layer, st in styles.items() if st == "rowwise"}
        loose = [n for n in A.unlayered_weights(t) if n.layer not in sliced and
                 f"{prefix}{n.layer}" not in biases]
        if tp > 1:
            said += [f"tpcompile: {prefix}{n.layer} stays {n.reason}" for n in loose]
        notes += loose
    SQ.apply_block_needs(gm, prop, contracts)
    params = set(t.params) | set(t.buffers)
    q = SQ.sequence_parallel(gm, prop, styles, contracts, params, is_root) if sp else set()
    hidden = _norms_in_regions(gm) if sp and given is None else []
    if hidden:
        said.append(f"tpcompile: {path or 'the root'}: the norm of {', '.join(hidden)} "
             "runs inside a torch.autocast region (traced as one higher-order op, as in "
             "llm-foundry's LPLayerNorm); sequence parallelism does not reach into it, so "
             "such norms and the residual stream around them stay whole on every rank (the "
             "numbers are the same; the activation memory SP would save is not saved)")
    tensor_inputs = [p for p in t.inputs if p.meta.get("tpc") is not None]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    contract = None if is_root else SQ.block_contract(tensor_inputs, t.outputs, prop, out_node)
    all_styles: dict[str, Style] = dict(styles)  # type: ignore[arg-type]
    modules = {n for n, _ in module.named_modules()}
    for name in SQ.norm_layers(gm, q, modules):
        all_styles[name] = "sequence_parallel"
    mp = ModulePlan(
        path=path, members=[], module_type=type(module).__name__, styles=all_styles,
        segments=[SegmentPlan(kind=s.kind, colwise=s.colwise, rowwise=s.rowwise) for s in segments],  # type: ignore[arg-type]
        inputs=[l.kind if l.kind == "Q" else "R" for l in contract.inputs] if contract else [],  # type: ignore[misc]
        output=contract.outputs[0].kind if contract and contract.outputs and contract.outputs[0].kind == "Q" else "R",  # type: ignore[arg-type]
        notes=[NotePlan(layer=n.layer, reason=n.reason) for n in notes],
        packed={k: v for k, v in prop.packed.items() if styles.get(k) == "colwise"},
        grouped={k: v for k, v in prop.grouped.items() if styles.get(k) == "colwise"},
        seq_dims=_seq_dims(gm, styles) if sp else {},
        summed=_summed(t, prop, all_styles),
        sliced=sorted(_sliced(t, prop)),
        experts={l.name: l.kind for n in gm.graph.nodes if (l := A.layer_of(n)) is not None
                 and l.kind in A.EXPERT_KINDS
                 and styles.get(l.name) in ("colwise", "rowwise")},
    )
    return Unit(t, prop, styles, q, contracts, contract, mp, said=said)


def _stock_attention(t: Traced, module: nn.Module, styles: dict[str, str]) -> list[A.Note]:
    """``nn.MultiheadAttention`` traced in this graph (its parameters read here) whose
    packed ``in_proj`` did not shard stays replicated, with the reason: separate q/k/v
    weights (kdim or vdim differ from embed_dim), or ``need_weights=True`` (heads
    averaged in a batched matmul the analysis does not split)."""
    read = set(t.params.values())
    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.MultiheadAttention) and f"{name}.in_proj" not in styles and any(
                f"{name}.{p}" in read for p in ("in_proj_weight", "q_proj_weight")):
            out.append(A.Note(name, "replicated: this nn.MultiheadAttention is sharded by "
                              "heads only with one packed in_proj_weight (kdim = vdim = "
                              "embed_dim) and need_weights=False; pass need_weights=False, "
                              "or write the attention with q/k/v Linears"))
    return out


def _summed(t: Traced, prop: A.Propagation, styles: dict[str, str]) -> list[str]:
    """Parameters of no styled layer that meet sharded activations (a per-head q/k norm's
    weight on each rank's heads): each rank's gradient is partial, summed over tp."""
    styled = {f"{layer}.{r}" for layer in styles for r in ("weight", "bias")} | {
        f"{layer}_{r}" for layer in styles for r in ("weight", "bias")}
    return sorted({t.params[p] for needs in prop.need.values() for p, lay in needs.items()
                   if p in t.params and lay.kind == "E" and t.params[p] not in styled})


def _norms_in_regions(gm: fx.GraphModule) -> list[str]:
    """The modules whose norm runs inside a higher-order op's subgraph (a
    ``torch.autocast`` region: ``wrap_with_autocast``), which the analysis sees whole."""
    out = []
    for n in gm.graph.nodes:
        subs = [getattr(gm, a.target, None) for a in n.args
                if isinstance(a, fx.Node) and a.op == "get_attr"]
        if n.op == "call_function" and any(
                isinstance(g, fx.GraphModule) and any(m.target in A.NORM_OPS
                                                      for m in g.graph.nodes) for g in subs):
            out.append(A.where(n))
    return sorted(set(out))


def _sliced(t: Traced, prop: A.Propagation) -> set[str]:
    """Replicated parameters that ops read in slices, like a sharded operand (a norm's
    weight over a sharded projection, gpt-oss's sinks): directly, or through casts and
    reshapes of them alone."""
    out: set[str] = set()
    for needs in prop.need.values():
        for p, lay in needs.items():
            if lay.kind == "S" and not prop.layouts.get(p, R).sharded:
                out |= {t.params[q] for q in (ops.params_alone(p) or ())}
    return out


def _seq_dims(gm: fx.GraphModule, styles: dict[str, str]) -> dict[str, int]:
    """Vocab-parallel embeddings whose output has the sequence on a dim other than 1: the
    lookup of ``[..., T]`` ids gives ``[..., T, d]``, the sequence second to last."""
    out = {}
    for n in gm.graph.nodes:
        layer = A.layer_of(n)
        val = n.meta.get("val")
        if layer is None or styles.get(layer.name) != "vocab_parallel" or \
                not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        if val.dim() - 2 != 1:
            out[layer.name] = val.dim() - 2
    return out


def _report_unsharded(notes: list[A.Note], prefix: str, tp: int, on_indivisible: str) -> list[str]:
    """Linears the analysis leaves replicated are never silent at tp > 1: a size that
    cannot be split (one kv head at tp 4) raises under ``on_indivisible='error'``; every
    other reason is a warning (returned, to be said; it stays in the plan's notes)."""
    if tp == 1:
        return []
    out = []
    for n in notes:
        if n.indivisible is not None and on_indivisible == "error":
            what, size = n.indivisible
            raise IndivisibleError(prefix + n.layer, what, size, tp)
        out.append(f"tpcompile: {prefix}{n.layer} stays {n.reason}")
    return out


def plan(model: nn.Module, *, tp: int, sequence_parallel: bool = True,
         example_inputs: tuple | None = None, example_kwargs: dict | None = None,
         on_indivisible: str = "error", tracer: TracerName = "auto") -> Plan:
    """Detect a tensor-parallel plan for ``model`` at tensor-parallel degree ``tp``.

    Needs no process group and no real weights: a model built under
    ``torch.device("meta")`` plans the same as a real one.
    """
    return compile_model(model, tp=tp, sequence_parallel=sequence_parallel,
                         example_inputs=example_inputs, example_kwargs=example_kwargs,
                         on_indivisible=on_indivisible, tracer=tracer).plan
