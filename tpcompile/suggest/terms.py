"""A number read off the plan at the example size, and how it scales.

Planning runs one ``B0 x s0`` call; each quantity (bytes of a tensor, FLOPs of a matmul)
is kept with the power of the sequence length it grows with (a dim equal to ``s0``, or
to ``B0 * s0`` for a flattened batch, marks one) and how tp divides it (its layout).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis.layout import Layout

B0 = 2  # example batch


def div(split: int, tp: int) -> int:
    """How many ways a value is divided over ``tp`` ranks: ``split`` 0 replicated, -1 all
    tp ranks, ``n`` > 0 at most ``n`` ways (n kv heads shared by groups of ranks)."""
    return 1 if split == 0 else tp if split < 0 else min(tp, split)


@dataclass(frozen=True)
class Term:
    """``value`` at the example size; per-sample (times ``b / b0 * (s / s0) ** es``) when
    ``es`` >= 1, else constant; divided over tp as ``split`` says (:func:`div`)."""

    value: float
    es: int
    split: int


def seq_power(shape: tuple[int, ...], s0: int) -> int:
    """How many sequence dims ``shape`` has (2 for an ``s x s`` mask)."""
    return sum(1 for d in shape if d == s0 or d == B0 * s0)


def split_of(lay: Layout | None) -> int:
    """A layout's tp split (:func:`div`): kv heads shared by groups divide by their count."""
    if lay is None or not lay.sharded:
        return 0
    return lay.groups if lay.groups and lay.inner < 0 else -1
