from __future__ import annotations

import os

import pytest

from tests.harness import WorkerPool

WORLD = 4  # tp=2 runs on two independent slices of it, tp=4 on all of it


@pytest.fixture(scope="session")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = WorkerPool(WORLD)
    yield p
    p.close()
