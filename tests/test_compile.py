"""torch.compile of tpcompile's programs: the rewritten program is plain tensors and c10d
functional collectives, so dynamo takes the whole forward in one graph. Outputs and every
gradient against the unsharded model, at the planned shape and at others (dynamo's
automatic dynamic shapes recompile, nothing re-plans), and against the eager program.

``aot_eager`` (dynamo + AOTAutograd, no code generation) keeps CI fast; one Inductor run
checks the generated code too."""

from __future__ import annotations

import pytest

from tests import jobs_compile as J
from tests.test_hf import check

SHAPES = [(4, 8), (2, 16), (4, 12)]


@pytest.mark.parametrize("family", ["llama", "reference_llama", "nanogpt"])
def test_fullgraph_compile_has_no_graph_break_and_matches(pool, family):
    res = pool.run(J.fullgraph, family, 2, "aot_eager", SHAPES)
    check(res)
    for per_rank in res:
        for r in per_rank:
            assert r["graphs"] == 1 and not r["breaks"], r["breaks"]
            assert r["vs_eager"] <= 1e-5, r["vs_eager"]
            assert r["programs"] == 1, "a dynamic plan serves every shape"


def test_inductor_compiles_the_hf_llama(pool):
    """Inductor, with the head's logits in 4 chunks of rows as large logits are (Inductor
    once reused a chunk's gather input for the next chunk's matmul while the gather was
    in flight: logits off by 9)."""
    res = pool.run(J.fullgraph, "llama", 2, "inductor", [(4, 8)], 4)
    check(res)
    assert all(r["vs_eager"] <= 1e-4 for per_rank in res for r in per_rank)


@pytest.mark.parametrize("family", ["llama", "nanogpt"])
def test_compile_per_block_under_fsdp(pool, family):
    for r in pool.run(J.per_block, family, "aot_eager"):
        check(r["verdicts"], None)
        blocks = {n for n in r["compiled"] if n.split(".")[-1].isdigit()}
        assert len(blocks) == 2 and "" not in r["compiled"], r["compiled"]  # root stays eager
        assert r["graphs"] <= len(r["compiled"]) - 1, r  # the two blocks share one graph


@pytest.mark.parametrize("dp", [1, 2])
def test_bf16_within_the_unsharded_models_own_bf16_error(pool, dp):
    """Measured against the fp32 model, every output and gradient of the parallel bf16
    model is within 3x the unsharded bf16 model's own error plus 5e-3 (relative; at
    tp 2 the worst seen is 2.1x, from the reduction order of a sharded sum)."""
    for r in pool.run(J.bf16, "llama", dp):
        assert r["dtypes"] == (["torch.bfloat16"] if dp == 1 else ["torch.float32"]), r
        assert r["computed"] == "torch.bfloat16" and len(r["errs"]) > 20, r["computed"]
        bad = {k: (a, b) for k, (a, b) in r["errs"].items() if not a <= 3 * b + 5e-3}
        assert not bad, bad


def test_compiling_a_sharded_dropout_is_refused_by_name(pool):
    for r in pool.run(J.dropout_refused):
        assert "torch.compile cannot trace" in r["message"] and "dropout" in r["message"], r
        assert r["refused"].startswith("UnsupportedError: compile=True") and r["untouched"], r
        assert r["eager_ran"]


@pytest.mark.parametrize("family", ["llama", "nanogpt"])
def test_fullgraph_compile_under_no_grad(pool, family):
    """Inference: the compiled program under torch.no_grad(), where dynamo inlines each
    autograd.Function's forward (torch 2.13 dropped its ctx when the arguments given
    matched the parameters declared: the Llama's two SP norm weights, nanoGPT's one fused
    c_attn), equals the eager program and the unsharded model."""
    res = pool.run(J.no_grad, family)
    for r in res:
        assert r["error"] is None, r["error"]
        assert r["fields"] and r["vs_eager"] <= 1e-5 and r["vs_ref"] <= 1e-5, r


def test_compiling_an_unplanned_size_says_how_to_plan_first(pool):
    """fullgraph=True on a program specialised to other sizes: dynamo's error carries
    tpcompile's explanation (dynamic=True, or one eager call), not only "a skipped
    function"; without fullgraph the call is planned eagerly and matches the unsharded
    model."""
    from tests.test_hf import check
    res = pool.run(J.unplanned_size)
    for r in res:
        assert "planning cannot run inside torch.compile's tracing" in r["message"], r["message"]
        assert "dynamic=True" in r["message"], r["message"]
    check([r["verdict"] for r in res])


@pytest.mark.parametrize("kind", ["product", "longest"])
def test_a_compiled_dynamic_program_keeps_to_the_branch_it_was_traced_on(pool, kind):
    """torch.export keeps a branch on both sizes (batch x length, or the larger of them) as
    a condition beside the graph; under torch.compile it becomes one of dynamo's guards. A
    call on the other side of the branch is not served by the program traced on this side
    (it was, with numbers off by 0.21): fullgraph stops with tpcompile's message, and
    without fullgraph the call gets a program of its own (one more program, not one more
    served call) and matches the unsharded model."""
    res = pool.run(J.branch_on_rows, kind)
    for r in res:
        assert "planning cannot run inside torch.compile's tracing" in r["message"], r["message"]
        assert r["programs"] == [1, 1, 2, 2], r["programs"]
    check([v for r in res for v in r["verdicts"]])
