"""Stage 2b: sequence parallelism. Replicated regions around norms between segments
become sequence-sharded (``Q``, dim 1): the rowwise reduction becomes a reduce-scatter,
the colwise input an all-gather, and the norms run on 1/tp of the tokens.

Blocks exchange sequence shards through their *contract* (layouts at their boundary), so
a stack of blocks never gathers the sequence between them.
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from . import ops
from .analyze import NORM_FUNCTIONS, NORM_MODULES, Contract, Propagation, submodule, where
from .ops import Q, R, info, tensor_inputs

def _norm_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = submodule(gm, node)
    if isinstance(mod, NORM_MODULES) or node.target in NORM_FUNCTIONS:
        return True
    # the reduction at the heart of a hand-written norm: mean/var over the last dim
    if node.target in ("mean", "var") or getattr(node.target, "__name__", "") == "mean":
        d = ops.arg(node, 1, "dim")
        return d in (-1, [-1], (-1,)) or (info(node.args[0]) is not None and d == info(node.args[0]).rank - 1)
    return False


def _q_eligible(gm: fx.GraphModule, node: fx.Node, styles: dict[str, str],
                contracts: dict[str, Contract], is_root: bool) -> bool:
    t = info(node)
    if t is None or t.rank != 3:
        return False
    if node.op == "placeholder":
        return not is_root
    mod = submodule(gm, node)
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        return styles.get(node.target) in ("rowwise", "vocab_parallel")
    if node.op == "call_module" and node.target in contracts:
        return contracts[node.target].output.kind == "Q"
    if isinstance(mod, NORM_MODULES) or node.target in NORM_FUNCTIONS:
        return True
    rule = ops.rule_for(node, mod)
    if rule in (ops.unary, ops.elementwise):
        return True
    if rule is ops.reduction:
        d = ops.arg(node, 1, "dim")
        dims = d if isinstance(d, (list, tuple)) else [d]
        return d is not None and all(ops.norm_dim(x, 3) != 1 and ops.norm_dim(x, 3) != 0 for x in dims) \
            and ops.arg(node, 2, "keepdim", False)
    return False


def sequence_parallel(gm: fx.GraphModule, prop: Propagation, styles: dict[str, str],
                      contracts: dict[str, Contract], is_root: bool) -> set[fx.Node]:
    """Turn replicated regions around norms into sequence-sharded ones (dim 1). Returns the
    nodes that become ``Q`` and updates ``prop`` (layouts and needs) in place."""
    lay = prop.layouts
    elig = {n for n in gm.graph.nodes
            if lay.get(n) == R and _q_eligible(gm, n, styles, contracts, is_root)}
    g = nx.Graph()
    g.add_nodes_from(elig)
    for n in elig:
        for p in n.all_input_nodes:
            if p in elig:
                g.add_edge(p, n)
    chosen: set[fx.Node] = set()
    for comp in nx.connected_components(g):
        forced = any(n.op == "call_module" and n.target in contracts for n in comp)
        if forced or any(_norm_like(gm, n) for n in comp):
            chosen |= comp
    for n in chosen:
        lay[n] = Q(1)
    for n in chosen:
        if n.op == "placeholder":
            continue
        mod = submodule(gm, n)
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            continue  # partial sums reduce-scattered inside; input needs unchanged
        if n.op == "call_module" and n.target in contracts:
            _block_needs(n, contracts[n.target], prop)
            continue
        out = info(n)
        for p in tensor_inputs(n):
            t = info(p)
            pos = 1 - (out.rank - t.rank)  # type: ignore[union-attr]
            prop.need[n][p] = Q(pos) if pos >= 0 and t.shape[pos] != 1 else R  # type: ignore[union-attr]
    for n in gm.graph.nodes:  # non-Q consumers of a Q producer read it replicated
        if n in chosen or ops.is_meta_op(n):
            continue
        for p in tensor_inputs(n):
            if p in chosen and n.op != "output":
                prop.need[n].setdefault(p, R)
    return chosen


def _block_needs(n: fx.Node, c: Contract, prop: Propagation) -> None:
    for i, a in enumerate(n.args):
        if isinstance(a, fx.Node) and i < len(c.inputs):
            prop.need[n][a] = c.inputs[i]
    for k, a in n.kwargs.items():  # layer(x, attention_mask=m)
        if isinstance(a, fx.Node) and k in c.names:
            prop.need[n][a] = c.inputs[c.names.index(k)]


def block_contract(gm: fx.GraphModule, prop: Propagation) -> Contract:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = out.args[0]
    out_lay = prop.layouts.get(res, R) if isinstance(res, fx.Node) else R
    if out_lay.kind == "Q":
        prop.need[out][res] = out_lay
    else:
        out_lay = R
    return Contract([prop.layouts.get(p, R) for p in phs], out_lay, [str(p.target) for p in phs])


def apply_block_needs(gm: fx.GraphModule, prop: Propagation, contracts: dict[str, Contract]) -> None:
    """Without sequence parallel a block call still needs its contract's inputs."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in contracts:
            _block_needs(n, contracts[n.target], prop)


def norm_layers(gm: fx.GraphModule, chosen: set[fx.Node]) -> list[str]:
    """Module paths of the norms that run sequence-parallel (modules or hand-written)."""
    modules = dict(gm.named_modules())
    out: list[str] = []
    for n in gm.graph.nodes:
        if n in chosen and _norm_like(gm, n):
            name = str(n.target) if n.op == "call_module" else where(n)
            # a norm written inline in this module's own forward has no layer to name
            if name in modules and name and name not in out:
                out.append(name)
    return out
