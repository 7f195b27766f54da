"""Image sources: a .npy/.npz array, a folder of image files, or a LoadData-style CSV manifest.

Every source yields images as (C, H, W) arrays in index order, a metadata frame with
``Metadata_*`` columns (one row per image) and channel names, so the embedding engine and the
writers never need to know where the pixels came from.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError, MicrosnoopWarning
from .images import IMAGE_SUFFIXES, check_pixel_count, check_pixel_type, decode_image, read_file_bytes, read_image
from .ometiff import ome_channel_names


def _file_sig(path: Path) -> str:
    """Which file and how big: the cheap part of a resume check (content is checked per chunk by digest)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MicrosnoopError("file not found", path) from None
    except OSError as exc:
        raise MicrosnoopError(f"cannot read file ({exc.strerror or exc})", path) from None
    return f"{path.resolve()}:{st.st_size}"


class ImageSource:
    """Base class: subclasses set ``channel_names``, ``metadata`` and implement ``read``."""

    path: Path
    channel_names: list[str]
    metadata: pd.DataFrame

    def __len__(self) -> int:
        return len(self.metadata)

    def read(self, start: int, stop: int, digest: Any = None) -> list[np.ndarray]:
        """Images ``start:stop``; ``digest`` (a hashlib object), when given, is fed the bytes read."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def content_digest(self, start: int, stop: int) -> str:
        """sha256 of the input bytes behind images ``start:stop`` (what ``read`` feeds its digest)."""
        h = hashlib.sha256()
        self.read(start, stop, h)
        return h.hexdigest()

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    def rename_channels(self, names: Sequence[str] | None) -> None:
        if not names:
            return
        names = [str(n).strip() for n in names]
        if len(names) != self.n_channels:
            raise MicrosnoopError(f"{len(names)} channel names given ({','.join(names)}) but the input has "
                                  f"{self.n_channels} channels", self.path)
        if len(set(names)) != len(names):
            raise MicrosnoopError(f"channel names must be unique: {','.join(names)}", self.path)
        self.channel_names = names


def load_dataset_json(folder: Path) -> dict:
    p = folder / "dataset.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MicrosnoopError(f"invalid JSON ({exc.msg} at line {exc.lineno})", p) from None


class ArraySource(ImageSource):
    """An (N, C, H, W) array in .npy (memory-mapped) or .npz, with ``metadata.csv`` and
    ``dataset.json`` beside it when present (the shared benchmark format)."""

    def __init__(self, path: str | Path, metadata: str | Path | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise MicrosnoopError("file not found", self.path)
        try:
            if self.path.suffix == ".npz":
                z = np.load(self.path)
                key = "images" if "images" in z.files else z.files[0]
                self.array = z[key]
            else:
                self.array = np.load(self.path, mmap_mode="r")
        except Exception as exc:
            raise MicrosnoopError(f"cannot read array ({type(exc).__name__}: {exc})", self.path) from None
        if self.array.ndim == 3:  # (N, H, W): one channel
            self.array = self.array[:, None]
        if self.array.ndim != 4:
            raise MicrosnoopError(f"expected an (N, C, H, W) array, got shape {self.array.shape}", self.path)
        if self.array.shape[0] == 0 or 0 in self.array.shape[2:]:
            raise MicrosnoopError(f"empty image array of shape {self.array.shape}", self.path)
        check_pixel_type(self.array.dtype, self.path)
        check_pixel_count(self.array.shape[1:], self.path)
        info = load_dataset_json(self.path.parent)
        self.dataset = info
        n, c = self.array.shape[:2]
        names = info.get("channels") if info.get("channels") and len(info["channels"]) == c else None
        self.channel_names = list(names) if names else [f"ch{i}" for i in range(c)]
        meta_path = Path(metadata) if metadata else self.path.parent / "metadata.csv"
        if metadata and not meta_path.is_file():
            raise MicrosnoopError("--metadata file not found" if not meta_path.exists() else
                                  "--metadata is not a file", meta_path)
        if meta_path.exists():
            meta = read_csv(meta_path)
            if len(meta) != n:
                # a metadata table that does not describe these images must not be dropped silently
                raise MicrosnoopError(f"has {len(meta)} rows but {self.path.name} holds {n} images (fix it, or "
                                      f"pass the right table with --metadata)", meta_path)
        else:
            meta = pd.DataFrame(index=range(n))
        meta = meta[[c_ for c_ in meta.columns if c_.startswith("Metadata_")]].reset_index(drop=True)
        if "Metadata_Index" not in meta.columns:
            meta.insert(0, "Metadata_Index", np.arange(n))
        self.metadata = meta

    def read(self, start: int, stop: int, digest: Any = None) -> np.ndarray:
        block = np.ascontiguousarray(self.array[start:stop])
        if digest is not None:  # the pixels just read, so the input is never read twice for its digest
            digest.update(f"{block.dtype.str}{block.shape}".encode())
            digest.update(memoryview(block).cast("B"))
        return block

    def name(self, i: int) -> str:
        return f"{self.path} (image {i})"

    def fingerprint(self) -> str:
        return _file_sig(self.path)


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV as a frame; any parse problem (empty, binary, ragged rows) is a one-line error naming it."""
    try:
        return pd.read_csv(path)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise MicrosnoopError(f"cannot read CSV ({type(exc).__name__}: {msg})", path) from None


class FileListSource(ImageSource):
    """Images stored as files: ``files[i]`` lists one path per channel (or one multi-channel file)."""

    def __init__(self, path: Path, files: list[list[Path]], metadata: pd.DataFrame, channel_names: list[str]):
        self.path = Path(path)
        self.files = files
        self.metadata = metadata.reset_index(drop=True)
        self.channel_names = channel_names
        self.channel_index: list[int] | None = None

    def read_one(self, i: int, digest: Any = None) -> np.ndarray:
        """Image ``i`` as (C, H, W); each file is read once, its bytes fed to ``digest`` and decoded."""
        parts = []
        for p in self.files[i]:
            data = read_file_bytes(p)
            if digest is not None:
                digest.update(data)
            parts.append(decode_image(data, p))
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise MicrosnoopError(f"channel files of one image differ in size: "
                                  f"{', '.join(f'{f.name} {p.shape[1:]}' for f, p in zip(self.files[i], parts))}",
                                  self.files[i][0])
        img = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if self.channel_index is not None:
            if max(self.channel_index) >= img.shape[0]:
                raise MicrosnoopError(f"has {img.shape[0]} channels; --channel-index asks for "
                                      f"{max(self.channel_index)}", self.files[i][0])
            img = img[self.channel_index]
        if img.shape[0] != self.n_channels:
            raise MicrosnoopError(f"has {img.shape[0]} channels but the first image has {self.n_channels}",
                                  self.files[i][0])
        return img

    def read(self, start: int, stop: int, digest: Any = None) -> list[np.ndarray]:
        return [self.read_one(i, digest) for i in range(start, stop)]

    def content_digest(self, start: int, stop: int) -> str:
        """sha256 of the files' bytes, in the order ``read`` feeds them, without decoding."""
        h = hashlib.sha256()
        for i in range(start, stop):
            for p in self.files[i]:
                h.update(read_file_bytes(p))
        return h.hexdigest()

    def name(self, i: int) -> str:
        return ", ".join(str(p) for p in self.files[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for group in self.files:
            for p in group:
                h.update(_file_sig(p).encode())
        return h.hexdigest()

    def select_channels(self, index: Sequence[int] | None) -> None:
        """Keep these channels of multi-channel files (e.g. drop an empty blue plane of an RGB PNG)."""
        if not index:
            return
        bad = [i for i in index if int(i) < 0]
        if bad:
            raise MicrosnoopError(f"--channel-index must list planes counted from 0, got {bad[0]}")
        if len(set(index)) != len(index):
            raise MicrosnoopError(f"--channel-index lists a plane twice: {','.join(map(str, index))}")
        self.channel_index = [int(i) for i in index]
        self.channel_names = [f"ch{i}" for i in self.channel_index]


def _probe_channels(path: Path) -> int:
    return read_image(path).shape[0]


class FolderSource(FileListSource):
    """A folder of TIFF/PNG files. With ``channels`` (tokens such as ``w1,w2``) each image is the set of
    files whose names differ only in that token; without, every file is one (multi-channel) image."""

    def __init__(self, folder: str | Path, channels: Sequence[str] | None = None, pattern: str = "*"):
        folder = Path(folder)
        if not folder.is_dir():
            raise MicrosnoopError("not a folder", folder)
        all_files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not all_files:
            raise MicrosnoopError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) matching '{pattern}'", folder)
        if channels:
            files, keys = self._group(folder, all_files, list(channels))
            names = list(channels)
        else:
            files = [[p] for p in all_files]
            keys = [p.stem for p in all_files]
            n = _probe_channels(all_files[0])
            names = ome_channel_names(all_files[0], n) or [f"ch{i}" for i in range(n)]
        meta = pd.DataFrame({"Metadata_Image": keys,
                             "Metadata_FileName": [";".join(p.name for p in g) for g in files]})
        super().__init__(folder, files, meta, names)

    @staticmethod
    def _group(folder: Path, files: list[Path], tokens: list[str]) -> tuple[list[list[Path]], list[str]]:
        first = tokens[0]
        by_name = {p.name: p for p in files}
        groups, keys, used = [], [], {}
        for p in files:
            if first not in p.name:
                continue
            # replace the last occurrence, the usual place for a channel suffix such as _w1
            i = p.name.rfind(first)
            group = []
            for t in tokens:
                nm = p.name[:i] + t + p.name[i + len(first):]
                if nm not in by_name:
                    raise MicrosnoopError(f"channel '{t}' file {nm} is missing for image {p.name}", folder)
                if nm in used:
                    raise MicrosnoopError(f"file {nm} would be used for two channels/images "
                                          f"({used[nm]} and {p.name})", folder)
                used[nm] = p.name
                group.append(by_name[nm])
            groups.append(group)
            keys.append(p.name[:i] + p.name[i + len(first):].rsplit(".", 1)[0])
        if not groups:
            raise MicrosnoopError(f"no file name contains the first channel token '{first}'", folder)
        unused = [p for p in files if p.name not in used]
        for p in unused:
            tok = next((t for t in tokens[1:] if t in p.name), None)
            if tok is not None:
                raise MicrosnoopError(f"file {p.name} (channel '{tok}') has no '{first}' partner; every image needs "
                                      f"all of {','.join(tokens)}", folder)
        if unused:
            warnings.warn(f"{folder}: {len(unused)} image file(s) contain none of the channel tokens "
                          f"{','.join(tokens)} and are not used (first: {unused[0].name})", MicrosnoopWarning,
                          stacklevel=3)
        return groups, keys


def _manifest_channel_columns(df: pd.DataFrame, path: Path, columns: Sequence[str] | None) -> dict[str, str]:
    """Channel name -> path column. CellProfiler LoadData: FileName_<ch> (+ optional PathName_<ch>)."""
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise MicrosnoopError(f"missing column(s) {', '.join(missing)}; columns are {', '.join(df.columns)}", path)
        return {re.sub(r"^(FileName_|PathName_|Path_|File_)", "", c): c for c in columns}
    cols = {c[len("FileName_"):]: c for c in df.columns if c.startswith("FileName_")}
    if not cols:
        raise MicrosnoopError("missing FileName_<channel> columns (CellProfiler LoadData style) and no "
                              "--path-columns given", path)
    return cols


class ManifestSource(FileListSource):
    """A CSV with one row per image, one path column per channel and any ``Metadata_*`` columns."""

    def __init__(self, csv: str | Path, path_columns: Sequence[str] | None = None, channels: Sequence[str] | None = None):
        csv = Path(csv)
        if not csv.exists():
            raise MicrosnoopError("file not found", csv)
        df = read_csv(csv)
        if len(df) == 0:
            raise MicrosnoopError("manifest has no rows", csv)
        chan_cols = _manifest_channel_columns(df, csv, path_columns)
        if channels:  # order/select channels by name
            missing = [c for c in channels if c not in chan_cols]
            if missing:
                raise MicrosnoopError(f"missing column(s) {', '.join('FileName_' + m for m in missing)}", csv)
            chan_cols = {c: chan_cols[c] for c in channels}
        files: list[list[Path]] = []
        seen: dict[Path, str] = {}
        for row_i in range(len(df)):
            group = []
            for ch, col in chan_cols.items():
                val = df.iat[row_i, df.columns.get_loc(col)]
                if pd.isna(val) or str(val).strip() == "":
                    raise MicrosnoopError(f"row {row_i + 2}: empty {col}", csv)
                p = Path(str(val))
                pcol = f"PathName_{ch}"
                if not p.is_absolute():
                    # relative file names (and relative PathName_ folders) are relative to the CSV's folder
                    base = df.iat[row_i, df.columns.get_loc(pcol)] if pcol in df.columns else None
                    folder = Path(str(base)) if base is not None and not pd.isna(base) else Path()
                    p = (folder if folder.is_absolute() else csv.parent / folder) / p
                if p in seen:
                    raise MicrosnoopError(f"row {row_i + 2}: file {p} is used twice ({seen[p]} and {col})", csv)
                if not p.is_file():  # the most common manifest mistake: say so before anything is read
                    what = "is a folder, not an image file" if p.is_dir() else "file not found"
                    raise MicrosnoopError(f"row {row_i + 2} {col}: {what}: {p}", csv)
                seen[p] = f"row {row_i + 2} {col}"
                group.append(p)
            files.append(group)
        meta = df[[c for c in df.columns if c.startswith("Metadata_")]].copy()
        super().__init__(csv, files, meta, list(chan_cols))


def open_source(path: str | Path, *, channels: Sequence[str] | None = None, channel_names: Sequence[str] | None = None,
                path_columns: Sequence[str] | None = None, channel_index: Sequence[int] | None = None,
                metadata: str | Path | None = None, pattern: str = "*") -> ImageSource:
    """Open any supported input: ``.npy``/``.npz`` array, ``.csv`` manifest, an OME-Zarr HCS plate, a folder
    of images, or one image file (OME-TIFF channel names are used when present).

    Parameters
    ----------
    path : str or Path
        The input, as for ``microsnoop embed``.
    channels : sequence of str, optional
        Folder input: channel tokens in file names; manifest: names of the ``FileName_<name>`` columns to use.
    channel_names : sequence of str, optional
        Names for the channels, in order.
    path_columns : sequence of str, optional
        Manifest: path columns, one per channel.
    channel_index : sequence of int, optional
        Keep these planes of multi-channel files.
    metadata : str or Path, optional
        Array input: metadata CSV (default: ``metadata.csv`` beside it).
    pattern : str
        Folder input: glob of the files to read.

    Returns
    -------
    ImageSource
        Lazily reads images by index; ``len()``, ``channel_names`` and ``metadata`` (one row per image).
    """
    from .omezarr import OmeZarrPlateSource, is_ome_zarr_plate

    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    if metadata is not None and (path.is_dir() or path.suffix.lower() not in (".npy", ".npz")):
        raise MicrosnoopError("--metadata applies to .npy/.npz array inputs; manifests and folders carry their own "
                              "metadata", metadata)
    if path.is_dir() and is_ome_zarr_plate(path):
        src: ImageSource = OmeZarrPlateSource(path, channels=channels)
    elif path.is_dir():
        src = FolderSource(path, channels=channels, pattern=pattern)
    elif path.suffix.lower() in (".npy", ".npz"):
        src = ArraySource(path, metadata=metadata)
    elif path.suffix.lower() == ".csv":
        src = ManifestSource(path, path_columns=path_columns, channels=channels)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        n = _probe_channels(path)
        src = FileListSource(path, [[path]], pd.DataFrame({"Metadata_Image": [path.stem],
                                                            "Metadata_FileName": [path.name]}),
                             ome_channel_names(path, n) or [f"ch{i}" for i in range(n)])
    else:
        raise MicrosnoopError("unsupported input (expected .npy, .npz, .csv, an image file or a folder)", path)
    if channel_index and isinstance(src, FileListSource):
        src.select_channels(channel_index)
    src.rename_channels(channel_names)
    return src
