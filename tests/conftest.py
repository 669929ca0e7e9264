from __future__ import annotations

import os

import pytest
from hypothesis import Phase, settings

from tests.harness import WorkerPool

WORLD = 4  # tp=2 runs on two independent slices of it, tp=4 on all of it

# Hypothesis profiles: `ci` (the default; deterministic, so CI is never flaky), `dev` for
# a quick look, `deep`/`nightly` to search far. Pick with --hypothesis-profile=NAME.
# ci: 100 examples, each five parallel comparisons of one model (tp 2 and 4, SP on and off,
# dp 2 x tp 2), about 5 minutes on two cores; `deep` searches far (hours)
# ci does not shrink a failure (each step re-runs a model on the pool: it could take
# longer than CI has); the failing example prints the command that re-runs it
settings.register_profile("ci", max_examples=100, derandomize=True, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("dev", max_examples=25)
settings.register_profile("deep", max_examples=3000, print_blob=True)
settings.register_profile("nightly", parent=settings.get_profile("deep"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Pool restarts a test did not declare: (test id, why). Any of them fails the session.
UNEXPECTED_RESTARTS: list[tuple[str, str]] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "pool_restart: the test restarts the worker pool on purpose (a restart "
                   "anywhere else fails the session)")


@pytest.fixture(scope="session")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = WorkerPool(WORLD)
    yield p
    p.close()


@pytest.fixture(autouse=True)
def _pool_restarts_are_declared(request):
    """Attribute every pool restart to the test that caused it; the session fails at the
    end (``pytest_sessionfinish``) for each one its test did not declare."""
    if "pool" not in request.fixturenames:
        yield
        return
    p = request.getfixturevalue("pool")
    before = p.restarts
    yield
    if p.restarts > before and request.node.get_closest_marker("pool_restart") is None:
        UNEXPECTED_RESTARTS.extend((request.node.nodeid, why) for why in p.restart_log[before:])


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if UNEXPECTED_RESTARTS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if UNEXPECTED_RESTARTS:
        terminalreporter.write_sep("=", "worker pool restarted without the test declaring it",
                                   red=True)
        for nodeid, why in UNEXPECTED_RESTARTS:
            terminalreporter.write_line(f"{nodeid}: {why}")
        terminalreporter.write_line("the session fails: a crash that passes on retry is "
                                    "still a crash (mark a test pool_restart if it is meant)")
    from tests.property import STATS
    if STATS.faults:
        terminalreporter.write_sep("-", "planted faults")
        for fault, (tried, caught) in STATS.faults.items():
            terminalreporter.write_line(f"{fault}: caught by a numerics mismatch in {caught} "
                                        f"of {tried} examples drawn (the rest: not applicable "
                                        "or the fault changed nothing there)")
    if not STATS.examples:
        return
    errors = ", ".join(f"{k} {v}" for k, v in sorted(STATS.errors.items())) or "none"
    terminalreporter.write_sep("-", "property tests")
    terminalreporter.write_line(
        f"parallel comparisons run: {STATS.examples} ({STATS.two_d} on a 2-D (dp, tp) mesh; "
        f"{STATS.compared} compared with the unsharded model; documented errors: {errors})")
    for k, counts in STATS.by.items():
        split = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda x: -x[1]))
        terminalreporter.write_line(f"  compared, by {k}: {split}")
    terminalreporter.write_line(
        f"worst relative error: {STATS.worst:.2e} ({STATS.worst_where}); every rank's "
        f"outputs and local gradients judged")
    terminalreporter.write_line(
        f"closest to its bound: {STATS.used:.2f} of it ({STATS.used_where}); "
        f"{STATS.noisy} tensors the float32 reference knows only to rounding noise "
        "(judged against its float64 shadow)")
