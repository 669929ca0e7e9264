from __future__ import annotations

import os

import pytest
from hypothesis import settings

from tests.harness import WorkerPool

WORLD = 4  # tp=2 runs on two independent slices of it, tp=4 on all of it

# Hypothesis profiles: `ci` (the default; deterministic, so CI is never flaky), `dev` for
# a quick look, `deep`/`nightly` to search far. Pick with --hypothesis-profile=NAME.
settings.register_profile("ci", max_examples=500, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25)
settings.register_profile("deep", max_examples=3000, print_blob=True)
settings.register_profile("nightly", parent=settings.get_profile("deep"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = WorkerPool(WORLD)
    yield p
    p.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.property import STATS
    if not STATS.examples:
        return
    errors = ", ".join(f"{k} {v}" for k, v in sorted(STATS.errors.items())) or "none"
    terminalreporter.write_sep("-", "property tests")
    terminalreporter.write_line(
        f"examples run: {STATS.examples} ({STATS.two_d} on a 2-D (dp, tp) mesh; "
        f"{STATS.compared} compared with the unsharded model; documented errors: {errors})")
    terminalreporter.write_line(
        f"worst relative error: {STATS.worst:.2e} ({STATS.worst_where})")
