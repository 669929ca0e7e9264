"""Collectives overlapped with compute. Backward: the input gradient of the colwise
layers that share an input (q, k, v; gate and up; the head) is launched as soon as it is
summed, and the weight-gradient matmuls run while it is on the wire; it is waited on only
after them. Forward: a head's large logits are computed and all-gathered in chunks, each
chunk's gather on the wire while the next chunks compute. Numerics are the rest of the
suite's business (every test runs the backward path; small logits are one chunk), except
for the chunked head, checked here."""

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


@pytest.mark.parametrize("p2p", [False, True], ids=["all_gather", "send_recv"])
def test_head_logits_gather_in_chunks_while_the_next_chunks_compute(pool, p2p):
    """HF Llama at tp 2 with SP, its logits split into 4 chunks, at most 2 gathers in
    flight: each chunk's all-gather (into the output's column blocks; or, as gloo gathers
    large chunks, a send to the other rank and a receive from it) is in flight while
    the next two chunks' matmuls run (the third chunk's: one, the last's: none, waited
    on at once), every other all-gather (sequence-parallel inputs) waited on at once;
    each chunk's gather registered for its wait and none left registered after; each
    chunk's own columns (and the buffer the other rank's part was received into) freed
    once its gather lands (no memory left to the process group's work objects); and the logits, loss and every gradient match the unsharded
    model (every rank's columns of every chunk in their place)."""
    from tests.test_hf import check
    res = pool.run(J.head_pipelined, "llama", 2, True, 4, p2p)
    check([r["verdict"] for r in res])
    works = 2 if p2p else 1  # per chunk: its send and its receive, or the all-gather
    for r in res:
        mms = [sum(op in ("aten.mm", "aten.addmm") for op in ops) for ops in r["in_flight"]]
        assert sorted(m for m in mms if m) == [1, 2, 2], r["in_flight"]
        assert r["sends"] == (4 if p2p else 0), r["sends"]
        assert len(r["held"]) == 4 * works and not any(r["held"]), r["held"]
        assert r["registered"] == [works, 2 * works, 2 * works, 2 * works] and r["left"] == 0, r


@pytest.mark.parametrize("p2p", [False, True], ids=["all_gather", "send_recv"])
def test_a_head_failing_mid_way_leaves_no_work_registered(pool, p2p):
    """An error in the head's third chunk, after two gathers were launched, reaches the
    caller, and both gathers are waited on first: none stays registered holding the
    logits."""
    for r in pool.run(J.head_fails_mid_way, "llama", 2, p2p):
        assert r["error"] == "planted: the third chunk" and r["left"] == 0, r


def test_head_chunks_sent_to_three_ranks_at_tp4(pool):
    """At tp 4 a chunk gathered by sends goes to each of the three other ranks and comes
    from each (every rank's columns in their block, on every rank): the logits, loss and
    every gradient match the unsharded model; nothing held or left registered."""
    from tests.test_hf import check
    res = pool.run(J.head_pipelined, "llama", 4, True, 4, True)
    check([r["verdict"] for r in res])
    for r in res:
        assert r["sends"] == 4 * 3 and not any(r["held"]) and r["left"] == 0, r
