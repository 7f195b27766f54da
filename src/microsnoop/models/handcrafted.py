"""``handcrafted``: the classical per-channel features a CellProfiler user gets, as a registered baseline.

Each one-channel plane (percentile-normalised by the engine) is treated as one object, as
CellProfiler's MeasureObject* modules would treat a cell crop, and measured with ``cp_measure``
(CellProfiler's measurement code as a library):

- intensity statistics over the whole crop (mean, SD, quartiles, MAD, edge intensity...);
- a foreground object from Otsu's threshold: its size/shape (area, axes, eccentricity, solidity,
  Hu moments...) and the share of intensity inside it - the shape a mask gives, without a mask file;
- radial intensity distribution (4 rings), which captures nuclear vs cytoplasmic localisation;
- Haralick/GLCM texture at scales 1 and 3 (32 grey levels, averaged over the 4 directions);
- granularity spectrum (grey-scale opening, CellProfiler's MeasureGranularity);
- local binary pattern histograms (scikit-image, uniform LBP, radii 1 and 2).

Positional features (centres, bounding boxes, orientation) are dropped: they describe where the
crop was cut, not biology. Undefined values (e.g. texture of an empty plane) become 0. Features are
not standardised here; the benchmark z-scores them over the set like every other embedding.
Why 32 grey levels: CellProfiler 3's 256 levels cost ~200 ms per 64-px plane in mahotas, ~0.3 ms at 32.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from ..core.extras import install_hint
from .registry import ChannelEncoder, ModelSpec, register_model

FEATURE_VERSION = 1
CONFIG: dict[str, Any] = {
    "arch": "handcrafted",
    "feature_version": FEATURE_VERSION,
    "input": "engine's percentile-normalised plane; intensity features on it as is, texture/granularity/LBP on it clipped to [0, 1]",
    "object": "whole crop (label 1 everywhere)",
    "foreground": "Otsu threshold of the plane (clipped), all foreground pixels = one object",
    "intensity": "cp_measure get_intensity, Location_* dropped",
    "radial_distribution": "cp_measure get_radial_distribution, 4 bins, whole crop",
    "sizeshape": ["Area", "Perimeter", "MajorAxisLength", "MinorAxisLength", "Eccentricity", "FormFactor",
                  "Extent", "Solidity", "Compactness", "EulerNumber", "MaximumRadius", "MeanRadius",
                  "MedianRadius", "HuMoment_0", "HuMoment_1", "HuMoment_2", "HuMoment_3", "HuMoment_4",
                  "HuMoment_5", "HuMoment_6"],
    "foreground_intensity": ["ForegroundFraction", "ForegroundIntensityShare", "ForegroundMean", "BackgroundMean"],
    "texture": {"scales": [1, 3], "gray_levels": 32, "directions": "mean of 4"},
    "granularity": {"subsample_size": 0.5, "image_sample_size": 0.5, "element_size": 10, "granular_spectrum_length": 8},
    "lbp": [{"P": 8, "R": 1, "method": "uniform"}, {"P": 8, "R": 2, "method": "uniform"}],
}
CONFIG_STRING = json.dumps(CONFIG, sort_keys=True)
HANDCRAFTED_SHA256 = hashlib.sha256(CONFIG_STRING.encode()).hexdigest()


def _cp() -> Any:
    try:
        from cp_measure.core import (measuregranularity, measureobjectintensity, measureobjectintensitydistribution,
                                     measureobjectsizeshape, measuretexture)
    except ImportError as exc:
        raise ImportError("cp_measure", name="cp_measure") from exc
    return measuregranularity, measureobjectintensity, measureobjectintensitydistribution, measureobjectsizeshape, measuretexture


def _otsu_mask(clipped: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    if clipped.max() <= clipped.min():
        return np.zeros(clipped.shape, dtype=np.int32)
    return (clipped > threshold_otsu(clipped)).astype(np.int32)


def _lbp_hist(u8: np.ndarray, P: int, R: float) -> list[float]:
    from skimage.feature import local_binary_pattern

    codes = local_binary_pattern(u8, P, R, method="uniform")
    hist = np.bincount(codes.astype(np.int64).ravel(), minlength=P + 2)[:P + 2]
    return list(hist / max(1, codes.size))


def measure_plane(plane: np.ndarray) -> dict[str, float]:
    """All handcrafted features of one (H, W) normalised plane, by name (CellProfiler-style names)."""
    gran, inten, radial, shape, texture = _cp()
    plane = np.asarray(plane, dtype=np.float64)
    clipped = np.clip(plane, 0.0, 1.0)
    whole = np.ones(plane.shape, dtype=np.int32)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cp_measure divides by zero on empty/flat planes; NaN -> 0 below
        for k, v in inten.get_intensity(whole, plane).items():
            if not k.startswith("Location_"):
                out[k] = v[0]
        for k, v in radial.get_radial_distribution(whole, plane, bin_count=4).items():
            out[k] = v[0]
        fg = _otsu_mask(clipped)
        if fg.any():
            sz = shape.get_sizeshape(fg, plane)
            for k in CONFIG["sizeshape"]:
                out["Shape_" + k] = sz[k][0]
        else:
            for k in CONFIG["sizeshape"]:
                out["Shape_" + k] = 0.0
        inside = fg.astype(bool)
        total = float(np.clip(plane, 0, None).sum())
        out["Foreground_Fraction"] = float(inside.mean())
        out["Foreground_IntensityShare"] = float(np.clip(plane[inside], 0, None).sum() / total) if total > 0 else 0.0
        out["Foreground_Mean"] = float(plane[inside].mean()) if inside.any() else 0.0
        out["Foreground_BackgroundMean"] = float(plane[~inside].mean()) if (~inside).any() else 0.0
        tcfg = CONFIG["texture"]
        for scale in tcfg["scales"]:
            t = texture.get_texture(whole, clipped, scale=scale, gray_levels=tcfg["gray_levels"])
            names = sorted({k.split("_")[0] for k in t})
            for name in names:
                vals = [v[0] for k, v in t.items() if k.split("_")[0] == name]
                out[f"Texture_{name}_{scale}"] = float(np.mean(vals))
        g = gran.get_granularity(whole, clipped, **CONFIG["granularity"])
        for k, v in g.items():
            out[k] = v[0]
        u8 = np.round(clipped * 255).astype(np.uint8)
        for cfg in CONFIG["lbp"]:
            for j, h in enumerate(_lbp_hist(u8, cfg["P"], cfg["R"])):
                out[f"LBP_P{cfg['P']}R{cfg['R']}_{j:02d}"] = h
    return {k: float(v) if np.isfinite(v) else 0.0 for k, v in out.items()}


@lru_cache(maxsize=1)
def feature_names() -> tuple[str, ...]:
    """Feature names in output order (measured once on a real-looking plane: a blurred spot)."""
    yy, xx = np.mgrid[:32, :32]
    spot = np.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / 40.0)
    return tuple(measure_plane(spot))


class HandcraftedEncoder(ChannelEncoder):
    """Per-plane classical features; runs on CPU in numpy whatever the device (no parameters to move)."""

    min_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.names = feature_names()
        self.dim = len(self.names)
        self.config = dict(CONFIG)
        self.sha256 = HANDCRAFTED_SHA256
        self.measure: Callable[[np.ndarray], dict[str, float]] = measure_plane

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planes = x.detach().float().cpu().numpy()[:, 0]
        feats = np.zeros((len(planes), self.dim), dtype=np.float32)
        for i, p in enumerate(planes):
            m = self.measure(p)
            feats[i] = [m.get(n, 0.0) for n in self.names]
        return torch.from_numpy(feats).to(x.device)


def build_handcrafted(pretrained: bool = True) -> HandcraftedEncoder:
    _cp()  # fail early with the install hint if cp_measure is missing
    return HandcraftedEncoder()


register_model(ModelSpec(
    name="handcrafted",
    head="tta=none",
    build=build_handcrafted,
    description="Classical CellProfiler-style features per channel (cp_measure + scikit-image): intensity, "
                "Otsu-object shape, radial distribution, Haralick texture, granularity, LBP",
    license="BSD-3-Clause (cp_measure / CellProfiler measurements), no learned weights",
    training_data="none (fixed feature definitions; sha256 is of the feature-definition string)",
    input_size="any (>=16 px)",
    sha256=HANDCRAFTED_SHA256,
    requires=install_hint("cp_measure") + "  (needs cp_measure)",
    extra={"weights": "none (fixed feature definitions)"},
))
