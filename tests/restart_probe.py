"""Run only by tests/test_harness.py, in a pytest session of its own (the name keeps it
out of normal collection): a test that passes although the pool restarted under it."""

from __future__ import annotations

import pytest


class _Pool:
    """Stands in for the worker pool: only its restart log matters here."""

    def __init__(self) -> None:
        self.restart_log: list[str] = []

    @property
    def restarts(self) -> int:
        return len(self.restart_log)


@pytest.fixture(scope="module")
def pool():
    return _Pool()


def test_passes_after_a_restart(pool):
    pool.restart_log.append("job die_once, attempt 1: worker(s) [0] died (exit codes [3])")


@pytest.mark.pool_restart
def test_declares_its_restart(pool):
    pool.restart_log.append("job divide_by_zero: rank 0 raised ZeroDivisionError")
