"""Jobs for rank agreement: planning that fails on one rank, inputs that differ by rank."""

from __future__ import annotations

import copy
import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import tpcompile
from models.toy import GatedMLPStack
from tests.harness import numerics_result, tp_mesh
from tests.jobs import build

_SHORT: dict[str, Any] = {}


def _short_timeout_mesh(seconds: int) -> Any:
    """A 1-D mesh over the whole world whose group times out after ``seconds``: a rank
    left waiting in a collective fails fast instead of holding CI for minutes."""
    from torch.distributed.device_mesh import DeviceMesh
    key = f"tp{seconds}"
    if key not in _SHORT:
        g = dist.new_group(list(range(dist.get_world_size())),
                           timeout=datetime.timedelta(seconds=seconds))
        _SHORT[key] = DeviceMesh.from_group(g, "cpu", mesh_dim_names=("tp",))
    return _SHORT[key]


def one_rank_fails(rank: int, bad_rank: int) -> dict:
    """Rank ``bad_rank`` is given a model whose hidden width does not split over tp = 4;
    the others a good one. Every rank must raise, none may wait."""
    torch.manual_seed(0)
    model = GatedMLPStack(dim=8, hidden=6 if rank == bad_rank else 8, n_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, 8)
    mesh = _short_timeout_mesh(20)
    try:
        par = tpcompile.auto_parallelize(model, mesh)
        out = par(x)  # without the agreement: waits for the failed rank until the timeout
        out.sum().backward()
        return {"error": None, "t": time.time()}
    except tpcompile.TPCompileError as e:
        t = time.time()
        untouched = all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and \
            "forward" not in model.__dict__ and not any(
                type(p).__name__ == "DTensor" for p in model.parameters())
        return {"error": type(e).__name__, "message": str(e), "t": t, "untouched": untouched}


class WithMask(nn.Module):
    """A gated MLP with an optional multiplicative mask, for the structure case."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = GatedMLPStack(dim=8, hidden=16, n_layers=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.mlp(x)


def mismatched_inputs(rank: int, kind: str) -> dict:
    """tp = 2; the second rank of each pair gets a different call (``kind``): a longer
    sequence, a larger batch, other values, a mask the first rank does not get, or
    eval mode. Every rank must raise InputMismatchError; then an agreeing call must
    still give the right numbers (the group is intact)."""
    torch.manual_seed(0)
    ref = WithMask()
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    second = rank % 2 == 1
    x = torch.randn(2, 4, 8)
    args: tuple = (x,)
    kwargs: dict = {}
    if kind == "seq" and second:
        args = (torch.randn(2, 6, 8),)
    elif kind == "batch" and second:
        args = (torch.randn(3, 4, 8),)
    elif kind == "values" and second:
        args = (x + 1e-3,)
    elif kind == "structure" and second:
        kwargs = {"mask": torch.ones(2, 4, 8)}
    elif kind == "mode" and second:
        par.eval()
    old = os.environ.get("TPCOMPILE_CHECK_INPUTS")
    if kind == "values":
        os.environ["TPCOMPILE_CHECK_INPUTS"] = "1"
    out: dict[str, Any] = {"error": None}
    try:
        par(*args, **kwargs)
    except tpcompile.TPCompileError as e:
        out = {"error": type(e).__name__, "message": str(e)}
    finally:
        if old is None:
            os.environ.pop("TPCOMPILE_CHECK_INPUTS", None)
        else:
            os.environ["TPCOMPILE_CHECK_INPUTS"] = old
    par.train()
    out["after"] = numerics_result(ref, par, (x,))
    return out


def checked_values_agree(rank: int) -> dict:
    """TPCOMPILE_CHECK_INPUTS=1 with equal inputs: no false alarm, right numbers."""
    os.environ["TPCOMPILE_CHECK_INPUTS"] = "1"
    try:
        ref, inputs = build("llama")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
        return numerics_result(ref, par, inputs)
    finally:
        os.environ.pop("TPCOMPILE_CHECK_INPUTS", None)
