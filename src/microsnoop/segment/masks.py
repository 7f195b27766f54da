"""User-supplied segmentations: label masks (``masks.npy`` beside ``images.npy``, or one TIFF/PNG per
field) and cell centres from a CSV (CellProfiler's ``<Object>_Location_Center_X/Y`` columns)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.images import IMAGE_SUFFIXES, read_image


def save_mask(labels: np.ndarray, path: Path) -> Path:
    """One label image as a zlib TIFF (uint16 when the labels fit), readable back as ``--masks``.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer labels, 0 = background.
    path : Path
        The file to write (its folder is created).

    Returns
    -------
    Path
        ``path``.
    """
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if labels.max() < 65536 else np.uint32
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib")
    return path


def save_masks_npy(path: Path, labels: np.ndarray) -> Path:
    """(N, H, W) labels as an atomic ``.npy`` (uint16 when they fit), the format of a set's ``masks.npy``.

    Parameters
    ----------
    path : Path
        The file to write.
    labels : numpy.ndarray
        (N, H, W) integer labels.

    Returns
    -------
    Path
        ``path``.
    """
    from ..io.atomic import save_npy_atomic

    save_npy_atomic(path, labels.astype(np.uint16 if labels.max() < 65536 else np.int32))
    return path


def masks_npy_for(images_path: str | Path) -> Path:
    return Path(images_path).parent / "masks.npy"


def load_masks_npy(path: str | Path, n: int, shape: tuple[int, int]) -> np.ndarray:
    """A (N, H, W) integer label array (memory-mapped), checked against the images it belongs to."""
    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("mask file not found (--segmenter masks needs masks.npy beside images.npy)", path)
    try:
        m = np.load(path, mmap_mode="r")
    except Exception as exc:
        raise MicrosnoopError(f"cannot read masks ({type(exc).__name__}: {exc})", path) from None
    if m.ndim != 3 or m.shape[0] != n or tuple(m.shape[1:]) != tuple(shape):
        raise MicrosnoopError(f"masks have shape {m.shape}, images need ({n}, {shape[0]}, {shape[1]})", path)
    if m.dtype.kind not in "iub":
        raise MicrosnoopError(f"masks must be integer labels, not {m.dtype}", path)
    return m


def read_mask_file(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """One label image (TIFF/PNG, 0 = background) as int32, checked against the field's shape."""
    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("mask file not found", path)
    arr = read_image(path)
    if arr.shape[0] != 1:
        raise MicrosnoopError(f"a mask must be a one-channel label image, got {arr.shape[0]} channels", path)
    lab = arr[0]
    if lab.dtype.kind not in "iub":
        raise MicrosnoopError(f"mask must hold integer labels, not {lab.dtype}", path)
    if shape is not None and lab.shape != tuple(shape):
        raise MicrosnoopError(f"mask shape {lab.shape} does not match its field's {tuple(shape)}", path)
    return lab.astype(np.int32)


def mask_files_for(masks: str | Path, manifest: pd.DataFrame, segment_files: Sequence[Path], csv: Path) -> list[Path]:
    """Mask path of every field. ``masks`` is a manifest column (``FileName_NucleiMask``; relative
    paths are relative to the manifest) or a folder holding a file named like the segment channel's
    file (any image suffix). Every path is checked to exist before any work starts."""
    masks = str(masks)
    out: list[Path] = []
    if masks in manifest.columns:
        for i, v in enumerate(manifest[masks]):
            if pd.isna(v) or not str(v).strip():
                raise MicrosnoopError(f"row {i + 2}: empty {masks}", csv)
            p = Path(str(v))
            out.append(p if p.is_absolute() else csv.parent / p)
    else:
        folder = Path(masks)
        if not folder.is_dir():
            raise MicrosnoopError("--masks is neither a manifest column nor a folder", folder)
        for f in segment_files:
            cands = [folder / f.name] + [folder / (f.stem + s) for s in sorted(IMAGE_SUFFIXES)]
            hit = next((c for c in cands if c.exists()), None)
            out.append(hit if hit is not None else folder / f.name)
    for p in out:
        if not p.exists():
            raise MicrosnoopError("mask file not found", p)
    return out


def centre_columns(df: pd.DataFrame, path: Path) -> tuple[str, str]:
    xs = [c for c in df.columns if c.endswith("Location_Center_X")]
    ys = [c for c in df.columns if c.endswith("Location_Center_Y")]
    if len(xs) != 1 or len(ys) != 1:
        raise MicrosnoopError("expected one *_Location_Center_X and one *_Location_Center_Y column, found "
                              f"{xs + ys or 'none'}", path)
    return ys[0], xs[0]


def load_centres(path: str | Path, fields: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cell centres (y, x) per field from a CSV of objects. Rows are assigned to fields by
    ``ImageNumber`` (1-based field order, CellProfiler's convention) or else by the ``Metadata_*``
    columns the CSV shares with the fields' metadata."""
    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("centres file not found", path)
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise MicrosnoopError(f"cannot read CSV ({type(exc).__name__}: {exc})", path) from None
    ycol, xcol = centre_columns(df, path)
    if df[[ycol, xcol]].isna().any().any():
        raise MicrosnoopError(f"empty values in {xcol}/{ycol}", path)
    if "ImageNumber" in df.columns:
        key = df["ImageNumber"].astype(int) - 1
        if key.min() < 0 or key.max() >= len(fields):
            raise MicrosnoopError(f"ImageNumber outside 1..{len(fields)} (the fields' count)", path)
    else:
        common = [c for c in df.columns if c.startswith("Metadata_") and c in fields.columns]
        if not common:
            raise MicrosnoopError("no ImageNumber column and no Metadata_* column shared with the fields", path)
        f = fields[common].astype(str).reset_index(drop=True).reset_index()
        merged = df[common].astype(str).merge(f, on=common, how="left")
        if merged["index"].isna().any():
            raise MicrosnoopError(f"some rows match no field on {', '.join(common)}", path)
        key = merged["index"].astype(int)
    out = []
    for i in range(len(fields)):
        sel = (key == i).to_numpy()
        out.append((df.loc[sel, ycol].to_numpy(float), df.loc[sel, xcol].to_numpy(float)))
    return out
