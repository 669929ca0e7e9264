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
    with a partial gradient (the input of colwise layers: summed over tp in backward);
    ``P`` partial: each rank holds a term, the value is their sum over tp (a sum or mean
    over the sharded dim, as in a norm over a whole sharded projection). A ``P`` value is
    all-reduced where it is first read, so no op computes on it.

    ``groups`` (``S`` only; 0 means tp): ``dim`` cut into that many chunks, fewer than tp,
    rank ``r`` holding chunk ``r // (tp // groups)`` (kv heads shared by groups of ranks
    when there are fewer kv heads than tp). ``inner``: a second dim, cut into
    ``tp // groups`` chunks, rank ``r`` holding chunk ``r % (tp // groups)`` (those kv
    heads expanded to their q heads, before the reshape that merges the two dims).
    ``outer`` (``S`` only): ``dim`` is a sharded dim folded under an unsharded outer
    factor of that size (nn.MultiheadAttention's heads folded into the batch,
    ``[B * H, T, hd]`` with ``H`` split: each rank holds ``B * H / tp`` of it, which is no
    chunk of the whole). Ops may carry it along until a reshape unfolds it again."""

    kind: str
    dim: int = -1
    groups: int = 0
    inner: int = -1
    outer: int = 0

    @property
    def sharded(self) -> bool:
        return self.kind in ("S", "Q")

    @property
    def standard(self) -> bool:
        """Split into tp chunks on one dim, chunk r on rank r (or not sharded)."""
        return self.groups == 0 and self.inner < 0 and self.outer == 0

    def shards(self, tp: int) -> int:
        """How many chunks ``dim`` is cut into."""
        return self.groups or tp

    def at(self, dim: int) -> "Layout":
        """The same spread with the sharded dim moved to ``dim``."""
        return Layout(self.kind, dim, self.groups, self.inner, self.outer)

    def __repr__(self) -> str:
        if self.kind in ("R", "E", "P"):
            return self.kind
        extra = f"/{self.groups}" if self.groups else ""
        extra += f"+{self.inner}" if self.inner >= 0 else ""
        extra += f" under {self.outer}" if self.outer else ""
        return f"{self.kind}({self.dim}{extra})"


R = Layout("R")
E = Layout("E")
P = Layout("P")


def S(d: int) -> Layout:
    return Layout("S", d)


def Q(d: int = 1) -> Layout:
    return Layout("Q", d)


class Unsafe(Exception):
    """The op cannot run on the given shards. ``demand`` = (node, dim): it could, if that
    input were sharded on that dim too. ``indivisible`` = (what, size) for divisibility."""

    def __init__(self, reason: str, demand: tuple[fx.Node, int] | None = None,
                 indivisible: tuple[str, int] | None = None, no_rule: str | None = None,
                 group: tuple[str, int] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.demand, self.indivisible = reason, demand, indivisible
        self.no_rule = no_rule  # the op lacking a rule, when that is the reason
        # (colwise layer, n): it would fit if its output were cut into n < tp chunks, each
        # shared by tp // n ranks (n kv heads at a larger tp)
        self.group = group


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
