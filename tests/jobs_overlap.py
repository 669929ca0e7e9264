"""Jobs for the overlap of backward reductions with compute (tests/test_overlap.py)."""

from __future__ import annotations

import copy
from typing import Any

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


def head_pipelined(rank: int, family: str, tp: int, sp: bool, chunks: int) -> dict:
    """The head's logits all-gathered in ``chunks`` pieces (the chunk size set so that
    this small model's logits make exactly that many): for each piece's all-gather, the
    ops of one forward run between its launch and the next wait; the bytes each piece's
    own columns still hold after the forward (the process group's work object keeps a
    reference a while longer; the memory must go when the piece lands); then every output
    and gradient against the unsharded model."""
    from tpcompile.rewrite import collectives as C
    ref, args, kwargs = jobs_hf.build(family)
    pieces: list[torch.Tensor] = []
    real = C._gather_columns

    def spy(y: torch.Tensor, *rest: Any) -> torch.Tensor:
        pieces.append(y)
        return real(y, *rest)

    with jobs_hf.head_in_chunks(ref, kwargs["input_ids"].numel(), chunks):
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs, sequence_parallel=sp)
        C._gather_columns = spy
        try:
            with OpTimeline() as t:
                out = par(*args, **kwargs)
        finally:
            C._gather_columns = real
        jobs_hf.loss_of(out).backward()
    o_ref = ref(*args, **kwargs)
    jobs_hf.loss_of(o_ref).backward()
    return {"in_flight": t.in_flight(("all_gather_into_tensor", "allgather_")),
            "held": [y.untyped_storage().nbytes() for y in pieces],
            "verdict": jobs_hf.judge(ref, par, o_ref, out)}
