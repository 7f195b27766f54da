"""A set folder in the shared-data format: ``images.npy`` (N, C, H, W) + ``metadata.csv`` + ``dataset.json``.

One loader for every command that reads such a folder (benchmark sets, whole-field sets, labelled
training sets), so each checks the same things with the same one-line errors: the files it needs
exist, ``dataset.json`` parses, the images are a 4-D array (memory-mapped, never read whole here),
and the metadata has one row per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .readers import load_dataset_json, read_csv

NUCLEUS_CHANNEL = "DNA"  # the shared sets' name for the nuclear stain


@dataclass
class SetFolder:
    """What :func:`load_set_folder` read: the folder, its images (memory-mapped), metadata and info."""

    folder: Path
    images_path: Path
    images: np.ndarray           # (N, C, H, W), memory-mapped
    metadata: pd.DataFrame       # one row per image (an empty frame of N rows without metadata.csv)
    info: dict[str, Any]         # dataset.json ({} without it)

    @property
    def metadata_path(self) -> Path:
        return self.folder / "metadata.csv"

    @property
    def channels(self) -> list[str]:
        """Channel names from dataset.json, else ``ch0``, ``ch1``, ..."""
        return list(self.info.get("channels") or [f"ch{i}" for i in range(self.images.shape[1])])


def set_images_path(path: str | Path) -> Path:
    """``images.npy`` of a set folder, or ``path`` itself when it is not a folder holding one."""
    path = Path(path)
    return path / "images.npy" if path.is_dir() and (path / "images.npy").exists() else path


def load_set_folder(path: str | Path, required: Sequence[str] = ("images.npy",),
                    what: str = "not a set folder") -> SetFolder:
    """Read and check a set folder (or its ``images.npy``).

    Parameters
    ----------
    path : str or Path
        The folder, or the ``images.npy`` inside it.
    required : sequence of str
        Files that must exist in the folder (``images.npy`` always must).
    what : str
        How a missing file is reported (e.g. ``not a benchmark set``).

    Returns
    -------
    SetFolder
        The folder's images, metadata and dataset.json.
    """
    path = Path(path)
    img_path = path if path.suffix == ".npy" else path / "images.npy"
    folder = img_path.parent
    for name in dict.fromkeys(["images.npy", *required]):
        p = img_path if name == "images.npy" else folder / name
        if not p.exists():
            raise MicrosnoopError(f"{what}: missing {p.name} (expected {', '.join(required)})", folder)
    info = load_dataset_json(folder)
    try:
        images = np.load(img_path, mmap_mode="r")
    except Exception as exc:
        raise MicrosnoopError(f"cannot read array ({type(exc).__name__}: {exc})", img_path) from None
    if images.ndim != 4:
        raise MicrosnoopError(f"expected (N, C, H, W) images, got shape {images.shape}", img_path)
    meta_path = folder / "metadata.csv"
    if meta_path.exists():
        meta = read_csv(meta_path)
        if len(images) != len(meta):
            raise MicrosnoopError(f"{len(images)} images but {len(meta)} metadata rows", meta_path)
    else:
        meta = pd.DataFrame(index=range(len(images)))
    return SetFolder(folder, img_path, images, meta, info)


def channel_index(names: Sequence[str], wanted: str | None, path: str | Path | None = None,
                  what: str = "channel") -> int:
    """Index of channel ``wanted`` (a name, or a position given as digits); ``None``: DNA, else the first.

    Parameters
    ----------
    names : sequence of str
        The input's channel names.
    wanted : str or None
        The channel asked for.
    path : str or Path, optional
        The input, named in the error.
    what : str
        The option's name in the error (``channel``, ``segment channel``).

    Returns
    -------
    int
        The channel's position.
    """
    names = list(names)
    if wanted is None:
        return names.index(NUCLEUS_CHANNEL) if NUCLEUS_CHANNEL in names else 0
    if wanted in names:
        return names.index(wanted)
    if wanted.isdigit() and int(wanted) < len(names):
        return int(wanted)
    raise MicrosnoopError(f"{what} '{wanted}' not in the input's channels ({', '.join(names)})", path)
