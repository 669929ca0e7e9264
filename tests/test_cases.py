"""Models a review built to find silent wrong numbers (see tests/jobs_cases.py): each
now matches the unsharded model, or is refused with a clear error."""

from __future__ import annotations

import pytest

from tests import jobs_cases
from tests.test_numerics import check as matches


@pytest.mark.parametrize("name", ["raw_weight", "tied_module", "tied_function",
                                  "function_attrs", "module_classes", "freq_scaled", "list_index",
                                  "torch_unflatten"])
@pytest.mark.parametrize("sp", [False, True])
def test_review_case_matches_the_unsharded_model(pool, name, sp):
    matches(pool.run(jobs_cases.case, name, 2, sp))


def test_tied_embedding_and_head_are_sharded_once(pool):
    """``head.weight = emb.weight``: one Shard(0) weight, a vocab-parallel lookup and a
    colwise head (numerics in test_review_case_matches_the_unsharded_model)."""
    r = pool.run(jobs_cases.case, "tied_module", 2, True)[0]
    assert r["styles"]["head"] == "colwise" and r["styles"]["emb"] == "vocab_parallel"
    assert r["styles"]["layers.0.w1"] == "colwise"


def test_hooks_on_inlined_layers_are_refused(pool):
    r = pool.run(jobs_cases.hooked)[0]
    assert r["error"] == "UnsupportedError" and "layers.0.w2" in r["message"]
    assert r["untouched"]


def test_second_call_is_refused(pool):
    r = pool.run(jobs_cases.twice)[0]
    assert r["error"] == "TPCompileError" and "already" in r["message"]


@pytest.mark.parametrize("start_in_train", [True, False])
def test_forward_that_reads_the_training_flag(pool, start_in_train):
    res = pool.run(jobs_cases.mode_switch, start_in_train)
    matches(res)
    for r in res:
        assert r["flags_kept"] and r["two_programs"]
        assert r["dropped"], "train mode must run dropout"


def test_parametrized_weights_are_refused(pool):
    r = pool.run(jobs_cases.weight_normed)[0]
    assert r["error"] == "UnsupportedError" and "layers.1.w1" in r["message"]


def test_plan_with_an_inline_norm_applies_again(pool, tmp_path):
    res = pool.run(jobs_cases.plan_roundtrip_inline_norm, str(tmp_path / "plan.yaml"))
    matches(res)
    assert all(r["styles"]["layers.1.w1"] == "colwise" for r in res)


@pytest.mark.parametrize("sp", [False, True])
def test_blocks_called_with_keywords(pool, sp):
    res = pool.run(jobs_cases.keyword_blocks, sp)
    matches(res)
    assert all(r["styles"]["layers.1.w1"] == "colwise" for r in res)


def test_dropout_on_shards_draws_per_rank(pool):
    for r in pool.run(jobs_cases.dropout_streams):
        assert r["routed"] and r["untouched"] and r["differ"]
        assert 0.45 < r["rate"] < 0.55


@pytest.mark.parametrize("sp", [False, True])
def test_output_container_type_is_kept(pool, sp):
    """A Hugging Face style ModelOutput (an OrderedDict subclass) comes back as itself,
    with the same keys and values."""
    matches(pool.run(jobs_cases.output_container, sp))


@pytest.mark.parametrize("sp", [False, True])
def test_buffers_changed_in_forward_advance(pool, sp):
    res = pool.run(jobs_cases.buffers_advance, sp)
    matches(res)
    for r in res:
        assert r["calls"] == (3, 3), r["calls"]
        assert r["running"] < 1e-6, r["running"]
