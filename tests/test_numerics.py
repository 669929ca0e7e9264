"""Numerics contract: the parallel module's outputs and every parameter gradient equal
the unsharded model's, on every rank (tpcompile.verify: each rank's outputs and local
gradient shards against the matching part of the reference; replicated copies
bit-identical across each tp group; placements as planned, never Partial).

Error = ||parallel - reference|| / ||reference|| per tensor, per rank's part of it.
float32: TOL = 5e-5. The bound is set by float32 itself: the unsharded float32 model
differs from the same model run in float64 by up to 1.7e-5 on these gradients (a
norm weight summed over every position), and the parallel program sums in another
order. float64: TOL = 1e-10, which leaves no room for a wrong program to hide.
A real fault (a missing reduction, a bias added tp times) shows as an error >= 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from tests import jobs
from tests.harness import assert_numerics
from tpcompile.verify import RTOL

TOL = RTOL[torch.float32]
TOL_F64 = RTOL[torch.float64]


def check(results: list[dict], tol: float = TOL) -> None:
    assert_numerics(results, tol)


@pytest.mark.parametrize("tp", [2, 4])
def test_toy_model(pool, tp):
    res = pool.run(jobs.numerics, "toy", tp, False)
    check(res)
    assert res[0]["styles"] == {"in_proj": "colwise", "out_proj": "rowwise"}


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, True)])
def test_gated_mlp_stack(pool, tp, sp):
    res = pool.run(jobs.numerics, "gated", tp, sp)
    check(res)
    styles = res[0]["styles"]
    assert styles["layers.1.mlp.w3"] == "colwise" and styles["layers.1.mlp.w2"] == "rowwise"
    assert (styles.get("layers.0.norm") == "sequence_parallel") == sp


@pytest.mark.parametrize("tp,sp", [(2, False), (4, True)])
def test_gated_mlp_stack_float64(pool, tp, sp):
    check(pool.run(jobs.numerics, "gated", tp, sp, {"dtype": "float64"}), TOL_F64)


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_llama_gqa(pool, tp, sp):
    # debug config: 8 heads, 4 kv heads (GQA), 2 layers
    check(pool.run(jobs.numerics, "llama", tp, sp))


@pytest.mark.parametrize("tp,dtype", [(2, "float32"), (4, "float64")])
def test_sums_over_the_sharded_dim(pool, tp, dtype):
    """A mean and a sum over the features of a colwise output leave each rank a term of
    the value; the terms are all-reduced where first read (both ways when a sharded op
    reads them, the subtraction), so fc1 and fc2 stay sharded with the model's numbers."""
    res = pool.run(jobs.numerics, "centred", tp, False, {"dtype": dtype})
    check(res, TOL if dtype == "float32" else TOL_F64)
    assert res[0]["styles"] == {"fc1": "colwise", "fc2": "rowwise"}


@pytest.mark.parametrize("name,sp,sharded", [
    ("ScaleReadTwice", False, {"fc1": "colwise", "fc2": "rowwise"}),
    ("FusedReadWhole", False, {"out": "colwise"}),
    ("ClampedFusedNormed", False, {"out": "colwise"}),
    ("MeanIntoResidual", True, {"fc1": "colwise", "fc2": "rowwise"}),
    ("NormWeightReadTwice", True, {"fc1": "colwise", "fc2": "rowwise"}),
    ("NormWeightAsGate", True, {"fc1": "colwise", "fc2": "rowwise"}),
    ("WeightNormScaled", False, {"fc2": "colwise"}),
    ("UnembedOnly", False, {"inp": "colwise", "wte": "rowwise"}),
    ("ExpertsInOut", False, {"w1": "colwise", "w3": "colwise", "w2": "rowwise"}),
    ("ExpertsReadElsewhere", False, {"layers.1.fc": "colwise"}),
])
def test_partial_sums_and_sliced_weights_read_other_ways(pool, name, sp, sharded):
    """Found by review, each once wrong: a weight read in slices and whole (its gradient
    was summed over tp whole: 2x); a fused output read whole as well as cut by index (it
    was sharded per part, so the whole reads saw interleaved parts); a mean over the
    sharded dim read by a sequence-parallel op (no conversion: PlanError); a norm's weight
    read on sequence shards and also whole, or in slices through a cast (its gradient
    summed over tp whole, with the complete part: wrong before this project read weights
    in slices, too); a sharded Linear's own weight read whole beside its output (left
    replicated: each rank holds only its rows); an embedding's weight read by F.linear
    in a graph with no lookup of it (named ``wte@linear``, it got no placement: the full
    weight read as a shard, 2x the logits); experts stored [E, in, out] and read by a
    grouped matmul as they are (sharded on the mirrored dims: colwise on dim 2); an
    experts Parameter another kind of block also reads (it was sharded, the other block
    read its shard as the whole: 13 % off, no word; now replicated with a note, and the
    rest of those experts, w3 and w2, with it)."""
    res = pool.run(jobs.numerics, name, 2, sp)
    check(res)
    assert {k: v for k, v in res[0]["styles"].items() if v != "sequence_parallel"} == sharded


def test_llama_other_sequence_length(pool):
    """Traced at one length, run at another: nothing about seq or batch is baked in."""
    check(pool.run(jobs.numerics, "llama", 2, True, None, 12))


@pytest.mark.parametrize("tp", [2, 4])
def test_llama_multi_query(pool, tp):
    """One kv head (multi-query attention): every rank computes it from the replicated
    wk/wv, whose gradients are summed over tp; q, o and the MLP split as usual."""
    res = pool.run(jobs.numerics, "llama", tp, True, {"n_kv_heads": 1})
    check(res)
    assert res[0]["styles"]["layers.0.attention.wq"] == "colwise"


@pytest.mark.parametrize("sp", [False, True])
def test_nested_repeated_blocks(pool, sp):
    """Blocks inside blocks: every repeat of the outer block has its inner ones rewritten."""
    res = pool.run(jobs.nested, 2, sp)
    check(res)
    styles = res[0]["styles"]
    for s in range(3):
        for i in range(2):
            assert styles[f"stages.{s}.inner.{i}.up"] == "colwise"
            assert styles[f"stages.{s}.inner.{i}.down"] == "rowwise"


@pytest.mark.parametrize("tp,sp,dp", [(2, False, False), (2, True, False), (4, True, False),
                                      (2, True, True)])
def test_loss_parallel(pool, tp, sp, dp):
    """Logits stay vocab-sharded (never gathered); the vocab-parallel cross-entropy and
    every gradient equal the unsharded model's."""
    res = pool.run(jobs.loss_parallel, tp, sp, dp)
    assert all(r["sharded"] for r in res)
    check(res)


def test_loss_parallel_needs_a_colwise_head(pool):
    msg = pool.run(jobs.loss_parallel_without_head)[0]
    assert "loss_parallel=True" in msg and "GatedMLPStack" in msg
