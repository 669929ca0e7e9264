"""Stage 2b: sequence parallelism. Replicated regions around norms between segments
become sequence-sharded (``Q``, dim 1): the rowwise reduction becomes a reduce-scatter,
the colwise input an all-gather, and the norms run on 1/tp of the tokens.

Blocks exchange sequence shards through their *contract* (layouts at their boundary), so
a stack of blocks never gathers the sequence between them.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from . import ops
from .layers import LINEAR_KINDS, NORM_OPS, Contract, Propagation, is_block, layer_of
from .layout import E, Q, R, info, tensor_inputs

aten = torch.ops.aten


def _norm_like(node: fx.Node) -> bool:
    if node.target in NORM_OPS:
        return True
    # the reduction at the heart of a hand-written norm: mean/var over the last dim
    if node.target in (aten.mean.dim, aten.var.correction, aten.var.dim):
        d = ops.arg(node, 1, "dim")
        t = info(node.args[0])
        return t is not None and d is not None and all(
            ops.norm_dim(x, t.rank) == t.rank - 1 for x in (d if isinstance(d, (list, tuple)) else [d]))
    return False


def _q_eligible(node: fx.Node, styles: dict[str, str], params: set[fx.Node],
                is_root: bool) -> bool:
    t = info(node)
    if t is None or t.rank != 3:
        return False
    if node.op == "placeholder":
        return not is_root and node not in params
    layer = layer_of(node)
    if layer is not None and layer.kind in (*LINEAR_KINDS, "embedding"):
        return styles.get(layer.name) in ("rowwise", "vocab_parallel")
    if node.op == "call_function" and node.target is operator.getitem and is_block(node.args[0]):
        return True  # a block output: the block's contract decides (see sequence_parallel)
    if node.target in NORM_OPS:
        return True
    rule = ops.rule_for(node)
    if rule in (ops.unary, ops.elementwise):
        return True
    if node.target is aten.slice.Tensor and _full_slice(node):
        return True  # x[:, slice(-0, None)]: HF's logits_to_keep=0
    if rule is ops.reduction:
        d = ops.arg(node, 1, "dim")
        dims = d if isinstance(d, (list, tuple)) else [d]
        return d is not None and all(ops.norm_dim(x, 3) not in (0, 1) for x in dims) \
            and ops.arg(node, 2, "keepdim", False)
    return False


def _full_slice(node: fx.Node) -> bool:
    t = info(node.args[0])
    start, end = ops.arg(node, 2, "start"), ops.arg(node, 3, "end")
    step = ops.arg(node, 4, "step", 1)
    return t is not None and start in (None, 0) and step in (None, 1) and (
        end is None or isinstance(end, int) and end >= max(t.shape))


def _block_wants_q(n: fx.Node, contracts: dict[fx.Node, Contract]) -> bool:
    """Blocks exchange sequence shards: a block output the contract makes ``Q``, or a
    tensor passed to a block input the contract makes ``Q``, is sequence-sharded."""
    if n.target is operator.getitem and n.args and is_block(n.args[0]):
        c = contracts.get(n.args[0])
        return c is not None and c.outputs[n.args[1]].kind == "Q"
    for u in n.users:
        c = contracts.get(u)
        if c is not None and any(a is n and c.inputs[i].kind == "Q" for i, a in enumerate(u.args[1])):
            return True
    return False


def sequence_parallel(gm: fx.GraphModule, prop: Propagation, styles: dict[str, str],
                      contracts: dict[fx.Node, Contract], params: set[fx.Node],
                      is_root: bool) -> set[fx.Node]:
    """Turn replicated regions around norms into sequence-sharded ones (dim 1). Returns the
    nodes that become ``Q`` and updates ``prop`` (layouts and needs) in place."""
    lay = prop.layouts
    elig = {n for n in gm.graph.nodes
            if lay.get(n) == R and _q_eligible(n, styles, params, is_root)}
    # a block output is sequence-sharded only where the block's contract says so
    for n in list(elig):
        if n.target is operator.getitem and is_block(n.args[0]) and \
                not _block_wants_q(n, contracts):
            elig.discard(n)
    g = nx.Graph()
    g.add_nodes_from(elig)
    for n in elig:
        for p in n.all_input_nodes:
            if p in elig:
                g.add_edge(p, n)
    chosen: set[fx.Node] = set()
    for comp in nx.connected_components(g):
        if any(_block_wants_q(n, contracts) for n in comp) or any(_norm_like(n) for n in comp):
            chosen |= comp
    for n in chosen:
        lay[n] = Q(1)
    for n in chosen:
        if n.op == "placeholder":
            continue
        layer = layer_of(n)
        if layer is not None and layer.kind in (*LINEAR_KINDS, "embedding"):
            continue  # partial sums reduce-scattered inside; input needs unchanged
        if n.op == "call_function" and n.args and is_block(n.args[0]):
            continue  # a block output; the block call's needs are set below
        out = info(n)
        for p in tensor_inputs(n):
            t = info(p)
            if p in params:
                prop.need[n][p] = R  # its partial gradient is summed by the rewrite's sync_grads
                continue
            pos = 1 - (out.rank - t.rank)  # type: ignore[union-attr]
            if pos >= 0 and t.shape[pos] != 1:  # type: ignore[union-attr]
                prop.need[n][p] = Q(pos)
            else:  # a replicated operand (1 + weight, a scale): its gradient is partial
                prop.need[n][p] = R if p in chosen else E
    for n in gm.graph.nodes:  # non-Q consumers of a Q producer read it replicated
        if n in chosen or ops.is_meta_op(n):
            continue
        for p in tensor_inputs(n):
            if p in chosen and n.op != "output":
                prop.need[n].setdefault(p, R)
    return chosen


def apply_block_needs(gm: fx.GraphModule, prop: Propagation,
                      contracts: dict[fx.Node, Contract]) -> None:
    """A block call needs its inputs in the layouts of the block's contract."""
    for n, c in contracts.items():
        for a, want in zip(n.args[1], c.inputs):
            if isinstance(a, fx.Node):
                prop.need[n][a] = want


def block_contract(t_inputs: list[fx.Node], outputs: list, prop: Propagation,
                   out_node: fx.Node) -> Contract:
    """The layouts at a block's boundary: its tensor inputs, and its tensor outputs (a
    sequence-sharded output stays sharded for the next block)."""
    ins = [prop.layouts.get(p, R) for p in t_inputs]
    outs = []
    for o in outputs:
        if not isinstance(o, fx.Node) or info(o) is None:
            continue
        lay = prop.layouts.get(o, R)
        if lay.kind == "Q":
            prop.need[out_node][o] = lay
            outs.append(lay)
        else:
            outs.append(R)
    return Contract([l if l.kind == "Q" else R for l in ins], outs)


def norm_layers(gm: fx.GraphModule, chosen: set[fx.Node], modules: set[str]) -> list[str]:
    """Names of the norm layers that run sequence-parallel: ATen norms by their weight,
    hand-written norms (mean over the features) by the module they were written in."""
    from .layers import where
    out: list[str] = []
    for n in gm.graph.nodes:
        if n not in chosen or not _norm_like(n):
            continue
        layer = layer_of(n)
        name = layer.name if layer is not None else where(n)
        if name in modules and name not in out:
            out.append(name)
    return out
