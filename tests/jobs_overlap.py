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
