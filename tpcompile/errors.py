"""Error types. Every message names the layer, the numbers involved and the fix."""

from __future__ import annotations

import sys
import warnings


class TPCompileError(Exception):
    """Base class of every error tpcompile raises on purpose."""


class TraceError(TPCompileError):
    """The model (or one of its blocks) could not be traced into a graph."""


class IndivisibleError(TPCompileError):
    """A dimension that must be split over the tensor-parallel ranks is not divisible."""

    def __init__(self, layer: str, what: str, size: int, tp: int) -> None:
        self.layer, self.what, self.size, self.tp = layer, what, size, tp
        heads = "reshape" in what and size > 1  # a heads dim (kv heads may also divide tp)
        if not heads:
            fix = f". Pick a tp that divides {size}"
        elif tp % size:
            fix = (f" and does not divide it. Pick a tp that is a divisor or a multiple of "
                   f"{size} (kv heads fewer than tp are shared by groups of tp / {size} ranks)")
        else:  # fewer heads than tp where only kv heads may be shared (q heads, say)
            fix = (f". Only kv heads can be fewer than tp (shared by groups of ranks); these "
                   f"heads feed the output projection, so pick a tp that divides {size}")
        super().__init__(
            f"{layer}: {what} = {size} is not divisible by tp = {tp}{fix}, change the "
            "layer's width, or pass on_indivisible='replicate' to keep this segment "
            "replicated."
        )


class PlanError(TPCompileError):
    """A plan (detected or given) is inconsistent with the model's graph."""


class UnsupportedError(TPCompileError):
    """A feature or construct tpcompile does not support (yet): the message says what to
    use instead."""


class ExampleInputsError(TPCompileError, TypeError):
    """``example_inputs`` / ``example_kwargs`` of a kind a call cannot be made from."""


class RuntimeShapeError(TPCompileError):
    """An input at run time cannot be split the way the compiled program needs."""


def warn(message: str) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame outside tpcompile
    (planning reaches the same check from ``plan``, ``auto_parallelize`` and a re-plan
    on first call, at different depths)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("tpcompile"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
