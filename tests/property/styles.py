"""Models in other people's code styles, drawn by the property tests next to the project's
own template (``arch.py``): the reference Llama (mask from the length, complex RoPE sliced
by start position), nanoGPT (fused ``c_attn`` split into q, k, v, causal mask built in
forward, tied embeddings), Hugging Face families built from their config classes, and
stock ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention`` inside).

A :class:`StyleSpec` is data, like ``arch.Spec``: hypothesis draws and shrinks it, and a
failing example prints it for ``build_style(StyleSpec.model_validate_json(...), seed)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from tests.property.arch import fits

Style = Literal["reference", "nanogpt", "hf", "torch_layer"]
# HF families drawn (tiny random configs); the held-in families of tests/test_hf.py plus
# two more, each with its own attention/MLP code
HF_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "qwen3", "granite",
               "starcoder2")


REFERENCE_MULTIPLE = 8


def reference_hidden(dim: int) -> int:
    """The reference Llama's SwiGLU width: 2/3 of 4 * dim, rounded up to multiple_of."""
    h = int(2 * 4 * dim / 3)
    return REFERENCE_MULTIPLE * ((h + REFERENCE_MULTIPLE - 1) // REFERENCE_MULTIPLE)


class StyleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Style
    family: str | None = None  # style "hf"
    dim: int
    n_layers: int = 1
    n_heads: int
    n_kv_heads: int
    hidden: int
    vocab: int = 32
    bias: bool = False
    tied: bool = False
    explicit_softmax: bool = False  # eager attention / nanoGPT's non-flash path
    norm_first: bool = True  # torch_layer: pre-norm (False: post-norm, the 2017 layout)

    def widths(self) -> list[tuple[str, int]]:
        out = [("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads),
               ("hidden", self.hidden)]
        if self.style != "torch_layer":
            out.append(("vocab", self.vocab))
        return out

    def divisible(self, tp: int) -> bool:
        return all(fits(what, size, tp) for what, size in self.widths())

    def label(self) -> str:
        return f"hf:{self.family}" if self.style == "hf" else self.style


class EncoderStack(nn.Module):
    """``nn.TransformerEncoderLayer`` blocks as a user stacks them (batch first)."""

    def __init__(self, s: StyleSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(s.dim, s.n_heads, s.hidden, dropout=0.0,
                                       activation="gelu", batch_first=True,
                                       norm_first=s.norm_first, bias=s.bias)
            for _ in range(s.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=x.device), 1)
        for layer in self.layers:
            x = layer(x, src_mask=causal)
        return x


def build_style(s: StyleSpec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if s.style == "reference":
        from models.reference_llama import ModelArgs, Transformer
        model: nn.Module = Transformer(ModelArgs(
            dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
            vocab_size=s.vocab, multiple_of=REFERENCE_MULTIPLE, max_seq_len=64))
    elif s.style == "nanogpt":
        from models.nanogpt import GPTConfig, GPT
        model = GPT(GPTConfig(block_size=64, vocab_size=s.vocab, n_layer=s.n_layers,
                              n_head=s.n_heads, n_embd=s.dim, dropout=0.0, bias=s.bias,
                              tie_weights=s.tied, flash=not s.explicit_softmax))
    elif s.style == "hf":
        from models import hf_zoo
        over: dict[str, Any] = dict(
            hidden_size=s.dim, num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads,
            intermediate_size=s.hidden, vocab_size=s.vocab, tie_word_embeddings=s.tied,
            attn_implementation="eager" if s.explicit_softmax else "sdpa")
        if s.family != "gpt2":
            over["num_key_value_heads"] = s.n_kv_heads
        if s.family in ("llama", "mistral", "gemma", "qwen3"):
            over["head_dim"] = s.dim // s.n_heads
        if s.family in ("llama", "qwen2", "mistral", "qwen3", "granite"):
            over["attention_bias"] = s.bias
        model = hf_zoo.build(s.family, **over)  # type: ignore[arg-type]
    else:
        model = EncoderStack(s)
    with torch.no_grad():  # every parameter random, norms and biases too
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.ndim > 1
                    else 1.0 + 0.5 * torch.randn_like(p))
    return model.train()


def style_inputs(s: StyleSpec, batch: int, seq: int, seed: int,
                 loss: bool = True) -> tuple[tuple, dict]:
    """(args, kwargs) the way each codebase is called; ``loss``: with the targets / labels
    that make the model return its loss too (not on a dp-split batch, whose shards' losses
    are means over other rows than the whole batch's)."""
    g = torch.Generator().manual_seed(seed + 1)
    if s.style == "torch_layer":
        return (torch.randn(batch, seq, s.dim, generator=g),), {}
    ids = torch.randint(3, s.vocab, (batch, seq + 1), generator=g)
    if s.style == "reference":
        return (ids[:, :-1].contiguous(),), {}
    if s.style == "nanogpt":
        return (ids[:, :-1].contiguous(),), {"targets": ids[:, 1:].contiguous()} if loss else {}
    x = ids[:, :-1].contiguous()
    kwargs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    return (), {**kwargs, "labels": x} if loss else kwargs
