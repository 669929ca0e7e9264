"""Hypothesis proves the rewritten programs compute what the originals do.

Architectures are generated as data (``arch.Spec``), with the mesh, sequence parallel,
and run-time batch/sequence sizes other than those traced with. Each example runs on the
persistent gloo pool; the numerics contract (tests/test_numerics.py) must hold for the
outputs and every parameter gradient on every rank (``tpcompile.verify``: each rank's
local shards against their slices of the reference, replicas identical across each tp
group, placements as planned), or the documented error must come.

The judge is tested too: ``test_suite_catches_an_injected_fault`` plants a bug in the
rewrite (``tests.property.jobs.FAULTS``) and requires every example in which it took
effect to be judged a numerics mismatch.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from tests.harness import NumericsMismatch, assert_numerics
from tests.property import STATS
from tests.property.arch import AttnSpec, BlockSpec, MlpSpec, Spec, repro
from tests.property.jobs import FAULTS, check_example, planted
from tests.test_numerics import TOL

FAULT_EXAMPLES = 10  # examples per planted fault (those in which it took effect)
MIN_CAUGHT = 4  # ... of which at least this many must have run, and all been caught


def _heads_by_inference(case: dict) -> dict | None:
    """Undivided head counts compute wrong numbers silently only where the head dim is
    inferred (``view(b, s, heads, -1)``); with explicit sizes the views fail outright."""
    spec = case["spec"]
    if spec.block.attn is None:
        return None
    attn = spec.block.attn.model_copy(update={"head_view": "infer_head_dim"})
    return dict(case, spec=spec.model_copy(
        update={"block": spec.block.model_copy(update={"attn": attn})}))


def _with_rowwise_bias(case: dict) -> dict | None:
    b = case["spec"].block
    return case if (b.attn and b.attn.bias) or (b.mlp and b.mlp.bias_out) else None


# What a fault's search does to each generated case first (None: the fault cannot take
# effect in it, skip it unrun). Only saves time: whether it took effect is counted.
FAULT_CASES = {"undivided_heads": _heads_by_inference, "bias_before_reduce": _with_rowwise_bias}


ACTS = ["relu", "gelu", "gelu_tanh", "silu", "tanh"]
NORMS = ["layer", "rms", "hand_rms"]


@st.composite
def attn_specs(draw: st.DrawFn) -> AttnSpec:
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    return AttnSpec(n_heads=n_heads, n_kv_heads=n_kv, head_dim=draw(st.sampled_from([2, 4, 8])),
                    bias=draw(st.booleans()), kind=draw(st.sampled_from(["sdpa", "explicit"])),
                    kv_repeat=draw(st.sampled_from(["expand", "interleave"])),
                    head_view=draw(st.sampled_from(["sizes", "infer_head_dim"])))


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


def run_case(pool, case: dict) -> list[dict]:
    """One example on every rank; the verdict on all ranks' results."""
    spec: Spec = case["spec"]
    note(repro(**case))
    results = pool.run(check_example, spec.model_dump_json(), case["seed"], case["tp"],
                       case["sp"], case["batch"], case["seq"], case["on_indivisible"],
                       dp=case["dp"])
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


@pytest.mark.parametrize("fault", list(FAULTS))
def test_suite_catches_an_injected_fault(pool, fault):
    """The judge's worth: with a bug planted in the rewrite, every example in which the
    fault took effect (the replaced function changed something on some rank) and the
    program still ran must be judged a numerics mismatch (``NumericsMismatch``; any other
    exception fails the test), and there must be such examples."""
    _, _, sp = FAULTS[fault]
    caught: list[list[int]] = []

    @settings(max_examples=FAULT_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def search(case):
        assume(case["spec"].divisible(case["tp"]) and case["tp"] > 1)
        case = FAULT_CASES.get(fault, dict)(dict(case, sp=sp or case["sp"]))
        assume(case is not None and case["seq"] % case["tp"] == 0)
        note(repro(**case) + f"# fault: {fault}")
        results = pool.run(check_example, case["spec"].model_dump_json(), case["seed"],
                           case["tp"], case["sp"], case["batch"], case["seq"],
                           case["on_indivisible"], fault, dp=case["dp"])
        assert results[0]["error"] != "FaultTargetMissing", results[0]["message"]
        calls = [r["fault_calls"] for r in results]
        assume(any(calls))  # the fault changed nothing here: nothing to catch
        assume(all(r["error"] != "FaultCrash" for r in results))  # not silent: no numbers
        assert all(r["error"] is None for r in results), [r.get("message") for r in results]
        try:
            assert_numerics(results)
        except NumericsMismatch:
            caught.append(calls)
        else:
            raise AssertionError(f"fault {fault} took effect (calls per rank: {calls}), "
                                 "yet the judge passed")

    search()
    assert len(caught) >= MIN_CAUGHT, f"the fault took effect in {len(caught)} examples only"


def test_every_fault_target_exists():
    """A fault is planted by replacing a core function by name: once the core renames
    one, planting it must fail (it used to raise inside the worker and count as caught)."""
    for fault in FAULTS:
        with planted(fault):
            pass
    FAULTS["renamed"] = ("tpcompile.collectives.no_such_function", lambda real: real, True)
    try:
        with pytest.raises(AttributeError):
            planted("renamed")
    finally:
        del FAULTS["renamed"]
