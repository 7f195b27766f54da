"""Inference-only rewrite of the Microsnoop U-Net encoder: batch-norms folded into convolutions.

Why: in eval mode a BatchNorm is a per-channel affine map, i.e. a full extra pass over every
activation (10% of the encoder's time in the profile). Where the algebra is exact it is folded:

* ``proj`` = BN -> 1x1 conv: the BN folds into the conv's *input* side (no padding, so exact);
* ``conv_1``'s and ``conv_3``'s BN read only the output of ``conv_0``/``conv_2``: they fold into
  those convs' *output* side;
* ``conv_0``'s and ``conv_2``'s BN read a tensor that is also used unnormalised (the residual),
  so they stay.

For the first block (1 input channel) the 1x1 projection is an outer product; it is added in place
(``addcmul_``) instead of running a convolution, and its bias is merged into ``conv_1``'s.
fp32 results match the unfused encoder to ~1e-7; the module is also what runs in bf16.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.heads import pool_levels


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - bn.running_mean * a


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    new.weight.data.copy_(weight)
    new.bias.data.copy_(bias)
    return new


def _fold_output_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    a, b = _bn_affine(bn)
    return _conv_like(conv, conv.weight * a[:, None, None, None], conv.bias * a + b)


class FusedResDown(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        c = block.conv
        bn, conv = block.proj[0], block.proj[1]
        a, b = _bn_affine(bn)
        w = conv.weight * a[None, :, None, None]
        pbias = conv.bias + conv.weight[:, :, 0, 0] @ b
        self.one_channel = conv.in_channels == 1
        c1 = copy.deepcopy(c.conv_1[2])
        if self.one_channel:  # outer product, added in place; bias merged into conv_1's
            self.register_buffer("proj_w", w.reshape(1, -1, 1, 1).clone())
            c1.bias.data += pbias
            self.proj = None
        else:
            self.proj = _conv_like(conv, w, pbias)
        self.bn0 = copy.deepcopy(c.conv_0[0])
        self.c0 = _fold_output_bn(c.conv_0[2], c.conv_1[0])
        self.c1 = c1
        self.bn2 = copy.deepcopy(c.conv_2[0])
        self.c2 = _fold_output_bn(c.conv_2[2], c.conv_3[0])
        self.c3 = copy.deepcopy(c.conv_3[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.relu(self.c0(F.relu(self.bn0(x)))))
        if self.proj is None:
            x = h.addcmul_(x, self.proj_w)
        else:
            x = h.add_(self.proj(x))
        return x.add_(self.c3(F.relu(self.c2(F.relu(self.bn2(x))))))


class FusedUNetEncoder(nn.Module):
    """(B, 1, H, W) -> (B, dim) float32: the same function as ``UNetEncoder.forward`` (any head)."""

    def __init__(self, encoder: nn.Module, levels: tuple[int, ...] | None = None, pool: str = "mean",
                 post: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(FusedResDown(b) for b in encoder.down)
        self.levels = tuple(levels) if levels is not None else (len(self.blocks) - 1,)
        self.pool = pool
        self.post = post  # e.g. a distilled model's projections (kept in fp32)
        self.depth = max(self.levels) + 1  # deeper blocks than the last pooled level need not run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, block in enumerate(self.blocks[:self.depth]):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        v = pool_levels(feats, self.levels, self.pool)
        return self.post(v) if self.post is not None else v


class _PostPool(nn.Module):
    """A distilled encoder's projections in fp32, outside the bf16 body (tiny, precision-sensitive)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.proj = copy.deepcopy(encoder.proj).float()  # only the projections, not the whole encoder
        self.order = list(encoder.teachers)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v.float()
        return torch.cat([self.proj[n](v) for n in self.order], dim=1)


def fast_module(encoder: nn.Module, device: torch.device, precision: str) -> tuple[nn.Module, bool]:
    """The module the engine runs, and whether it still needs autocast.

    The U-Net gets the folded rewrite with weights cast to bf16 when asked (casting once is faster
    than autocast re-casting weights every call); any other encoder runs as is, channels-last,
    under autocast for bf16/fp16."""
    from ..models.microsnoop_unet import UNetEncoder

    if isinstance(encoder, UNetEncoder) and type(encoder).forward is UNetEncoder.forward:
        with torch.no_grad():
            mod = FusedUNetEncoder(encoder.backbone, encoder.config["levels"], encoder.config["pool"]).eval().to(device)
        mod = mod.to(memory_format=torch.channels_last)
        if precision == "bf16":
            mod, cast = mod.to(torch.bfloat16), False
        elif precision == "fp16" and device.type == "cuda":
            mod, cast = mod.to(torch.float16), False
        else:
            cast = precision != "fp32"
        if type(encoder).post_pool is not UNetEncoder.post_pool:
            mod.post = _PostPool(encoder).eval().to(device)
        return mod, cast
    try:
        encoder = encoder.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError):
        pass
    return encoder, precision != "fp32"
