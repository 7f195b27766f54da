"""cytoself-style VQ-VAE with split vector quantisation, and its per-channel encoder (arch ``cytoself``).

Two encoder stages: ``enc1`` maps a one-channel image to a *local* map (1/4 resolution), ``enc2``
maps that to a *global* map (1/16). Each map is vector-quantised with **split quantisation**: its
``C`` channels are cut into ``split`` sub-vectors of ``C / split`` that are quantised independently
against one shared codebook (cytoself's ``channel_split``), so a codebook of ``K`` entries gives
``K ** split`` combinations per position. Gradients pass the quantiser straight through; the
codebook is learned by exponential moving averages (default) or by the VQ-VAE codebook loss, and
``beta`` x the commitment term keeps the encoder close to its codes.

The per-channel embedding is the spatial mean of the quantised global map, concatenated with the
mean of the quantised local map (``embedding = "global+local"``, default) or the global one alone:
pooling keeps one fixed-size vector per channel for any input size.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import MicrosnoopError
from .registry import ChannelEncoder, register_architecture

VQVAE_DEFAULTS: dict[str, Any] = {"width": 32, "local_dim": 64, "global_dim": 64, "local_codes": 256,
                                  "global_codes": 256, "split": 4, "beta": 0.25, "ema": True,
                                  "embedding": "global+local"}


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)  # batch-independent: training and embedding statistics agree


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def down(cin: int, cout: int) -> nn.Sequential:
    """Stride-2 conv + residual block: halves the resolution."""
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1), ResBlock(cout))


def up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), ResBlock(cout))


class SplitQuantizer(nn.Module):
    """Split vector quantisation: (B, C, H, W) -> nearest codebook entry per (position, sub-vector).

    Codebook: ``ema=True`` (default) learns it as exponential moving averages of the vectors
    assigned to each code (VQ-VAE-2 / cytoself's EMA option), initialised from the first training
    batch and restarting codes whose usage falls below ``dead_threshold`` at random batch vectors;
    without it, the codebook term ||sg(z) - e||^2 of the VQ-VAE loss trains it. Why EMA by default:
    in short CPU runs a loss-trained codebook lags the encoder (codes start near 0, Adam moves them
    by ~lr per step) and the commitment loss then grows instead of falling.
    Distances are computed in fp32 even under autocast (bf16 argmins pick wrong codes).
    """

    def __init__(self, channels: int, codes: int, split: int, beta: float, ema: bool = True,
                 decay: float = 0.99, dead_threshold: float = 0.01):
        super().__init__()
        if channels % split:
            raise ValueError("channels must be a multiple of split")
        self.split, self.sub, self.beta = split, channels // split, beta
        self.ema, self.decay, self.dead_threshold = ema, decay, dead_threshold
        self.codebook = nn.Embedding(codes, self.sub)
        nn.init.uniform_(self.codebook.weight, -1.0 / codes, 1.0 / codes)
        if ema:
            self.codebook.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(codes))
            self.register_buffer("ema_sum", self.codebook.weight.detach().clone())
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return z.float().reshape(b, self.split, self.sub, h, w).permute(0, 1, 3, 4, 2).reshape(-1, self.sub)

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        e = self.codebook.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, split, H, W) code indices (squared Euclidean nearest neighbour)."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            return self._nearest(self._flat(z)).reshape(b, self.split, h, w)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        b, s, h, w = idx.shape
        q = self.codebook.weight.float()[idx]  # (B, split, H, W, sub)
        return q.permute(0, 1, 4, 2, 3).reshape(b, s * self.sub, h, w)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        codes = self.codebook.num_embeddings
        if not bool(self.initialised):
            pick = torch.randint(0, len(flat), (codes,), device=flat.device)
            self.codebook.weight.copy_(flat[pick])
            self.ema_sum.copy_(flat[pick])
            self.ema_count.fill_(1.0)
            self.initialised.fill_(True)
            idx = self._nearest(flat)
        counts = torch.bincount(idx, minlength=codes).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + codes * 1e-5) * n
        self.codebook.weight.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_threshold
        if dead.any():  # restart unused codes at random vectors of this batch
            pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)
            self.codebook.weight[dead] = flat[pick]
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 1.0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (quantised with straight-through gradient, VQ loss, perplexity, indices)."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = self._flat(z)
            idx = self._nearest(flat)
            if self.training and self.ema:
                self._ema_update(flat.detach(), idx)
                idx = self._nearest(flat)
            idx = idx.reshape(b, self.split, h, w)
            q = self.lookup(idx)
            loss = self.beta * F.mse_loss(z, q.detach())
            if not self.ema:
                loss = loss + F.mse_loss(q, z.detach())
            counts = torch.bincount(idx.reshape(-1), minlength=self.codebook.num_embeddings).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return z + (q - z).detach(), loss, perplexity, idx


class CytoselfVQVAE(nn.Module):
    """Encoders, split quantisers and decoders (no classifier: that is the pretext's head)."""

    def __init__(self, width: int = 32, local_dim: int = 64, global_dim: int = 64, local_codes: int = 256,
                 global_codes: int = 256, split: int = 4, beta: float = 0.25, ema: bool = True, **_: Any):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), down(w, w), down(w, 2 * w),
                                  nn.Conv2d(2 * w, local_dim, 1))  # 1/4 resolution
        self.enc2 = nn.Sequential(down(local_dim, 2 * w), down(2 * w, 4 * w), nn.Conv2d(4 * w, global_dim, 1))  # 1/16
        self.vq1 = SplitQuantizer(local_dim, local_codes, split, beta, ema)
        self.vq2 = SplitQuantizer(global_dim, global_codes, split, beta, ema)
        # decoder2: global -> the local (encoder1) map; decoder1: [upsampled global, local] -> image
        self.dec2 = nn.Sequential(up(global_dim, 4 * w), up(4 * w, 2 * w), nn.Conv2d(2 * w, local_dim, 1))
        self.dec1 = nn.Sequential(nn.Conv2d(global_dim + local_dim, 2 * w, 3, padding=1), up(2 * w, 2 * w),
                                  up(2 * w, w), nn.Conv2d(w, 1, 1))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z1 = self.enc1(x)
        q1, vq1, ppl1, idx1 = self.vq1(z1)
        z2 = self.enc2(z1)
        q2, vq2, ppl2, idx2 = self.vq2(z2)
        return {"z1": z1, "q1": q1, "z2": z2, "q2": q2, "vq1": vq1, "vq2": vq2, "ppl1": ppl1, "ppl2": ppl2,
                "idx1": idx1, "idx2": idx2}

    def decode(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q1, q2 = enc["q1"], enc["q2"]
        up2 = F.interpolate(q2, size=q1.shape[-2:], mode="nearest")
        recon = self.dec1(torch.cat([up2, q1], 1))
        local_from_global = self.dec2(q2)
        return recon, local_from_global


class CytoselfEncoder(ChannelEncoder):
    """Per-channel embedding: mean-pooled quantised global map (+ mean-pooled quantised local map)."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        cfg = {**VQVAE_DEFAULTS, **(config or {})}
        if cfg["embedding"] not in ("global", "global+local"):
            raise MicrosnoopError(f"cytoself embedding must be 'global' or 'global+local', not {cfg['embedding']!r}")
        self.net = CytoselfVQVAE(**cfg)
        self.config = {**cfg, "arch": "cytoself"}
        self.dim = int(cfg["global_dim"]) + (int(cfg["local_dim"]) if cfg["embedding"] == "global+local" else 0)
        self.min_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        z1 = self.net.enc1(x)
        q2 = self.net.vq2.lookup(self.net.vq2.indices(self.net.enc2(z1)))
        parts = [q2.mean(dim=(2, 3))]
        if self.config["embedding"] == "global+local":
            parts.append(self.net.vq1.lookup(self.net.vq1.indices(z1)).mean(dim=(2, 3)))
        return torch.cat(parts, 1).float()

    def load_weights(self, state: dict[str, torch.Tensor], source: object = None) -> None:
        self.load_prefixed(state, "net.", "cytoself VQ-VAE", source)


register_architecture("cytoself", CytoselfEncoder)
