"""The embedding engine: normalise each channel, run the encoder on one-channel planes, concatenate.

Each image is embedded at its own size (grouped with same-size images into batches): nothing is
padded to a batch-mate's size, so an image's vector never depends on what else is in the batch or
chunk. Images smaller than the encoder's minimum are zero-padded (centred) up to it; encoders with
a fixed input size (ImageNet CNNs) resize internally.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.device import autocast, resolve_device, resolve_precision
from ..core.errors import MicrosnoopError, MicrosnoopWarning
from ..io.images import MAX_ABS_PIXEL, MIN_SIDE
from ..models import ChannelEncoder, create_model
from ..models.registry import apply_head
from ..models.heads import TTAModule, rescale, scaled_size
from . import defaults
from .backends import check_engine, engine_module
from .fused import FusedUNetEncoder, fast_module
from ..io.normalize import normalize_percentile

log = logging.getLogger("microsnoop")

BATCH_PIXELS = 256 * 64 * 64  # automatic batch: ~1M pixels per forward (~130 MB per bf16 activation)
MAX_AUTO_BATCH = 512
# OpenVINO runs fastest on small batches (activations stay in cache): ~128k pixels per forward measured
# 70-85 % of the bf16 matmul peak at 64-224 px against 60-65 % at BATCH_PIXELS (benchmarks/throughput.py)
ENGINE_BATCH_PIXELS = 2 ** 17
PADDING = "images smaller than the model's minimum size are zero-padded (centred); no resizing"


# architectures whose bf16 embeddings stay within cosine 0.999 of fp32 on real images
# (tests/test_speed.py checks random-init, cellpose-encoder and the default model on real cells and fields)
BF16_VALIDATED_ARCHS = {"unet", "distill-unet"}


def bf16_validated(encoder: ChannelEncoder | None) -> bool:
    """Whether ``auto`` may pick bf16 for this encoder (its architecture was checked against fp32)."""
    arch = (getattr(encoder, "config", None) or {}).get("arch") if encoder is not None else "unet"
    return arch in BF16_VALIDATED_ARCHS



def default_threads() -> int:
    """CPUs this process may use, shared between the ranks torchrun starts on this node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, local))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to the CPUs we may use (oversubscribing a 2-core laptop, or
    N torchrun ranks each taking every core, costs more than it gains)."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise MicrosnoopError("--threads must be at least 1")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def check_finite(arr: np.ndarray, name: Callable[[int], str], offset: int = 0) -> None:
    """NaN/inf pixels, or float pixels so large that the encoder overflows (an all-NaN vector), would
    silently poison every feature of the image: refuse them."""
    if arr.dtype.kind != "f":
        return
    flat = arr.reshape(len(arr), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MicrosnoopError(f"image contains NaN or inf pixels ({int(bad.sum())} such images in this chunk)",
                              name(offset + i))
    big = (np.abs(flat) > MAX_ABS_PIXEL).any(axis=1)
    if big.any():
        i = int(np.flatnonzero(big)[0])
        raise MicrosnoopError(f"image has float pixel values beyond +-{MAX_ABS_PIXEL:g} (max |x| "
                              f"{float(np.abs(flat[i]).max()):.3g}): corrupt data, or rescale it", name(offset + i))


def check_size(h: int, w: int, min_size: int, name: str) -> bool:
    """Refuse images too thin to embed; returns True when the image will be zero-padded."""
    if min(h, w) < MIN_SIDE:
        raise MicrosnoopError(f"image of {h}x{w} px is too small to embed (each side needs at least {MIN_SIDE} px)",
                              name)
    return h < min_size or w < min_size


def warn_padded(padded: list[tuple[str, tuple]], min_size: int, count: int | None = None) -> None:
    if padded:
        first, shape = padded[0]
        warnings.warn(f"{count or len(padded)} image(s) smaller than the model's {min_size} px minimum were zero-padded "
                      f"(first: {first}, {shape[0]}x{shape[1]} px)", MicrosnoopWarning, stacklevel=3)


def pad_to_min(planes: np.ndarray, min_size: int) -> np.ndarray:
    h, w = planes.shape[-2:]
    ph, pw = max(0, min_size - h), max(0, min_size - w)
    if not (ph or pw):
        return planes
    return np.pad(planes, [(0, 0)] * (planes.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)])


class Embedder:
    """An encoder bound to a device and precision; ``embed`` maps images to (N, C * dim) features.

    Speed (see docs/scaling.md): the U-Net runs as a BN-folded, channels-last module under
    ``torch.inference_mode``, with bf16 weights when the precision is bf16; same-size images are
    batched. Batch invariance: in fp32 an image's vector matches its vector alone to ~1e-6; in bf16
    to a cosine of ~0.9999 (oneDNN may pick other kernels for other batch sizes)."""

    def __init__(self, model: str | ChannelEncoder | None = None, device: str | torch.device = defaults.DEVICE,
                 precision: str = defaults.PRECISION, batch_size: int | None = defaults.BATCH_SIZE,
                 threads: int | None = None, tta: str | None = None, levels: Any = None, pool: str | None = None,
                 engine: str | None = defaults.ENGINE, scales: Any = None):
        self.engine_choice = check_engine(engine)  # options first: an unknown/uninstalled engine fails before loading
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            configure_threads(threads)
        self.encoder = model if isinstance(model, ChannelEncoder) else create_model(model, device=self.device)
        apply_head(self.encoder, levels=levels, pool=pool, tta=tta, scales=scales)  # head options override the model's
        self.encoder = self.encoder.to(self.device).eval()
        self.precision = resolve_precision(precision, self.device, bf16_validated(self.encoder))
        self.batch_size = None if batch_size is None else int(batch_size)
        if self.batch_size is not None and self.batch_size < 1:
            raise MicrosnoopError("--batch-size must be at least 1")
        self._module: torch.nn.Module | None = None
        self._engine: torch.nn.Module | None = None  # backends.EngineModule when an optional engine runs
        self._autocast = self.precision != "fp32"

    @property
    def dim(self) -> int:
        """Features per channel: the encoder's dim x the head's number of scales."""
        return self.encoder.out_dim

    @property
    def min_size(self) -> int:
        """Smallest plane side embedded without zero-padding: the encoder's minimum, divided by the head's
        smallest scale when that is below 1 (so every scaled copy still reaches the encoder's minimum)."""
        return int(math.ceil(self.encoder.min_size / min(1.0, min(self.encoder.scales))))

    @property
    def module(self) -> torch.nn.Module:
        """The optimised module (built on first use, so weights loaded after construction count)."""
        if self._module is None:
            self._module, self._autocast = fast_module(self.encoder, self.device, self.precision)
            self._engine = self._engine_for(self._module)
            if self._engine is not None:
                self._module, self._autocast = self._engine, False
            if self.encoder.tta != "none":  # scales are run by encode_planes, one scale at a time
                self._module = TTAModule(self._module, self.encoder.tta)
        return self._module

    def _engine_for(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """The optional engine (OpenVINO, ONNX Runtime) running ``module``, or None for torch (reason logged).

        The engine exports the fp32 version of exactly this module (folded U-Net, head, projections) and
        falls back to ``module`` itself if it fails or its first batch is not within cosine 0.999 of fp32."""
        if self.engine_choice == "torch" or self.device.type != "cpu":
            return None
        if not isinstance(module, FusedUNetEncoder):
            log.info("engine: torch (the optional engines are validated for the U-Net encoders only)")
            return None
        reference = module if self.precision == "fp32" else fast_module(self.encoder, self.device, "fp32")[0]
        return engine_module(reference, self.engine_choice, self.device, self.precision, fallback=module,
                             threads=torch.get_num_threads())

    @property
    def engine(self) -> str:
        """The engine that runs (or ran) the encoder: torch, openvino or onnxruntime."""
        _ = self.module
        return self._engine.name if self._engine is not None else "torch"

    def refresh(self) -> None:
        """Rebuild the optimised module after the encoder's weights changed (e.g. during training)."""
        self._module = None
        self._engine = None

    def provenance(self) -> dict[str, Any]:
        prov = {**self.encoder.provenance(), "precision": self.precision, "device": str(self.device.type),
                "engine": self.engine}
        if self._engine is not None and self._engine.validation:
            prov["engine_min_cosine_to_fp32"] = min(self._engine.validation.values())
        return prov

    def batch_for(self, h: int, w: int) -> int:
        """Planes per forward pass: ``batch_size`` if given, else about BATCH_PIXELS pixels with torch (256
        planes of 64x64, 20 of 224x224, 1 of a 1024x1024 field): small crops need big batches to keep the
        cores busy, big fields need small ones to bound memory; OpenVINO: ENGINE_BATCH_PIXELS (32 of 64x64,
        2 of 224x224), where its activations stay in cache."""
        if self.batch_size is not None:
            return self.batch_size
        pixels = ENGINE_BATCH_PIXELS if self.engine.startswith("openvino") else BATCH_PIXELS
        return int(min(MAX_AUTO_BATCH, max(1, pixels // (h * w))))

    def encode_planes(self, planes: np.ndarray) -> np.ndarray:
        """(P, H, W) normalised float32 planes of one size -> (P, dim).

        With several head scales, all planes go through the encoder at one scale, then at the next (each
        scale with its own batch size), so an engine keeps one input shape per run of batches."""
        planes = pad_to_min(planes, self.min_size)
        out = np.empty((len(planes), self.dim), dtype=np.float32)
        module = self.module
        ctx = autocast(self.device, self.precision) if self._autocast else contextlib.nullcontext()
        dtype = next(module.parameters()).dtype if any(True for _ in module.parameters()) else torch.float32
        d = self.encoder.dim
        with torch.inference_mode(), ctx:
            for j, factor in enumerate(self.encoder.scales):
                bs = self.batch_for(*(scaled_size(n, factor) for n in planes.shape[-2:]))
                for s in range(0, len(planes), bs):
                    x = torch.from_numpy(np.ascontiguousarray(planes[s:s + bs]))[:, None]
                    x = rescale(x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                                factor)
                    if dtype in (torch.bfloat16, torch.float16):
                        x = x.to(dtype)
                    out[s:s + len(x), j * d:(j + 1) * d] = module(x).float().cpu().numpy()
        return out

    def prepare(self, images: np.ndarray | Sequence[np.ndarray], name: Callable[[int], str] | None = None,
                offset: int = 0) -> "Prepared":
        """Validate and normalise a chunk (CPU, numpy): the part a loader thread can do ahead of compute."""
        name = name or (lambda i: f"image {i}")
        min_size = self.min_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            n, c = images.shape[:2]
            check_finite(images, name, offset)
            if 0 in images.shape:
                raise MicrosnoopError(f"empty image of shape {images.shape[1:]}", name(offset))
            if n and check_size(*images.shape[2:], min_size, name(offset)):
                warn_padded([(name(offset), images.shape[2:])], min_size, count=n)
            return Prepared(n, c, [(np.arange(n), normalize_percentile(images))])
        images = list(images)
        n = len(images)
        if n == 0:
            return Prepared(0, 0, [])
        c = images[0].shape[0]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        padded: list[tuple[str, tuple]] = []
        for i, img in enumerate(images):
            if img.ndim != 3:
                raise MicrosnoopError(f"expected a (C, H, W) image, got shape {img.shape}", name(offset + i))
            if img.shape[0] != c:
                raise MicrosnoopError(f"has {img.shape[0]} channels but the first image has {c}", name(offset + i))
            if img.size == 0:
                raise MicrosnoopError("empty image (no pixels)", name(offset + i))
            check_finite(img[None], lambda _: name(offset + i))
            if check_size(*img.shape[1:], min_size, name(offset + i)):
                padded.append((name(offset + i), img.shape[1:]))
            by_shape[img.shape[1:]].append(i)
        warn_padded(padded, min_size)
        groups = [(np.array(ix), normalize_percentile(np.stack([images[i] for i in ix]))) for ix in by_shape.values()]
        return Prepared(n, c, groups)

    def encode(self, prepared: "Prepared", name: Callable[[int], str] | None = None, offset: int = 0) -> np.ndarray:
        """Run the encoder on a prepared chunk -> (N, C * dim) float32 in input order.

        A vector that is not finite is never returned: it names the image instead of writing NaN."""
        if prepared.n == 0:
            return np.zeros((0, 0), np.float32)
        out = np.empty((prepared.n, prepared.c * self.dim), dtype=np.float32)
        for ix, arr in prepared.groups:
            planes = arr.reshape(-1, *arr.shape[2:])
            out[ix] = self.encode_planes(planes).reshape(len(ix), prepared.c * self.dim)
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            who = name(offset + i) if name else f"image {offset + i}"
            raise MicrosnoopError(f"the model gave a NaN/inf vector for this image ({int(bad.sum())} such images in "
                                  f"this chunk; extreme pixel values?)", who)
        return out

    def embed(self, images: np.ndarray | Sequence[np.ndarray], name: Callable[[int], str] | None = None,
              offset: int = 0) -> np.ndarray:
        """(N, C, H, W) array or a list of (C, H, W) arrays (sizes may differ) -> (N, C * dim) float32."""
        return self.encode(self.prepare(images, name, offset), name, offset)


class Prepared:
    """A normalised chunk: (indices, (n_i, C, H, W) float32) per image size."""

    __slots__ = ("n", "c", "groups")

    def __init__(self, n: int, c: int, groups: list[tuple[np.ndarray, np.ndarray]]):
        self.n, self.c, self.groups = n, c, groups
