"""Decoding single image files into (C, H, W) arrays with tifffile / imageio."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MicrosnoopError

TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp"}


def to_chw(arr: np.ndarray, path: object = None) -> np.ndarray:
    """2-D -> (1, H, W); (H, W, c<=4) -> (c, H, W); (C, H, W) kept."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[-1] <= 4 and arr.shape[0] > 4:
            return np.moveaxis(arr, -1, 0)
        return arr
    if arr.ndim == 4 and 1 in arr.shape[:2]:  # e.g. (Z=1, C, H, W) from some TIFF writers
        return arr.reshape(-1, *arr.shape[-2:])
    raise MicrosnoopError(f"cannot read {arr.ndim}-D image of shape {arr.shape} as (C, H, W)", path)


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as (C, H, W) in its stored dtype; one-line error if it does not decode."""
    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            arr = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            arr = iio.imread(path)
    except MicrosnoopError:
        raise
    except Exception as exc:  # decoders raise many types; the user needs the file and the reason
        raise MicrosnoopError(f"cannot decode image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", path) from None
    if np.asarray(arr).size == 0:
        raise MicrosnoopError("cannot decode image: empty or corrupt (no pixel data)", path)
    return to_chw(arr, path)
