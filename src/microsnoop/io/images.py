"""Decoding single image files into (C, H, W) arrays with tifffile / imageio.

Every way a file can be unusable ends in a one-line :class:`MicrosnoopError` naming it: undecodable
bytes, a declared size beyond the pixel limit (checked from the header, before decoding), complex
pixels, Z-stacks or time series (which would otherwise silently become channels).
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import MicrosnoopError, MicrosnoopWarning

TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp"}
DEFAULT_MAX_PIXELS = 200_000_000  # per image (all planes): ~400 MB as uint16, ~800 MB as float32
MAX_PIXELS_ENV = "MICROSNOOP_MAX_PIXELS"
MAX_ABS_PIXEL = 1e30  # float pixels beyond this overflow float32 inside the encoder (NaN vectors)
# tifffile logs every malformed tag it skips; the user gets our one-line error (or the image) instead
logging.getLogger("tifffile").setLevel(logging.CRITICAL)
MIN_SIDE = 4  # an image narrower than this carries no morphology (a 1x1 or 100000x1 "image" is a mistake)


def max_pixels() -> int:
    """The pixel limit per image: ``$MICROSNOOP_MAX_PIXELS`` (the CLI's ``--max-pixels`` sets it), else 200M."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise MicrosnoopError(f"--max-pixels / {MAX_PIXELS_ENV} must be a number, not '{raw}'") from None
    if value < 1:
        raise MicrosnoopError(f"--max-pixels / {MAX_PIXELS_ENV} must be at least 1, not {raw}")
    return value


def check_pixel_count(shape: tuple[int, ...], path: object) -> None:
    """Refuse an image whose declared size exceeds the pixel limit (a corrupt or hostile header can
    declare a million rows in a 4 KB file; decoding it would take GBs)."""
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    limit = max_pixels()
    if n > limit:
        raise MicrosnoopError(f"image of shape {tuple(int(s) for s in shape)} has {n:,} pixels, over the limit of "
                              f"{limit:,} (raise it with --max-pixels or ${MAX_PIXELS_ENV})", path)


def check_pixel_type(dtype: np.dtype, path: object) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise MicrosnoopError(f"complex pixels ({dtype}) are not supported: save the magnitude or the real part "
                              f"as a real-valued image", path)
    if dtype.kind not in "biuf":
        raise MicrosnoopError(f"unsupported pixel type {dtype}", path)


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


def _decode_tiff(data: bytes, path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.series:
            raise MicrosnoopError("TIFF holds no image", path)
        series = tif.series[0]
        axes = series.axes.upper()
        shape = tuple(series.shape)
        check_pixel_type(series.dtype, path)
        check_pixel_count(shape, path)
        for ax, what in (("Z", "a Z-stack"), ("T", "a time series")):
            if ax in axes and shape[axes.index(ax)] > 1:
                raise MicrosnoopError(f"is {what} (axes {axes}, shape {shape}); microsnoop embeds 2-D images: "
                                      f"project it (e.g. a max projection) or save the planes as separate files", path)
        return series.asarray()


def _decode_other(data: bytes, path: Path) -> np.ndarray:
    import imageio.v3 as iio
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own, configurable limit applies instead of Pillow's
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
            bands = len(im.getbands())
        check_pixel_count((bands, h, w), path)
        return iio.imread(data, extension=path.suffix.lower())
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_image(data: bytes, path: str | Path) -> np.ndarray:
    """Decode the bytes of one image file (named by ``path``) as (C, H, W) in its stored dtype."""
    path = Path(path)
    try:
        arr = _decode_tiff(data, path) if path.suffix.lower() in TIFF_SUFFIXES else _decode_other(data, path)
    except MicrosnoopError:
        raise
    except Exception as exc:  # decoders raise many types; the user needs the file and the reason
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise MicrosnoopError(f"cannot decode image ({type(exc).__name__}: {msg})", path) from None
    arr = np.asarray(arr)
    if arr.size == 0:
        raise MicrosnoopError("cannot decode image: empty or corrupt (no pixel data)", path)
    check_pixel_type(arr.dtype, path)
    check_pixel_count(arr.shape, path)
    chw = to_chw(arr, path)
    if path.suffix.lower() == ".png" and chw.shape[0] == 4 and (chw[3] == chw[3].flat[0]).all():
        warnings.warn(f"{path}: dropped the constant alpha plane of an RGBA image (3 channels kept)",
                      MicrosnoopWarning, stacklevel=2)
        chw = chw[:3]
    return chw


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of a file, with a one-line error naming it when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MicrosnoopError("file not found", path) from None
    except IsADirectoryError:
        raise MicrosnoopError("is a folder, not an image file", path) from None
    except OSError as exc:
        raise MicrosnoopError(f"cannot read file ({exc.strerror or exc})", path) from None


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as (C, H, W) in its stored dtype; one-line error if it does not decode."""
    return decode_image(read_file_bytes(path), path)
