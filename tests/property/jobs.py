"""The property-test job, run on every worker of the pool."""

from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch

import tpcompile
from tests.harness import judge, mesh, tp_mesh
from tests.property.arch import Spec, build, make_inputs

# Faults injected on purpose, to show the suite catches a broken rewrite.
FAULTS = {
    # replicated norm weights on sequence-sharded activations: skip the sum over tp
    "no_norm_grad_sync": ("tpcompile.collectives.sync_grads", lambda group, *ps: ps),
    # head-count constants in views left undivided
    "undivided_heads": ("tpcompile.collectives.localize_shape",
                        lambda sizes, pos, tp: tuple(sizes[0] if len(sizes) == 1 and
                                                     isinstance(sizes[0], (tuple, list)) else sizes)),
    # a rowwise bias added before the reduction, so tp times
    "bias_before_reduce": ("tpcompile.rewrite._Builder._linear", None),
}


def _linear_bias_before_reduce(self: Any, n: Any, mod: Any) -> Any:
    """A wrong rowwise Linear: the bias joins the partial sums, so it is added tp times."""
    x = self.value(n.args[0], n)
    w, b = self.params[f"{n.target}.weight"], self.params.get(f"{n.target}.bias")
    y = self.g.call_function(torch.nn.functional.linear, (x, w, b))
    return self._reduce(n, y) if self.styles.get(n.target) == "rowwise" else y


FAULTS["bias_before_reduce"] = ("tpcompile.rewrite._Builder._linear", _linear_bias_before_reduce)


def check_example(rank: int, spec_json: str, seed: int, tp: int, sp: bool, batch: int,
                  seq: int, on_indivisible: str, fault: str | None = None,
                  dtype: str = "float32", dp: bool = False) -> dict[str, Any]:
    """One example: ``dp`` runs it on the 2-D (dp=2, tp) mesh with FSDP2, each dp rank
    on its own ``batch`` rows of a ``2 * batch`` batch the reference sees whole. Returns
    this rank's report (``tpcompile.verify``), or the documented error it raised."""
    spec = Spec.model_validate_json(spec_json)
    dt = getattr(torch, dtype)
    ref = build(spec, seed, dt)
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if fault is not None:
            target, fn = FAULTS[fault]  # type: ignore[misc]
            stack.enter_context(mock.patch(target, fn))
        try:
            target = mesh((2, tp), ("dp", "tp")) if dp else tp_mesh(tp)
            par = tpcompile.auto_parallelize(copy.deepcopy(ref), target,
                                             sequence_parallel=sp, on_indivisible=on_indivisible)
        except tpcompile.TPCompileError as e:
            return {"error": type(e).__name__, "message": str(e)}
        plan = tpcompile.plan_of(par)
        styles = plan.layer_styles()
        try:
            inputs = make_inputs(spec, batch * (2 if dp else 1), seq, seed, dt)
            rep = judge(ref, par, inputs, dp=(target["dp"].get_local_rank(), 2) if dp else None)
        except tpcompile.TPCompileError as e:
            return {"error": type(e).__name__, "message": str(e), "styles": styles}
        except RuntimeError as e:
            if fault is None:
                raise
            # an injected fault that breaks the program outright (every rank fails at the
            # same op, so no collective is left half done): report it, keep the pool
            return {"error": "FaultCrash", "message": str(e), "styles": styles}
    return {"error": None, "report": rep, "styles": styles,
            "notes": [n.reason for n in plan.notes()]}
