"""The worker pool recovers from losing a worker, and reports real job errors; a restart
no test declared fails the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import jobs
from tests.harness import WorkerError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.pool_restart
def test_a_lost_worker_is_replaced_and_the_job_rerun(pool, tmp_path):
    restarts = pool.restarts
    assert pool.run(jobs.die_once, str(tmp_path / "marker")) == [0, 1, 2, 3]
    assert pool.restarts == restarts + 1
    assert "die_once" in pool.restart_log[-1] and "died" in pool.restart_log[-1]


@pytest.mark.pool_restart
def test_a_stalled_job_says_where_each_silent_rank_was(pool, tmp_path, monkeypatch):
    """A job with no result in time is reported with where each rank that gave none was
    (what a hang in CI needs to be found); ``run`` then restarts the pool with that
    report in its log. (The pool is up first: starting workers takes seconds.)"""
    from tests import harness
    assert pool.run(jobs.ready) == [0, 1, 2, 3]
    monkeypatch.setattr(harness, "JOB_TIMEOUT_S", 3.0)
    got, why = pool._collect(jobs.stall_once, (str(tmp_path / "marker"),), {})
    pool.restart(why)  # rank 1 still sleeps
    assert sorted(got) == [0, 2, 3], got
    assert "no result within 3.0s" in why and "rank 1:" in why and "rank 0:" not in why, why
    assert "in stall_once" in why, why


@pytest.mark.pool_restart
def test_a_job_error_is_reported_not_retried(pool):
    with pytest.raises(WorkerError, match="ZeroDivisionError"):
        pool.run(jobs.divide_by_zero)
    assert "ZeroDivisionError" in pool.restart_log[-1]


def test_undeclared_restart_fails_the_session():
    """tests/restart_probe.py, in a session of its own: two tests pass, one restart was
    declared, the other fails the session."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/restart_probe.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert "2 passed" in out, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert "worker pool restarted without the test declaring it" in out, out[-3000:]
    assert "test_passes_after_a_restart: job die_once, attempt 1" in out, out[-3000:]
    assert "divide_by_zero" not in out, out[-3000:]
