"""Segment one channel of a field into a label image (0 = background, 1..n = objects).

Segmenters: ``cellpose`` (the Cellpose generalist network shipped in scellseg, flows turned into
masks by :mod:`.dynamics`), ``classical`` (smoothing, Otsu, distance transform, watershed; no
weights), and user-supplied masks or cell centres (:mod:`.masks`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..core.errors import MicrosnoopError

SEGMENTERS = ("cellpose", "classical")


def get_segmenter(name: str, diameter: float | None = None, device: str = "cpu",
                  precision: str = "auto", engine: str | None = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """A function (H, W) image -> (H, W) int32 labels for a segmenter name; unknown names are a user error.

    ``precision`` (cellpose): auto = bf16 where native, else fp32. ``engine`` (cellpose): auto | torch |
    openvino | onnxruntime (see :mod:`microsnoop.embed.backends`)."""
    if name == "cellpose":
        from .cellpose import CellposeSegmenter

        return CellposeSegmenter(diameter=diameter, device=device, precision=precision, engine=engine)
    if name == "classical":
        from .classical import segment_classical

        return lambda img: segment_classical(img, diameter=diameter)
    raise MicrosnoopError(f"unknown segmenter '{name}' (choose {', '.join(SEGMENTERS)}, or give user masks)")


def segment(image: np.ndarray, method: str = "cellpose", diameter: float | None = None) -> np.ndarray:
    """Segment a 2-D image with a named segmenter."""
    return get_segmenter(method, diameter)(np.asarray(image))


__all__ = ["SEGMENTERS", "get_segmenter", "segment"]
