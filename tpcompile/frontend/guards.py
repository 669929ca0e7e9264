"""Which calls a trace (and the programs made from it) serves: each tensor input's dims,
static or expressions of the export's symbols, and the ranges the export proved."""

from __future__ import annotations

import dis
import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch

from ..errors import warn


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


@dataclass(frozen=True)
class Condition:
    """One of the export's shape conditions: its text, and ``holds(sizes)``, the same
    test on the sizes of the tensor inputs it ``reads`` (export index -> sizes) as a plain
    Python function, which torch.compile traces (a broken one then fails dynamo's guards
    and the call looks for another program)."""

    text: str
    holds: Callable[[dict[int, tuple[Any, ...]]], Any]
    reads: frozenset[int]


# a size the export's condition source reads: ``L['tensors'][i].size()[d]``
_SIZE = re.compile(r"L\['tensors'\]\[(\d+)\]\.size\(\)\[(\d+)\]")
_NAMESPACE: dict[str, Any] = {}


def _namespace() -> dict[str, Any]:
    if not _NAMESPACE:
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
        # the printer writes Max, Min, Abs and RoundToInt as Python's builtins
        _NAMESPACE.update(SYMPY_INTERP, math=math, inf=float("inf"), torch=torch, max=max,
                          min=min, abs=abs, round=round, int=int, float=float)
    return _NAMESPACE


def conditions_of(ep: Any) -> list[Condition]:
    """The export's shape conditions: what its code decided on the sizes beyond each
    size's range (``x.size(0) * x.size(1) <= 64`` where the model branches on a product,
    ``x.size(1) != 16``), which the graph does not hold and torch.export keeps as Python
    source (``ExportedProgram._guards_code``). One that reads anything but the tensor
    inputs' sizes (a stride, a storage offset) is passed over; one naming a function
    unknown here is passed over with a warning."""
    out = []
    for text in getattr(ep, "_guards_code", None) or ():
        source = _SIZE.sub(lambda m: f"S[{m[1]}][{m[2]}]", text)
        if "L[" in source:
            continue
        try:
            code = compile(f"lambda S: ({source})", "<export shape condition>", "eval")
        except SyntaxError:
            continue
        inner = next(c for c in code.co_consts if isinstance(c, types.CodeType))
        names = {i.argval for i in dis.get_instructions(inner) if i.opname == "LOAD_GLOBAL"}
        if not names <= _namespace().keys():  # a printer newer than this list: said
            warn(f"tpcompile: torch.export kept the shape condition {text!r}, which names "
                 f"{sorted(names - _namespace().keys())}, unknown here; a dynamic program "
                 "made from this trace does not check it. Plan with dynamic=False if the "
                 "model decides anything on these sizes")
            continue
        holds = eval(code, _namespace())  # noqa: S307 - torch.export's own guard code
        reads = frozenset(int(m[1]) for m in _SIZE.finditer(text))
        out.append(Condition(text, holds, reads))
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


def broken_condition(conditions: list[Condition], guards: list[Guard],
                     flat: list[Any]) -> str | None:
    """Why the flat call's tensors, which fit ``guards``, break one of the export's other
    ``conditions`` (read on their logical sizes), else None. Under torch.compile each
    condition becomes one of dynamo's guards."""
    sizes = {g.index: tuple(n * g.scale.get(d, 1) for d, n in enumerate(flat[g.pos].shape))
             for g in guards}
    for c in conditions:
        if not c.reads <= sizes.keys():
            continue
        try:
            holds = c.holds(sizes)
        except Exception:  # noqa: BLE001 - undecidable: not served, never guessed
            holds = False
        if not holds:
            return f"the traced code decided on its sizes that {c.text}"
    return None
