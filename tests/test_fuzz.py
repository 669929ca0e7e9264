"""The fuzz walk over classes of unusual and bad input (tests/jobs_fuzz.py): correct
numbers on every rank, or a TPCompileError naming the cause with the model untouched."""

from __future__ import annotations

import pytest

from tests import jobs_fuzz as J
from tests.harness import assert_numerics


@pytest.mark.parametrize("name", sorted(J.CASES))
def test_correct_numbers_or_a_clear_error(pool, name):
    res = pool.run(J.run_case, name)
    expect = res[0]["expect"]
    if expect == "numbers":
        assert_numerics(res, context=name)
        return
    for r in res:
        assert r["error"] == expect, (r["error"], r.get("message"))
        assert not r["changed"], f"the failed call changed {r['changed']}"
        assert r["message"] and "\n" not in r["message"].strip()[:80]


@pytest.mark.parametrize("kind,fragment", [("ddp", "pass the module inside it (model.module)"),
                                           ("fsdp2", "already has DTensor parameters")])
def test_a_model_wrapped_for_data_parallelism_is_refused(pool, kind, fragment):
    for r in pool.run(J.wrapped, kind):
        assert r["error"] == "UnsupportedError" and fragment in r["message"], r
