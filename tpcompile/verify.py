"""The error measure the tests, the property suite and the benchmarks all use to compare a
parallel module with the unsharded original."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor a (possibly sharded) DTensor stands for; plain tensors as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    """max |a - b| / max(max |b|, floor), in float64; ``a`` may be a DTensor."""
    a, b = full(a).detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if not b.numel():
        return 0.0
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor)
