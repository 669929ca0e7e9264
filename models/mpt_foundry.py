"""A decoder-only LM laid out like MosaicML's MPT in llm-foundry (``llmfoundry/models/mpt``),
the code MPT-7B and MPT-30B were trained with.

A "model written by someone else" for the tests. It keeps that codebase's idioms: the token
embedding is a ``SharedEmbedding`` (an ``nn.Embedding`` whose ``forward(x, unembed=True)``
is ``F.linear(x, self.weight)``), so **the output head is the embedding module called a
second way**, with no Linear of its own; learned positions added to it; blocks that return
``(x, attn_weights, past_key_value)``; a fused ``Wqkv`` cut by ``chunk(3)``, optionally
clipped (``clip_qkv``), with the heads split by a view that names the head count; scores
masked by a causal mask built from the length in ``forward``; the low-precision LayerNorm
(``LPLayerNorm``: the norm run with autocast off), biases off (``no_bias``, MPT-7B's
setting), and an optional ``logit_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MPTConfig:
    d_model: int = 4096
    n_heads: int = 32
    n_layers: int = 32
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    no_bias: bool = True
    clip_qkv: Optional[float] = None
    logit_scale: Optional[float] = None
    learned_pos_emb: bool = True


class SharedEmbedding(nn.Embedding):
    def forward(self, input: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        if unembed:
            return F.linear(input, self.weight)
        return super().forward(input)


class LPLayerNorm(nn.LayerNorm):
    """llm-foundry's low-precision LayerNorm: under autocast the input, weight and bias
    are cast to the autocast dtype and the norm runs with autocast off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module_device = x.device
        dtype = torch.get_autocast_dtype(module_device.type) \
            if torch.is_autocast_enabled(module_device.type) else None
        down_x = x if dtype is None else x.to(dtype)
        down_w = self.weight if dtype is None or self.weight is None else self.weight.to(dtype)
        down_b = self.bias if dtype is None or self.bias is None else self.bias.to(dtype)
        with torch.autocast(enabled=False, device_type=module_device.type):
            return F.layer_norm(down_x, self.normalized_shape, down_w, down_b, self.eps)


def scaled_multihead_dot_product_attention(query: torch.Tensor, key: torch.Tensor,
                                           value: torch.Tensor, n_heads: int,
                                           softmax_scale: Optional[float] = None,
                                           is_causal: bool = True
                                           ) -> tuple[torch.Tensor, None, None]:
    b, s, _ = query.shape
    q = query.view(b, s, n_heads, -1).transpose(1, 2)  # b h s d
    k = key.view(b, s, n_heads, -1).permute(0, 2, 3, 1)  # b h d s
    v = value.view(b, s, n_heads, -1).transpose(1, 2)
    if softmax_scale is None:
        softmax_scale = 1 / math.sqrt(q.size(-1))
    attn_weight = q.matmul(k) * softmax_scale
    if is_causal and s > 1:
        causal_mask = attn_weight.new_ones(s, s, dtype=torch.float32).tril()
        causal_mask = ~causal_mask.to(torch.bool)
        attn_weight = attn_weight.masked_fill(causal_mask.view(1, 1, s, s),
                                              torch.finfo(q.dtype).min)
    attn_weight = torch.softmax(attn_weight, dim=-1)
    out = attn_weight.matmul(v)
    return out.transpose(1, 2).reshape(b, s, -1), None, None


class MultiheadAttention(nn.Module):
    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.clip_qkv = config.clip_qkv
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model, bias=not config.no_bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=not config.no_bias)

    def forward(self, x: torch.Tensor, is_causal: bool = True
                ) -> tuple[torch.Tensor, None, None]:
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = qkv.chunk(3, dim=2)
        context, attn_weights, past = scaled_multihead_dot_product_attention(
            query, key, value, self.n_heads, is_causal=is_causal)
        return self.out_proj(context), attn_weights, past


class MPTMLP(nn.Module):
    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        hidden = config.expansion_ratio * config.d_model
        self.up_proj = nn.Linear(config.d_model, hidden, bias=not config.no_bias)
        self.act = nn.GELU(approximate="none")
        self.down_proj = nn.Linear(hidden, config.d_model, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MPTBlock(nn.Module):
    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.norm_1 = LPLayerNorm(config.d_model, bias=not config.no_bias)
        self.attn = MultiheadAttention(config)
        self.norm_2 = LPLayerNorm(config.d_model, bias=not config.no_bias)
        self.ffn = MPTMLP(config)
        self.resid_attn_dropout = nn.Dropout(0.0)
        self.resid_ffn_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, is_causal: bool = True
                ) -> tuple[torch.Tensor, None, None]:
        a = self.norm_1(x)
        b, attn_weights, past_key_value = self.attn(a, is_causal=is_causal)
        x = x + self.resid_attn_dropout(b)
        m = self.norm_2(x)
        x = x + self.resid_ffn_dropout(self.ffn(m))
        return x, attn_weights, past_key_value


class MPTModel(nn.Module):
    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = SharedEmbedding(config.vocab_size, config.d_model)
        if config.learned_pos_emb:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([MPTBlock(config) for _ in range(config.n_layers)])
        self.norm_f = LPLayerNorm(config.d_model, bias=not config.no_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        S = input_ids.size(1)
        if S > self.config.max_seq_len:
            raise ValueError(f"Cannot forward input with seq_len={S}, this model only "
                             f"supports seq_len<={self.config.max_seq_len}")
        x = self.wte(input_ids)
        if self.config.learned_pos_emb:
            pos = torch.arange(0, S, dtype=torch.long, device=input_ids.device).unsqueeze(0)
            x = x + self.wpe(pos)
        x = self.emb_drop(x)
        for block in self.blocks:
            x, _, _ = block(x, is_causal=True)
        return self.norm_f(x)


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class MPTForCausalLM(nn.Module):
    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.transformer = MPTModel(config)
        self.logit_scale = config.logit_scale
        for name, p in self.named_parameters():  # norm weights not all ones: a wrong slice shows
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02 * math.sqrt(64 / config.d_model) * 4)
            elif name.endswith("weight"):
                nn.init.uniform_(p, 0.5, 1.5)
            else:
                nn.init.normal_(p, std=0.1)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> CausalLMOutput:
        hidden = self.transformer(input_ids)
        logits = self.transformer.wte(hidden, True)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        loss = None
        if labels is not None:
            labels = torch.roll(labels, shifts=-1)
            labels[:, -1] = -100
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))
        return CausalLMOutput(logits=logits, loss=loss)


CONFIGS: dict[str, MPTConfig] = {
    "tiny": MPTConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=64,
                      vocab_size=128, clip_qkv=6.0, logit_scale=0.5),
}


def build(name: str = "tiny", **overrides) -> MPTForCausalLM:
    return MPTForCausalLM(replace(CONFIGS[name], **overrides))


def example_inputs(name: str = "tiny", batch: int = 4, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return {"input_ids": torch.randint(0, CONFIGS[name].vocab_size, (batch, seq), generator=g)}
