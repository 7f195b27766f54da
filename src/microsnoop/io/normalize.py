"""Per-image, per-channel percentile normalisation (Cellpose's normalize99, as Microsnoop uses)."""
from __future__ import annotations

import numpy as np

NORMALIZATION = "percentile per image and channel: (x - p1) / (p99 - p1), float32; constant channels -> 0"


def normalize_percentile(images: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """(..., H, W) -> float32 of the same shape, each (H, W) plane scaled so p_lower->0 and p_upper->1."""
    x = np.asarray(images, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    lo, hi = np.percentile(flat, [lower, upper], axis=1)
    scale = hi - lo
    # a constant plane (blank channel) has no contrast: map it to zeros rather than dividing by 0
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    out = (flat - lo[:, None].astype(np.float32)) / safe[:, None]
    out[scale <= 0] = 0.0
    return out.reshape(x.shape)
