"""A small one-channel Vision Transformer (ViT) and its per-channel encoder (arch ``vit``).

Used by the ``dino-vit`` pretext (uniDINO-style self-distillation on single channels). The embedding
is the final-norm CLS token. Any input size works: the image is zero-padded (centred, as the engine
pads small images) to a multiple of the patch size and the learned position embeddings are
bicubically interpolated to the patch grid, as DINO does for other resolutions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ChannelEncoder, register_architecture

VIT_DEFAULTS: dict[str, Any] = {"patch": 8, "dim": 192, "depth": 4, "heads": 3, "mlp_ratio": 4.0, "grid": 6}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP, both residual)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """(B, 1, H, W) with H, W multiples of ``patch`` -> (B, dim) CLS token (after the final LayerNorm)."""

    def __init__(self, patch: int = 8, dim: int = 192, depth: int = 4, heads: int = 3, mlp_ratio: float = 4.0,
                 grid: int = 6):
        super().__init__()
        if dim % heads:
            raise ValueError("dim must be a multiple of heads")
        self.patch, self.dim, self.grid = patch, dim, grid
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def position(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings for a ``gh`` x ``gw`` patch grid (bicubic interpolation of the learned grid)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(grid.dtype)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, self.dim)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens (B, 1 + n_patches, dim) after the final norm."""
        x = self.patch_embed(x)
        b, d, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.position(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Zero-pad (centred) H and W up to multiples of ``m`` (same convention as the engine's min-size pad)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if not (ph or pw):
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class ViTEncoder(ChannelEncoder):
    """Per-channel ViT encoder: CLS token of the (teacher) ViT, one vector per one-channel plane."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        cfg = {**VIT_DEFAULTS, **(config or {})}
        keys = ("patch", "dim", "depth", "heads", "mlp_ratio", "grid")
        self.vit = ViT(**{k: cfg[k] for k in keys})
        self.config = {**cfg, "arch": "vit"}
        self.dim = int(cfg["dim"])
        self.min_size = 2 * int(cfg["patch"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x.contiguous(), self.vit.patch)
        return self.vit(x).float()

    def load_weights(self, state: dict[str, torch.Tensor], source: object = None) -> None:
        self.load_prefixed(state, "vit.", "ViT", source)


register_architecture("vit", ViTEncoder)

__all__ = ["ViT", "ViTEncoder", "VIT_DEFAULTS", "pad_to_multiple"]
