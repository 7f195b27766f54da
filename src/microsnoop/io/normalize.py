"""Per-image, per-channel percentile normalisation (Cellpose's normalize99, as Microsnoop uses)."""
from __future__ import annotations

import numpy as np

NORMALIZATION = "percentile per image and channel: (x - p1) / (p99 - p1), float32; constant channels -> 0"


def row_percentiles(flat: np.ndarray, q: list[float]) -> np.ndarray:
    """``np.percentile(flat, q, axis=1)`` (linear method) -> (len(q), rows) float64, bit for bit.

    Why: for integer images (uint8/uint16 TIFFs, the common case) a partial sort of the raw
    integers finds the same two order statistics as numpy's percentile of the float32 copy at
    ~2x the speed (benchmarks/throughput.py: normalisation runs beside the encoder on the same
    cores). The interpolation repeats numpy's ``_lerp`` exactly; float input goes to numpy."""
    if not np.issubdtype(flat.dtype, np.integer) or flat.dtype.itemsize > 2:
        return np.asarray(np.percentile(flat.astype(np.float32, copy=False), q, axis=1), dtype=np.float64)
    n = flat.shape[1]
    virtual = np.asarray(q, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(virtual).astype(np.intp)
    above = np.minimum(below + 1, n - 1)
    part = np.partition(flat, np.unique(np.concatenate([below, above])), axis=1)
    out = np.empty((len(virtual), len(flat)), dtype=np.float64)
    for i, (lo, hi, t) in enumerate(zip(below, above, virtual - below)):
        a, b = part[:, lo].astype(np.float64), part[:, hi].astype(np.float64)
        diff = b - a  # exact: integers of 16 bits or fewer
        out[i] = b - diff * (1.0 - t) if t >= 0.5 else a + diff * t
    return out


def normalize_percentile(images: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """(..., H, W) -> float32 of the same shape, each (H, W) plane scaled so p_lower->0 and p_upper->1."""
    images = np.asarray(images)
    flat_in = images.reshape(-1, images.shape[-2] * images.shape[-1])
    lo, hi = row_percentiles(flat_in, [lower, upper])
    scale = hi - lo
    # a constant plane (blank channel) has no contrast: map it to zeros rather than dividing by 0
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    out = flat_in.astype(np.float32)  # always a new array: the caller's images are never modified
    out -= lo[:, None].astype(np.float32)
    out /= safe[:, None]
    out[scale <= 0] = 0.0
    return out.reshape(images.shape)
