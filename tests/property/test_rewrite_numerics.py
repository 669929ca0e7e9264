"""Hypothesis proves the rewritten programs compute what the originals do.

Architectures are generated as data (``arch.Spec``), with the mesh, sequence parallel,
and run-time batch/sequence sizes other than those traced with. Each example runs on the
persistent gloo pool; the numerics contract (tests/test_numerics.py) must hold for the
outputs and every parameter gradient on every rank (``tpcompile.verify``: each rank's
local shards against their slices of the reference, replicas identical across each tp
group, placements as planned), or the documented error must come.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from tests.harness import WorkerError, assert_numerics
from tests.property import STATS
from tests.property.arch import AttnSpec, BlockSpec, MlpSpec, Spec, repro
from tests.property.jobs import check_example
from tests.test_numerics import TOL

ACTS = ["relu", "gelu", "gelu_tanh", "silu", "tanh"]
NORMS = ["layer", "rms", "hand_rms"]


@st.composite
def attn_specs(draw: st.DrawFn) -> AttnSpec:
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    return AttnSpec(n_heads=n_heads, n_kv_heads=n_kv, head_dim=draw(st.sampled_from([2, 4, 8])),
                    bias=draw(st.booleans()), kind=draw(st.sampled_from(["sdpa", "explicit"])),
                    kv_repeat=draw(st.sampled_from(["expand", "interleave"])))


@st.composite
def mlp_specs(draw: st.DrawFn) -> MlpSpec:
    return MlpSpec(hidden=draw(st.sampled_from([4, 6, 8, 12, 16, 24, 32])),
                   gated=draw(st.booleans()), act=draw(st.sampled_from(ACTS)),
                   bias_in=draw(st.booleans()), bias_out=draw(st.booleans()))


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    attn = draw(st.none() | attn_specs())
    mlp = draw(mlp_specs()) if attn is None else draw(st.none() | mlp_specs())
    block = BlockSpec(norm=draw(st.sampled_from(NORMS)), attn=attn, mlp=mlp)
    return Spec(dim=draw(st.sampled_from([8, 12, 16, 32])), n_layers=draw(st.integers(1, 3)),
                block=block, vocab=draw(st.none() | st.sampled_from([16, 24, 30, 32])),
                final_norm=draw(st.none() | st.sampled_from(NORMS)),
                head_bias=draw(st.booleans()))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    spec = draw(specs())
    tp = draw(st.sampled_from([1, 2, 4]))
    sp = draw(st.booleans())
    # mostly run-time lengths the plan can split; now and then one it cannot
    seq = draw(st.integers(1, 4)) * tp if draw(st.integers(0, 9)) else draw(st.integers(1, 9))
    return dict(spec=spec, seed=draw(st.integers(0, 2**16)), tp=tp, sp=sp,
                batch=draw(st.integers(1, 3)), seq=seq,
                on_indivisible=draw(st.sampled_from(["error", "replicate"])),
                dp=tp == 2 and draw(st.booleans()))  # 2-D: (dp=2, tp=2), FSDP2 on dp


def run_case(pool, case: dict, fault: str | None = None) -> list[dict]:
    """One example on every rank; the verdict on all ranks' results."""
    spec: Spec = case["spec"]
    note(repro(**case))
    results = pool.run(check_example, spec.model_dump_json(), case["seed"], case["tp"],
                       case["sp"], case["batch"], case["seq"], case["on_indivisible"], fault,
                       dp=case["dp"])
    if fault is None:
        STATS.record(results, case["dp"])
    errors = {r["error"] for r in results}
    assert len(errors) == 1, f"ranks disagree: {[r['error'] for r in results]}"
    r = results[0]
    divisible = spec.divisible(case["tp"])
    if r["error"] == "RuntimeShapeError":
        assert case["sp"] and case["seq"] % case["tp"], r["message"]
        return results
    if r["error"] == "IndivisibleError":
        assert case["on_indivisible"] == "error" and not divisible, r["message"]
        return results
    if not divisible and case["on_indivisible"] == "error":
        # no error only where the analysis could not prove the structure at all (one
        # head has no heads dim to split); it must then have said so in the plan
        assert r.get("notes"), f"indivisible widths {spec.widths()} at tp={case['tp']} " \
                               "passed silently"
    assert r["error"] is None, r["message"]
    assert all(x["styles"] == r["styles"] for x in results), "ranks planned differently"
    sp_used = any(v == "sequence_parallel" for v in r["styles"].values())
    assert not (sp_used and case["seq"] % case["tp"]), "an unsplittable sequence passed"
    assert_numerics(results, TOL)
    if divisible:  # detection is complete: every block's segments are found
        expect_sharded(spec, r["styles"])
    return results


def expect_sharded(spec: Spec, styles: dict[str, str]) -> None:
    for i in range(spec.n_layers):
        want = {}
        # one kv head has no heads dim to split (at tp=1 the plan may leave it replicated)
        if spec.block.attn and spec.block.attn.n_kv_heads > 1:
            want.update({f"layers.{i}.attn.w{x}": "colwise" for x in "qkv"})
            want[f"layers.{i}.attn.wo"] = "rowwise"
        if spec.block.mlp:
            want[f"layers.{i}.mlp.w1"] = "colwise"
            want[f"layers.{i}.mlp.w2"] = "rowwise"
            if spec.block.mlp.gated:
                want[f"layers.{i}.mlp.w3"] = "colwise"
        got = {k: styles.get(k) for k in want}
        assert got == want, f"segments not detected: {got} != {want}"


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_rewrite_matches_original(pool, case):
    run_case(pool, case)


@pytest.mark.parametrize("fault", ["no_norm_grad_sync", "undivided_heads", "bias_before_reduce"])
def test_suite_catches_an_injected_fault(pool, fault):
    """The suite's worth: a deliberately broken rewrite must be found within 60 examples."""

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=cases())
    def search(case):
        assume(case["spec"].divisible(case["tp"]) and case["tp"] > 1)
        assume(case["seq"] % case["tp"] == 0)
        run_case(pool, dict(case, sp=True), fault)

    # caught = a wrong number (AssertionError) or the program failing outright (WorkerError)
    with pytest.raises((AssertionError, WorkerError)):
        search()
