"""``microsnoop segment``: one channel of every image of any input -> label images in a new folder.

Array inputs give ``masks.npy`` (N, H, W) (usable as a set's masks.npy); file inputs give one
``<segmented file stem>.tif`` per image (usable as ``plate --masks``). The folder is built beside
the output as ``.<name>.partial`` and renamed into place only when every image is done.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import MicrosnoopError
from .masks import save_mask, save_masks_npy
from .metrics import MatchResult, match_masks


def segment_to_folder(source: str | Path, output: str | Path, channel: str | None = None,
                      segmenter: str = "cellpose", diameter: float | None = None, truth: str | Path | None = None,
                      overwrite: bool = False, device: str = "cpu", precision: str = "auto",
                      progress: Callable[[int], None] | None = None, engine: str | None = "auto") -> dict[str, Any]:
    """Segment one channel of every image of any input and write the label images to ``output``.

    Parameters
    ----------
    source : str or Path
        Any input ``embed`` reads (a set folder means its ``images.npy``).
    output : str or Path
        The folder to create; it appears only when done.
    channel : str, optional
        Channel name or index (default: DNA if present, else the first).
    segmenter, diameter, device, precision, engine
        As for :func:`microsnoop.segment.get_segmenter`.
    truth : str or Path, optional
        A (N, H, W) ``masks.npy``: the summary then has object F1 at IoU 0.5.
    overwrite : bool
        Replace an existing ``output``.
    progress : callable, optional
        Called with 1 after each image.

    Returns
    -------
    dict
        The summary also written to ``segmentation.json``.
    """
    from ..io.dataset import channel_index, set_images_path
    from ..io.readers import open_source
    from . import get_segmenter

    source, output = set_images_path(source), Path(output)
    if output.exists() and not overwrite:
        raise MicrosnoopError("output already exists (use --overwrite to replace it)", output)
    seg = get_segmenter(segmenter, diameter, device=device, precision=precision, engine=engine)
    src = open_source(source)
    names = list(src.channel_names)
    ci = channel_index(names, channel, source)
    gt = _truth(truth, src)
    stage = output.parent / f".{output.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        found, matches = _segment_all(src, seg, ci, gt, stage, progress)
        summary: dict[str, Any] = {"input": str(source), "channel": names[ci], "n_images": len(src),
                                   "objects_found": int(sum(found)),
                                   "segmentation": getattr(seg, "provenance", lambda: {"segmenter": segmenter})()}
        if matches:
            tot = sum(matches[1:], matches[0])
            summary.update({"truth": str(truth), "objects_true": int(tot.n_true), "iou_0.5": tot.as_dict()})
        (stage / "segmentation.json").write_text(json.dumps(summary, indent=1, default=str))
        if output.exists():
            shutil.rmtree(output)
        stage.rename(output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return summary


def _truth(truth: str | Path | None, src: Any) -> np.ndarray | None:
    """The ground-truth masks, checked against the input's image count and size."""
    if truth is None:
        return None
    from .masks import load_masks_npy

    first = src.read(0, 1)[0]
    return load_masks_npy(truth, len(src), first.shape[1:])


def _segment_all(src: Any, seg: Callable[[np.ndarray], np.ndarray], ci: int, gt: np.ndarray | None, stage: Path,
                 progress: Callable[[int], None] | None) -> tuple[list[int], list[MatchResult]]:
    """Every image's labels into ``stage``; returns objects found per image and matches to the truth."""
    from ..io.readers import ArraySource, FileListSource

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
        save_masks_npy(stage / "masks.npy", np.stack(labels_all))
    return found, matches
