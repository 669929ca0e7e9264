"""Layouts: how a tensor is spread over the tensor-parallel ranks, and the helpers the
op table's rules read node facts with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from ..frontend.blocks import TensorInfo


@dataclass(frozen=True)
class Layout:
    """``R`` replicated; ``S`` sharded on ``dim`` inside a tensor-parallel segment;
    ``Q`` sharded on the sequence ``dim`` (sequence parallel); ``E`` replicated in forward
    with a partial gradient (the input of colwise layers: summed over tp in backward)."""

    kind: str
    dim: int = -1

    @property
    def sharded(self) -> bool:
        return self.kind in ("S", "Q")

    def __repr__(self) -> str:
        return self.kind if self.kind in ("R", "E") else f"{self.kind}({self.dim})"


R = Layout("R")
E = Layout("E")


def S(d: int) -> Layout:
    return Layout("S", d)


def Q(d: int = 1) -> Layout:
    return Layout("Q", d)


class Unsafe(Exception):
    """The op cannot run on the given shards. ``demand`` = (node, dim): it could, if that
    input were sharded on that dim too. ``indivisible`` = (what, size) for divisibility."""

    def __init__(self, reason: str, demand: tuple[fx.Node, int] | None = None,
                 indivisible: tuple[str, int] | None = None, no_rule: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.demand, self.indivisible = reason, demand, indivisible
        self.no_rule = no_rule  # the op lacking a rule, when that is the reason


# ----------------------------------------------------------------------------- helpers

def info(n: Any) -> TensorInfo | None:
    if isinstance(n, fx.Node):
        t = n.meta.get("tpc")
        return t if isinstance(t, TensorInfo) else None
    return None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes of ``node`` that carry tensors (or tuples of them), in order, unique."""
    out: list[fx.Node] = []
    for n in node.all_input_nodes:
        if n.meta.get("tpc") is not None and n not in out:
            out.append(n)
    return out


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d
