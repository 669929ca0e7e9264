"""A decoder-only LM laid out like pytorch-labs' gpt-fast ``model.py``.

A "model written by someone else" for the tests. It keeps gpt-fast's idioms: one fused
``wqkv`` Linear cut by ``split([dim, kv_size, kv_size])`` (unequal parts under GQA), heads
made by ``view(bsz, seqlen, n_head, head_dim)``, RoPE from a precomputed buffer of
(cos, sin) pairs applied through ``x.float().reshape(..., -1, 2)``, kv heads widened by
``repeat_interleave``, a boolean causal-mask buffer indexed by ``input_pos``, and an
RMSNorm written by hand. The optional KV cache of gpt-fast is left out: training only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = 11008
    n_local_heads: int = -1  # kv heads; -1: as many as n_head (no GQA)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


CONFIGS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(block_size=64, vocab_size=128, n_layer=2, n_head=8, dim=64,
                      intermediate_size=128),
    "tiny-gqa": ModelArgs(block_size=64, vocab_size=128, n_layer=2, n_head=8, dim=64,
                          intermediate_size=128, n_local_heads=2),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_cache(seq_len: int, head_dim: int, base: float) -> Tensor:
    """``[seq_len, head_dim // 2, 2]``: the cosine and sine of position x frequency."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """``x`` is ``[bsz, seqlen, heads, head_dim]``, each consecutive pair one complex number."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        total = (args.n_head + 2 * args.n_local_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, total, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.n_head, self.n_local_heads = args.n_head, args.n_local_heads
        self.head_dim, self.dim = args.head_dim, args.dim

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("freqs_cis", rope_cache(config.block_size, config.head_dim,
                                                     config.rope_base), persistent=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(
            config.block_size, config.block_size, dtype=torch.bool)), persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor | None = None) -> Tensor:
        if input_pos is None:
            input_pos = torch.arange(idx.shape[1], device=idx.device)
        mask = self.causal_mask[None, None, input_pos][..., input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs_cis, mask)
        return self.output(self.norm(x))


def build(config_name: str = "tiny", **overrides: object) -> Transformer:
    return Transformer(replace(CONFIGS[config_name], **overrides))


def example_inputs(config_name: str = "tiny", batch: int = 2, seq: int = 8) -> dict:
    """Keyword inputs for ``Transformer.forward``: random token ids."""
    return {"idx": torch.randint(0, CONFIGS[config_name].vocab_size, (batch, seq))}
