"""Whole fields -> per-cell and per-field embeddings: segment one channel, crop cells, embed, average.

Used by ``microsnoop plate`` (:func:`plate_fields`, a LoadData manifest) and by ``microsnoop
benchmark`` for sets of kind ``fields`` (:func:`embed_fields_dataset`, an ``images.npy`` set).

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

import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import MicrosnoopError
from ..io.writers import feature_columns as feature_names
from ..segment.masks import read_mask_file
from .crop import (CELL_COLUMNS, DEFAULT_RC, DEFAULT_STA, cell_table, centre_table, check_mode, crop_cells,
                   rescale_field, tile_field)

log = logging.getLogger("microsnoop")

SEGMENTER_CHOICES = ("cellpose", "classical", "masks", "centres")
ESTIMATE_FIELDS = 3  # plates: Cellpose's size is estimated on this many fields (first, middle, last), then fixed


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

    from ..embed.normalize import normalize_percentile

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


def save_mask(labels: np.ndarray, path: Path) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if labels.max() < 65536 else np.uint32
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib")
    return path


def field_key(meta: pd.Series, index: int) -> str:
    parts = [str(meta[c]) for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Field")
             if c in meta.index and pd.notna(meta[c])]
    key = "_".join(parts) if parts else f"field{index:05d}"
    return f"{index:05d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", key)


def _assemble(meta: pd.DataFrame, results: list[FieldResult], channels: list[str], dim: int
              ) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
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


# ---------------------------------------------------------------------------------------- plates

def plate_field_options(s: Any) -> FieldOptions:
    """The checked :class:`FieldOptions` of ``PlateSettings`` ``s``."""
    return FieldOptions(segmenter=s.segmenter, diameter=s.diameter, mode=s.mode, rescale_constant=s.rescale_constant,
                        crop_size=s.crop_size, max_cells=s.max_cells, seed=s.seed,
                        skip_border=not getattr(s, "keep_border", False),
                        centre_size=getattr(s, "centre_size", None),
                        segment_precision=getattr(s, "segment_precision", "auto"),
                        engine=getattr(s, "engine", "auto")).check()


def user_cells(plan: Any, s: Any, opts: FieldOptions) -> tuple[list[Path] | None, list | None]:
    """User masks (one file per field, each checked to exist) or centres, before any field is read."""
    src = plan.source
    if opts.mode != "crop":
        return None, None
    if opts.segmenter == "masks":
        if not getattr(s, "masks", None):
            raise MicrosnoopError("--segmenter masks needs --masks (a manifest column or a folder of label images)")
        if not hasattr(src, "files"):
            raise MicrosnoopError("--segmenter masks reads masks named after a manifest's files; with an OME-Zarr "
                                  "plate use --segmenter cellpose or classical", src.path)
        from ..segment.masks import mask_files_for

        seg_i = src.channel_names.index(plan.segment_channels[-1])
        return mask_files_for(s.masks, pd.read_csv(src.path), [g[seg_i] for g in src.files], src.path), None
    if opts.segmenter == "centres":
        if not getattr(s, "centres", None):
            raise MicrosnoopError("--segmenter centres needs --centres (a CSV with *_Location_Center_X/Y)")
        from ..segment.masks import load_centres

        return None, load_centres(s.centres, src.metadata)
    return None, None


def field_state(plan: Any, s: Any, opts: FieldOptions, embedder: Any) -> dict[str, Any]:
    """What every field's result depends on; a resumed, merged or sharded run must match it."""
    from dataclasses import asdict

    return {"input": plan.source.fingerprint(), "n_fields": plan.n_fields, "model": embedder.encoder.name,
            "model_sha256": embedder.encoder.sha256, "precision": embedder.precision,
            "embed_channels": plan.embed_channels, "segment_channels": plan.segment_channels,
            "field_options": asdict(opts), "masks": str(getattr(s, "masks", None)),
            "centres": str(getattr(s, "centres", None))}


def plate_diameter(plan: Any, opts: FieldOptions, store: Any, device: str) -> dict[str, Any] | None:
    """One magnification per plate: Cellpose's size estimated on 3 fields spread over the whole plate
    (first, middle, last; the same for every shard), then fixed; kept in the store for shards and resume."""
    if not (opts.mode == "crop" and opts.segmenter == "cellpose" and opts.diameter is None):
        return None
    note = store.load_json("diameter.json")
    if note is None:
        from ..segment import get_segmenter

        probe = get_segmenter("cellpose", None, device=device, precision=opts.segment_precision, engine=opts.engine)
        src, n = plan.source, plan.n_fields
        seg_idx = [src.channel_names.index(c) for c in plan.segment_channels]
        picks = sorted(set(np.linspace(0, n - 1, min(ESTIMATE_FIELDS, n)).round().astype(int)))
        diams = []
        for i in picks:
            img = src.read_one(int(i))
            diams.append(probe.estimate_diameter(img[seg_idx] if len(seg_idx) == 2 else img[seg_idx[0]]))
        note = {"estimated_on_fields": [int(i) for i in picks], "estimates": [round(d, 2) for d in diams],
                "diameter": float(np.median(diams)),
                "input": "cytoplasm + nucleus" if len(seg_idx) == 2 else "nucleus"}
        store.save_json("diameter.json", note)
    opts.diameter = float(note["diameter"])
    log.info("cellpose: diameter %.1f px (median of fields %s)", opts.diameter, note["estimated_on_fields"])
    return note


def _mask_name(src: Any, i: int, seg_i: int) -> str:
    """Saved masks are named like the segmented channel's file (reusable as --masks), else by field."""
    if hasattr(src, "files"):
        return src.files[i][seg_i].stem + ".tif"
    return field_key(src.metadata.iloc[i], i) + ".tif"


def plate_fields(plan: Any, s: Any, opts: FieldOptions, embedder: Any, store: Any, todo: Sequence[int],
                 progress: Callable[[int], None] | None = None) -> FieldEmbedder:
    """Segment, crop and embed the fields ``todo`` that the store does not hold yet, saving each as it
    finishes (previews/masks into the store's folder too). Returns the field embedder (for provenance)."""
    src = plan.source
    mask_files, centres = user_cells(plan, s, opts)
    seg_idx = [src.channel_names.index(c) for c in plan.segment_channels]
    seg_index: Any = seg_idx if len(seg_idx) == 2 else (seg_idx[0] if seg_idx else 0)
    fe = FieldEmbedder(embedder, opts, segment_index=seg_index,
                       embed_index=[src.channel_names.index(c) for c in plan.embed_channels])
    preview = int(getattr(s, "preview", 0) or 0)
    save_masks = bool(getattr(s, "save_masks", False))
    needs_seg = bool(seg_idx) and mask_files is None
    done = store.done()
    if progress:
        progress(sum(1 for i in todo if i in done))
    for i in todo:
        if i in done:
            continue
        t0 = time.perf_counter()
        img = src.read_one(i)
        t1 = time.perf_counter()
        labels = table = None
        if mask_files is not None:
            labels = read_mask_file(mask_files[i], img.shape[1:])
        elif centres is not None:
            ys, xs = centres[i]
            table = centre_table(ys, xs, opts.centre_side(), img.shape[1:])
        elif needs_seg:
            labels = fe.labels_for(img)
        t2 = time.perf_counter()
        r = fe(img, i, labels=labels, table=table, keep_crops=bool(preview))
        t3 = time.perf_counter()
        if preview and r.crops is not None:
            save_montage(r.crops, store.folder / "previews" / f"{field_key(src.metadata.iloc[i], i)}.png", preview)
        if save_masks and r.labels is not None:
            save_mask(r.labels, store.folder / "masks" / _mask_name(src, i, seg_idx[-1]))
        store.save(i, r, {"read": t1 - t0, "segment": t2 - t1, "crop_embed": t3 - t2})
        if progress:
            progress(1)
    return fe


def assemble_plate(plan: Any, store: Any, fe: FieldEmbedder, embedder: Any, diameter_note: dict | None
                   ) -> tuple[pd.DataFrame | None, pd.DataFrame, list[str], dict[str, Any]]:
    """Every field from the store, in field order -> (cells or None, fields, feature names, provenance)."""
    n = plan.n_fields
    missing = sorted(set(range(n)) - store.done())
    if missing:
        raise MicrosnoopError(f"{len(missing)} of {n} fields are not finished (e.g. field {missing[0]}); run the "
                              f"missing shards, or rerun with --resume to compute them", store.folder)
    results, timings = [], {"read": 0.0, "segment": 0.0, "crop_embed": 0.0}
    for i in range(n):
        r, t = store.load(i)
        results.append(r)
        for k in timings:
            timings[k] += t[k]
    fields_df, cells, feats = _assemble(plan.source.metadata, results, plan.embed_channels, embedder.dim)
    prov = embedder.provenance()
    seg = plan.segment_channels
    prov = {**prov, "sha256": prov.get("model_sha256"), "channels": plan.embed_channels,
            "segment_channel": seg[-1] if seg else None,
            "segmentation_input": ("whole cells: [" + ", ".join(seg) + "] (cytoplasm, nucleus)") if len(seg) == 2
            else (f"nuclei: {seg[0]}" if seg else None),
            **fe.provenance(), "diameter_estimate": diameter_note,
            "fields_timings_s": {k: round(v, 2) for k, v in timings.items()},
            "n_fields": n, "n_cells_found": int(sum(r.n_found for r in results)),
            "n_cells_embedded": int(sum(r.count for r in results)),
            "n_fields_without_cells": int(sum(r.count == 0 for r in results)) if fe.opts.mode == "crop" else 0}
    return cells, fields_df, feats, prov


# ------------------------------------------------------------------------------- benchmark sets

def segment_dataset(images: np.ndarray, segmenter: str = "cellpose", diameter: float | None = None,
                    segment_index: int = 0, device: str = "cpu", cache_dir: str | Path | None = None,
                    data_sha256: str | None = None, precision: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Label images (N, H, W) int32 of one channel of every field, with the segmenter's provenance
    and wall time. With ``cache_dir`` (and the images' sha256) the labels are kept in
    ``<cache_dir>/<data>__<settings>.npy``, so several models or modes segment a set only once."""
    import hashlib
    import json

    from ..io.atomic import save_npy_atomic
    from ..segment import get_segmenter

    seg = get_segmenter(segmenter, diameter, device=device, precision=precision)
    prov = getattr(seg, "provenance", lambda: {"segmenter": segmenter, "diameter": diameter or "estimated"})()
    prov = {**prov, "segment_index": segment_index}
    path = None
    if cache_dir is not None and data_sha256:
        tag = hashlib.sha256(json.dumps(prov, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"{data_sha256[:16]}__{segmenter}__{tag}.npy"
        if path.exists():
            side = path.with_suffix(".json")
            done = json.loads(side.read_text()) if side.exists() else prov
            return np.load(path).astype(np.int32), {**done, "cached": str(path)}
    t0 = time.perf_counter()
    labels = np.stack([seg(np.asarray(images[i, segment_index])) for i in range(len(images))])
    prov["wall_s"] = round(time.perf_counter() - t0, 2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, labels.astype(np.uint16 if labels.max() < 65536 else np.int32))
        from ..io.atomic import atomic_path

        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(prov, default=str))
    return labels.astype(np.int32), prov


def embed_fields_dataset(set_path: str | Path, embedder: Any, mode: str = "crop", segmenter: str = "cellpose",
                         diameter: float | None = None, crop_size: int | None = None, max_cells: int | None = None,
                         rescale_constant: float | None = None, segment_channel: str | None = None,
                         seed: int = 0, cache_dir: str | Path | None = None, data_sha256: str | None = None,
                         segment_precision: str = "auto") -> tuple[pd.DataFrame, np.ndarray]:
    """A benchmark set of whole fields (images.npy + metadata.csv + dataset.json) -> (metadata with
    ``Metadata_Count`` / ``Metadata_CellsFound``, (n_fields, C * dim) float32 field vectors).

    ``segmenter="masks"`` uses ``masks.npy`` beside ``images.npy`` (the set's own label masks);
    ``cache_dir`` + ``data_sha256`` keep the segmentation for reuse (see :func:`segment_dataset`)."""
    import json

    set_path = Path(set_path)
    img_path = set_path / "images.npy" if set_path.is_dir() else set_path
    images = np.load(img_path, mmap_mode="r")
    if images.ndim != 4:
        raise MicrosnoopError(f"expected (N, C, H, W) images, got shape {images.shape}", img_path)
    meta_path = img_path.parent / "metadata.csv"
    meta = pd.read_csv(meta_path) if meta_path.exists() else pd.DataFrame(index=range(len(images)))
    info_path = img_path.parent / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    channels = list(info.get("channels") or [f"ch{i}" for i in range(images.shape[1])])
    if segment_channel is None:
        seg_i = channels.index("DNA") if "DNA" in channels else 0
    elif segment_channel in channels:
        seg_i = channels.index(segment_channel)
    else:
        raise MicrosnoopError(f"segment channel '{segment_channel}' not in {channels}", info_path)
    opts = FieldOptions(segmenter=segmenter, diameter=diameter, mode=mode, crop_size=crop_size, max_cells=max_cells,
                        rescale_constant=rescale_constant, seed=seed, segment_precision=segment_precision).check()
    masks = None
    if opts.mode == "crop" and opts.segmenter == "masks":
        from ..segment.masks import load_masks_npy, masks_npy_for

        masks = load_masks_npy(masks_npy_for(img_path), len(images), images.shape[2:])
    elif opts.segmenter == "centres" and opts.mode == "crop":
        raise MicrosnoopError("--segmenter centres is for manifests (plate); use masks, cellpose or classical")
    elif opts.mode == "crop":
        masks, _ = segment_dataset(images, opts.segmenter, opts.diameter, seg_i, device=str(embedder.device),
                                   cache_dir=cache_dir, data_sha256=data_sha256, precision=opts.segment_precision)
    fe = FieldEmbedder(embedder, opts, segment_index=seg_i)
    results = []
    for i in range(len(images)):
        img = np.asarray(images[i])
        labels = np.asarray(masks[i]).astype(np.int32) if masks is not None else None
        results.append(fe(img, i, labels=labels))
        if (i + 1) % 10 == 0:
            log.info("fields: %d/%d", i + 1, len(images))
    fields_df, _, feats = _assemble(meta, results, channels, embedder.dim)
    X = fields_df[feats].to_numpy(np.float32)
    return fields_df.drop(columns=feats), X


# ------------------------------------------------------------------------------ microsnoop segment

def segment_to_folder(source: str | Path, output: str | Path, channel: str | None = None,
                      segmenter: str = "cellpose", diameter: float | None = None, truth: str | Path | None = None,
                      overwrite: bool = False, device: str = "cpu", precision: str = "auto",
                      progress: Callable[[int], None] | None = None, engine: str | None = "auto") -> dict[str, Any]:
    """Segment one channel of every image of any input and write the label images to ``output``:
    ``masks.npy`` (N, H, W) for array inputs (usable as a set's masks.npy), else one
    ``<segmented file stem>.tif`` per image (usable as ``plate --masks``). With ``truth`` (a
    (N, H, W) ``masks.npy``) the summary has object F1 at IoU 0.5. The folder appears only when done."""
    import json
    import shutil

    from ..evaluate.segmentation import match_masks
    from ..io.readers import ArraySource, FileListSource, open_source
    from ..segment import get_segmenter

    source, output = Path(source), Path(output)
    if source.is_dir() and (source / "images.npy").exists():
        source = source / "images.npy"
    if output.exists() and not overwrite:
        raise MicrosnoopError("output already exists (use --overwrite to replace it)", output)
    seg = get_segmenter(segmenter, diameter, device=device, precision=precision, engine=engine)
    src = open_source(source)
    names = list(src.channel_names)
    if isinstance(src, ArraySource):
        info = source.parent / "dataset.json"
        if info.exists():
            names = list(json.loads(info.read_text()).get("channels") or names)
    if channel is None:
        ci = names.index("DNA") if "DNA" in names else 0
    elif channel in names:
        ci = names.index(channel)
    elif channel.isdigit() and int(channel) < len(names):
        ci = int(channel)
    else:
        raise MicrosnoopError(f"channel '{channel}' not in the input's channels ({', '.join(names)})", source)
    gt = None
    if truth is not None:
        from ..segment.masks import load_masks_npy

        first = src.read(0, 1)[0]
        gt = load_masks_npy(truth, len(src), first.shape[1:])
    stage = output.parent / f".{output.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        labels_all, found, matches = [], [], []
        for i in range(len(src)):
            img = src.read(i, i + 1)[0]
            lab = np.asarray(seg(np.asarray(img[ci])), np.int32)
            found.append(int(len(np.unique(lab)) - 1))
            if gt is not None:
                matches.append(match_masks(np.asarray(gt[i]), lab))
            if isinstance(src, ArraySource):
                labels_all.append(lab)
            else:
                stem = src.files[i][min(ci, len(src.files[i]) - 1)].stem if isinstance(src, FileListSource) else f"{i:05d}"
                save_mask(lab, stage / f"{stem}.tif")
            if progress:
                progress(1)
        if labels_all:
            from ..io.atomic import save_npy_atomic

            arr = np.stack(labels_all)
            save_npy_atomic(stage / "masks.npy", arr.astype(np.uint16 if arr.max() < 65536 else np.int32))
        summary: dict[str, Any] = {"input": str(source), "channel": names[ci], "n_images": len(src),
                                   "objects_found": int(sum(found)),
                                   "segmentation": getattr(seg, "provenance", lambda: {"segmenter": segmenter})()}
        if matches:
            tot = matches[0]
            for m in matches[1:]:
                tot = tot + m
            summary["truth"] = str(truth)
            summary["objects_true"] = int(tot.n_true)
            summary["iou_0.5"] = tot.as_dict()
        (stage / "segmentation.json").write_text(json.dumps(summary, indent=1, default=str))
        if output.exists():
            shutil.rmtree(output)
        stage.rename(output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return summary
