"""The property-test job, run on every worker of the pool."""

from __future__ import annotations

import copy
import pkgutil
import warnings
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch

import tpcompile
from tests.harness import judge, mesh, tp_mesh
from tests.property.arch import Spec, build, make_inputs

# ----------------------------------------------------------------------------- faults
# Bugs planted on purpose, to show the judge catches a broken rewrite. Each one replaces a
# function of the core (``target``) for one job; the replacement counts the calls in
# which it changed something (``FAULT_CALLS``), so a test can tell a fault that took
# effect from one that never ran (a renamed target fails loudly: mock.patch raises).
FAULT_CALLS = {"n": 0}


def _took_effect() -> None:
    FAULT_CALLS["n"] += 1


def _no_norm_grad_sync(real: Any) -> Any:
    """Replicated parameters on sequence-sharded activations (norm weights, rowwise
    biases under SP): their partial gradients are not summed over tp."""
    def sync_grads(group: str, *ps: torch.Tensor) -> tuple:
        if ps:
            _took_effect()
        return ps
    return sync_grads


def _undivided_heads(real: Any) -> Any:
    """Head counts in views of a shard left undivided."""
    def localize_shape(sizes: Any, pos: int, tp: int) -> list:
        right = real(sizes, pos, tp)
        wrong = list(sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
                     else sizes)
        if wrong != right:
            _took_effect()
        return wrong
    return localize_shape


def _bias_before_reduce(real: Any) -> Any:
    """A rowwise Linear whose bias joins the partial sums, so it is added tp times."""
    def _linear(self: Any, n: Any, layer: Any) -> Any:
        if self.styles.get(layer.name) != "rowwise" or layer.bias is None or \
                layer.kind != "linear":
            return real(self, n, layer)
        _took_effect()
        x = self.value(n.args[0], n)
        w, b = self.env[layer.weight], self.env[layer.bias]
        return self._reduce(n, layer.name, self.g.call_function(
            torch.ops.aten.linear.default, (x, w, b)))
    return _linear


def _all_reduce_off_rank0(real: Any) -> Any:
    """Every all-reduce result scaled by (1 + 1e-3) on tp ranks other than 0: rank 0
    computes the right numbers, the other ranks do not."""
    from tpcompile.rewrite import collectives as C

    def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
        out = real(x, group)
        if C._rank(group) == 0:
            return out
        _took_effect()
        return out * (1 + 1e-3)
    return _all_reduce


class _Twice(torch.autograd.Function):
    """Identity forward; backward adds the gradient twice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g + g


def _grad_twice_on_one_rank(real: Any) -> Any:
    """On the last tp rank, the first replicated parameter whose gradient is summed over
    tp gets that sum twice; the other ranks are right."""
    from tpcompile.rewrite import collectives as C

    def sync_grads(group: str, *ps: torch.Tensor) -> tuple:
        if not ps or C._rank(group) != C._size(group) - 1:
            return real(group, *ps)
        _took_effect()
        # before the sync in forward, so after its all-reduce in backward: this rank only
        return real(group, _Twice.apply(ps[0]), *ps[1:])
    return sync_grads


def _swap_kv_groups(real: Any) -> Any:
    """Each tp rank gets the next rank's kv-head group of ``wk`` and ``wv`` (q keeps its
    own): every rank attends with the wrong keys and values."""
    def distribute_parameters(model: Any, placements: Any, tp_mesh: Any) -> None:
        real(model, placements, tp_mesh)
        tp, r = tp_mesh.size(), tp_mesh.get_local_rank()
        for name, p in model.named_parameters():
            if name.endswith(("attn.wk.weight", "attn.wv.weight")) and \
                    p.placements[0].is_shard() and tp > 1:
                full = p.full_tensor()
                with torch.no_grad():
                    p.to_local().copy_(full.chunk(tp, 0)[(r + 1) % tp])
                _took_effect()
    return distribute_parameters


def _norm_grad_scrambled(real: Any) -> Any:
    """The summed gradient of the replicated norm weights comes back with its halves
    swapped (as if gathered along the wrong dim after a reduce-scatter)."""
    from tpcompile.rewrite import collectives as C

    class _Scrambled(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            h = g.shape[0] // 2
            return torch.cat([g[h:], g[:h]]) if h and g.ndim == 1 else g

    def sync_grads(group: str, *ps: torch.Tensor) -> tuple:
        out = real(group, *ps)
        if not out or C._size(group) == 1:
            return out
        _took_effect()
        return (_Scrambled.apply(out[0]), *out[1:])
    return sync_grads


# name -> (function replaced, what replaces it given the real one, sequence parallel on)
FAULTS: dict[str, tuple[str, Any, bool]] = {
    "no_norm_grad_sync": ("tpcompile.rewrite.collectives.sync_grads", _no_norm_grad_sync, True),
    "undivided_heads": ("tpcompile.rewrite.collectives.localize_shape", _undivided_heads, True),
    "bias_before_reduce": ("tpcompile.rewrite.codegen._Builder._linear", _bias_before_reduce, True),
    "all_reduce_off_rank0": ("tpcompile.rewrite.collectives._all_reduce", _all_reduce_off_rank0, False),
    "grad_twice_on_one_rank": ("tpcompile.rewrite.collectives.sync_grads", _grad_twice_on_one_rank,
                               True),
    "swap_kv_groups": ("tpcompile.api.distribute_parameters", _swap_kv_groups, False),
    "norm_grad_scrambled": ("tpcompile.rewrite.collectives.sync_grads", _norm_grad_scrambled, True),
}


def planted(fault: str) -> Any:
    """The patch that plants ``fault``. Raises AttributeError / ImportError if the core no
    longer has the function it replaces (renamed, moved): that is never a catch."""
    target, make, _ = FAULTS[fault]
    return mock.patch(target, make(pkgutil.resolve_name(target)))


def check_example(rank: int, spec_json: str, seed: int, tp: int, sp: bool, batch: int,
                  seq: int, on_indivisible: str, fault: str | None = None,
                  dtype: str = "float32", dp: bool = False) -> dict[str, Any]:
    """One example: ``dp`` runs it on the 2-D (dp=2, tp) mesh with FSDP2, each dp rank
    on its own ``batch`` rows of a ``2 * batch`` batch the reference sees whole. Returns
    this rank's report (``tpcompile.verify``), or the documented error it raised;
    ``fault_calls``: how often the planted ``fault`` changed something on this rank."""
    spec = Spec.model_validate_json(spec_json)
    dt = getattr(torch, dtype)
    ref = build(spec, seed, dt)
    FAULT_CALLS["n"] = 0
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if fault is not None:
            try:
                stack.enter_context(planted(fault))
            except (AttributeError, ImportError) as e:
                return {"error": "FaultTargetMissing", "message": f"{FAULTS[fault][0]}: {e}",
                        "fault_calls": 0}
        try:
            target = mesh((2, tp), ("dp", "tp")) if dp else tp_mesh(tp)
            par = tpcompile.auto_parallelize(copy.deepcopy(ref), target,
                                             sequence_parallel=sp, on_indivisible=on_indivisible)
        except tpcompile.TPCompileError as e:
            return {"error": type(e).__name__, "message": str(e), "fault_calls": FAULT_CALLS["n"]}
        plan = tpcompile.plan_of(par)
        styles = plan.layer_styles()
        try:
            inputs = make_inputs(spec, batch * (2 if dp else 1), seq, seed, dt)
            rep = judge(ref, par, inputs, dp=(target["dp"].get_local_rank(), 2) if dp else None)
        except tpcompile.TPCompileError as e:
            return {"error": type(e).__name__, "message": str(e), "styles": styles,
                    "fault_calls": FAULT_CALLS["n"]}
        except RuntimeError as e:
            if fault is None:
                raise
            # an injected fault that breaks the program outright (every rank fails at the
            # same op, so no collective is left half done): report it, keep the pool
            return {"error": "FaultCrash", "message": str(e), "styles": styles,
                    "fault_calls": FAULT_CALLS["n"]}
    return {"error": None, "report": rep, "styles": styles,
            "notes": [n.reason for n in plan.notes()], "fault_calls": FAULT_CALLS["n"]}


def check_variants(rank: int, kind: str, spec_json: str, seed: int,
                   variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One model, several parallel comparisons: each variant is a mesh (tp, and dp for
    the 2-D (dp=2, tp) mesh with FSDP2), sequence parallel on or off, a tracer, and the
    batch and length it runs at. ``kind``: "arch" (``arch.Spec``, the project's template)
    or "style" (``styles.StyleSpec``, other people's code). One result per variant, as
    ``check_example`` gives it (the trace is cached across variants)."""
    import time

    from tests.property.styles import StyleSpec, build_style, style_inputs
    out = []
    for v in variants:
        t0 = time.perf_counter()
        rows = v["batch"] * (2 if v["dp"] else 1)
        # traced on one call (batch 2 x 8 positions, the same for every variant, so the
        # trace is made once), run on the variant's own batch and length
        if kind == "arch":
            spec = Spec.model_validate_json(spec_json)
            ref = build(spec, seed)
            example: tuple[tuple, dict] = (make_inputs(spec, 2, 8, seed), {})
            args, kwargs = make_inputs(spec, rows, v["seq"], seed), {}
        else:
            s = StyleSpec.model_validate_json(spec_json)
            ref = build_style(s, seed)
            example = style_inputs(s, 2, 8, seed, loss=not v["dp"])
            args, kwargs = style_inputs(s, rows, v["seq"], seed, loss=not v["dp"])
        res = _one_variant(ref, example, args, kwargs, v)
        res["seconds"] = time.perf_counter() - t0
        out.append(res)
    return out


def _one_variant(ref: torch.nn.Module, example: tuple[tuple, dict], args: tuple, kwargs: dict,
                 v: dict[str, Any]) -> dict[str, Any]:
    tp, dp = v["tp"], v["dp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = mesh((2, tp), ("dp", "tp")) if dp else tp_mesh(tp)
        try:
            par = tpcompile.auto_parallelize(
                copy.deepcopy(ref), target, sequence_parallel=v["sp"],
                on_indivisible=v.get("on_indivisible", "error"), tracer=v["tracer"],
                example_inputs=example[0], example_kwargs=example[1])
        except tpcompile.TPCompileError as e:
            return {"error": type(e).__name__, "message": str(e)}
        plan = tpcompile.plan_of(par)
        styles = plan.layer_styles()
        try:
            rep = judge(ref, par, args, kwargs=kwargs,
                        dp=(target["dp"].get_local_rank(), 2) if dp else None)
        except tpcompile.TPCompileError as e:
            return {"error": type(e).__name__, "message": str(e), "styles": styles}
    programs = par.__dict__["_tpcompile_runtime"].programs
    return {"error": None, "report": rep, "styles": styles, "tracer": plan.tracer,
            "notes": [n.reason for n in plan.notes()],
            "variants": sorted({p.sp for p in programs})}
