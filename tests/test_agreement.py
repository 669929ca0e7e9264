"""Ranks that must agree: a planning failure on one rank stops every rank (no hang),
and inputs that differ between tp ranks are an InputMismatchError on every rank."""

from __future__ import annotations

import pytest

from tests import jobs_agreement as J
from tests.harness import assert_numerics


def test_planning_failure_on_one_rank_raises_on_every_rank(pool):
    res = pool.run(J.one_rank_fails, 1)
    assert res[1]["error"] == "IndivisibleError", res[1]
    for r in (res[0], res[2], res[3]):
        assert r["error"] == "PlanningFailedElsewhere", r
        assert "rank 1: IndivisibleError" in r["message"] and "same model" in r["message"]
    assert all(r["untouched"] for r in res)
    spread = max(r["t"] for r in res) - min(r["t"] for r in res)
    assert spread < 30, f"ranks raised {spread:.1f} s apart"


@pytest.mark.parametrize("kind,fragment", [
    ("seq", "input 0: [2, 4, 8] float32 vs input 0: [2, 6, 8] float32"),
    ("batch", "[2, 4, 8] float32 vs input 0: [3, 4, 8]"),
    ("structure", "structure:"),
    ("mode", "mode: train vs mode: eval"),
    ("values", "the values differ"),
])
def test_inputs_that_differ_between_tp_ranks(pool, kind, fragment):
    res = pool.run(J.mismatched_inputs, kind)
    for r in res:
        assert r["error"] == "InputMismatchError", r
        assert fragment in r["message"], r["message"]
        assert "rank 1 differs from rank 0" in r["message"] or \
            "rank 3 differs from rank 2" in r["message"] or kind == "values"
    assert_numerics([r["after"] for r in res], context=f"after a {kind} mismatch")


def test_value_checks_raise_no_false_alarm(pool):
    assert_numerics(pool.run(J.checked_values_agree), context="TPCOMPILE_CHECK_INPUTS=1")
