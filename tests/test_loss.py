"""A cross-entropy inside the model over a colwise head's logits runs vocab-parallel:
each rank computes its classes' share and one all-gather of two or three numbers per row
makes the loss whole; the logits are gathered only when the model returns them.

Checked against ``F.cross_entropy`` on the whole scores (the loss function alone, every
option real models pass) and against the unsharded model (loss, logits and every
gradient on every rank, placements included)."""

from __future__ import annotations

import math

import pytest
import torch

from tests import jobs_loss as J
from tests.harness import assert_numerics

CASES = {
    "mean": {"shape": (12, 10)},
    "sum, ignored rows": {"shape": (12, 10), "reduction": "sum", "ignored": 0.3},
    "none": {"shape": (12, 10), "reduction": "none", "ignored": 0.3, "ignore_index": -1},
    "label smoothing": {"shape": (12, 10), "smoothing": 0.1, "ignored": 0.3},
    "classes second, 3-D": {"shape": (3, 10, 5), "reduction": "none", "smoothing": 0.2},
    "classes second, mean": {"shape": (3, 10, 5), "ignored": 0.2},
    "bf16": {"shape": (16, 32), "dtype": torch.bfloat16, "smoothing": 0.1},
    "masked classes (-inf)": {"shape": (12, 10), "masked": 3, "ignored": 0.2},
    # every class of rank 0 masked: its log-softmax is nan, the loss must not be
    "one rank's classes all -inf": {"shape": (12, 10), "masked": 5, "smoothing": 0.0},
    "autocast": {"shape": (16, 32), "dtype": torch.bfloat16, "autocast": True},
}


@pytest.mark.parametrize("name", CASES)
def test_loss_function_matches_cross_entropy(pool, name):
    tol = 2e-2 if CASES[name].get("dtype") is torch.bfloat16 else 1e-5
    for r in pool.run(J.loss_function, CASES[name]):
        assert r["loss_err"] <= tol and r["grad_err"] <= tol, r
        if "dtype" in CASES[name]:  # under autocast torch's loss is float32
            loss_dtype = "torch.float32" if CASES[name].get("autocast") else "torch.bfloat16"
            assert r["dtypes"] == (loss_dtype, "torch.bfloat16") == (r["ref_dtype"], r["dtypes"][1]), r


def test_every_target_ignored_gives_nan_as_torch_does(pool):
    """The mean over no targets is nan, as torch's; the gradient is zero, as torch's (a
    nan there would spoil the parameters of a micro-batch that is all padding)."""
    for r in pool.run(J.loss_function, {"shape": (6, 10), "ignored": 1.0}):
        got, want = r["loss"]
        assert math.isnan(got) and math.isnan(want), r["loss"]
        assert r["grad_zero"] == (True, True), r


def test_target_out_of_range_raises_as_torch_does(pool):
    for bad in (10, -3):
        for r in pool.run(J.loss_function, {"shape": (6, 10), "bad_target": bad}):
            (ref_type, ref_msg), (got_type, got_msg) = r["raised"]
            assert got_type == ref_type == "IndexError" and f"Target {bad}" in got_msg, r


MODELS = {
    # nanoGPT's call: ignore_index=-1, the loss alone returned, no logits gathered at all
    "loss only, ignore -1, smoothing": ({"ignore_index": -1, "smoothing": 0.1, "returns": "loss"}, 0),
    "logits and loss (transformers)": ({}, 1),
    "sum": ({"reduction": "sum"}, 1),
    "per-token losses, classes second": ({"reduction": "none", "layout": "classes_second",
                                          "returns": "loss"}, 0),
}


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("name", MODELS)
def test_model_loss_is_vocab_parallel(pool, name, sp):
    kw, logits_gathers = MODELS[name]
    res = pool.run(J.model_loss, kw, sp)
    assert_numerics(res, context=name)
    rows = 2 * 8
    for r in res:
        assert r["head"] == "(Shard(dim=0),)", r["head"]
        big = [s for s in r["gathers"] if math.prod(s) >= rows * 64 // 2]
        small = [s for s in r["gathers"] if s == (rows, 3 if kw.get("smoothing") else 2)]
        assert len(big) == logits_gathers and len(small) == 1, r["gathers"]


def test_class_weights_keep_the_gather(pool):
    """A loss the rule does not take (class weights over sharded classes) reads gathered
    logits, as before: right numbers, the head still sharded."""
    res = pool.run(J.model_loss, {"class_weights": True, "returns": "loss"})
    assert_numerics(res, context="class weights")
    for r in res:
        assert r["head"] == "(Shard(dim=0),)" and len(r["gathers"]) == 1, r


@pytest.mark.parametrize("loss_parallel", [False, True])
def test_transformers_labels_loss_is_vocab_parallel(pool, loss_parallel):
    """``model(input_ids=..., labels=...)`` of transformers' Llama: the loss from one
    all-gather of (log-sum-exp, target logit) per token; the logits gathered for
    ``out.logits`` only, and not at all under ``loss_parallel=True`` (a DTensor)."""
    for r in pool.run(J.hf_loss, loss_parallel):
        assert len(r["stats"]) == 1, r
        assert len(r["logits"]) == (0 if loss_parallel else 1), r
        assert r["logits_type"] == ("DTensor" if loss_parallel else "Tensor"), r
        assert r["loss_err"] < 1e-5 and r["logits_err"] < 1e-5, r
