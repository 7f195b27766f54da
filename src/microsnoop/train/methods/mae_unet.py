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
from ..data import ImagePool, StepBatches


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


class MaeUNet(PretextMethod):
    name = "mae-unet"
    # encoder_* keys matter when fine-tuning (--init): a fresh decoder/head first sends large, noisy
    # gradients into the pretrained encoder; a smaller encoder LR, a few frozen steps and the
    # pretrained BatchNorm statistics (eval-mode BN in the encoder) keep what it already knows.
    defaults = {"mask_ratio": 0.25, "patch": 16, "widths": [32, 64, 128, 256], "encoder_lr_scale": 1.0,
                "encoder_frozen_steps": 0, "freeze_encoder_bn": False}

    def build(self, config: dict[str, Any]) -> nn.Module:
        # the bare U-Net: forward() reconstructs, which is what DDP / the loop call
        return MicrosnoopUNet(1, 1, tuple(config.get("widths", self.defaults["widths"])))

    def make_dataset(self, pool: ImagePool, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> StepBatches:
        ratio, patch = float(config["mask_ratio"]), int(config["patch"])
        return StepBatches(pool, int(config["batch_size"]), int(config["input_size"]), int(config["seed"]),
                           tuple(config.get("scale_range", (0.75, 1.5))),
                           extra=lambda imgs, rng: {"mask": apply_mask(imgs, ratio, rng, patch)}, shard=shard)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, mask = batch["image"], batch["mask"]
        y = model(x * mask).float()
        loss = F.mse_loss(y, x)
        with torch.no_grad():
            hidden = 1 - mask
            masked_mse = ((y - x) ** 2 * hidden).sum() / hidden.sum().clamp(min=1)
        return loss, {"masked_mse": float(masked_mse)}

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
