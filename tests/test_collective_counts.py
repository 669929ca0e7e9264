"""Collectives per Llama block, counted while running (a TorchDispatchMode sees every c10d
functional op). Per-block cost = counts(3 layers) - counts(2 layers), so the embedding and
the head do not blur the numbers."""

from __future__ import annotations

import pytest

from tests import jobs


def per_block(pool, tp: int, sp: bool) -> dict:
    two = pool.run(jobs.collective_counts, tp, sp, 2)[0]
    three = pool.run(jobs.collective_counts, tp, sp, 3)[0]
    return {phase: {k: three[phase].get(k, 0) - two[phase].get(k, 0)
                    for k in set(two[phase]) | set(three[phase])
                    if three[phase].get(k, 0) - two[phase].get(k, 0)}
            for phase in ("fwd", "bwd")}


def test_megatron_minimum_without_sequence_parallel(pool):
    c = per_block(pool, 2, False)
    assert c["fwd"] == {"all_reduce": 2}
    # q, k, v (and w1, w3) read one input: their input gradients are summed locally and
    # reduced once. A plain parallelize_module plan does 5 all-reduces here.
    assert c["bwd"] == {"all_reduce": 2}


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_minimum_with_sequence_parallel(pool, tp):
    c = per_block(pool, tp, True)
    assert c["fwd"] == {"all_gather": 2, "reduce_scatter": 2}
    # the mirror, plus one all-reduce that sums both norm weights' partial gradients
    assert c["bwd"] == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1}


def _block_cost(pool, name: str, tp: int, sp: bool) -> dict:
    from tests import jobs_shapes
    one, two = (pool.run(jobs_shapes.with_counts, name, tp, sp, d)[0] for d in (1, 2))
    return {phase: {k: two[phase].get(k, 0) - one[phase].get(k, 0)
                    for k in set(one[phase]) | set(two[phase])
                    if two[phase].get(k, 0) - one[phase].get(k, 0)}
            for phase in ("fwd", "bwd")}


@pytest.mark.parametrize("name,tp,sp", [("nanogpt", 2, False), ("mha", 2, False),
                                        ("reference_llama", 4, False), ("nanogpt", 2, True),
                                        ("reference_llama", 4, True)])
def test_fused_qkv_and_shared_kv_heads_stay_at_the_minimum(pool, name, tp, sp):
    """Per block: a fused qkv projection sharded per part (nanoGPT's c_attn,
    nn.MultiheadAttention's in_proj) costs what three Linears do, the Megatron minimum.
    kv heads fewer than tp (2 at tp 4) add one all-reduce in backward, the sum of the
    replicated kv weights' gradients; under sequence parallelism it shares the bucket of
    the norm weights' sums, so nothing is added."""
    c = _block_cost(pool, name, tp, sp)
    extra = 1 if name == "reference_llama" or sp else 0
    if sp:
        assert c["fwd"] == {"all_gather": 2, "reduce_scatter": 2}, c
        assert c["bwd"] == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": extra}, c
    else:
        assert c["fwd"] == {"all_reduce": 2}, c
        assert c["bwd"] == {"all_reduce": 2 + extra}, c
