"""Which calls a trace (and the programs made from it) serves: each tensor input's dims,
static or expressions of the export's symbols, and the ranges the export proved."""

from __future__ import annotations

import math
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
    index: int = -1  # which tensor input of the export (its ``L['tensors'][index]``)


def guards_for(inputs: list[Any], positions: list[int], q_dims: dict[Any, int],
               tp: int) -> list[Guard]:
    """Shape guards of a program from its input placeholders' symbolic shapes."""
    out = []
    for index, (pos, ph) in enumerate(zip(positions, inputs)):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dims = tuple(int(s) if not isinstance(s, torch.SymInt) else s.node.expr for s in val.shape)
        dims = tuple(int(d) if isinstance(d, sympy.Integer) else d for d in dims)
        scale = {q_dims[ph]: tp} if ph in q_dims else {}
        out.append(Guard(pos, dims, scale, val.dtype, index))
    return out


def conditions_of(ep: Any) -> list[tuple[str, Any]]:
    """The export's shape conditions as (text, compiled expression): what its code
    decided on the sizes beyond each size's range (``x.size(0) * x.size(1) <= 64`` where
    the model branches on a product, ``x.size(1) != 16``), which the graph does not hold
    and torch.export keeps as Python source (``ExportedProgram._guards_code``)."""
    out = []
    for text in getattr(ep, "_guards_code", None) or ():
        try:
            out.append((text, compile(text, "<export shape condition>", "eval")))
        except SyntaxError:
            continue
    return out


class _Sizes:
    """A tensor input as a shape condition reads it: its (logical) sizes."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self._sizes = sizes

    def size(self, dim: int | None = None) -> Any:
        return torch.Size(self._sizes) if dim is None else self._sizes[dim]

    def dim(self) -> int:
        return len(self._sizes)


_NAMESPACE: dict[str, Any] = {}


def _broken(conditions: list[tuple[str, Any]], sizes: dict[int, tuple[int, ...]]) -> str | None:
    """The first condition these sizes (tensor input index -> sizes) break, else None.
    One the sizes alone cannot decide (it reads something else) is passed over."""
    if not _NAMESPACE:
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
        _NAMESPACE.update(SYMPY_INTERP, math=math, inf=float("inf"), torch=torch)
    local = {"L": {"tensors": {i: _Sizes(s) for i, s in sizes.items()}}}
    for text, code in conditions:
        try:
            holds = eval(code, _NAMESPACE, local)  # noqa: S307 - torch.export's own guard code
        except Exception:  # noqa: BLE001 - not about these inputs' sizes
            continue
        if not holds:
            return text
    return None


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


def broken_condition(conditions: list[tuple[str, Any]], guards: list[Guard],
                     flat: list[Any]) -> str | None:
    """Why the flat call's tensors, which fit ``guards``, break one of the export's other
    ``conditions`` (read on their logical sizes), else None. Not under torch.compile:
    dynamo cannot trace ``eval``."""
    sizes = {g.index: tuple(int(n) * g.scale.get(d, 1) for d, n in enumerate(flat[g.pos].shape))
             for g in guards}
    broken = _broken(conditions, sizes)
    return None if broken is None else f"the traced code decided on its sizes that {broken}"
