"""The tutorial's ToyModel, and a residual stack of gated MLPs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ToyModel(nn.Module):
    """MLP: in_proj 10 -> 32, ReLU, out_proj 32 -> 5 (the tensor-parallel tutorial's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(10, 32)
        self.relu = nn.ReLU()
        self.out_proj = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.relu(self.in_proj(x)))


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GatedBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = GatedMLP(dim, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class GatedMLPStack(nn.Module):
    """Pre-norm residual blocks of gated MLPs on [batch, seq, dim] activations."""

    def __init__(self, dim: int = 32, hidden: int = 64, n_layers: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GatedBlock(dim, hidden, bias) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def build_model(config_name: str = "toy") -> nn.Module:
    """For ``python -m tpcompile``: ``--config toy`` (the tutorial's MLP) or ``gated``."""
    if config_name == "toy":
        return ToyModel()
    if config_name == "gated":
        return GatedMLPStack()
    raise KeyError(f"models/toy.py: unknown config {config_name!r}; use 'toy' or 'gated'")
