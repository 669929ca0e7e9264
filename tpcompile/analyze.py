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
from typing import Any, Literal

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from . import ops
from .errors import IndivisibleError, PlanError
from .frontend import BLOCK_OP, Traced
from .ops import E, Layout, R, S, Unsafe, info, tensor_inputs

aten = torch.ops.aten
Style = Literal["colwise", "rowwise", "vocab_parallel", "sequence_parallel", "replicate"]
NORM_OPS = (aten.layer_norm.default, aten.rms_norm.default)


@dataclass(frozen=True)
class Layer:
    """A layer the rewrite can shard: an ATen linear / embedding / norm whose weight is a
    parameter of the traced module. ``name`` is the module path (weight FQN less
    ``.weight``), relative to the traced module."""

    kind: Literal["linear", "conv1d", "embedding", "norm"]
    name: str
    weight: fx.Node
    bias: fx.Node | None
    shape: tuple[int, ...]
    options: tuple = ()  # embedding: (padding_idx, scale_grad_by_freq, sparse)


def mark_layers(t: Traced, module: nn.Module | None = None) -> dict[str, Layer]:
    """Find the layers of a traced graph (``node.meta['tpc_layer']``). A weight tied
    between an embedding and a Linear head (export keeps one placeholder, named after
    the first) gives two layers, each named after the module that calls it; a weight
    used by two Linears makes neither a layer: they stay replicated."""
    found: dict[fx.Node, Layer] = {}
    uses: dict[fx.Node, int] = defaultdict(int)
    for n in t.gm.graph.nodes:
        n.meta.pop("tpc_layer", None)
        n.meta.pop("tpc_shared", None)
        if n.op != "call_function":
            continue
        if n.target is aten.linear.default:
            w, b = n.args[1], (n.args[2] if len(n.args) > 2 else None)
            kind = "linear"
        elif n.target is aten.addmm.default and len(n.args) == 3 and not n.kwargs:
            w, b, kind = n.args[2], n.args[0], "conv1d"  # GPT-2's Conv1D: bias + x @ W
        elif n.target is aten.embedding.default:
            w, b, kind = n.args[0], None, "embedding"
        elif n.target in NORM_OPS:
            w = n.args[2] if len(n.args) > 2 else None
            b = n.args[3] if n.target is aten.layer_norm.default and len(n.args) > 3 else None
            kind = "norm"
        else:
            continue
        fqn = t.params.get(w)  # type: ignore[arg-type]
        if fqn is None or not fqn.endswith("weight"):
            continue
        layer = fqn[:-len(".weight")] if fqn.endswith(".weight") else ""
        caller = _caller(n) if module is not None else layer
        if caller and caller != layer:
            if not _holds(module, caller, "weight", module.get_parameter(fqn)):  # type: ignore[union-attr]
                continue  # another module's weight read directly (F.linear(h, emb.weight))
            layer = caller  # the tied twin: named after the module that calls it
        if not layer or b is not None and not (t.params.get(b) == f"{layer}.bias" or _holds(
                module, layer, "bias", module.get_parameter(t.params.get(b, "")))):  # type: ignore[union-attr, arg-type]
            continue
        uses[w] += 1
        opts = ()
        if kind == "embedding":
            opts = (n.args[2] if len(n.args) > 2 else -1, n.args[3] if len(n.args) > 3 else False,
                    n.args[4] if len(n.args) > 4 else False)
        found[n] = Layer(kind, layer, w, b, tuple(info(w).shape), opts)  # type: ignore[arg-type, union-attr]
    out: dict[str, Layer] = {}
    for n, layer in found.items():
        twins = [l for l in found.values() if l.weight is layer.weight]
        kinds = sorted(l.kind for l in twins)
        if len(kinds) > 1 and kinds != ["embedding", "linear"] and layer.kind != "norm":
            # one weight, two layers of the same kind: replicated, and said so
            n.meta["tpc_shared"] = (layer.name, t.params[layer.weight],
                                    sorted({l.name for l in twins} - {layer.name}))
            continue
        n.meta["tpc_layer"] = layer
        out.setdefault(layer.name, layer)
    return out


def _caller(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return _clean_path(list(stack.values())[-1][0]) if stack else ""


def _holds(module: nn.Module | None, path: str, name: str, p: Any) -> bool:
    if module is None:
        return False
    try:
        return module.get_submodule(path)._parameters.get(name) is p
    except AttributeError:
        return False


def tied_pairs(gm: fx.GraphModule) -> list[tuple[Layer, Layer]]:
    """(embedding, linear) layers that share one weight."""
    layers = [l for n in gm.graph.nodes if (l := layer_of(n)) is not None]
    return [(e, h) for e in layers if e.kind == "embedding"
            for h in layers if h.kind in ("linear", "conv1d") and h.weight is e.weight]


def layer_of(node: fx.Node) -> Layer | None:
    return node.meta.get("tpc_layer")


def is_block(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is BLOCK_OP


@dataclass
class Contract:
    """Layouts at a traced block's boundary: one per tensor input (in the order of the
    flattened ``(args, kwargs)``) and one per tensor output."""

    inputs: list[Layout]
    outputs: list[Layout]


@dataclass
class Propagation:
    layouts: dict[fx.Node, Layout]
    need: dict[fx.Node, dict[fx.Node, Layout]]  # consumer -> producer -> layout it needs
    found_rowwise: set[str] = field(default_factory=set)
    gathered_outputs: list[fx.Node] = field(default_factory=list)
    heads: set[str] = field(default_factory=set)  # colwise heads gathered right at the layer
    packed: dict[str, int] = field(default_factory=dict)  # fused colwise layer -> parts


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
    no_rule: str | None = None  # the op without a rule that stopped the segment


def where(node: fx.Node) -> str:
    """The module path a node came from, for messages."""
    layer = layer_of(node)
    if layer is not None:
        return layer.name
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path) or node.name
    return node.name


def _clean_path(path: str) -> str:
    """nn_module_stack paths of non-strict export look like ``L['self'].layers[0].mlp``
    or ``layers.0.mlp``: make them dotted."""
    import re
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = path.strip(".")
    return "" if path == "inner" else path.removeprefix("inner.")  # frontend._Flat


def source_line(node: fx.Node) -> str:
    """The user's source line of a node, for messages (``file:line``), or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    lines = [ln for ln in lines if "/torch/" not in ln and "/tpcompile/" not in ln]
    if not lines:
        return ""
    import re
    m = re.match(r'File "([^"]+)", line (\d+)', lines[-1])
    return f"{m.group(1)}:{m.group(2)}" if m else ""


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for p in n.all_input_nodes:
            g.add_edge(p, n)
    return g


# ------------------------------------------------------------------- tensor parallel

def propagate(gm: fx.GraphModule, styles: dict[str, str], tp: int, *,
              auto_rowwise: bool = False, contracts: dict[fx.Node, Contract] | None = None,
              heads: set[str] = frozenset()  # type: ignore[assignment]
              ) -> Propagation:
    """Layouts of every node for the given layer styles; raises ``Unsafe``. ``heads``:
    colwise layers whose output is gathered at once (a head whose logits also feed a loss
    computed inside the model)."""
    contracts = contracts or {}
    res = Propagation({}, defaultdict(dict), heads=set(heads))
    lay = res.layouts
    ctx = ops.Ctx(tp, lay, packed=res.packed)
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
        layer = layer_of(node)
        if layer is not None and layer.kind in ("linear", "conv1d"):
            lay[node] = _linear(node, layer, styles.get(layer.name), tp, res, auto_rowwise)
            if styles.get(layer.name) == "colwise":
                ctx.colwise[node] = layer.name
            if layer.name in res.heads:
                lay[node] = R  # gathered inside the rewritten layer
                res.gathered_outputs.append(node)
            continue
        if layer is not None and layer.kind == "embedding" and \
                styles.get(layer.name) == "vocab_parallel":
            _divisible(layer.name, "num_embeddings", layer.shape[0], tp)
            lay[node] = R  # partial sums, reduced inside the rewritten embedding
            continue
        if not any(lay[p].sharded for p in ins) or ops.is_meta_op(node):
            lay[node] = R
            continue
        if is_block(node):
            raise Unsafe(f"a sharded tensor enters block {node.args[0]}")
        if "tpc_shared" in node.meta:
            name, weight, others = node.meta["tpc_shared"]
            raise Unsafe(f"{name} shares its weight {weight} with {', '.join(others)}: one "
                         "weight cannot be sharded for two layers, so they stay replicated "
                         "(give each layer its own weight to shard them)")
        rule = ops.rule_for(node)
        if rule is None:
            line = source_line(node)
            raise Unsafe(f"{where(node)}: `{_describe(node)}` has no rule in the op table, so "
                         "a sharded tensor cannot pass through it" + (f" (at {line})" if line else ""),
                         no_rule=_describe(node))
        try:
            lay[node] = rule(node, ctx)
        except Unsafe as u:
            u.reason = f"{where(node)}: {u.reason}"
            raise
        # A replicated operand of a sharded op gets a partial gradient on each rank (each
        # computes only its slice of the output): it enters as E, summed over tp in backward.
        for p in ins:
            res.need[node][p] = lay[p] if lay[p].sharded else E
    return res


def _linear(node: fx.Node, layer: Layer, style: str | None, tp: int, res: Propagation,
            auto_rowwise: bool) -> Layout:
    x = node.args[1] if layer.kind == "conv1d" else node.args[0]
    lx, tx = res.layouts[x], info(x)
    last = tx.rank - 1  # type: ignore[union-attr]
    out_features, in_features = layer.shape[::-1] if layer.kind == "conv1d" else layer.shape
    if style == "colwise":
        if lx.sharded:
            raise Unsafe(f"{layer.name}: colwise layer fed by a tensor sharded on dim {lx.dim}")
        _divisible(layer.name, "out_features", out_features, tp)
        res.need[node][x] = E
        return S(last)
    if style == "rowwise" or (style is None and auto_rowwise and lx.sharded and lx.dim == last):
        if not (lx.sharded and lx.dim == last):
            raise Unsafe(f"{layer.name}: rowwise layer fed by a tensor that is not sharded "
                         "on its features (its input would have to be split first)")
        _divisible(layer.name, "in_features", in_features, tp)
        res.need[node][x] = lx
        if style is None:
            res.found_rowwise.add(layer.name)
        return R
    if lx.sharded:
        raise Unsafe(f"{layer.name}: replicated layer fed by a tensor sharded on dim {lx.dim}")
    return R


def _divisible(layer: str, what: str, size: int, tp: int) -> None:
    if size % tp:
        raise Unsafe(f"{layer}: {what} = {size} not divisible by tp = {tp}",
                     indivisible=(what, size))


def _describe(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else str(t) if isinstance(t, torch._ops.OpOverload) \
        else getattr(t, "__name__", str(t))


def _linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if (l := layer_of(n)) is not None
            and l.kind in ("linear", "conv1d")]


def _backtrace(g: nx.DiGraph, start: fx.Node, free: set[str]) -> set[str]:
    """Unassigned Linears that feed ``start`` through shard-preserving ops."""
    found, seen, todo = set(), {start}, [start]
    while todo:
        n = todo.pop()
        layer = layer_of(n)
        if layer is not None and layer.kind in ("linear", "conv1d"):
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
            if res.found_rowwise and res.gathered_outputs:
                reason = "its output leaves the block both through a Linear and directly"
            elif not res.found_rowwise and not res.gathered_outputs:
                reason = "no Linear or output consumes it"
            else:
                styles.update({e: "colwise" for e in sorted(entries, key=order.get)})
                styles.update({r: "rowwise" for r in sorted(res.found_rowwise, key=order.get)})
                segments.append(_segment(gm, g, res, entries, order))
            break
        if reason and lin not in styles:
            notes.append(Note(lin, f"replicated: {reason}", indivisible, no_rule))
    return styles, segments, notes


def _is_head(g: nx.DiGraph, gm: fx.GraphModule, name: str) -> bool:
    """A Linear whose output reaches the graph's output and feeds no other layer."""
    node = next(n for n in gm.graph.nodes if (l := layer_of(n)) is not None and l.name == name)
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
    if res.gathered_outputs or entries & res.heads:
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
    ``on_indivisible='replicate'``) is dropped, with a note."""
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
            if on_indivisible != "replicate":
                raise IndivisibleError(prefix + layer, what, size, tp) from None
            reason = f"{what} = {size} not divisible by tp = {tp}"
            if layer not in styles and not any(_owns(s, layer) for s in segments):
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


__all__ = ["Layer", "mark_layers", "layer_of", "is_block", "propagate", "detect_segments", "check_divisibility", "embedding_styles", "Contract",
           "Propagation", "Segment", "Note"]
