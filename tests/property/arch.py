"""Random architectures as data: a pydantic ``Spec`` that builds a plain PyTorch model.

The spec is what hypothesis generates and shrinks, and what a failing example prints, so
a bug report is one paste: ``build(Spec.model_validate_json(...), seed=...)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

Act = Literal["relu", "gelu", "gelu_tanh", "silu", "tanh"]
Norm = Literal["layer", "rms", "hand_rms"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttnSpec(_Spec):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    bias: bool = False
    kind: Literal["sdpa", "explicit"] = "sdpa"
    kv_repeat: Literal["expand", "interleave"] = "expand"
    # q, k, v split into heads by sizes (v: ``view(b, s, -1, head_dim)``), or all three
    # by ``view(b, s, heads, -1)``
    head_view: Literal["sizes", "infer_head_dim"] = "sizes"


class MlpSpec(_Spec):
    hidden: int
    gated: bool = False
    act: Act = "relu"
    bias_in: bool = False
    bias_out: bool = False


class BlockSpec(_Spec):
    norm: Norm = "layer"
    attn: AttnSpec | None = None
    mlp: MlpSpec | None = None
    # pre-norm (Llama), post-norm (the 2017 Transformer, BERT), or parallel: attention
    # and MLP both read one norm of the block's input (GPT-J, Falcon)
    layout: Literal["pre", "post", "parallel"] = "pre"


class Spec(_Spec):
    dim: int
    n_layers: int = 1
    block: BlockSpec
    vocab: int | None = None  # token ids in, an embedding and a head; else [b, s, dim] in
    final_norm: Norm | None = None
    head_bias: bool = False

    def widths(self) -> list[tuple[str, int]]:
        """(what, size) for every size that tensor parallelism must divide."""
        out: list[tuple[str, int]] = []
        if self.block.attn:
            out += [("n_heads", self.block.attn.n_heads), ("n_kv_heads", self.block.attn.n_kv_heads)]
        if self.block.mlp:
            out.append(("hidden", self.block.mlp.hidden))
        if self.vocab:
            out.append(("vocab", self.vocab))
        return out

    def divisible(self, tp: int) -> bool:
        return all(fits(what, size, tp) for what, size in self.widths())


def fits(what: str, size: int, tp: int) -> bool:
    """Whether tensor parallelism over ``tp`` ranks can split ``size``: kv heads fewer
    than tp are also fine when they divide it (each shared by tp / size ranks)."""
    return size % tp == 0 or (what == "n_kv_heads" and tp % size == 0)


def activation(name: Act, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[name](x)


class HandRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: Norm, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    return nn.RMSNorm(dim, eps=1e-6) if kind == "rms" else HandRMSNorm(dim)


class Attention(nn.Module):
    def __init__(self, dim: int, s: AttnSpec) -> None:
        super().__init__()
        self.s = s
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.wq = nn.Linear(dim, s.n_heads * s.head_dim, bias=s.bias)
        self.wk = nn.Linear(dim, s.n_kv_heads * s.head_dim, bias=s.bias)
        self.wv = nn.Linear(dim, s.n_kv_heads * s.head_dim, bias=s.bias)
        self.wo = nn.Linear(s.n_heads * s.head_dim, dim, bias=s.bias)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:  # [b, kv, s, d] -> [b, heads, s, d]
        rep = self.n_heads // self.n_kv_heads
        if rep == 1:
            return x
        if self.s.kv_repeat == "interleave":
            return x.repeat_interleave(rep, dim=1)
        b, kv, s, d = x.shape
        return x[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        if self.s.head_view == "infer_head_dim":
            q = self.wq(x).view(b, s, self.n_heads, -1).transpose(1, 2)
            k = self.wk(x).view(b, s, self.n_kv_heads, -1).transpose(1, 2)
            v = self.wv(x).view(b, s, self.n_kv_heads, -1).transpose(1, 2)
        else:
            q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k, v = self._repeat(k), self._repeat(v)
        if self.s.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            y = F.softmax(att, dim=-1) @ v
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, s: MlpSpec) -> None:
        super().__init__()
        self.act = s.act
        self.w1 = nn.Linear(dim, s.hidden, bias=s.bias_in)
        self.w3 = nn.Linear(dim, s.hidden, bias=s.bias_in) if s.gated else None
        self.w2 = nn.Linear(s.hidden, dim, bias=s.bias_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = activation(self.act, self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


class Block(nn.Module):
    def __init__(self, dim: int, s: BlockSpec) -> None:
        super().__init__()
        self.attn_norm = make_norm(s.norm, dim) if s.attn else None
        self.attn = Attention(dim, s.attn) if s.attn else None
        self.mlp_norm = make_norm(s.norm, dim) if s.mlp else None
        self.mlp = Mlp(dim, s.mlp) if s.mlp else None
        self.layout = s.layout if s.attn and s.mlp else ("post" if s.layout == "post" else "pre")
        if self.layout == "parallel":
            self.mlp_norm = None  # one norm feeds both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "parallel":
            h = self.attn_norm(x)
            return x + self.attn(h) + self.mlp(h)
        if self.layout == "post":
            if self.attn is not None:
                x = self.attn_norm(x + self.attn(x))
            if self.mlp is not None:
                x = self.mlp_norm(x + self.mlp(x))
            return x
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class Model(nn.Module):
    def __init__(self, s: Spec) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.dim) if s.vocab else None
        self.layers = nn.ModuleList(Block(s.dim, s.block) for _ in range(s.n_layers))
        self.norm = make_norm(s.final_norm, s.dim) if s.final_norm else None
        self.head = nn.Linear(s.dim, s.vocab, bias=s.head_bias) if s.vocab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers:
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h) if self.head is not None else h


def build(spec: Spec, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model, with every parameter (norm weights and biases too) drawn from ``seed``,
    so no gradient hides behind a constant weight."""
    torch.manual_seed(seed)
    model = Model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.ndim > 1
                   else 1.0 + 0.5 * torch.randn_like(p))
    return model.to(dtype)


def make_inputs(spec: Spec, batch: int, seq: int, seed: int,
                dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(seed + 1)
    if spec.vocab:
        return (torch.randint(0, spec.vocab, (batch, seq), generator=g),)
    return (torch.randn(batch, seq, spec.dim, generator=g).to(dtype),)


def repro(spec: Spec, seed: int, tp: int, sp: bool, batch: int, seq: int, on_indivisible: str,
          dp: bool = False) -> str:
    """A failing example as Python a person can paste and run."""
    return (
        "# tpcompile property-test failure: run with `python repro.py` from the repo root\n"
        "from tests.property.arch import Spec\n"
        "from tests.property.repro import main\n"
        f"spec = Spec.model_validate_json({spec.model_dump_json()!r})\n"
        f"main(spec, seed={seed}, tp={tp}, sp={sp}, batch={batch}, seq={seq}, "
        f"on_indivisible={on_indivisible!r}, dp={dp})\n"
    )
