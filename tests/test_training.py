"""Everyday training-loop use of a parallel model that once went wrong: bf16 autocast
crashed in backward, a deep copy installed its programs into the original, replaced
weights and late hooks gave wrong numbers in silence (found by probing as a user would)."""

from __future__ import annotations

from tests import jobs_training as J


def test_autocast_bf16_forward_and_backward(pool):
    """Under ``torch.autocast(bfloat16)`` the colwise layers' backward ran fp32 weights
    against bf16 gradients (a dtype error); now it computes in the gradient's dtype and
    returns fp32 gradients. Against the unsharded model under the same autocast: loss
    within 1e-2, every gradient within J.BF16_TOL of its largest entry."""
    for r in pool.run(J.autocast):
        a, b = r["losses"]
        assert abs(a - b) <= 1e-2 * abs(a), r["losses"]
        assert r["dtypes"] == ["torch.float32"], r["dtypes"]
        assert len(r["errs"]) == 21 and max(r["errs"].values()) <= J.BF16_TOL, \
            sorted(r["errs"].items(), key=lambda kv: -kv[1])[:3]


def test_deep_copy_is_independent(pool):
    for r in pool.run(J.deep_copy):
        assert r["err"] < 1e-5 and r["err_orig"] < 1e-5, r
        assert r["programs"] == (1, 2), r["programs"]  # the new size's program went to the copy


def test_weights_replaced_after_parallelizing_are_refused(pool):
    for r in pool.run(J.replaced_weights):
        for got in (r["assigned"], r["one"]):
            assert got is not None and got[0] == "UnsupportedError", got
            assert "not the DTensor auto_parallelize made" in got[1], got
            assert "load_state_dict(state_dict) (without assign=True" in got[1], got
        assert "parameter attention.wq.weight (in the module" in r["one"][1], r["one"]


def test_hooks_added_after_parallelizing(pool):
    for r in pool.run(J.late_hooks):
        assert r["refused"] is not None and "layers.0.attention.wq (Linear)" in r["refused"][1]
        assert r["block_hook_calls"] == 1 and r["err"] < 1e-5, r


def test_clip_grad_norm_over_dtensor_parameters(pool):
    for r in pool.run(J.clip_norm):
        a, b = r["norms"]
        assert abs(a - b) <= 1e-5 * a, r["norms"]
        assert r["worst"] <= 5e-5, r["worst"]


def test_gradients_accumulate_over_micro_batches(pool):
    """Two micro-batches' backward before a step (the second replanned: another length):
    every accumulated gradient equals the unsharded model's, none left Partial."""
    from tests.test_hf import check
    check(pool.run(J.accumulated))


def test_pickling_the_whole_module_is_refused_clearly(pool):
    for r in pool.run(J.pickled):
        assert r["whole"] is not None and r["whole"][0] == "UnsupportedError", r["whole"]
        assert "model.state_dict()" in r["whole"][1] and "checkpoint" in r["whole"][1]
        assert r["state_dict_bytes"] > 0
