"""Stage 2: find tensor-parallel segments and sequence-parallel regions in a traced graph.

A *segment* is a connected region of shard-preserving ops whose entries are Linear
outputs (colwise) and whose exits are Linear inputs (rowwise), or graph outputs (a
colwise head whose output is gathered). Detection comes from dataflow alone: we
propose a Linear as colwise, propagate the shard through the op table, pull in the other
Linears the ops demand (k and v once q is sharded, ``w3`` once ``w1`` is), and accept the
region only if every op in it is provably safe. Anything else stays replicated, with the
reason recorded.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .errors import IndivisibleError, PlanError
from .ops import E, Layout, R, S, Unsafe, info, tensor_inputs

Style = Literal["colwise", "rowwise", "vocab_parallel", "sequence_parallel", "replicate"]
NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)
NORM_FUNCTIONS = (F.layer_norm, F.rms_norm)


@dataclass
class Contract:
    """Layouts at a traced module's boundary: one per placeholder, one for the output."""

    inputs: list[Layout]
    output: Layout
    names: list[str] = field(default_factory=list)  # the placeholders' (forward's) names


@dataclass
class Propagation:
    layouts: dict[fx.Node, Layout]
    need: dict[fx.Node, dict[fx.Node, Layout]]  # consumer -> producer -> layout it needs
    found_rowwise: set[str] = field(default_factory=set)
    gathered_outputs: list[fx.Node] = field(default_factory=list)


@dataclass
class Segment:
    kind: str
    colwise: list[str]
    rowwise: list[str]
    nodes: list[str] = field(default_factory=list)


@dataclass
class Note:
    layer: str
    reason: str
    indivisible: tuple[str, int] | None = None  # the structure is fine, a size is not


def submodule(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def where(node: fx.Node) -> str:
    """The module path a node came from, for messages."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for p in n.all_input_nodes:
            g.add_edge(p, n)
    return g


# ------------------------------------------------------------------- tensor parallel

def propagate(gm: fx.GraphModule, styles: dict[str, str], tp: int, *,
              auto_rowwise: bool = False, contracts: dict[str, Contract] | None = None
              ) -> Propagation:
    """Layouts of every node for the given layer styles; raises ``Unsafe``."""
    contracts = contracts or {}
    res = Propagation({}, defaultdict(dict))
    lay = res.layouts
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            lay[node] = R
            continue
        ins = tensor_inputs(node)
        if node.op == "output":
            for p in ins:
                if lay[p].sharded:
                    res.need[node][p] = R
                    res.gathered_outputs.append(p)
            continue
        mod = submodule(gm, node)
        if isinstance(mod, nn.Linear):
            lay[node] = _linear(node, mod, styles.get(node.target), tp, res, auto_rowwise)
            continue
        if isinstance(mod, nn.Embedding) and styles.get(node.target) == "vocab_parallel":
            _divisible(node.target, "num_embeddings", mod.num_embeddings, tp)
            lay[node] = R  # partial sums, reduced inside the rewritten embedding
            continue
        if not any(lay[p].sharded for p in ins) or ops.is_meta_op(node):
            lay[node] = R
            continue
        if node.op == "call_module" and node.target in contracts:
            raise Unsafe(f"a sharded tensor enters block {node.target}")
        rule = ops.rule_for(node, mod)
        if rule is None:
            raise Unsafe(f"{where(node)}: `{_describe(node)}` is not in the op table, so a "
                         "sharded tensor cannot pass through it")
        try:
            lay[node] = rule(node, ops.Ctx(tp, lay))
        except Unsafe as u:
            u.reason = f"{where(node)}: {u.reason}"
            raise
        # A replicated operand of a sharded op gets a partial gradient on each rank (each
        # computes only its slice of the output): it enters as E, summed over tp in backward.
        for p in ins:
            res.need[node][p] = lay[p] if lay[p].sharded else E
    return res


def _linear(node: fx.Node, mod: nn.Linear, style: str | None, tp: int, res: Propagation,
            auto_rowwise: bool) -> Layout:
    x = node.args[0]
    lx, tx = res.layouts[x], info(x)
    last = tx.rank - 1  # type: ignore[union-attr]
    if style == "colwise":
        if lx.sharded:
            raise Unsafe(f"{node.target}: colwise layer fed by a tensor sharded on dim {lx.dim}")
        _divisible(node.target, "out_features", mod.out_features, tp)
        res.need[node][x] = E
        return S(last)
    if style == "rowwise" or (style is None and auto_rowwise and lx.sharded and lx.dim == last):
        if not (lx.sharded and lx.dim == last):
            raise Unsafe(f"{node.target}: rowwise layer fed by a tensor that is not sharded "
                         "on its features (its input would have to be split first)")
        _divisible(node.target, "in_features", mod.in_features, tp)
        res.need[node][x] = lx
        if style is None:
            res.found_rowwise.add(node.target)
        return R
    if lx.sharded:
        raise Unsafe(f"{node.target}: replicated layer fed by a tensor sharded on dim {lx.dim}")
    return R


def _divisible(layer: str, what: str, size: int, tp: int) -> None:
    if size % tp:
        raise Unsafe(f"{layer}: {what} = {size} not divisible by tp = {tp}",
                     indivisible=(what, size))


def _describe(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(submodule(gm, n), nn.Linear)]


def _backtrace(g: nx.DiGraph, gm: fx.GraphModule, start: fx.Node, free: set[str]) -> set[str]:
    """Unassigned Linears that feed ``start`` through shard-preserving ops."""
    found, seen, todo = set(), {start}, [start]
    while todo:
        n = todo.pop()
        mod = submodule(gm, n)
        if isinstance(mod, nn.Linear):
            if n.target in free:
                found.add(n.target)
            continue
        if n is not start and not ops.is_passable(n, mod):
            continue
        for p in g.predecessors(n):
            if p not in seen and info(p) is not None or p.meta.get("tpc") is not None:
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
    return found


def detect_segments(gm: fx.GraphModule, contracts: dict[str, Contract] | None = None
                    ) -> tuple[dict[str, str], list[Segment], list[Note]]:
    """Styles for every Linear that belongs to a safe segment (structure only: tp=1)."""
    g = dataflow_graph(gm)
    styles: dict[str, str] = {}
    segments: list[Segment] = []
    notes: list[Note] = []
    linears = _linear_nodes(gm)
    order = {n.target: i for i, n in enumerate(gm.graph.nodes)}  # styles in graph order
    for lin in linears:
        if lin.target in styles:
            continue
        entries = {lin.target}
        reason, indivisible = "", None
        for _ in range(len(linears) + 1):
            trial = dict(styles, **{e: "colwise" for e in entries})
            try:
                res = propagate(gm, trial, 1, auto_rowwise=True, contracts=contracts)
            except Unsafe as u:
                free = {n.target for n in linears} - set(styles) - entries
                new = _backtrace(g, gm, u.demand[0], free) if u.demand else set()
                if new:
                    entries |= new
                    continue
                reason, indivisible = u.reason, u.indivisible
                break
            if res.found_rowwise and res.gathered_outputs:
                reason = "its output leaves the block both through a Linear and directly"
            elif not res.found_rowwise and not res.gathered_outputs:
                reason = "no Linear or output consumes it"
            else:
                styles.update({e: "colwise" for e in sorted(entries, key=order.get)})
                styles.update({r: "rowwise" for r in sorted(res.found_rowwise, key=order.get)})
                segments.append(_segment(gm, g, res, entries))
            break
        if reason and lin.target not in styles:
            notes.append(Note(str(lin.target), f"replicated: {reason}", indivisible))
    return styles, segments, notes


def _segment(gm: fx.GraphModule, g: nx.DiGraph, res: Propagation, entries: set[str]) -> Segment:
    """The segment grown from ``entries``: the sharded nodes downstream of them (earlier
    segments are sharded in ``res`` too, so reachability separates this one)."""
    starts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in entries]
    reach = set(starts).union(*(nx.descendants(g, s) for s in starts))
    nodes = [n for n, l in res.layouts.items() if l.sharded and n in reach]
    targets = {n.target for n in nodes}
    attention = any(t in (F.scaled_dot_product_attention, F.softmax, "softmax")
                    or getattr(t, "__name__", "") in ("matmul", "softmax") for t in targets)
    if res.gathered_outputs:
        kind = "head"
    elif attention:
        kind = "attention"
    elif len(entries) >= 2:
        kind = "gated_mlp"
    elif len(entries) == 1 and len(res.found_rowwise) == 1:
        kind = "mlp"
    else:
        kind = "generic"
    order = {n.target: i for i, n in enumerate(gm.graph.nodes)}
    return Segment(kind, sorted(entries, key=order.get), sorted(res.found_rowwise, key=order.get),
                   [n.name for n in nodes])


def embedding_styles(gm: fx.GraphModule) -> dict[str, str]:
    out = {}
    for n in gm.graph.nodes:
        mod = submodule(gm, n)
        if (isinstance(mod, nn.Embedding) and mod.max_norm is None and mod.padding_idx is None
                and not mod.scale_grad_by_freq and not mod.sparse):
            out[str(n.target)] = "vocab_parallel"
    return out


def check_divisibility(gm: fx.GraphModule, styles: dict[str, str], segments: list[Segment],
                       tp: int, on_indivisible: str, prefix: str,
                       contracts: dict[str, Contract] | None = None
                       ) -> tuple[dict[str, str], list[Segment], list[Note]]:
    """Re-propagate at the real tp; a segment with an indivisible dim raises or (with
    ``on_indivisible='replicate'``) is dropped, with a note."""
    notes: list[Note] = []
    styles, segments = dict(styles), list(segments)
    while True:
        try:
            propagate(gm, styles, tp, contracts=contracts)
            return styles, segments, notes
        except Unsafe as u:
            if u.indivisible is None:
                raise PlanError(f"{prefix}{u.reason}") from None
            layer = u.reason.split(":")[0]
            what, size = u.indivisible
            if on_indivisible != "replicate":
                raise IndivisibleError(prefix + layer, what, size, tp) from None
            notes.append(replicate_layer(styles, segments, layer,
                                         f"{what} = {size} not divisible by tp = {tp}"))


def replicate_layer(styles: dict[str, str], segments: list[Segment], layer: str,
                    reason: str) -> Note:
    """Keep ``layer`` replicated, and with it the whole segment it belongs to (a segment
    is all sharded or not at all). Updates ``styles`` and ``segments`` in place."""
    seg = next((s for s in segments if _owns(s, layer)), None)
    if seg is None:  # a lone layer (e.g. an embedding)
        styles.pop(layer, None)
        return Note(layer, f"replicated: {reason}")
    segments.remove(seg)
    for name in seg.colwise + seg.rowwise:
        styles.pop(name, None)
    return Note(", ".join(seg.colwise + seg.rowwise), f"replicated ({seg.kind}): {reason}")


def _owns(seg: Segment, layer: str) -> bool:
    return layer in seg.colwise or layer in seg.rowwise or any(
        layer.startswith(c.rsplit(".", 1)[0]) for c in seg.colwise)


__all__ = ["propagate", "detect_segments", "check_divisibility", "embedding_styles", "Contract",
           "Propagation", "Segment", "Note"]
