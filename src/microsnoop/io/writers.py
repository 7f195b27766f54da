"""Embedding outputs: Parquet (metadata + channel-named feature columns), HDF5 compatible with the
original Microsnoop (``embeddings``, ``inds``, ``chans``) and AnnData ``.h5ad``. All written to a temp
file and renamed, streamed chunk by chunk where the format allows."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .atomic import atomic_path

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".h5": "h5", ".hdf5": "h5", ".h5ad": "h5ad"}


def format_for(path: str | Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in set(FORMATS.values()):
            raise MicrosnoopError(f"unknown --format '{fmt}' (choose parquet, h5 or h5ad)")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise MicrosnoopError(f"cannot tell the output format from '{suffix or 'no suffix'}' (use .parquet, .h5 "
                              f"or .h5ad, or --format)", path)
    return FORMATS[suffix]


EMB_TOKEN = "_emb_"
_FEATURE = re.compile(r".+_emb_\d+$")


def feature_columns(channel_names: list[str], dim: int) -> list[str]:
    """``DNA_emb_000`` ...: the channel a feature came from is always in its name. Numbers have 3 digits,
    or 4 from 1,000 features per channel on (``DNA_emb_0000`` ... ``DNA_emb_1023``), so names sort in order."""
    width = max(3, len(str(dim - 1)))
    return [f"{ch}{EMB_TOKEN}{j:0{width}d}" for ch in channel_names for j in range(dim)]


def is_feature_column(name: str) -> bool:
    """A feature column is ``<channel>_emb_<number>``; a ``Metadata_*`` column never is, whatever its name
    contains (a plate map's ``Metadata_emb_note`` is metadata, not a feature)."""
    return not str(name).startswith("Metadata_") and bool(_FEATURE.fullmatch(str(name)))


def output_provenance(provenance: dict[str, Any], channel_names: list[str], dim: int) -> dict[str, Any]:
    """Provenance as written to every output: the run's record plus which columns each channel gave."""
    columns = feature_columns(channel_names, dim)
    return {**provenance, "channel_names": list(channel_names),
            "channel_features": {ch: [columns[i * dim], columns[(i + 1) * dim - 1]]
                                 for i, ch in enumerate(channel_names)}}


def _metadata_table(meta: pd.DataFrame):
    import pyarrow as pa

    return pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)


def write_parquet(path: Path, metadata: pd.DataFrame, chunks: Iterable[np.ndarray], columns: list[str],
                  provenance: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_tab = _metadata_table(metadata)
    fields = list(meta_tab.schema) + [pa.field(c, pa.float32()) for c in columns]
    schema = pa.schema(fields, metadata={b"microsnoop": json.dumps(provenance).encode()})
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            start = 0
            for block in chunks:
                n = len(block)
                arrays = list(meta_tab.slice(start, n).columns)
                arrays += [pa.array(block[:, j], type=pa.float32()) for j in range(block.shape[1])]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                start += n
            if start != len(metadata):
                raise MicrosnoopError(f"wrote {start} rows but metadata has {len(metadata)}", path)


def write_h5(path: Path, metadata: pd.DataFrame, chunks: Iterable[np.ndarray], columns: list[str],
             provenance: dict[str, Any]) -> None:
    import h5py

    n, d = len(metadata), len(columns)
    chans = provenance.get("channel_names", [])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            ds = fh.create_dataset("embeddings", shape=(n, d), dtype="float32", chunks=(min(max(n, 1), 1024), d))
            start = 0
            for block in chunks:
                ds[start:start + len(block)] = block
                start += len(block)
            if start != n:
                raise MicrosnoopError(f"wrote {start} rows but metadata has {n}", path)
            fh.create_dataset("inds", data=np.arange(n, dtype=np.int64))
            fh.create_dataset("chans", data=np.array(chans, dtype=h5py.string_dtype()))
            fh.create_dataset("feature_names", data=np.array(columns, dtype=h5py.string_dtype()))
            g = fh.create_group("metadata", track_order=True)
            for col in metadata.columns:
                vals = metadata[col].to_numpy()
                if vals.dtype.kind in "biuf":
                    g.create_dataset(col, data=vals)
                else:
                    g.create_dataset(col, data=np.array([str(v) for v in vals], dtype=h5py.string_dtype()))
            fh.attrs["provenance"] = json.dumps(provenance)
            fh.attrs["channel_names"] = json.dumps(chans)


def to_anndata(metadata: pd.DataFrame, x: np.ndarray, columns: list[str], provenance: dict[str, Any]):
    """An AnnData: ``X`` = features, ``obs`` = metadata, ``var['channel']``, ``uns['microsnoop']`` = provenance
    as a nested dict (readable with ``adata.uns['microsnoop']['model']``, written natively by h5ad)."""
    import anndata as ad

    obs = metadata.reset_index(drop=True).copy()
    obs.index = obs.index.astype(str)
    for col in obs.columns:  # h5ad wants plain str/number columns
        if obs[col].dtype == object:
            obs[col] = obs[col].astype(str)
    var = pd.DataFrame({"channel": [c.rsplit(EMB_TOKEN, 1)[0] for c in columns]}, index=list(columns))
    adata = ad.AnnData(X=np.asarray(x, dtype=np.float32), obs=obs, var=var)
    adata.uns["microsnoop"] = to_uns(provenance)
    return adata


def to_uns(value: Any) -> Any:
    """Provenance -> what h5ad stores natively. Lists h5ad cannot hold as one array (of dicts, of mixed
    types) become ``{"__list__": True, "0": ..., "1": ...}``; :func:`from_uns` turns them back."""
    if isinstance(value, dict):
        return {str(k): to_uns(v) for k, v in value.items()}
    if isinstance(value, str):
        return str(value)  # str subclasses (torch.__version__) have no h5ad writer
    if isinstance(value, (list, tuple)):
        kinds = {str if isinstance(v, str) else type(v) for v in value}
        if not value or kinds <= {str} or kinds <= {bool} or kinds <= {int, float}:
            return list(value)
        return {"__list__": True, **{str(i): to_uns(v) for i, v in enumerate(value)}}
    return value


def from_uns(value: Any) -> Any:
    """The inverse of :func:`to_uns`: plain Python dicts, lists and scalars (numpy arrays become lists)."""
    if isinstance(value, Mapping):
        d = dict(value)
        if "__list__" in d and bool(d["__list__"]):
            return [from_uns(d[str(i)]) for i in range(len(d) - 1)]
        return {k: from_uns(v) for k, v in d.items()}
    if isinstance(value, np.ndarray):
        return [from_uns(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_h5ad(path: Path, metadata: pd.DataFrame, chunks: Iterable[np.ndarray], columns: list[str],
               provenance: dict[str, Any]) -> None:
    x = np.concatenate(list(chunks), axis=0) if len(metadata) else np.zeros((0, len(columns)), np.float32)
    adata = to_anndata(metadata, x, columns, provenance)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


WRITERS = {"parquet": write_parquet, "h5": write_h5, "h5ad": write_h5ad}


def write_embeddings(path: str | Path, metadata: pd.DataFrame, chunks: Iterable[np.ndarray], channel_names: list[str],
                     dim: int, provenance: dict[str, Any], fmt: str | None = None) -> Path:
    """Write embeddings atomically, streamed chunk by chunk where the format allows.

    Parameters
    ----------
    path : str or Path
        Output file; the format comes from the suffix (.parquet, .h5, .h5ad) unless ``fmt`` is given.
    metadata : pandas.DataFrame
        One row per image (``Metadata_*`` columns).
    chunks : iterable of numpy.ndarray
        (n_i, len(channel_names) * dim) float32 blocks, in row order.
    channel_names : list of str
        Channel names; feature columns are named ``<channel>_emb_<k>``.
    dim : int
        Features per channel.
    provenance : dict
        JSON-serialisable record of how the features were made.
    fmt : str, optional
        parquet | h5 | h5ad.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    fmt = format_for(path, fmt)
    columns = feature_columns(channel_names, dim)
    WRITERS[fmt](path, metadata, chunks, columns, output_provenance(provenance, channel_names, dim))
    return path


def to_frame(metadata: pd.DataFrame, x: np.ndarray, columns: list[str], provenance: dict[str, Any]) -> pd.DataFrame:
    """One table: metadata columns, then the float32 feature columns; provenance in ``attrs['microsnoop']``."""
    meta = metadata.reset_index(drop=True)
    feats = pd.DataFrame(np.asarray(x, dtype=np.float32), columns=list(columns), index=meta.index)
    frame = pd.concat([meta, feats], axis=1)
    frame.attrs["microsnoop"] = provenance
    return frame


def read_embeddings(path: str | Path) -> pd.DataFrame:
    """Read an embeddings or profiles file (.parquet, .h5, .h5ad) as one table.

    Parameters
    ----------
    path : str or Path
        A file written by ``microsnoop embed``, ``profile``, ``plate`` or :func:`microsnoop.embed_source`.

    Returns
    -------
    pandas.DataFrame
        One row per image (or profile): the metadata columns (``Metadata_*``), then the float32 feature
        columns ``<channel>_emb_<k>`` in channel order (list them with :func:`microsnoop.feature_columns`).
        The provenance dict is in ``frame.attrs["microsnoop"]``.

    Raises
    ------
    MicrosnoopError
        The file is missing, unreadable, has no or non-numeric or non-finite features, or inconsistent shapes.
    """
    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    if not path.is_file():
        raise MicrosnoopError("is a folder, not an embeddings file", path)
    fmt = format_for(path)
    try:
        meta, x, names, prov = _READERS[fmt](path)
    except MicrosnoopError:
        raise
    except Exception as exc:  # truncated/empty files, missing datasets, wrong layouts: name the file
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise MicrosnoopError(f"cannot read embeddings ({type(exc).__name__}: {msg[:200]})", path) from None
    if not isinstance(prov, dict):
        raise MicrosnoopError("provenance is not a JSON object", path)
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise MicrosnoopError("feature columns are not numbers (text in a *_emb_* column?)", path) from None
    if x.ndim != 2 or len(names) != x.shape[1] or len(meta) != x.shape[0]:
        raise MicrosnoopError(f"{len(names)} feature names and {len(meta)} metadata rows for features of shape "
                              f"{x.shape}", path)
    if not names:
        raise MicrosnoopError("no feature columns (named <channel>_emb_<k>) in the file", path)
    if len(set(names)) != len(names):
        raise MicrosnoopError("feature column names repeat", path)
    check_finite(x, names, path)
    return to_frame(meta, x, names, prov)


def check_finite(x: np.ndarray, names: Sequence[str], source: object = None, what: str = "row(s)",
                 advice: str = "drop or re-embed them") -> None:
    """Refuse NaN or inf features, naming the first row and column.

    Why: one NaN would turn a whole normalised or sphered column NaN (or stop the SVD).

    Parameters
    ----------
    x : numpy.ndarray
        (rows, features) values.
    names : sequence of str
        The feature column names, in ``x``'s column order.
    source : object, optional
        The file or output named in the error.
    what, advice : str
        How the rows are called and what to do, in the message.
    """
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        r, c = int(rows[0]), int(np.flatnonzero(bad[rows[0]])[0])
        raise MicrosnoopError(f"{len(rows)} {what} have NaN or inf features (first: row {r}, column {names[c]}); "
                              f"{advice}", source)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, Any, list[str], Any]:
    import pyarrow.parquet as pq

    tab = pq.read_table(path)
    prov = json.loads((tab.schema.metadata or {}).get(b"microsnoop", b"{}"))
    names = [c for c in tab.column_names if is_feature_column(c)]
    meta = tab.select([c for c in tab.column_names if not is_feature_column(c)]).to_pandas()
    x = (np.stack([tab.column(c).to_numpy() for c in names], axis=1) if names
         else np.zeros((len(meta), 0), np.float32))
    return meta, x, names, prov


def _read_h5(path: Path) -> tuple[pd.DataFrame, Any, list[str], Any]:
    import h5py

    with h5py.File(path, "r") as fh:
        x = fh["embeddings"][:]
        meta = pd.DataFrame({k: (v[:].astype(str) if v.dtype.kind in "OS" else v[:])
                             for k, v in fh["metadata"].items()})
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in fh["feature_names"][:]]
        prov = json.loads(fh.attrs["provenance"])
    return meta, x, names, prov


def _read_h5ad(path: Path) -> tuple[pd.DataFrame, Any, list[str], Any]:
    import anndata as ad

    adata = ad.read_h5ad(path)
    prov = adata.uns.get("microsnoop", {})
    prov = json.loads(prov) if isinstance(prov, str) else from_uns(prov)  # files before 0.1.0 held a JSON string
    return adata.obs.reset_index(drop=True), adata.X, [str(v) for v in adata.var_names], prov


_READERS = {"parquet": _read_parquet, "h5": _read_h5, "h5ad": _read_h5ad}


def iter_npy(paths: Iterable[Path]) -> Iterator[np.ndarray]:
    for p in paths:
        yield np.load(p)
