"""Benchmark sets of whole fields (``images.npy`` + ``metadata.csv`` + ``dataset.json``, kind ``fields``)
-> one vector per field, with the sets' segmentations cached so several models segment a set once.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .fields import FieldEmbedder, FieldOptions, assemble_fields

log = logging.getLogger("microsnoop")

def segment_dataset(images: np.ndarray, segmenter: str = "cellpose", diameter: float | None = None,
                    segment_index: int = 0, device: str = "cpu", cache_dir: str | Path | None = None,
                    data_sha256: str | None = None, precision: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Label images (N, H, W) int32 of one channel of every field, with the segmenter's provenance
    and wall time. With ``cache_dir`` (and the images' sha256) the labels are kept in
    ``<cache_dir>/<data>__<settings>.npy``, so several models or modes segment a set only once."""
    import hashlib
    import json

    from ..io.atomic import atomic_path
    from ..segment import get_segmenter
    from ..segment.masks import save_masks_npy

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
        save_masks_npy(path, labels)
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
    from ..io.dataset import channel_index, load_set_folder

    s = load_set_folder(set_path)
    images, meta, channels, img_path = s.images, s.metadata, s.channels, s.images_path
    seg_i = channel_index(channels, segment_channel, img_path, "segment channel")
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
    fields_df, _, feats = assemble_fields(meta, results, channels, embedder.dim)
    X = fields_df[feats].to_numpy(np.float32)
    return fields_df.drop(columns=feats), X
