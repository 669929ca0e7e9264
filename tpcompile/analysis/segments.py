"""Segment detection: Linear -> shard-preserving ops -> Linear regions found from
dataflow alone, checked for divisibility, with a reason for every layer left replicated."""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from ..errors import IndivisibleError, PlanError
from . import ops
from .layers import (EXPERT_KINDS, LINEAR_KINDS, Contract, Note, Propagation, Segment,
                     dataflow_graph, layer_of)
from .ops import Unsafe
from .propagate import propagate

aten = torch.ops.aten


def _linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if (l := layer_of(n)) is not None
            and l.kind in LINEAR_KINDS]


def _backtrace(g: nx.DiGraph, start: fx.Node, free: set[str]) -> set[str]:
    """Unassigned Linears that feed ``start`` through shard-preserving ops."""
    found, seen, todo = set(), {start}, [start]
    while todo:
        n = todo.pop()
        layer = layer_of(n)
        if layer is not None and layer.kind in LINEAR_KINDS:
            if layer.name in free:
                found.add(layer.name)
            continue
        if n is not start and not ops.is_passable(n):
            continue
        for p in g.predecessors(n):
            if p not in seen and p.meta.get("tpc") is not None:
                seen.add(p)
                todo.append(p)
    return found


def detect_segments(gm: fx.GraphModule, contracts: dict[fx.Node, Contract] | None = None
                    ) -> tuple[dict[str, str], list[Segment], list[Note]]:
    """Styles for every Linear that belongs to a safe segment (structure only: tp=1)."""
    g = dataflow_graph(gm)
    styles: dict[str, str] = {}
    segments: list[Segment] = []
    notes: list[Note] = []
    linears = _linear_nodes(gm)
    names = [layer_of(n).name for n in linears]  # type: ignore[union-attr]
    heads: set[str] = set()
    order = {nm: i for i, nm in enumerate(names)}  # styles in graph order
    for lin in names:
        if lin in styles:
            continue
        entries = {lin}
        reason, indivisible, no_rule = "", None, None
        for _ in range(len(linears) + 1):
            trial = dict(styles, **{e: "colwise" for e in entries})
            try:
                res = propagate(gm, trial, 1, auto_rowwise=True, contracts=contracts, heads=heads)
            except Unsafe as u:
                free = set(names) - set(styles) - entries
                new = _backtrace(g, u.demand[0], free) if u.demand else set()
                if new:
                    entries |= new
                    continue
                reason, indivisible, no_rule = u.reason, u.indivisible, u.no_rule
                node = linears[order[lin]]
                narrow = _narrow(node) if entries == {lin} else ""
                if narrow and u.indivisible is None and (_read_whole(node) or _is_head(g, gm, lin)):
                    # a router: its scores are read whole (softmax, top-k) in the model
                    reason = f"its output is read whole inside the model, and {narrow}"
                    no_rule = None
                    break
                if entries == {lin} and u.indivisible is None and _is_head(g, gm, lin):
                    try:  # the logits also feed a loss inside the model: gather at the head
                        res = propagate(gm, trial, 1, auto_rowwise=True, contracts=contracts,
                                        heads=heads | {lin})
                    except Unsafe:
                        break
                    heads.add(lin)
                    styles[lin] = "colwise"
                    segments.append(_segment(gm, g, res, entries, order))
                break
            ends = res.gathered_outputs or res.losses  # read whole, or by a vocab-parallel loss
            if res.found_rowwise and ends:
                reason = "its output leaves the block both through a Linear and directly"
            elif not res.found_rowwise and not ends:
                reason = "no Linear, loss or output consumes it"
            else:
                styles.update({e: "colwise" for e in sorted(entries, key=order.get)})
                styles.update({r: "rowwise" for r in sorted(res.found_rowwise, key=order.get)})
                segments.append(_segment(gm, g, res, entries, order))
            break
        if reason and lin not in styles:
            notes.append(Note(lin, f"replicated: {reason}", indivisible, no_rule))
    return styles, segments, _blame_feeders(g, linears, names, notes)


def _blame_feeders(g: nx.DiGraph, linears: list[fx.Node], names: list[str],
                   notes: list[Note]) -> list[Note]:
    """A Linear fed by another of the same module that stays replicated (attention's
    output projection fed by a fused qkv that could not be sharded) could only have been
    rowwise had its feeder been sharded; its own colwise failure (often a residual add) is
    not the cause to report first. Feeders in other modules (the last block's output
    projection, through the residual stream and a norm) are not blamed."""
    noted = {n.layer for n in notes if n.layer in names}
    out = []
    for n in notes:
        feeders: list[str] = []
        if n.layer in noted and n.indivisible is None:
            parent = n.layer.rpartition(".")[0]
            free = {f for f in noted - {n.layer} if f.rpartition(".")[0] == parent}
            feeders = sorted(set().union(*(_backtrace(g, p, free) for p in
                                           g.predecessors(linears[names.index(n.layer)]))))
        if feeders:
            stay = "stays" if len(feeders) == 1 else "stay"
            own = n.reason.removeprefix("replicated: ")
            n = Note(n.layer, f"replicated: its input comes from {', '.join(feeders)}, which "
                     f"{stay} replicated (a rowwise layer needs its input sharded on its "
                     f"features); as a colwise layer instead: {own}", n.indivisible, n.no_rule)
        out.append(n)
    return out


def _narrow(node: fx.Node) -> str:
    """Why a Linear gathered at once would not pay for its collectives ("" if it would):
    split by columns, each rank saves ``(tp - 1) / tp`` of its ``out x in`` weight and
    matmuls, and pays a gather of ``[tokens, out]`` forward and an all-reduce of
    ``[tokens, in]`` backward. A vocabulary head (out >> in) is worth it; a router or
    a classifier (out < in: a few experts or classes) is not."""
    layer = layer_of(node)
    if layer is None or len(layer.shape) != 2:
        return ""
    out, inp = layer.shape if layer.kind == "linear" else layer.shape[::-1]
    if out >= inp:
        return ""
    return (f"out_features {out} < in_features {inp}: gathering its output forward and "
            "all-reducing its input gradient backward would cost more than splitting its "
            "weight saves")


# ops that read a whole row of scores at once (a router's softmax and top-k)
_WHOLE_ROW = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
              aten._log_softmax.default, aten.topk.default, aten.sort.default,
              aten.argmax.default, aten.max.dim}


def _read_whole(node: fx.Node, depth: int = 4) -> bool:
    """The layer's output reaches an op that reads whole rows of it (softmax, top-k), past
    casts, views and other elementwise ops of one operand."""
    todo, seen = [(node, 0)], {node}
    while todo:
        n, d = todo.pop()
        for u in n.users:
            if u.op != "call_function" or u in seen:
                continue
            if u.target in _WHOLE_ROW:
                return True
            if d < depth and (ops.rule_for(u) is ops.unary or u.target in ops.VIEW_LIKE):
                seen.add(u)
                todo.append((u, d + 1))
    return False


def _is_head(g: nx.DiGraph, gm: fx.GraphModule, name: str) -> bool:
    """A Linear whose output reaches the graph's output and feeds no other layer."""
    node = next(n for n in gm.graph.nodes if (l := layer_of(n)) is not None and l.name == name)
    if layer_of(node).kind in EXPERT_KINDS:  # type: ignore[union-attr]
        return False  # rows sorted by expert: no logits
    out = next(n for n in gm.graph.nodes if n.op == "output")
    below = nx.descendants(g, node)
    return out in below and not any(layer_of(n) is not None and layer_of(n).kind != "norm"  # type: ignore[union-attr]
                                    for n in below)


def head_layers(gm: fx.GraphModule, styles: dict[str, str], segments: list[Segment], tp: int,
                contracts: dict[fx.Node, Contract] | None = None) -> set[str]:
    """The heads of a plan that must be gathered at the layer: those whose sharded
    logits cannot reach the output (a loss inside the model reads them)."""
    try:
        propagate(gm, styles, tp, contracts=contracts)
        return set()
    except Unsafe:
        return {c for s in segments if s.kind == "head" for c in s.colwise}


def _segment(gm: fx.GraphModule, g: nx.DiGraph, res: Propagation, entries: set[str],
             order: dict[str, int]) -> Segment:
    """The segment grown from ``entries``: the sharded nodes downstream of them (earlier
    segments are sharded in ``res`` too, so reachability separates this one)."""
    starts = [n for n in gm.graph.nodes if (l := layer_of(n)) is not None and l.name in entries]
    reach = set(starts).union(*(nx.descendants(g, s) for s in starts))
    nodes = [n for n, l in res.layouts.items() if l.sharded and n in reach]
    attention_ops = {aten.scaled_dot_product_attention.default, aten._softmax.default,
                     aten.softmax.int, aten.matmul.default, aten.bmm.default}
    attention = any(n.target in attention_ops for n in nodes)
    if res.gathered_outputs or res.losses or entries & res.heads:
        kind = "head"
    elif attention:
        kind = "attention"
    elif len(entries) >= 2:
        kind = "gated_mlp"
    elif len(entries) == 1 and len(res.found_rowwise) == 1:
        kind = "mlp"
    else:
        kind = "generic"
    return Segment(kind, sorted(entries, key=order.get), sorted(res.found_rowwise, key=order.get),
                   [n.name for n in nodes])


def embedding_styles(gm: fx.GraphModule) -> dict[str, str]:
    """Every embedding becomes vocab-parallel, except those whose gradient semantics a
    split would change (``scale_grad_by_freq``, ``sparse``)."""
    out = {}
    for n in gm.graph.nodes:
        layer = layer_of(n)
        if layer is not None and layer.kind == "embedding":
            _, scale_grad_by_freq, sparse = layer.options
            if not scale_grad_by_freq and not sparse:
                out[layer.name] = "vocab_parallel"
    return out


def check_divisibility(gm: fx.GraphModule, styles: dict[str, str], segments: list[Segment],
                       tp: int, on_indivisible: str, prefix: str,
                       contracts: dict[fx.Node, Contract] | None = None,
                       heads: set[str] = frozenset()  # type: ignore[assignment]
                       ) -> tuple[dict[str, str], list[Segment], list[Note]]:
    """Re-propagate at the real tp; a segment with an indivisible dim raises or (with
    ``on_indivisible='replicate'``) is dropped, with a note. A segment of one layer (a
    7-class head, an odd vocabulary) is always dropped with a note: replicating it costs
    one layer's compute, not a block's, and the caller warns."""
    notes: list[Note] = []
    styles, segments = dict(styles), list(segments)
    while True:
        try:
            propagate(gm, styles, tp, contracts=contracts, heads=heads & set(styles))
            return styles, segments, notes
        except Unsafe as u:
            if u.indivisible is None:
                raise PlanError(f"{prefix}{u.reason}") from None
            layer = u.reason.split(":")[0]
            what, size = u.indivisible
            if on_indivisible != "replicate" and not _lone(styles, segments, layer):
                raise IndivisibleError(prefix + layer, what, size, tp) from None
            reason = f"{what} = {size} not divisible by tp = {tp}"
            if layer not in styles and not any(_owns(s, layer, styles) for s in segments):
                # named after an op, not a layer (an fx-traced forward): the segment that
                # feeds the op goes, so every round removes something
                seg = _segment_reaching(gm, segments, layer)
                if seg is None:
                    raise IndivisibleError(prefix + layer, what, size, tp) from None
                layer, reason = seg.colwise[0], f"{reason} (at {layer})"
            notes.append(replicate_layer(styles, segments, layer, reason))


def _segment_reaching(gm: fx.GraphModule, segments: list[Segment], name: str) -> Segment | None:
    """The first segment one of whose colwise layers feeds the node called ``name``."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return None
    above, todo = set(), [node]
    while todo:
        n = todo.pop()
        for p in n.all_input_nodes:
            if p not in above:
                above.add(p)
                todo.append(p)
    feeding = {layer.name for n in above if (layer := layer_of(n)) is not None}
    return next((s for s in segments if feeding & set(s.colwise)), None)


def replicate_layer(styles: dict[str, str], segments: list[Segment], layer: str,
                    reason: str) -> Note:
    """Keep ``layer`` replicated, and with it the whole segment it belongs to (a segment
    is all sharded or not at all). Updates ``styles`` and ``segments`` in place."""
    seg = next((s for s in segments if _owns(s, layer, styles)), None)
    if seg is None:  # a lone layer (e.g. an embedding)
        styles.pop(layer, None)
        return Note(layer, f"replicated: {reason}")
    segments.remove(seg)
    for name in seg.colwise + seg.rowwise:
        styles.pop(name, None)
    return Note(", ".join(seg.colwise + seg.rowwise), f"replicated ({seg.kind}): {reason}")


def _lone(styles: dict[str, str], segments: list[Segment], layer: str) -> bool:
    """``layer`` is a segment by itself: a colwise head with no rowwise partner, or a
    vocab-parallel embedding (in no segment)."""
    seg = next((s for s in segments if _owns(s, layer, styles)), None)
    if seg is None:
        return layer in styles
    return len(seg.colwise) + len(seg.rowwise) == 1


def _owns(seg: Segment, layer: str, styles: dict[str, str]) -> bool:
    """Whether ``seg`` holds ``layer``: a layer by name (a layer with a style of its own
    belongs to no other segment: ``mlp.shared_expert_gate`` is not part of
    ``mlp.shared_expert.*`` nor of ``mlp.gate``'s); an op or module scope by sitting
    inside the module of one of the segment's colwise layers."""
    if layer in seg.colwise or layer in seg.rowwise:
        return True
    if layer in styles:
        return False
    scopes = {c.rsplit(".", 1)[0] for c in seg.colwise if "." in c}
    return any(layer == p or layer.startswith(p + ".") for p in scopes)
