"""Which calls a trace (and the programs made from it) serves: each tensor input's dims,
static or expressions of the export's symbols, and the ranges the export proved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch


@dataclass
class Guard:
    pos: int  # position in the flat inputs
    dims: tuple[Any, ...]  # int (static) or a sympy expression of the export's symbols
    scale: dict[int, int] = field(default_factory=dict)  # dim -> tp (a sequence-sharded input)
    dtype: torch.dtype | None = None  # a trace bakes dtypes in (casts, factories)


def guards_for(inputs: list[Any], positions: list[int], q_dims: dict[Any, int],
               tp: int) -> list[Guard]:
    """Shape guards of a program from its input placeholders' symbolic shapes."""
    out = []
    for pos, ph in zip(positions, inputs):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dims = tuple(int(s) if not isinstance(s, torch.SymInt) else s.node.expr for s in val.shape)
        dims = tuple(int(d) if isinstance(d, sympy.Integer) else d for d in dims)
        scale = {q_dims[ph]: tp} if ph in q_dims else {}
        out.append(Guard(pos, dims, scale, val.dtype))
    return out


def shape_mismatch(guards: list[Guard], ranges: dict[Any, tuple[int, float]], flat: list[Any],
                   bound: dict[Any, int]) -> str | None:
    """None if the flat call's tensors fit ``guards`` (each symbol one size, inside its
    range; each expression of them what the call gives), else why not. Fills ``bound``
    (symbol -> size)."""
    later: list[tuple[Any, int]] = []
    for g in guards:
        x = flat[g.pos]
        if not isinstance(x, torch.Tensor) or x.dim() != len(g.dims):
            return f"input {g.pos} is not a tensor of rank {len(g.dims)}"
        if g.dtype is not None and x.dtype != g.dtype:
            return f"input {g.pos} is {x.dtype}, the program has {g.dtype}"
        for d, want in enumerate(g.dims):
            got = int(x.shape[d]) * g.scale.get(d, 1)
            if isinstance(want, int):
                if got != want:
                    return f"input {g.pos} dim {d} is {got}, the program has {want}"
            elif isinstance(want, sympy.Symbol):
                if bound.setdefault(want, got) != got:
                    return f"input {g.pos} dim {d} is {got}, but {want} = {bound[want]}"
                lo, hi = ranges.get(want, (0, float("inf")))
                if not lo <= got <= hi:
                    return f"input {g.pos} dim {d} = {got} is outside [{lo}, {hi}]"
            else:
                later.append((want, got))
    for expr, got in later:
        if expr.free_symbols <= set(bound) and int(expr.subs(bound)) != got:
            return f"a dim is {got}, the program needs {expr} = {int(expr.subs(bound))}"
    return None
