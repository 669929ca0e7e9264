"""A Llama-2 style decoder in plain PyTorch; it knows nothing of parallelism.

Names follow the PyTorch tensor-parallel examples (tok_embeddings, layers.N.attention.wq,
feed_forward.w1, attention_norm, norm, output), so hand-written plans and tpcompile's
detected plans can be compared name for name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    rope_theta: float = 10000.0


CONFIGS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                       multiple_of=32, max_seq_len=256),
    "tutorial": ModelArgs(dim=256, n_layers=2, n_heads=16, vocab_size=32000, max_seq_len=1024),
    "7B": ModelArgs(),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                     multiple_of=4096),
}


def config(name: str, **overrides: object) -> ModelArgs:
    if name not in CONFIGS:
        raise KeyError(f"no config {name!r}; the configs are {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)  # type: ignore[arg-type]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, written out (as in the original Llama code)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, seq, heads, head_dim] by position (the rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, s, n_kv, d] -> [b, s, n_kv * n_rep, d], each kv head repeated for its queries."""
    if n_rep == 1:
        return x
    b, s, n_kv, d = x.shape
    return x[:, :, :, None, :].expand(b, s, n_kv, n_rep, d).reshape(b, s, n_kv * n_rep, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary(xq, cos, sin), apply_rotary(xk, cos, sin)
        xk, xv = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int,
                 ffn_dim_multiplier: float | None) -> None:
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, 4 * args.dim, args.multiple_of,
                                        args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._set_rope()

    @classmethod
    def from_model_args(cls, args: ModelArgs) -> "Transformer":
        return cls(args)

    def _set_rope(self) -> None:
        cos, sin = rope_tables(self.args.dim // self.args.n_heads, self.args.max_seq_len,
                               self.args.rope_theta)
        device = self.output.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)).float()

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from ``seed``; every parameter is drawn from its own generator
        seeded by (seed, parameter name), so the values do not depend on the order or the
        device the parameters are initialised on."""
        for name, p in self.named_parameters():
            g = torch.Generator().manual_seed(_name_seed(seed, name))
            if name.endswith("norm.weight"):
                full = torch.ones(p.shape)
            elif "tok_embeddings" in name:
                full = torch.randn(p.shape, generator=g)
            else:
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                full = torch.randn(p.shape, generator=g) * std
            _copy_into(p, full)
        # buffers are not parameters: after to_empty() they hold garbage, so recompute
        device = self.output.weight.device
        cos, sin = rope_tables(self.args.dim // self.args.n_heads, self.args.max_seq_len,
                               self.args.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)


def _name_seed(seed: int, name: str) -> int:
    h = seed
    for ch in name:
        h = (h * 131 + ord(ch)) % (2 ** 61 - 1)
    return h


def _copy_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size value into ``p``, which may be a sharded DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor):
        shard = distribute_tensor(full.to(p.to_local().dtype), p.device_mesh, p.placements,
                                  src_data_rank=None)
        p.to_local().copy_(shard.to_local())
    else:
        p.copy_(full.to(p.dtype))


def build_model(config_name: str = "7B") -> Transformer:
    """For ``python -m tpcompile explain models/llama2.py --config debug``."""
    return Transformer(config(config_name))
