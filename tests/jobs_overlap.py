"""Jobs for the overlap of backward reductions with compute (tests/test_overlap.py)."""

from __future__ import annotations

import copy

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
    ops of one forward run between its launch and the next wait; then every output and
    gradient against the unsharded model."""
    ref, args, kwargs = jobs_hf.build(family)
    with jobs_hf.head_in_chunks(ref, kwargs["input_ids"].numel(), chunks):
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs, sequence_parallel=sp)
        with OpTimeline() as t:
            out = par(*args, **kwargs)
        jobs_hf.loss_of(out).backward()
    o_ref = ref(*args, **kwargs)
    jobs_hf.loss_of(o_ref).backward()
    return {"in_flight": t.in_flight(("all_gather_into_tensor", "allgather_")),
            "verdict": jobs_hf.judge(ref, par, o_ref, out)}
