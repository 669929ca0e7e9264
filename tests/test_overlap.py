"""Backward reductions overlapped with compute: the input gradient of the colwise layers
that share an input (q, k, v; gate and up) is launched as soon as it is summed, and the
weight-gradient matmuls run while it is on the wire; it is waited on only after them.
Numerics are the rest of the suite's business (every test runs this path)."""

from __future__ import annotations

import pytest

from tests import jobs_overlap as J


@pytest.mark.parametrize("sp", [False, True])
def test_weight_gradients_compute_while_the_input_gradient_reduces(pool, sp):
    """HF Llama at tp 2: per block, the all-reduce (reduce-scatter with sequence
    parallelism) of the attention's and the MLP's input gradients each have weight-gradient
    matmuls (aten.mm) between their launch and their wait: 3 for q, k, v and 2 for gate,
    up; and 1 for the vocab-sharded head. A wait right after the launch (no overlap)
    leaves nothing in flight."""
    res = pool.run(J.in_flight, "llama", 2, sp)
    for r in res:
        overlapped = [ops for ops in r["in_flight"] if "aten.mm" in ops]
        assert sorted(ops.count("aten.mm") for ops in overlapped) == \
            sorted([3, 2] * r["layers"] + [1]), r["in_flight"]
