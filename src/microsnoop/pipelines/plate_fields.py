"""The plate's field loop: every field of a plate (LoadData manifest or OME-Zarr) segmented, cropped and
embedded with :class:`.fields.FieldEmbedder`, each kept in the field store as it finishes.

The checked plate plan (``workflows.plate_checks.PlatePlan``) and settings (``PlateSettings``) come
in as plain objects, so this layer needs nothing from profiling or evaluation.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..segment.masks import read_mask_file, save_mask
from .crop import centre_table
from .fields import FieldEmbedder, FieldOptions, assemble_fields, field_key, save_montage

log = logging.getLogger("microsnoop")

ESTIMATE_FIELDS = 3  # plates: Cellpose's size is estimated on this many fields (first, middle, last), then fixed

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
    fields_df, cells, feats = assemble_fields(plan.source.metadata, results, plan.embed_channels, embedder.dim)
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
