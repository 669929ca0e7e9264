"""Parameters: same names, sharded as DTensors, gathered back bit for bit."""

from __future__ import annotations

import pytest

from tests import jobs


@pytest.mark.parametrize("tp", [2, 4])
def test_weights_gather_back_bit_for_bit(pool, tp):
    for r in pool.run(jobs.weights_roundtrip, tp):
        assert r["par_keys"] == r["ref_keys"]  # same keys, same order
        assert r["equal"] and all(r["equal"].values()), \
            [k for k, v in r["equal"].items() if not v]


def test_meta_model_without_materialising(pool):
    for r in pool.run(jobs.meta_stays_meta):
        assert r["dtensor"] and r["meta"]
        assert r["wq_local"] == [32, 64]  # 64 / tp rows of the [64, 64] weight
