"""Shard propagation: given the styles of the Linears, the layout of every value in the
graph, op by op through the op table."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.fx as fx

from . import ops
from .layers import (EXPERT_KINDS, LINEAR_KINDS, Contract, Layer, Propagation, is_block,
                     layer_of, source_line, where)
from .ops import E, Layout, R, Unsafe, info, tensor_inputs

aten = torch.ops.aten

# ------------------------------------------------------------------- tensor parallel

def propagate(gm: fx.GraphModule, styles: dict[str, str], tp: int, *,
              auto_rowwise: bool = False, contracts: dict[fx.Node, Contract] | None = None,
              heads: set[str] = frozenset()  # type: ignore[assignment]
              ) -> Propagation:
    """Layouts of every node for the given layer styles; raises ``Unsafe``. ``heads``:
    colwise layers whose output is gathered at once (a head whose logits also feed a loss
    computed inside the model).

    A colwise layer whose output splits into n heads, n < tp dividing tp (2 kv heads at
    tp 4), is tried again shared by groups of tp // n ranks (``Propagation.grouped``)."""
    grouped: dict[str, int] = {}
    first: Unsafe | None = None  # what failed before any layer was grouped
    while True:
        try:
            return _propagate(gm, styles, tp, auto_rowwise, contracts or {}, set(heads), grouped)
        except Unsafe as u:
            if u.group is None or u.group[0] in grouped or styles.get(u.group[0]) != "colwise":
                # grouping did not make it fit (q heads fewer than tp, say): the first
                # failure is the one to report, with its indivisible dims
                raise first or u
            first = first or u
            grouped[u.group[0]] = u.group[1]


def _propagate(gm: fx.GraphModule, styles: dict[str, str], tp: int, auto_rowwise: bool,
               contracts: dict[fx.Node, Contract], heads: set[str], grouped: dict[str, int]
               ) -> Propagation:
    res = Propagation({}, defaultdict(dict), heads=heads, grouped=dict(grouped))
    lay = res.layouts
    ctx = ops.Ctx(tp, lay, packed=res.packed)
    experts: list[tuple[fx.Node, str | None]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            lay[node] = R
            continue
        ins = tensor_inputs(node)
        if node.op == "output":
            for p in ins:
                if lay[p].sharded:
                    _gatherable(p, lay[p])
                    res.need[node][p] = R
                    res.gathered_outputs.append(p)
            continue
        layer = layer_of(node)
        if layer is not None and layer.kind in LINEAR_KINDS:
            lay[node] = _linear(node, layer, styles.get(layer.name), tp, res, auto_rowwise)
            if styles.get(layer.name) == "colwise":
                ctx.colwise[node] = layer.name
            if layer.kind in EXPERT_KINDS:
                experts.append((node, styles.get(layer.name)))
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
        _same_spread(node, [lay[p] for p in ins if lay[p].sharded])
        rule = ops.rule_for(node)
        if rule is None:
            line = source_line(node)
            raise Unsafe(f"{where(node)}: `{_describe(node)}` has no rule in the op table, so "
                         "a sharded tensor cannot pass through it" + (f" (at {line})" if line else ""),
                         no_rule=_describe(node))
        try:
            lay[node] = rule(node, ctx)
        except Unsafe as u:
            at = where(node)  # the module it came from; a rule's reason may name the op already
            if not u.reason.startswith(f"{at}: "):
                u.reason = f"{at}: {u.reason}"
            raise
        if node.target in ops.LOSSES:
            res.losses.append(node)
        # A replicated operand of a sharded op gets a partial gradient on each rank (each
        # computes only its slice of the output): it enters as E, summed over tp in backward.
        # Integer operands (indices, class targets) have no gradient to sum.
        # A parameter lined up with the sharded dim (a norm's weight) is read split.
        for p in ins:
            res.need[node][p] = lay[p] if lay[p].sharded else ctx.splits.get((node, p)) or \
                (E if _differentiable(p) else R)
    for node, style in experts:
        _experts_collectives(node, style, res)
    return res


def _linear(node: fx.Node, layer: Layer, style: str | None, tp: int, res: Propagation,
            auto_rowwise: bool) -> Layout:
    x = node.args[1] if layer.kind == "conv1d" else node.args[0]
    lx, tx = res.layouts[x], info(x)
    last = tx.rank - 1  # type: ignore[union-attr]
    out_features, in_features = features(layer)
    if style == "colwise":
        if lx.sharded:
            raise Unsafe(f"{layer.name}: colwise layer fed by a tensor sharded on dim {lx.dim}")
        n = res.grouped.get(layer.name, 0)
        _divisible(layer.name, "out_features", out_features, n or tp)
        res.need[node][x] = E
        return Layout("S", last, n)
    if style == "rowwise" or (style is None and auto_rowwise and lx.sharded and lx.dim == last):
        if lx.sharded and not lx.standard:
            raise Unsafe(f"{layer.name}: rowwise layer fed by kv heads shared by groups of "
                         "ranks (each rank would sum another rank's rows again)")
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


def _numel(n: fx.Node) -> int:
    t = info(n)
    return math.prod(t.shape) if t is not None else 1 << 62


def _nbytes(n: fx.Node) -> int:
    t = info(n)
    return _numel(n) * t.dtype.itemsize if t is not None else 1 << 62


def _users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if not ops.is_meta_op(u)]


_ROW_PICKS = (aten.index.Tensor,)  # rows picked by replicated integer indices
_SHAPES = tuple(ops.VIEW_LIKE) + (aten.permute.default, aten.transpose.int)
_CASTS = (aten.to.dtype, aten._to_copy.default)


def _widening(n: fx.Node) -> bool:
    """A cast that loses nothing (a sum of partial terms then cast is not the same)."""
    a, b = info(n.args[0]), info(n)
    return a is not None and b is not None and b.dtype.itemsize >= a.dtype.itemsize and \
        b.dtype.is_floating_point


def _same_dtype(n: fx.Node) -> bool:
    a, b = info(n.args[0]), info(n)
    return a is not None and b is not None and a.dtype == b.dtype


def _experts_collectives(node: fx.Node, style: str | None, res: Propagation) -> None:
    """Where a grouped matmul of experts sums over tp (after propagation: every layout
    known). Its rows are (token, expert) pairs, top_k of them per token: a rowwise
    expert's partial sums are weighted, put back in token order and summed over the top_k
    experts first (all linear in them), then reduced per token; a colwise expert's input
    gradient is summed over tp per token, before the rows were picked from the tokens.
    Each is top_k times fewer bytes than at the layer. Only through replicated, single-use
    nodes (no other reader may see a partial sum), two-dim where sequence parallelism could
    claim an op."""
    lay = res.layouts
    if style == "rowwise":
        steps: list[tuple[fx.Node, list[fx.Node]]] = []
        cur = node
        while len(_users(cur)) == 1:
            u = _users(cur)[0]
            t, others = info(u), []
            if t is None or lay.get(u, R) != R:
                break
            if u.target in (aten.mul.Tensor, aten.div.Tensor) and t.rank <= 2 and \
                    sum(a is cur for a in u.args[:2]) == 1 and \
                    (u.args[0] is cur or u.target is aten.mul.Tensor):
                others = [a for a in u.args[:2] if isinstance(a, fx.Node) and a is not cur]
                if any(lay.get(o, R) != R or _numel(o) > _numel(u) for o in others):
                    break
            elif not (u.args and u.args[0] is cur and (
                    u.target in _ROW_PICKS or u.target in _SHAPES or
                    u.target is aten.sum.dim_IntList and (t.rank <= 2 or not ops.arg(u, 2, "keepdim", False)) or
                    u.target in _CASTS and t.rank <= 2 and _widening(u))):
                break
            steps.append((u, others))
            cur = u
        if not steps:
            return
        best = min(range(len(steps)), key=lambda i: (_nbytes(steps[i][0]), i))
        if _nbytes(steps[best][0]) >= _nbytes(node):
            return
        for u, others in steps[:best + 1]:
            for o in others:  # weights of the partial sums: their gradients are partial too
                if _differentiable(o):
                    res.need[u][o] = E
        res.deferred[node] = (steps[best][0], [u for u, _ in steps[:best + 1]])
        return
    if style != "colwise":
        return
    x = node.args[0]
    readers = _users(x)  # type: ignore[arg-type]
    if not all((l := layer_of(r)) is not None and l.kind in EXPERT_KINDS and
               r.args[0] is x and res.need.get(r, {}).get(x) == E for r in readers):
        return
    best, cur = None, x
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.args and \
            isinstance(cur.args[0], fx.Node) and lay.get(cur, R) == R and (
                cur.target in _ROW_PICKS or cur.target in _SHAPES or
                cur.target in _CASTS and _same_dtype(cur)):
        src = cur.args[0]  # (past a real cast, the gradient would be summed in another dtype)
        if (cur is not x and len(_users(cur)) != 1) or lay.get(src, R) != R:
            break
        if _nbytes(src) < _nbytes(best[1] if best else x):
            best = (cur, src)
        if len(_users(src)) != 1:
            break  # read by others too (the router): entered here, not above
        cur = src
    if best is not None:
        for r in readers:
            res.need[r][x] = R
        res.need[best[0]][best[1]] = E


def features(layer: Layer) -> tuple[int, int]:
    """(out_features, in_features) of a Linear-like layer, whatever its weight's layout:
    (out, in) for a Linear, (in, out) for GPT-2's Conv1D, [E, out, in] / [E, in, out] for
    a Parameter of experts."""
    shape = {"conv1d": layer.shape[::-1], "experts": layer.shape[1:],
             "experts_io": layer.shape[:0:-1]}.get(layer.kind, layer.shape)
    return shape[0], shape[1]


def _same_spread(node: fx.Node, lays: list[Layout]) -> None:
    """Operands must be spread alike: kv heads shared by groups of ranks meet per-rank
    heads only in attention with ``enable_gqa``; expanded kv heads only in the reshape
    that merges them; heads folded into the batch meet only heads folded alike."""
    if any(l.inner >= 0 for l in lays) and node.target not in ops.VIEW_LIKE:
        raise Unsafe(f"{node.name}: expanded kv heads used before the reshape that merges "
                     "them into q heads")
    if len({(l.groups, l.inner, l.outer) for l in lays}) > 1 and \
            node.target is not torch.ops.aten.scaled_dot_product_attention.default:
        raise Unsafe(f"{node.name}: operands spread differently over tp ({lays}): kv heads "
                     "shared by groups of ranks, or heads folded into the batch, meet "
                     "per-rank heads")


def _differentiable(p: fx.Node) -> bool:
    t = info(p)
    return t is None or t.dtype.is_floating_point or t.dtype.is_complex


def _gatherable(p: fx.Node, lay: Layout) -> None:
    if not lay.standard:
        raise Unsafe(f"{p.name}: kv heads shared by groups of ranks, or heads folded into "
                     "the batch, leave the segment (a gather would repeat or interleave them)")


def _divisible(layer: str, what: str, size: int, tp: int) -> None:
    if size % tp:
        raise Unsafe(f"{layer}: {what} = {size} not divisible by tp = {tp}",
                     indivisible=(what, size))


def _describe(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else str(t) if isinstance(t, torch._ops.OpOverload) \
        else getattr(t, "__name__", str(t))
