"""Jobs for the overlap of backward reductions with compute (tests/test_overlap.py)."""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import torch

import tpcompile
from tests import jobs_hf
from tests.harness import tp_mesh
from tpcompile.counting import OpTimeline


def in_flight(rank: int, family: str, tp: int, sp: bool) -> dict:
    """The ops one backward runs while each input-gradient reduction is on the wire."""
    ref, args, kwargs = jobs_hf.build(family)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                     example_kwargs=kwargs, sequence_parallel=sp)
    loss = jobs_hf.loss_of(par(*args, **kwargs))
    with OpTimeline() as t:
        loss.backward()
    return {"in_flight": t.in_flight(), "layers": ref.config.num_hidden_layers}


def head_pipelined(rank: int, family: str, tp: int, sp: bool, chunks: int, p2p: bool) -> dict:
    """The head's logits all-gathered in ``chunks`` pieces (the chunk size set so that
    this small model's logits make exactly that many): for each piece's all-gather, the
    ops of one forward run between its launch and the next wait; the works registered for
    a wait_tensor after each launch, and left after the forward; the bytes each piece's
    own columns (and the buffers its parts were received into) still hold after the forward (the process group's work object keeps a
    reference a while longer; the memory must go when the piece lands); then every output
    and gradient against the unsharded model. ``p2p``: each piece gathered by sends and
    receives (gloo's way for large ones) instead of one all-gather."""
    from tpcompile.rewrite import head as H
    ref, args, kwargs = jobs_hf.build(family)
    pieces: list[torch.Tensor] = []
    real = H._gather_columns
    works = torch._C._distributed_c10d._get_work_registry_size
    registered: list[int] = []

    def spy(y: torch.Tensor, *rest: Any) -> Any:
        pieces.append(y)
        out = real(y, *rest)
        pieces.extend(buf for _, buf in out[1] or ())  # its receive buffers, if any
        registered.append(works())  # its work registered (a wait_tensor then waits for it)
        return out

    with jobs_hf.head_in_chunks(ref, kwargs["input_ids"].numel(), chunks, p2p):
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs, sequence_parallel=sp)
        before = works()
        with mock.patch.object(H, "_gather_columns", spy), OpTimeline() as t:
            out = par(*args, **kwargs)
        after = works()
        jobs_hf.loss_of(out).backward()
    o_ref = ref(*args, **kwargs)
    jobs_hf.loss_of(o_ref).backward()
    return {"in_flight": t.in_flight(("all_gather_into_tensor", "allgather_", "send")),
            "sends": sum(e[0] == "c10d.send" for e in t.events),
            "held": [y.untyped_storage().nbytes() for y in pieces],
            "registered": [n - before for n in registered], "left": after - before,
            "verdict": jobs_hf.judge(ref, par, o_ref, out)}


def head_fails_mid_way(rank: int, family: str, tp: int, p2p: bool) -> dict:
    """The head's third chunk fails (as an out-of-memory in its matmul would) after two
    gathers were launched: the error reaches the caller and no work is left registered
    (each would hold the logits until the process ends)."""
    from tpcompile.rewrite import head as H
    ref, args, kwargs = jobs_hf.build(family)
    works = torch._C._distributed_c10d._get_work_registry_size
    real, calls = H._gather_columns, []

    def fails_third(y: torch.Tensor, *rest: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("planted: the third chunk")
        return real(y, *rest)

    with jobs_hf.head_in_chunks(ref, kwargs["input_ids"].numel(), 4, p2p):
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs)
        before, error = works(), None
        with mock.patch.object(H, "_gather_columns", fails_third):
            try:
                par(*args, **kwargs)
            except MemoryError as e:
                error = str(e)
    return {"error": error, "left": works() - before}
