"""``mae-unet``: Microsnoop's masked self-supervised recipe (Xun et al. 2023).

A one-channel crop has a random ``mask_ratio`` of its 16x16 patches set to zero; the residual U-Net
reconstructs the whole crop and the loss is the MSE over every pixel (masked and visible), as in
the paper. After training, the encoder + global mean pool is the per-channel embedding.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.microsnoop_unet import UNetEncoder
from ...models.unet import MicrosnoopUNet
from ..base import MethodSpec, PretextMethod, load_matching, register_method
from ..data import ImagePool, StepBatches, intensity_view, normalize_crops


def patch_mask(h: int, w: int, ratio: float, rng: np.random.Generator, patch: int = 16) -> np.ndarray:
    """(h, w) float32 array: 0 on ``round(ratio * n_patches)`` random patch cells, 1 elsewhere."""
    gh, gw = -(-h // patch), -(-w // patch)
    n = gh * gw
    k = int(round(ratio * n))
    cells = np.ones(n, np.float32)
    if k:
        cells[rng.choice(n, k, replace=False)] = 0.0
    grid = cells.reshape(gh, gw)
    return np.kron(grid, np.ones((patch, patch), np.float32))[:h, :w]


def apply_mask(images: torch.Tensor, ratio: float, rng: np.random.Generator, patch: int = 16) -> torch.Tensor:
    """Per-image masks for a (B, 1, H, W) batch, as a (B, 1, H, W) tensor of 0/1."""
    b, _, h, w = images.shape
    return torch.from_numpy(np.stack([patch_mask(h, w, ratio, rng, patch) for _ in range(b)])[:, None])


def _standardise(v: torch.Tensor) -> torch.Tensor:
    """Each vector centred and scaled over its features: compares directions, not the shared offset."""
    v = v - v.mean(1, keepdim=True)
    return v / v.pow(2).mean(1, keepdim=True).add(1e-6).sqrt()


def invariance_loss(net: nn.Module, x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """MSE between the standardised all-level pooled features of ``x`` and of ``x`` turned by
    ``turn = (quarter turns, flip)``; the unturned view is the (stop-gradient) target."""
    from ...models.heads import dihedral, pool_levels

    levels = list(range(len(net.encoder.down)))
    with torch.no_grad():
        target = _standardise(pool_levels(net.encoder(x), levels, "mean"))
    turned = dihedral(x, int(turn[0]), bool(turn[1]))
    pred = _standardise(pool_levels(net.encoder(turned), levels, "mean"))
    return F.mse_loss(pred, target)


class MaeUNet(PretextMethod):
    name = "mae-unet"
    # encoder_* keys matter when fine-tuning (--init): a fresh decoder/head first sends large, noisy
    # gradients into the pretrained encoder; a smaller encoder LR, a few frozen steps and the
    # pretrained BatchNorm statistics (eval-mode BN in the encoder) keep what it already knows.
    # gamma / noise: intensity augmentation of the crop (reconstruction target included);
    # invariance_weight > 0 adds a second, differently rotated/flipped unmasked view whose pooled
    # all-level features must match the first view's (stop-gradient on the target view): rotation
    # invariance trained in, while reconstruction keeps the features from collapsing
    defaults = {"mask_ratio": 0.25, "patch": 16, "widths": [32, 64, 128, 256], "encoder_lr_scale": 1.0,
                "encoder_frozen_steps": 0, "freeze_encoder_bn": False, "gamma": None, "noise": 0.0,
                "invariance_weight": 0.0}

    def build(self, config: dict[str, Any]) -> nn.Module:
        # the bare U-Net: forward() reconstructs, which is what DDP / the loop call
        return MicrosnoopUNet(1, 1, tuple(config.get("widths", self.defaults["widths"])))

    def make_dataset(self, pool: ImagePool, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> StepBatches:
        ratio, patch = float(config["mask_ratio"]), int(config["patch"])
        gamma, noise = config.get("gamma"), float(config.get("noise") or 0.0)
        self._invariance = float(config.get("invariance_weight") or 0.0)

        def extra(imgs: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
            out = {}
            if gamma or noise:
                imgs = torch.from_numpy(intensity_view(normalize_crops(imgs.numpy()), rng, tuple(gamma or (1.0, 1.0)), noise))
                out["image"] = imgs
            out["mask"] = apply_mask(imgs, ratio, rng, patch)
            if self._invariance:
                out["turn"] = torch.tensor([int(rng.integers(1, 4)), int(rng.random() < 0.5)])
            return out

        return StepBatches(pool, int(config["batch_size"]), int(config["input_size"]), int(config["seed"]),
                           tuple(config.get("scale_range", (0.75, 1.5))), extra=extra, shard=shard)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, mask = batch["image"], batch["mask"]
        y = model(x * mask).float()
        loss = F.mse_loss(y, x)
        logs = {}
        with torch.no_grad():
            hidden = 1 - mask
            logs["masked_mse"] = float(((y - x) ** 2 * hidden).sum() / hidden.sum().clamp(min=1))
        if getattr(self, "_invariance", 0.0) and "turn" in batch:
            inv = invariance_loss(model.module if hasattr(model, "module") else model, x, batch["turn"])
            logs["invariance"] = float(inv.detach())
            loss = loss + self._invariance * inv
        return loss, logs

    def initialize(self, model: nn.Module, encoder: nn.Module) -> dict[str, int]:
        """Start from another U-Net's weights (e.g. ``cellpose-encoder``): every tensor whose name and
        shape match is copied (encoder + decoder); the output head keeps its fresh initialisation
        when the source has none that fits."""
        state = {k[4:] if k.startswith("net.") else k: v for k, v in encoder.state_dict().items()}
        return load_matching(model, state)

    def param_groups(self, model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
        enc = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
        return [{"params": enc, "lr_scale": float(config.get("encoder_lr_scale", 1.0)),
                 "frozen_steps": int(config.get("encoder_frozen_steps", 0))}, {"params": rest}]

    def prepare_train(self, model: nn.Module, config: dict[str, Any]) -> None:
        if config.get("freeze_encoder_bn"):
            for mod in model.encoder.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.eval()

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> UNetEncoder:
        enc = UNetEncoder({"widths": list(model.config["widths"])})
        enc.load_weights({k: v.detach().clone() for k, v in model.state_dict().items()})
        return enc.eval()


register_method(MethodSpec(
    name="mae-unet", factory=MaeUNet,
    description="Masked reconstruction with the residual U-Net: 16x16 patches zeroed at mask_ratio (0.25), MSE over the whole image",
))
