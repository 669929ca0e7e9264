"""The worker pool recovers from losing a worker, and reports real job errors."""

from __future__ import annotations

import pytest

from tests import jobs
from tests.harness import WorkerError


def test_a_lost_worker_is_replaced_and_the_job_rerun(pool, tmp_path):
    restarts = pool.restarts
    assert pool.run(jobs.die_once, str(tmp_path / "marker")) == [0, 1, 2, 3]
    assert pool.restarts == restarts + 1


def test_a_job_error_is_reported_not_retried(pool):
    with pytest.raises(WorkerError, match="ZeroDivisionError"):
        pool.run(jobs.divide_by_zero)
