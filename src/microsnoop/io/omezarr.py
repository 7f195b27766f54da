"""OME-Zarr (NGFF) high-content-screening plates as an image source: plate -> wells -> fields.

The plate's ``plate`` metadata lists its wells (``A/1``...), each well's ``well`` metadata lists its
fields (images), and each field is a multiscale image whose full-resolution level (``datasets[0]``)
has a channel axis; channel names come from the field's ``omero.channels[].label`` (NGFF's rendering
metadata) and fall back to ``ch0, ch1...``. NGFF 0.4 (zarr v2, attributes at the top level) and 0.5
(zarr v3, attributes under ``ome``) are both read, with ``zarr``.

Nothing is loaded up front but the metadata: :meth:`OmeZarrPlateSource.read_one` reads one field's
channels of interest (one plane each) when asked, so a plate of any size streams field by field.
Each field gets ``Metadata_Plate`` (the plate's ``name``, else the folder name), ``Metadata_Well``
(row + zero-padded column, e.g. ``A01``, as LoadData manifests write it), ``Metadata_Row``,
``Metadata_Column`` and ``Metadata_Site`` (the field's index in its well, from 1).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .readers import ImageSource


def _ome_attrs(group: Any) -> dict[str, Any]:
    """NGFF attributes of a zarr group: under ``ome`` in 0.5 (zarr v3), at the top level in 0.4."""
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))


def _open_group(path: Path | str, what: str) -> Any:
    try:
        import zarr
    except ImportError:
        raise MicrosnoopError("reading OME-Zarr needs zarr: pip install 'microsnoop[plates]' (or zarr)", path) from None

    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing or malformed group
        raise MicrosnoopError(f"cannot open {what} as a zarr group ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})", path) from None


def is_ome_zarr_plate(path: str | Path) -> bool:
    """True when ``path`` is a folder holding an NGFF plate (``plate`` in its group attributes)."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")):
        return False
    try:
        import zarr  # noqa: F401
    except ImportError:
        raise MicrosnoopError("this folder is a zarr store; reading OME-Zarr needs zarr: pip install "
                              "'microsnoop[plates]'", path) from None
    try:
        return "plate" in _ome_attrs(_open_group(path, "plate"))
    except MicrosnoopError:
        return False


def _well_name(row: str, col: str) -> str:
    return f"{row}{int(col):02d}" if str(col).isdigit() else f"{row}{col}"


class OmeZarrPlateSource(ImageSource):
    """An NGFF HCS plate, one image per field; channels by name (``channels`` selects and orders them)."""

    def __init__(self, path: str | Path, channels: Sequence[str] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise MicrosnoopError("file not found", self.path)
        root = _open_group(self.path, "plate")
        plate = _ome_attrs(root).get("plate")
        if not plate or not plate.get("wells"):
            raise MicrosnoopError("not an OME-Zarr HCS plate (no 'plate' metadata listing wells)", self.path)
        rows = [r["name"] for r in plate.get("rows", [])]
        cols = [c["name"] for c in plate.get("columns", [])]
        plate_name = str(plate.get("name") or self.path.stem)
        self.fields: list[str] = []
        meta: list[dict[str, Any]] = []
        for w in plate["wells"]:
            wpath = w["path"]
            r, c = (rows[w["rowIndex"]], cols[w["columnIndex"]]) if "rowIndex" in w and rows and cols \
                else tuple(wpath.split("/")[:2])
            images = _ome_attrs(_open_group(self.path / wpath, "well")).get("well", {}).get("images", [])
            if not images:
                raise MicrosnoopError(f"well {wpath} lists no fields", self.path / wpath)
            for site, im in enumerate(images, start=1):
                self.fields.append(f"{wpath}/{im['path']}")
                meta.append({"Metadata_Plate": plate_name, "Metadata_Well": _well_name(r, c), "Metadata_Row": r,
                             "Metadata_Column": c, "Metadata_Site": site})
        self.metadata = pd.DataFrame(meta)
        self._axes, self._level, all_names, self.shape = self._first_field_layout()
        self.all_channel_names = all_names
        self.channel_names = list(all_names)
        self._index = list(range(len(all_names)))
        if channels:
            self.select(channels)

    def _first_field_layout(self) -> tuple[list[str], str, list[str], tuple[int, ...]]:
        """Axes, full-resolution level path, channel names and array shape of the first field (every
        field of a plate shares them; each read checks its own shape)."""
        g = _open_group(self.path / self.fields[0], "field")
        attrs = _ome_attrs(g)
        ms = attrs.get("multiscales")
        if not ms:
            raise MicrosnoopError("field has no 'multiscales' metadata", self.path / self.fields[0])
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms[0].get("axes", [])]
        level = ms[0]["datasets"][0]["path"]
        arr = g[level]
        if not axes:
            axes = list("tczyx"[-arr.ndim:])
        if axes[-2:] != ["y", "x"] or len(axes) != arr.ndim:
            raise MicrosnoopError(f"unsupported axes {axes} for an array of shape {arr.shape}", self.path / self.fields[0])
        for ax in ("t", "z"):
            if ax in axes and arr.shape[axes.index(ax)] > 1:
                raise MicrosnoopError(f"fields have {arr.shape[axes.index(ax)]} '{ax}' planes; microsnoop embeds "
                                      f"2-D fields (project or pick a plane first)", self.path / self.fields[0])
        n_c = arr.shape[axes.index("c")] if "c" in axes else 1
        labels = [ch.get("label") for ch in attrs.get("omero", {}).get("channels", [])]
        names = [str(x) for x in labels] if len(labels) == n_c and all(labels) and len(set(labels)) == n_c \
            else [f"ch{i}" for i in range(n_c)]
        return axes, level, names, tuple(arr.shape)

    def select(self, channels: Sequence[str]) -> None:
        """Read only these channels, in this order."""
        missing = [c for c in channels if c not in self.all_channel_names]
        if missing:
            raise MicrosnoopError(f"channel(s) {', '.join(missing)} not in the plate (channels: "
                                  f"{', '.join(self.all_channel_names)})", self.path)
        self._index = [self.all_channel_names.index(c) for c in channels]
        self.channel_names = list(channels)

    def read_one(self, i: int) -> np.ndarray:
        """Field ``i`` as (C, H, W) in its stored dtype, only the selected channels read from disk."""
        import zarr

        where = self.path / self.fields[i]
        try:
            arr = zarr.open_array(str(where / self._level), mode="r")
        except Exception as exc:
            raise MicrosnoopError(f"cannot open the field's image ({type(exc).__name__}: {exc})", where) from None
        if arr.ndim != len(self._axes) or ("c" in self._axes and arr.shape[self._axes.index("c")] != self.shape[self._axes.index("c")]):
            raise MicrosnoopError(f"field shape {arr.shape} differs from the plate's first field {self.shape}", where)
        planes = []
        for c in self._index:
            sel = tuple(c if ax == "c" else (0 if ax in ("t", "z") else slice(None)) for ax in self._axes)
            try:
                planes.append(np.asarray(arr[sel]))
            except Exception as exc:  # a missing or corrupt chunk
                raise MicrosnoopError(f"cannot read channel {self.all_channel_names[c]} ({type(exc).__name__}: "
                                      f"{exc})", where) from None
        return np.stack(planes)

    def read(self, start: int, stop: int, digest: Any = None) -> list[np.ndarray]:
        """Fields ``start:stop``; ``digest`` (a hashlib object), when given, is fed the pixels read
        (chunks are compressed: the decoded pixels are what the embedding saw)."""
        images = [self.read_one(i) for i in range(start, stop)]
        if digest is not None:
            for img in images:
                digest.update(f"{img.dtype.str}{img.shape}".encode())
                digest.update(memoryview(np.ascontiguousarray(img)).cast("B"))
        return images

    def name(self, i: int) -> str:
        return str(self.path / self.fields[i])

    def fingerprint(self) -> str:
        """Metadata files and every chunk's size and mtime of the selected full-resolution arrays."""
        h = hashlib.sha256(str(self.path.resolve()).encode())
        for f in self.fields:
            for p in sorted((self.path / f / self._level).rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(self.path)}:{st.st_size}:{int(st.st_mtime)}".encode())
        h.update(",".join(self.channel_names).encode())
        return h.hexdigest()
