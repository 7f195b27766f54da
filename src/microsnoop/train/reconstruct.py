"""Masked input / reconstruction / original, side by side (the paper's Fig. 2), for any image.

Why: reconstruction is the only direct view of what a masked-pretrained U-Net has learned; a model
whose reconstructions are blurry blobs has not learned the image statistics its embedding relies on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.errors import MicrosnoopError
from ..io.atomic import atomic_path


def prepare_plane(path: str | Path, channel: int = 0, crop: int | None = 256) -> np.ndarray:
    """One channel of an image, centre-cropped to ``crop`` px and percentile-normalised (float32)."""
    from ..io.normalize import normalize_percentile
    from ..io.images import read_image

    img = read_image(path)
    if not 0 <= channel < img.shape[0]:
        raise MicrosnoopError(f"channel {channel} does not exist (image has {img.shape[0]})", path)
    plane = img[channel]
    if crop:
        h, w = plane.shape
        y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        plane = plane[y0:y0 + crop, x0:x0 + crop]
    return normalize_percentile(plane)


@torch.no_grad()
def reconstruct_planes(model: torch.nn.Module, planes: Sequence[np.ndarray], mask_ratio: float = 0.25,
                       seed: int = 0, patch: int = 16) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """For each plane: (masked input, reconstruction, MSE over the masked pixels)."""
    from .methods.mae_unet import patch_mask

    if not hasattr(model, "reconstruct"):
        raise MicrosnoopError(f"model '{getattr(model, 'name', model)}' has no decoder to reconstruct with "
                              f"(use a U-Net model such as random-init, cellpose-encoder or a trained microsnoop-unet)")
    if not 0.0 <= mask_ratio < 1.0:
        raise MicrosnoopError(f"mask ratio must be in [0, 1), not {mask_ratio}")
    rng = np.random.default_rng(seed)
    out = []
    for plane in planes:
        mask = patch_mask(*plane.shape, mask_ratio, rng, patch)
        masked = plane * mask
        y = model.reconstruct(torch.from_numpy(masked)[None, None].float())[0, 0].float().numpy()
        hidden = mask == 0
        mse = float(((y - plane)[hidden] ** 2).mean()) if hidden.any() else float("nan")
        out.append((masked, y, mse))
    return out


def reconstruct_figure(images: Sequence[str | Path], model: str, output: str | Path, mask_ratio: float = 0.25,
                       seed: int = 0, channel: int = 0, crop: int | None = 256, device: str = "cpu") -> dict:
    """Write a PNG with one row per image: masked input | reconstruction | original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..models.registry import create_model

    if not images:
        raise MicrosnoopError("give at least one image")
    enc = create_model(model, device=device)
    planes = [prepare_plane(p, channel, crop) for p in images]
    results = reconstruct_planes(enc, planes, mask_ratio, seed)
    fig, axes = plt.subplots(len(planes), 3, figsize=(9, 3 * len(planes)), squeeze=False)
    for row, (path, plane, (masked, recon, mse)) in enumerate(zip(images, planes, results)):
        for ax, im, title in zip(axes[row], (masked, recon, plane),
                                 (f"masked ({mask_ratio:.0%})", f"reconstruction (masked MSE {mse:.4f})", Path(path).name[:40])):
            ax.imshow(np.clip(im, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{enc.name}: mask ratio {mask_ratio}", fontsize=10)
    # leave a band for the suptitle: it is placed in figure coordinates, above the top row's titles
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (3 * len(planes))))
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format=output.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
    return {"output": str(output), "masked_mse": [r[2] for r in results]}
