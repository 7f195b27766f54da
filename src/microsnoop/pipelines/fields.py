"""One whole field -> its per-cell and per-field embeddings: segment one channel, crop cells, embed, average.

The field embedder is shared by ``microsnoop plate`` (the field loop in :mod:`.plate_fields`) and by
``microsnoop benchmark`` for sets of kind ``fields`` (:mod:`.field_sets`).

Per field, in ``crop`` mode: label image (Cellpose network, classical watershed, user masks, or
fixed boxes around user-given centres) -> cell table (id, centroid, bbox, area) -> the paper's
cell-region crops of every channel (:mod:`.crop`; border cells skipped) -> optionally a seeded
random subset of ``max_cells`` -> the embedder (each channel of each crop percentile-normalised on
its own, as for single cells) -> the field vector is the plain mean of its cells' vectors. In
``rescale`` and ``tile`` modes nothing is segmented: the whole field is resized, or tiled at 10 %
overlap and its tile vectors averaged.

A field in which no cell survives (empty segmentation, or all on the border) is embedded whole in
``rescale`` mode instead, with ``Metadata_Count = 0`` and a warning, so every field has a vector.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.writers import feature_columns as feature_names
from .crop import CELL_COLUMNS, DEFAULT_RC, DEFAULT_STA, cell_table, check_mode, crop_cells, rescale_field, tile_field

SEGMENTER_CHOICES = ("cellpose", "classical", "masks", "centres")


@dataclass
class FieldOptions:
    """How fields become vectors; recorded in the outputs' provenance."""

    segmenter: str = "cellpose"          # cellpose | classical | masks | centres
    diameter: float | None = None        # object diameter in px (None: estimated)
    mode: str = "crop"                   # crop | rescale | tile
    rescale_constant: float | None = None  # Rc (None: DEFAULT_RC)
    crop_size: int | None = None         # Sta (None: the model's fixed input size, else 224)
    max_cells: int | None = None         # per field, seeded random subset
    seed: int = 0
    skip_border: bool = True
    centre_size: int | None = None       # crop side for cells given as centres (None: 2 * diameter or 32)
    segment_precision: str = "auto"      # cellpose network: auto (bf16 where native) | fp32 | bf16
    engine: str = "auto"                 # cellpose network: auto | torch | openvino | onnxruntime

    def centre_side(self) -> int:
        """Box side (px) of a cell given by its centre: ``centre_size``, else twice the diameter, else 32."""
        return int(self.centre_size or (2 * self.diameter if self.diameter else 32))

    def check(self) -> "FieldOptions":
        check_mode(self.mode)
        if self.segmenter == "centers":
            self.segmenter = "centres"
        if self.segmenter not in SEGMENTER_CHOICES:
            raise MicrosnoopError(f"unknown segmenter '{self.segmenter}' (choose {', '.join(SEGMENTER_CHOICES)})")
        if self.max_cells is not None and self.max_cells < 1:
            raise MicrosnoopError("--max-cells must be at least 1")
        if self.crop_size is not None and self.crop_size < 16:
            raise MicrosnoopError("--crop-size must be at least 16 (the U-Net's minimum input)")
        if self.rescale_constant is not None and self.rescale_constant <= 0:
            raise MicrosnoopError("--rescale-constant must be positive")
        if self.diameter is not None and self.diameter <= 0:
            raise MicrosnoopError("--diameter must be positive")
        from ..embed.backends import check_engine

        self.engine = check_engine(self.engine)  # before any expensive work
        return self


@dataclass
class FieldResult:
    vector: np.ndarray                   # (D,) float32: mean of the cells (or tiles) embedded
    count: int                           # cells (tiles) averaged; 0 = fell back to the whole field
    n_found: int                         # objects the segmentation found (before border/max_cells)
    cells: pd.DataFrame | None = None    # CELL_COLUMNS of the cells embedded
    cell_X: np.ndarray | None = None     # (count, D)
    crops: np.ndarray | None = None      # (count, C, Sta, Sta), kept only for previews
    labels: np.ndarray | None = None


class FieldEmbedder:
    """Turns one (C, H, W) field into a :class:`FieldResult` with a bound embedder and options."""

    def __init__(self, embedder: Any, opts: FieldOptions, segment_index: int = 0, embed_index: Sequence[int] | None = None):
        self.embedder, self.opts = embedder, opts.check()
        self.segment_index = segment_index
        self.embed_index = list(embed_index) if embed_index is not None else None
        enc = embedder.encoder
        self.sta = int(opts.crop_size or getattr(enc, "fixed_size", None) or DEFAULT_STA)
        self.rc = float(opts.rescale_constant or DEFAULT_RC)
        self._segment: Callable[[np.ndarray], np.ndarray] | None = None
        self.fallbacks = 0

    @property
    def segmenter(self) -> Callable[[np.ndarray], np.ndarray]:
        if self._segment is None:
            from ..segment import get_segmenter

            self._segment = get_segmenter(self.opts.segmenter, self.opts.diameter, device=str(self.embedder.device),
                                          precision=self.opts.segment_precision, engine=self.opts.engine)
        return self._segment

    def provenance(self) -> dict[str, Any]:
        o = self.opts
        seg: dict[str, Any] = {"segmenter": o.segmenter, "diameter": o.diameter}
        if o.mode == "crop" and o.segmenter in ("cellpose", "classical"):
            seg = getattr(self.segmenter, "provenance", lambda: {"segmenter": o.segmenter,
                                                                   "diameter": o.diameter or "estimated"})()
        if o.mode != "crop":
            seg = {"segmenter": None, "note": f"mode {o.mode}: no segmentation"}
        crop = {"mode": o.mode, "Sta": self.sta}
        if o.mode == "crop":
            crop.update({"Rc": self.rc, "formula": "Rs = min(max(w, h) * Rc, Sta / 2); crop [c - Rs, c + Rs), "
                         "clipped, zero-padded to Sta", "skip_border": o.skip_border, "max_cells": o.max_cells,
                         "seed": o.seed, "centre_size": o.centre_size if o.segmenter == "centres" else None})
        elif o.mode == "tile":
            crop.update({"overlap": 0.1, "aggregate": "mean of tiles"})
        else:
            crop.update({"resize": "zero-pad to square (centred), bilinear anti-aliased resize to Sta"})
        return {"segmentation": seg, "field_mode": crop, "field_aggregate": "mean of cell vectors",
                "fields_without_cells": "embedded whole (rescale mode), Metadata_Count = 0"}

    def _embed(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.embedder.embed(x), dtype=np.float32)

    def labels_for(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self.segmenter(np.asarray(image[self.segment_index])), dtype=np.int32)

    def __call__(self, image: np.ndarray, index: int, labels: np.ndarray | None = None,
                 table: pd.DataFrame | None = None, keep_crops: bool = False) -> FieldResult:
        """Embed one field. ``labels`` (user masks) or ``table`` (cells from centres) skip segmentation."""
        o = self.opts
        image = np.asarray(image)
        emb = image if self.embed_index is None else image[self.embed_index]
        if o.mode == "rescale":
            return FieldResult(self._embed(rescale_field(emb.astype(np.float32), self.sta)[None])[0], 1, 0)
        if o.mode == "tile":
            X = self._embed(tile_field(emb, self.sta))
            return FieldResult(X.astype(np.float64).mean(axis=0).astype(np.float32), len(X), 0)
        if table is None:
            if labels is None:
                labels = self.labels_for(image)
            elif labels.shape != image.shape[1:]:
                raise MicrosnoopError(f"mask shape {labels.shape} does not match the field's {image.shape[1:]}")
            table = cell_table(labels)
            fixed = None
        else:
            fixed = max(1, o.centre_side() // 2)
        n_found = len(table)
        crops, kept = crop_cells(emb, table, self.rc, self.sta, skip_border=o.skip_border, fixed_half_side=fixed)
        if o.max_cells is not None and len(kept) > o.max_cells:
            rng = np.random.default_rng([o.seed, index])
            pick = np.sort(rng.choice(len(kept), o.max_cells, replace=False))
            crops, kept = crops[pick], kept.iloc[pick].reset_index(drop=True)
        if len(kept) == 0:
            self.fallbacks += 1
            warnings.warn(f"field {index}: no cells to crop ({n_found} found, all on the border or none); "
                          f"embedded the whole field instead (Metadata_Count = 0)", UserWarning, stacklevel=2)
            vec = self._embed(rescale_field(emb.astype(np.float32), self.sta)[None])[0]
            return FieldResult(vec, 0, n_found, kept, np.zeros((0, vec.shape[0]), np.float32), None, labels)
        X = self._embed(crops)
        vec = X.astype(np.float64).mean(axis=0).astype(np.float32)
        return FieldResult(vec, len(X), n_found, kept, X, crops if keep_crops else None, labels)


# ----------------------------------------------------------------------------------------- outputs

def save_montage(crops: np.ndarray, path: Path, n: int, per_row: int = 8) -> Path:
    """PNG montage of the first ``n`` crops: one tile per crop, its channels side by side, each
    channel percentile-normalised on its own (what the model sees)."""
    import imageio.v3 as iio

    from ..io.normalize import normalize_percentile

    crops = np.asarray(crops[:n], dtype=np.float32)
    if len(crops) == 0:
        return path
    k, C, S, _ = crops.shape
    x = np.clip(normalize_percentile(crops), 0, 1)
    tiles = np.concatenate([np.pad(x[:, c], ((0, 0), (1, 1), (1, 1)), constant_values=1.0) for c in range(C)], axis=2)
    rows = int(np.ceil(k / per_row))
    th, tw = tiles.shape[1:]
    grid = np.ones((rows * th, min(k, per_row) * tw), np.float32)
    for i in range(k):
        r, c = divmod(i, per_row)
        grid[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (grid * 255).astype(np.uint8))
    return path


def field_key(meta: pd.Series, index: int) -> str:
    parts = [str(meta[c]) for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Field")
             if c in meta.index and pd.notna(meta[c])]
    key = "_".join(parts) if parts else f"field{index:05d}"
    return f"{index:05d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", key)


def assemble_fields(meta: pd.DataFrame, results: list[FieldResult], channels: list[str], dim: int
              ) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """Per-field results -> (fields table, cells table or None, feature names), in field order."""
    feats = feature_names(channels, dim)
    fmeta = meta.reset_index(drop=True).copy()
    fmeta["Metadata_Count"] = [r.count for r in results]
    fmeta["Metadata_CellsFound"] = [r.n_found for r in results]
    fields_df = pd.concat([fmeta, pd.DataFrame(np.stack([r.vector for r in results]), columns=feats)], axis=1)
    parts = []
    for i, r in enumerate(results):
        if r.cells is None or r.count == 0:
            continue
        m = pd.DataFrame([meta.iloc[i].to_dict()] * r.count).reset_index(drop=True)
        m["Metadata_FieldIndex"] = i
        m = pd.concat([m, r.cells[CELL_COLUMNS].reset_index(drop=True)], axis=1)
        parts.append(pd.concat([m, pd.DataFrame(r.cell_X, columns=feats)], axis=1))
    cells = pd.concat(parts, ignore_index=True) if parts else None
    return fields_df, cells, feats
