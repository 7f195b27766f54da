"""From a field and its label image to model inputs: the paper's three field modes.

- ``crop`` (cell-region cropping, Microsnoop Methods): for each cell, its bounding box (w, h) gives
  the centre and the half-side ``Rs = min(max(w, h) * Rc, Sta / 2)``; the square
  ``[centre - Rs, centre + Rs)`` of every channel is cut out, clipped to the image, and zero-padded
  (centred on the cell) to ``(C, Sta, Sta)``. Cells whose box touches the image border are skipped
  by default (they are cut off).
- ``rescale``: the whole field zero-padded to a square (centred) and resized to ``Sta``.
- ``tile``: ``Sta`` x ``Sta`` tiles at 10 % overlap covering the field (the last row/column flush
  with the edge; a field smaller than a tile is zero-padded); the field vector is the tiles' mean.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError

MODES = ("crop", "rescale", "tile")
DEFAULT_RC = 1.0       # Rs = max(w, h) * Rc: a square twice the box's longer side, the cell in context
DEFAULT_STA = 224      # the paper's input size
TILE_OVERLAP = 0.1

CELL_COLUMNS = ["Metadata_CellId", "Metadata_Centroid_Y", "Metadata_Centroid_X", "Metadata_BBox_Y0",
                "Metadata_BBox_X0", "Metadata_BBox_Y1", "Metadata_BBox_X1", "Metadata_Area"]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise MicrosnoopError(f"unknown mode '{mode}' (choose {', '.join(MODES)})")
    return mode


def cell_table(labels: np.ndarray) -> pd.DataFrame:
    """One row per object of a label image: id, centroid (y, x), bbox (y0, x0, y1, x1; end exclusive), area."""
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.max() <= 0:
        return pd.DataFrame({c: pd.Series(dtype=float if "Centroid" in c else int) for c in CELL_COLUMNS})
    t = regionprops_table(labels.astype(np.int32), properties=("label", "centroid", "bbox", "area"))
    return pd.DataFrame({"Metadata_CellId": t["label"].astype(int),
                         "Metadata_Centroid_Y": t["centroid-0"], "Metadata_Centroid_X": t["centroid-1"],
                         "Metadata_BBox_Y0": t["bbox-0"].astype(int), "Metadata_BBox_X0": t["bbox-1"].astype(int),
                         "Metadata_BBox_Y1": t["bbox-2"].astype(int), "Metadata_BBox_X1": t["bbox-3"].astype(int),
                         "Metadata_Area": t["area"].astype(int)})


def centre_table(y: np.ndarray, x: np.ndarray, size: int, shape: tuple[int, int]) -> pd.DataFrame:
    """Cells given by centres (e.g. CellProfiler's Location_Center_X/Y) as fixed ``size`` boxes."""
    y, x = np.asarray(y, float), np.asarray(x, float)
    y0 = np.floor(y - size / 2).astype(int)
    x0 = np.floor(x - size / 2).astype(int)
    return pd.DataFrame({"Metadata_CellId": np.arange(1, len(y) + 1), "Metadata_Centroid_Y": y,
                         "Metadata_Centroid_X": x, "Metadata_BBox_Y0": y0, "Metadata_BBox_X0": x0,
                         "Metadata_BBox_Y1": y0 + size, "Metadata_BBox_X1": x0 + size,
                         "Metadata_Area": np.full(len(y), size * size)})


def crop_half_side(h: int, w: int, rc: float, sta: int) -> int:
    """The paper's ``Rs = min(max(w, h) * Rc, Sta / 2)``, rounded to whole pixels (at least 1)."""
    return int(max(1, min(round(max(w, h) * rc), sta // 2)))


def touches_border(table: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    H, W = shape
    return ((table["Metadata_BBox_Y0"] <= 0) | (table["Metadata_BBox_X0"] <= 0) |
            (table["Metadata_BBox_Y1"] >= H) | (table["Metadata_BBox_X1"] >= W)).to_numpy()


def crop_cell(image: np.ndarray, cy: int, cx: int, rs: int, sta: int) -> np.ndarray:
    """(C, H, W) -> (C, sta, sta): the square [cy - rs, cy + rs) x [cx - rs, cx + rs), clipped to the
    image, placed so the cell centre sits at (sta // 2, sta // 2); the rest is zero."""
    C, H, W = image.shape
    out = np.zeros((C, sta, sta), dtype=image.dtype)
    y0, x0 = cy - rs, cx - rs
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(H, cy + rs), min(W, cx + rs)
    if sy1 <= sy0 or sx1 <= sx0:
        return out
    oy, ox = sta // 2 - rs + (sy0 - y0), sta // 2 - rs + (sx0 - x0)
    out[:, oy:oy + sy1 - sy0, ox:ox + sx1 - sx0] = image[:, sy0:sy1, sx0:sx1]
    return out


def crop_cells(image: np.ndarray, table: pd.DataFrame, rc: float = DEFAULT_RC, sta: int = DEFAULT_STA,
               skip_border: bool = True, fixed_half_side: int | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops (n, C, sta, sta) of the cells in ``table`` and the rows kept (border cells dropped unless
    ``skip_border`` is False). ``fixed_half_side`` overrides Rs (cells given as centres + a crop size)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise MicrosnoopError(f"expected a (C, H, W) field, got shape {image.shape}")
    if sta < 2:
        raise MicrosnoopError("--crop-size must be at least 2")
    keep = ~touches_border(table, image.shape[1:]) if skip_border else np.ones(len(table), bool)
    kept = table[keep].reset_index(drop=True)
    crops = np.zeros((len(kept), image.shape[0], sta, sta), dtype=image.dtype)
    for i, r in enumerate(kept.itertuples(index=False)):
        h, w = r.Metadata_BBox_Y1 - r.Metadata_BBox_Y0, r.Metadata_BBox_X1 - r.Metadata_BBox_X0
        rs = min(fixed_half_side, sta // 2) if fixed_half_side else crop_half_side(h, w, rc, sta)
        cy, cx = (r.Metadata_BBox_Y0 + r.Metadata_BBox_Y1) // 2, (r.Metadata_BBox_X0 + r.Metadata_BBox_X1) // 2
        crops[i] = crop_cell(image, int(cy), int(cx), rs, sta)
    return crops, kept


def rescale_field(image: np.ndarray, sta: int = DEFAULT_STA) -> np.ndarray:
    """(C, H, W) -> (C, sta, sta): zero-pad to a square (centred), then resize (anti-aliased bilinear)."""
    import torch
    import torch.nn.functional as F

    C, H, W = image.shape
    s = max(H, W)
    sq = np.zeros((C, s, s), np.float32)
    oy, ox = (s - H) // 2, (s - W) // 2
    sq[:, oy:oy + H, ox:ox + W] = image
    t = torch.from_numpy(sq)[None]
    out = F.interpolate(t, size=(sta, sta), mode="bilinear", align_corners=False, antialias=sta < s)
    return out[0].numpy()


def tile_starts(n: int, sta: int, overlap: float = TILE_OVERLAP) -> list[int]:
    """Tile origins along one axis: stride ``sta * (1 - overlap)``, the last tile flush with the edge."""
    if n <= sta:
        return [0]
    stride = max(1, int(math.floor(sta * (1 - overlap))))
    k = int(math.ceil((n - sta) / stride))
    starts = [min(i * stride, n - sta) for i in range(k + 1)]
    return sorted(set(starts))


def tile_field(image: np.ndarray, sta: int = DEFAULT_STA, overlap: float = TILE_OVERLAP) -> np.ndarray:
    """(C, H, W) -> (n_tiles, C, sta, sta) tiles at ``overlap``; a side shorter than sta is zero-padded (centred)."""
    C, H, W = image.shape
    if H < sta or W < sta:
        ph, pw = max(0, sta - H), max(0, sta - W)
        image = np.pad(image, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        C, H, W = image.shape
    tiles = [image[:, y:y + sta, x:x + sta] for y in tile_starts(H, sta, overlap) for x in tile_starts(W, sta, overlap)]
    return np.stack(tiles)
