"""Paired cell inpainting network (Lu et al. 2019) and its per-channel encoder (arch ``paired-inpainting``).

``SourceEncoder`` is a plain 5-block convolutional encoder (conv1..conv5, pooling after blocks 1-3)
that takes **one channel**. In the pretext it is applied with shared weights to the source cell's
protein and structural channels (their features are concatenated in that order, so the decoder
knows which is which); that is what makes it usable channel by channel afterwards, for any
channel type. The embedding is one of its layers (``layer``, 1-5; the paper read features from
intermediate conv layers), pooled over space (``pool``: ``max`` as the paper, or ``mean``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import MicrosnoopError
from .registry import ChannelEncoder, register_architecture

PCI_DEFAULTS: dict[str, Any] = {"widths": [32, 64, 128, 128, 128], "layer": 4, "pool": "max"}


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class SourceEncoder(nn.Module):
    """(B, 1, H, W) -> feature maps of conv1..conv5 (2x2 max-pool after conv1, conv2, conv3)."""

    POOL_AFTER = (0, 1, 2)

    def __init__(self, widths: list[int] | tuple[int, ...]):
        super().__init__()
        chans = [1, *widths]
        self.blocks = nn.ModuleList(conv_block(chans[i], chans[i + 1]) for i in range(len(widths)))

    def features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        out = []
        for i, blk in enumerate(self.blocks[:upto]):
            if i and (i - 1) in self.POOL_AFTER:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = blk(x)
            out.append(x)
        return out


class PairedInpaintingNet(nn.Module):
    """Source cell (protein, structure) + target cell structure -> target cell protein."""

    def __init__(self, widths: list[int] | tuple[int, ...] = (32, 64, 128, 128, 128), skips: bool = True):
        super().__init__()
        widths = list(widths)
        self.skips = skips
        self.source = SourceEncoder(widths)
        self.target = SourceEncoder(widths[:4])  # target structure encoder (with ``skips``: the decoder's skip maps)
        w1, w2, w3, w4, w5 = widths
        self.fuse = conv_block(2 * w5 + w4, w4)  # source protein + source structure + target structure (1/8)
        extra = (w3, w2, w1) if skips else (0, 0, 0)
        self.up3 = conv_block(w4 + extra[0], w3)
        self.up2 = conv_block(w3 + extra[1], w2)
        self.up1 = conv_block(w2 + extra[2], w1)
        self.head = nn.Conv2d(w1, 1, 1)

    def forward(self, src_protein: torch.Tensor, src_structure: torch.Tensor, tgt_structure: torch.Tensor) -> torch.Tensor:
        p = self.source.features(src_protein)[-1]
        s = self.source.features(src_structure)[-1]
        t1, t2, t3, t4 = self.target.features(tgt_structure)
        x = self.fuse(torch.cat([p, s, t4], 1))
        for skip, blk in ((t3, self.up3), (t2, self.up2), (t1, self.up1)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = blk(torch.cat([x, skip], 1) if self.skips else x)
        return self.head(x)


class PairedInpaintingEncoder(ChannelEncoder):
    """Per-channel embedding: the shared source encoder's ``layer`` map, max- (or mean-) pooled."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        cfg = {**PCI_DEFAULTS, **(config or {})}
        widths = list(cfg["widths"])
        layer = int(cfg["layer"])
        if not 1 <= layer <= len(widths):
            raise MicrosnoopError(f"paired-inpainting layer must be 1..{len(widths)}, not {layer}")
        if cfg["pool"] not in ("max", "mean"):
            raise MicrosnoopError(f"paired-inpainting pool must be 'max' or 'mean', not {cfg['pool']!r}")
        self.source = SourceEncoder(widths)
        self.config = {**cfg, "arch": "paired-inpainting"}
        self.layer, self.dim = layer, widths[layer - 1]
        self.min_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.source.features(x.contiguous(), upto=self.layer)[-1].float()
        return f.amax(dim=(2, 3)) if self.config["pool"] == "max" else f.mean(dim=(2, 3))

    def load_weights(self, state: dict[str, torch.Tensor], source: object = None) -> None:
        self.load_prefixed(state, "source.", "paired-inpainting encoder", source)


register_architecture("paired-inpainting", PairedInpaintingEncoder)
