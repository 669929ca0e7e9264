"""A post-pass on a rewritten graph: what runs while a collective is on the wire.

The colwise Linears that read one entered input (q, k, v; gate and up) become one
``colwise_linears`` call, whose backward launches the input gradient's reduction and
computes the weight gradients under it; a colwise head whose logits are gathered becomes
one ``colwise_head`` call, its gather pipelined with the matmul in row chunks (and its
local logits kept for a vocab-parallel loss that reads them too). Same
collectives, same count; ``TPCOMPILE_OVERLAP=0`` (or ``overlapping(False)``) leaves the
graph as the builder made it.
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Callable

import torch
import torch.fx as fx

from ..analysis import ops
from . import collectives as C
from .head import colwise_head

aten = torch.ops.aten


# Backward input-gradient reductions overlapped with the weight-gradient matmuls: on by
# default; TPCOMPILE_OVERLAP=0 (or ``overlapping(False)`` around auto_parallelize) builds
# the programs without it, to measure what it buys (bench/step_time.py --overlap).
OVERLAP = {"enabled": os.environ.get("TPCOMPILE_OVERLAP", "1") != "0"}


def overlapping(enabled: bool) -> contextlib.AbstractContextManager[None]:
    return ops.toggled(OVERLAP, enabled)


def overlap_input_grads(graph: fx.Graph) -> None:
    """An input entering colwise layers (``enter``/``sp_gather``) whose every user is one
    of those Linears becomes one ``colwise_linears`` call: the same collectives, with the
    input gradient's reduction overlapped with the weight-gradient matmuls in backward."""
    for conv in [n for n in graph.nodes if n.target in (C.enter, C.sp_gather)]:
        users = list(conv.users)
        if not users or any(u.target is not aten.linear.default or u.args[0] is not conv or
                            u.kwargs for u in users):
            continue
        pos = _position(graph)
        first = min(users, key=pos)
        params = [a for u in users for a in u.args[1:3] if isinstance(a, fx.Node)]
        late = [p for p in params if pos(p) > pos(first)]
        if any(pos(a) > pos(first) for p in late for a in p.all_input_nodes):
            continue  # a weight computed from something only ready later: left as it is
        for p in sorted(late, key=pos):
            first.prepend(p)  # this rank's rows of a shared kv weight, moved up
        dim = None if conv.target is C.enter else conv.args[1]
        head = _gathered_head(conv, users)
        if head is not None:
            _head(graph, conv, *head, dim)
            continue
        with graph.inserting_before(first):
            call = graph.call_function(C.colwise_linears, (
                conv.args[0], dim, conv.args[-1], [u.args[1] for u in users],
                [u.args[2] if len(u.args) > 2 else None for u in users]))
            call.meta.update(conv.meta)  # its tpc_site: what explain reports
            for i, u in enumerate(users):
                y = graph.call_function(operator.getitem, (call, i))
                y.meta.update(u.meta)
                u.replace_all_uses_with(y)
        for u in users:
            graph.erase_node(u)
        graph.erase_node(conv)


def _gathered_head(conv: fx.Node, users: list[fx.Node]
                   ) -> tuple[list[fx.Node], fx.Node, list[fx.Node]] | None:
    """One Linear on the entered input whose output, through at most one dtype cast (a
    ``.float()`` of the logits), is gathered on its last dim: a head whose logits are read
    replicated (the model's output). The Linear (and cast), the gather, and the other
    readers of the logits (a vocab-parallel loss), which read this rank's columns."""
    site = conv.meta.get("tpc_site")
    if len(users) != 1 or site is None:
        return None
    chain = [users[0]]
    if len(chain[0].users) == 1:
        (u,) = chain[0].users
        if u.target is aten.to.dtype and len(u.args) == 2 and not u.kwargs:
            chain.append(u)  # one cast at most
    y, rank = chain[-1], len(site.tensor.shape)
    gathers = [u for u in y.users if u.target is C.gather and u.args[0] is y and
               u.args[1] in (-1, rank - 1)]
    if len(gathers) != 1:
        return None
    return chain, gathers[0], [u for u in y.users if u is not gathers[0]]


def _head(graph: fx.Graph, conv: fx.Node, chain: list[fx.Node], gather: fx.Node,
          readers: list[fx.Node], dim: int | None) -> None:
    """conversion + Linear (+ cast) + gather of a head as one ``colwise_head`` call (its
    item 0 takes the gather's place and site, item 1 the local logits' for ``readers``):
    the gather pipelined with the matmul in chunks, the input gradient's reduction
    overlapped with the weight gradient."""
    linear = chain[0]
    dtype = chain[1].args[1] if len(chain) > 1 else None
    with graph.inserting_before(linear):
        call = graph.call_function(colwise_head, (
            conv.args[0], dim, conv.args[-1], linear.args[1],
            linear.args[2] if len(linear.args) > 2 else None, dtype, bool(readers)))
        call.meta.update(conv.meta)  # the conversion's site
        out = graph.call_function(operator.getitem, (call, 0))
        out.meta.update(gather.meta)  # the gather's site
        if readers:
            mine = graph.call_function(operator.getitem, (call, 1))
            for u in readers:
                u.replace_input_with(chain[-1], mine)
    gather.replace_all_uses_with(out)
    for n in [gather, *reversed(chain), conv]:
        graph.erase_node(n)


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
