"""The Cellpose-style residual U-Net that Microsnoop trains by masked reconstruction.

Module names mirror Cellpose's ``extractor.downsample`` so the generalist Cellpose weights
load into the encoder by stripping that prefix (see ``models/cellpose.py``).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

DEFAULT_WIDTHS = (32, 64, 128, 256)


def batchconv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """BN -> ReLU -> conv (pre-activation), indices 0/1/2 as in Cellpose."""
    return nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, k, padding=k // 2))


def batchconv0(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    """BN -> conv without activation: the residual projection."""
    return nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5), nn.Conv2d(cin, cout, k, padding=k // 2))


class ResDown(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = batchconv0(cin, cout, 1)
        self.conv = nn.Module()
        for i in range(4):
            self.conv.add_module(f"conv_{i}", batchconv(cin if i == 0 else cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        x = self.proj(x) + c.conv_1(c.conv_0(x))
        return x + c.conv_3(c.conv_2(x))


class Encoder(nn.Module):
    """Four residual levels with 2x max-pool between them."""

    def __init__(self, in_channels: int = 1, widths=DEFAULT_WIDTHS):
        super().__init__()
        chans = (in_channels, *widths)
        self.down = nn.Sequential()
        for i in range(len(widths)):
            self.down.add_module(f"res_down_{i}", ResDown(chans[i], chans[i + 1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats


class StyleConv(nn.Module):
    """Conv block whose input gets the style vector added, per channel."""

    def __init__(self, cin: int, cout: int, style_dim: int):
        super().__init__()
        self.conv = batchconv(cin, cout)
        self.full = nn.Linear(style_dim, cin)  # Cellpose's name for the style projection

    def forward(self, style: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + self.full(style)[:, :, None, None])


class ResUp(nn.Module):
    def __init__(self, cin: int, cout: int, style_dim: int):
        super().__init__()
        self.proj = batchconv0(cin, cout, 1)
        self.conv = nn.Module()
        self.conv.conv_0 = batchconv(cin, cout)
        for i in (1, 2, 3):
            self.conv.add_module(f"conv_{i}", StyleConv(cout, cout, style_dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        c = self.conv
        x = self.proj(x) + c.conv_1(style, c.conv_0(x) + skip)
        return x + c.conv_3(style, c.conv_2(style, x))


class Decoder(nn.Module):
    """Mirror of the encoder: nearest 2x upsampling, skip connections, style at every stage."""

    def __init__(self, widths=DEFAULT_WIDTHS):
        super().__init__()
        w = list(widths)
        self.up = nn.Module()
        # res_up_{i} maps level i+1 -> level i; the deepest one (last) keeps its width (Cellpose's order)
        for i in range(len(w)):
            cin = w[min(i + 1, len(w) - 1)]
            self.up.add_module(f"res_up_{i}", ResUp(cin, w[i], w[-1]))
        self.n = len(w)

    def forward(self, feats: list[torch.Tensor], style: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self.up, f"res_up_{i}") for i in range(self.n)]
        x = blocks[-1](feats[-1], feats[-1], style)
        for i in range(self.n - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = blocks[i](x, feats[i], style)
        return x


class MicrosnoopUNet(nn.Module):
    """Residual U-Net; ``embed`` runs the encoder only and average-pools the deepest map."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, widths=DEFAULT_WIDTHS):
        super().__init__()
        self.config = {"arch": "unet", "in_channels": in_channels, "out_channels": out_channels,
                       "widths": list(widths)}
        self.encoder = Encoder(in_channels, widths)
        self.decoder = Decoder(widths)
        self.output = batchconv(widths[0], out_channels, 1)
        self.dim = widths[-1]
        self.min_size = 2 ** len(widths)

    @staticmethod
    def make_style(deepest: torch.Tensor) -> torch.Tensor:
        style = deepest.mean(dim=(2, 3))
        return style / (style.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.min_size // 2  # three pools: sizes must divide by 8 for the skips to line up
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.encoder(x)
        y = self.output(self.decoder(feats, self.make_style(feats[-1])))
        return y[..., :h, :w]
