"""A decoder-only LM laid out like AI2's own OLMo training code (``olmo/model.py``), the
code OLMo-1 was trained with before transformers had it.

A "model written by someone else" for the tests. It keeps that codebase's idioms: blocks
in ``transformer.blocks`` of an ``nn.ModuleDict``; one fused ``att_proj`` whose output is
clipped in place (``clamp_``, the ``clip_qkv`` option) and cut by ``split(fused_dims)``;
**q and k normalized over the whole projection** (``attention_layer_norm``, the layout
OLMo 2 kept), by a LayerNorm class that is one of ``layer_norm_type``: "default" calls
``F.layer_norm``, "rms" is written out by hand (mean of squares, ``rsqrt``, weight), and
"by_hand" is a LayerNorm written out (mean, centred variance); rotary embeddings computed
in ``forward`` with ``rotate_half``; a fused SwiGLU ``ff_proj`` cut by ``chunk(2)``; the
output tied to the token embedding through ``F.linear(x, wte.weight)``; the logits
returned in a named tuple.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_kv_heads: Optional[int] = None
    n_layers: int = 16
    mlp_ratio: int = 8
    vocab_size: int = 50280
    max_sequence_length: int = 2048
    clip_qkv: Optional[float] = None
    attention_layer_norm: bool = True
    layer_norm_type: str = "default"  # "default" | "rms" | "by_hand"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool = True
    include_bias: bool = False
    weight_tying: bool = False  # OLMo-1B ties (F.linear(x, wte.weight)): see the tests
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


class LayerNorm(nn.Module):
    """The three norm kinds of the config, over the last dim."""

    def __init__(self, config: ModelConfig, size: Optional[int] = None,
                 elementwise_affine: Optional[bool] = None) -> None:
        super().__init__()
        self.kind = config.layer_norm_type
        self.eps = config.eps
        self.normalized_shape = (size or config.d_model,)
        affine = config.layer_norm_with_affine if elementwise_affine is None else elementwise_affine
        if affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            use_bias = config.bias_for_layer_norm and self.kind != "rms"
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if use_bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "default":
            return F.layer_norm(x, self.normalized_shape, weight=self.weight, bias=self.bias,
                                eps=self.eps)
        dtype = x.dtype
        x = x.to(torch.float32)
        if self.kind == "rms":
            variance = x.pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(variance + self.eps)
        else:
            mean = x.mean(dim=-1, keepdim=True)
            centred = x - mean
            variance = (centred * centred).mean(dim=-1, keepdim=True)
            x = centred / torch.sqrt(variance + self.eps)
        x = x.to(dtype)
        if self.weight is not None:
            x = self.weight * x
            if self.bias is not None:
                x = x + self.bias
        return x


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dim = config.d_model // config.n_heads
        self.theta = config.rope_theta

    def sin_cos(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=device,
                                                      dtype=torch.float) / self.dim))
        seq = torch.arange(seq_len, device=device, dtype=torch.float)
        freqs = torch.einsum("i , j -> i j", seq, inv_freq)
        positions = torch.cat((freqs, freqs), dim=-1)
        return positions.sin()[None, None, :, :], positions.cos()[None, None, :, :]

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = x.size()
        x = x.view(B, nh, T, 2, hs // 2)
        x1, x2 = x.unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[-2]
        sin, cos = self.sin_cos(T, q.device)
        q_ = (q.float() * cos) + (self.rotate_half(q.float()) * sin)
        k_ = (k.float() * cos) + (self.rotate_half(k.float()) * sin)
        return q_.type_as(q), k_.type_as(k)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class OLMoSequentialBlock(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        head_dim = config.d_model // config.n_heads
        self.fused_dims = (config.d_model, config.effective_n_kv_heads * head_dim,
                           config.effective_n_kv_heads * head_dim)
        self.att_proj = nn.Linear(config.d_model, sum(self.fused_dims), bias=config.include_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)
        hidden = config.mlp_ratio * config.d_model
        self.ff_proj = nn.Linear(config.d_model, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden // 2, config.d_model, bias=config.include_bias)
        self.act = SwiGLU()
        self.attn_norm = LayerNorm(config)
        self.ff_norm = LayerNorm(config)
        self.k_norm: Optional[LayerNorm] = None
        self.q_norm: Optional[LayerNorm] = None
        if config.attention_layer_norm:
            self.k_norm = LayerNorm(config, size=self.fused_dims[1])
            self.q_norm = LayerNorm(config)
        self.rotary_emb = RotaryEmbedding(config)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, C = q.size()
        dtype = k.dtype
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q).to(dtype=dtype)
            k = self.k_norm(k).to(dtype=dtype)
        n_kv = self.config.effective_n_kv_heads
        q = q.view(B, T, self.config.n_heads, C // self.config.n_heads).transpose(1, 2)
        k = k.view(B, T, n_kv, C // self.config.n_heads).transpose(1, 2)
        v = v.view(B, T, n_kv, C // self.config.n_heads).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        if n_kv != self.config.n_heads:
            rep = self.config.n_heads // n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                             is_causal=True)
        att = att.transpose(1, 2).contiguous().view(B, T, C)
        return self.attn_out(att)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.att_proj(self.attn_norm(x))
        if self.config.clip_qkv is not None:
            qkv.clamp_(min=-self.config.clip_qkv, max=self.config.clip_qkv)
        q, k, v = qkv.split(self.fused_dims, dim=-1)
        x = x + self.attention(q, k, v)
        og_x = x
        x = self.ff_out(self.act(self.ff_proj(self.ff_norm(x))))
        return og_x + x


class OLMoOutput(NamedTuple):
    logits: torch.Tensor
    hidden_states: Optional[tuple] = None


class OLMo(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            emb_drop=nn.Dropout(0.0),
            ln_f=LayerNorm(config),
            blocks=nn.ModuleList([OLMoSequentialBlock(i, config) for i in range(config.n_layers)]),
        ))
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(config.d_model, config.vocab_size,
                                                         bias=config.include_bias)})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.config.d_model)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
            elif name.endswith("weight"):  # norm weights: not all ones, so a wrong slice shows
                nn.init.uniform_(p, 0.5, 1.5)
            else:
                nn.init.normal_(p, std=0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None) -> OLMoOutput:
        if attention_mask is not None:
            raise NotImplementedError("padding masks are left out of this copy")
        x = self.transformer.wte(input_ids)
        x = self.transformer.emb_drop(x)
        all_hidden = [] if output_hidden_states else None
        for block in self.transformer.blocks:
            if all_hidden is not None:
                all_hidden.append(x)
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight, None)
        else:
            logits = self.transformer.ff_out(x)
        return OLMoOutput(logits=logits, hidden_states=tuple(all_hidden) if all_hidden else None)


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=64, n_heads=4, n_layers=2, mlp_ratio=4, vocab_size=128,
                        max_sequence_length=64, clip_qkv=2.0),
}


def build(name: str = "tiny", **overrides) -> OLMo:
    return OLMo(replace(CONFIGS[name], **overrides))


def example_inputs(name: str = "tiny", batch: int = 4, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return {"input_ids": torch.randint(0, CONFIGS[name].vocab_size, (batch, seq), generator=g)}
