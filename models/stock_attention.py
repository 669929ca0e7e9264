"""Language models built from PyTorch's own attention modules, as people write them.

``MHALM``: pre-norm blocks around ``nn.MultiheadAttention`` (one packed
``in_proj_weight``; batch first or sequence first), the causal mask made from the
length in ``forward``, ``need_weights=False``. ``EncoderLM``: ``nn.TransformerEncoder``
over ``nn.TransformerEncoderLayer`` (pre- or post-norm), the way the PyTorch
language-model tutorial builds one. Neither knows anything of parallelism.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MHABlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, batch_first: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MHALM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, n_heads: int = 4, n_layers: int = 2,
                 batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(MHABlock(dim, n_heads, batch_first) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), diagonal=1)
        x = self.tok(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (T, B, dim): nn.MultiheadAttention's default layout
        for block in self.blocks:
            x = block(x, mask)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(self.ln_f(x))


class EncoderLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, n_heads: int = 4, n_layers: int = 2,
                 norm_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, n_heads, 4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.lm_head(self.encoder(self.embed(ids), mask=mask, is_causal=True))
