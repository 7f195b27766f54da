"""The embedding engine: normalise each channel, run the encoder on one-channel planes, concatenate.

Each image is embedded at its own size (grouped with same-size images into batches): nothing is
padded to a batch-mate's size, so an image's vector never depends on what else is in the batch or
chunk. Images smaller than the encoder's minimum are zero-padded (centred) up to it; encoders with
a fixed input size (ImageNet CNNs) resize internally.
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MicrosnoopError
from ..models import ChannelEncoder, create_model
from .normalize import normalize_percentile

log = logging.getLogger("microsnoop")

PADDING = "images smaller than the model's minimum size are zero-padded (centred); no resizing"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU, and logs the choice."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
        log.info("device: %s (auto)", dev)
        return dev
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MicrosnoopError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MicrosnoopError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    raise MicrosnoopError(f"unknown precision '{precision}' (fp32, bf16, fp16 or auto)")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def check_finite(arr: np.ndarray, name: Callable[[int], str], offset: int = 0) -> None:
    """NaN/inf pixels would silently poison every feature of the image: refuse them."""
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MicrosnoopError(f"image contains NaN or inf pixels ({int(bad.sum())} such images in this chunk)",
                              name(offset + i))


def pad_to_min(planes: np.ndarray, min_size: int) -> np.ndarray:
    h, w = planes.shape[-2:]
    ph, pw = max(0, min_size - h), max(0, min_size - w)
    if not (ph or pw):
        return planes
    return np.pad(planes, [(0, 0)] * (planes.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)])


class Embedder:
    """An encoder bound to a device and precision; ``embed`` maps images to (N, C * dim) features."""

    def __init__(self, model: str | ChannelEncoder | None = None, device: str | torch.device = "auto",
                 precision: str = "fp32", batch_size: int = 64):
        self.device = resolve_device(device)
        self.encoder = model if isinstance(model, ChannelEncoder) else create_model(model, device=self.device)
        self.encoder = self.encoder.to(self.device).eval()
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise MicrosnoopError("--batch-size must be at least 1")

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def provenance(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "precision": self.precision, "device": str(self.device.type)}

    def encode_planes(self, planes: np.ndarray) -> np.ndarray:
        """(P, H, W) normalised float32 planes of one size -> (P, dim)."""
        planes = pad_to_min(planes, self.encoder.min_size)
        out = np.empty((len(planes), self.dim), dtype=np.float32)
        with torch.inference_mode(), autocast_for(self.device, self.precision):
            for s in range(0, len(planes), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(planes[s:s + self.batch_size]))[:, None].to(self.device)
                out[s:s + len(x)] = self.encoder(x).float().cpu().numpy()
        return out

    def embed(self, images: np.ndarray | Sequence[np.ndarray], name: Callable[[int], str] | None = None,
              offset: int = 0) -> np.ndarray:
        """(N, C, H, W) array or a list of (C, H, W) arrays (sizes may differ) -> (N, C * dim) float32."""
        name = name or (lambda i: f"image {i}")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            groups = {images.shape[2:]: (np.arange(len(images)), images)}
            n, c = images.shape[:2]
            check_finite(images, name, offset)
        else:
            images = list(images)
            n = len(images)
            if n == 0:
                return np.zeros((0, 0), np.float32)
            c = images[0].shape[0]
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, img in enumerate(images):
                if img.ndim != 3:
                    raise MicrosnoopError(f"expected a (C, H, W) image, got shape {img.shape}", name(offset + i))
                if img.shape[0] != c:
                    raise MicrosnoopError(f"has {img.shape[0]} channels but the first image has {c}", name(offset + i))
                if img.size == 0:
                    raise MicrosnoopError("empty image (no pixels)", name(offset + i))
                check_finite(img[None], lambda _: name(offset + i))
                by_shape[img.shape[1:]].append(i)
            groups = {s: (np.array(ix), np.stack([images[i] for i in ix])) for s, ix in by_shape.items()}
        out = np.empty((n, c * self.dim), dtype=np.float32)
        for _, (ix, arr) in groups.items():
            if 0 in arr.shape:
                raise MicrosnoopError(f"empty image of shape {arr.shape[1:]}", name(offset + int(ix[0])))
            planes = normalize_percentile(arr).reshape(-1, *arr.shape[2:])
            feats = self.encode_planes(planes).reshape(len(ix), c * self.dim)
            out[ix] = feats
        return out


def embed_images(images: np.ndarray | Sequence[np.ndarray], model: str | ChannelEncoder | None = None, *,
                 batch_size: int = 64, device: str = "auto", precision: str = "fp32") -> np.ndarray:
    """Embed images in memory: (N, C, H, W) or a list of (C, H, W) -> (N, C * dim) float32.

    >>> import microsnoop, numpy as np
    >>> microsnoop.embed(np.random.rand(2, 3, 64, 64), model="random-init").shape
    (2, 768)
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    return Embedder(model, device=device, precision=precision, batch_size=batch_size).embed(images)
