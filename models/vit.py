"""A Vision Transformer laid out like timm's ``vision_transformer.py``.

A "model written by someone else" for the tests. It keeps timm's idioms: a Conv2d patch
embedding flattened and transposed to tokens, a class token concatenated in front (and
optional register tokens after the position embedding, as DINOv2 adds them), a learned
position embedding added, pre-norm blocks whose fused ``qkv`` Linear is cut by
``reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)``, attention
written by hand (``q * scale @ k.transpose(-2, -1)``, softmax, ``@ v``), a GELU MLP, and a
classifier reading the class token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    reg_tokens: int = 0


CONFIGS: dict[str, ViTConfig] = {
    # 16 patches and the class token: 17 tokens, which tp 2 cannot split (no SP)
    "tiny": ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2,
                      num_heads=8),
    # one register token more: 18 tokens, split by sequence parallelism at tp 2
    "tiny-reg": ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2,
                          num_heads=8, reg_tokens=1),
    "base": ViTConfig(),  # ViT-B/16
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, N, C]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, cfg.embed_dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, cfg.reg_tokens, cfg.embed_dim) * 0.02) \
            if cfg.reg_tokens else None
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        if self.reg_token is not None:
            x = torch.cat((x[:, :1], self.reg_token.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return self.norm(self.blocks(x))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(pixel_values)[:, 0])


def build(config_name: str = "tiny", **overrides: object) -> VisionTransformer:
    return VisionTransformer(replace(CONFIGS[config_name], **overrides))


def example_inputs(config_name: str = "tiny", batch: int = 2) -> dict:
    """Keyword inputs for ``VisionTransformer.forward``: random images."""
    c = CONFIGS[config_name]
    return {"pixel_values": torch.randn(batch, c.in_chans, c.img_size, c.img_size)}
