"""2-D meshes: tpcompile's tp program under FSDP2 on dp, against the single-process model.

Tolerances (float32, error = ||parallel - reference|| / ||reference|| per tensor, each
rank's part of it; tpcompile.verify):
- logits, loss and every rank's local gradient shards: 5e-5, the numerics contract's
  bound (tests/test_numerics.py). Measured: ~1e-6. A wrong dp averaging (sum instead of
  mean) shows as 1.0, a missing tp reduction as >= 1e-2.
- parameters after 3 AdamW steps (lr 1e-3): 5e-5. Measured: ~1e-5, set by Adam dividing
  tiny gradient entries by their own running norm, which magnifies float32 rounding.
  Adam is blind to a gradient's scale, which is why every step's gradients are checked
  as well.
"""

from __future__ import annotations

import pytest

from tests import jobs_fsdp as J
from tests.harness import assert_match


def _check_training(res: list[dict]) -> None:
    for step in range(len(res[0]["reports"])):
        reports = [r["reports"][step] for r in res]
        assert_match(reports, f"step {step}")
        for rep in reports:  # every Llama debug parameter, and its gradient
            assert sum(c.kind == "grad" for c in rep.checks) == 21
            assert sum(c.kind == "param" for c in rep.checks) == 21
    assert_match([r["final"] for r in res], "parameters after the last AdamW step")
    assert all(len(r["final"].checks) == 21 for r in res)


def test_fsdp_tp_matches_single_process(pool):
    res = pool.run(J.train_vs_reference, 3)
    _check_training(res)
    assert res[0]["fsdp_modules"] == ["", "layers.0", "layers.1"]  # per block, then the root
    pl = res[0]["placements"]
    # FSDP's dp shard sits on top of tpcompile's tp placement of every parameter
    assert pl["layers.0.attention.wo.weight"] == ["S(0)", "S(1)"]
    assert pl["layers.0.ffn_norm.weight"] == ["S(0)", "R"]
    assert pl["layers.1.feed_forward.w1.weight"][1] == "S(0)"


def test_fsdp_options_pass_through(pool):
    """No resharding after forward (the unsharded tp DTensors stay on the blocks between
    forward and backward): same numbers."""
    _check_training(pool.run(J.train_vs_reference, 2, reshard_after_forward=False))


@pytest.mark.parametrize("loaded", [True, "after a forward"])
def test_load_state_dict_of_full_tensors(pool, loaded):
    """The 2-D model made from another init, then ``load_state_dict(ref.state_dict())``
    (full tensors, as into the unsharded model): each rank cuts its (dp, tp) shards, FSDP's
    dp shard on top of tp's included; then it trains step for step as the reference. Also
    after a forward without backward (FSDP2 leaves the root's parameters unsharded then;
    the load failed on "different meshes")."""
    res = pool.run(J.train_vs_reference, 2, loaded=loaded)
    _check_training(res)
    assert res[0]["placements"]["layers.0.attention.wo.weight"] == ["S(0)", "S(1)"]


def test_mixed_precision_policy(pool):
    res = pool.run(J.mixed_precision)
    for r in res:
        assert r["dtypes"] == ["torch.bfloat16"], r["dtypes"]  # what the blocks computed with
        assert r["param_dtypes"] == ["torch.float32"]  # what the optimizer holds
        assert abs(r["loss"] - r["ref"]) < 2e-2 * r["ref"], r


def test_unknown_fsdp_option_leaves_model_untouched(pool):
    res = pool.run(J.bad_option)
    for r in res:
        assert "resharding" in r["error"] and "reshard_after_forward" in r["error"], r["error"]
        assert r["untouched"]


def test_meta_init_materialises_only_shards(pool):
    res = pool.run(J.meta_vs_full)
    for rank, r in enumerate(res):
        print(f"rank {rank}: parameter bytes {r['bytes']} of {r['total']} "
              f"(expected share {r['expected']})")
        assert r["bytes"] == r["expected"] < r["total"] // 3
        assert all(r["equal_local"].values()), r["equal_local"]
        assert all(r["equal_full"].values()), r["equal_full"]
        assert r["losses"][0] == r["losses"][1]
        assert r["devices"] == ["cpu"]  # the gloo mesh's device


def test_meta_init_without_init_weights(pool):
    res = pool.run(J.meta_generic_init)
    assert all(res[0].values()) and len(res[0]) == 18, res[0]


def test_meta_init_of_a_hugging_face_model(pool):
    """transformers' ``init_weights()`` takes no seed: its ``_init_weights`` runs per
    module instead (std 0.02 here), parameters and rotary buffers equal to the same loop
    on the full model."""
    for r in pool.run(J.meta_hf):
        assert len(r["params"]) == 21 and all(r["params"].values()), r["params"]
        assert len(r["buffers"]) == 2 and all(r["buffers"].values()), r["buffers"]
        assert abs(r["std"] - 0.02) < 0.002, r["std"]
        assert abs(r["losses"][0] - r["losses"][1]) <= 1e-5 * abs(r["losses"][1]), r["losses"]


def test_meta_init_errors(pool):
    res = pool.run(J.meta_errors)
    for r in res:
        assert "init_weights" in r["no_init"] and "init_fn" in r["no_init"], r
        assert "NaN" in r["lazy_init"] and "output.weight" in r["lazy_init"], r
        assert "meta" in r["init_fn_on_real"], r


def test_meta_init_on_1d_mesh(pool):
    for r in pool.run(J.meta_1d):
        assert len(r) == 21 and all(r.values()), r
