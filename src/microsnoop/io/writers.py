"""Embedding outputs: Parquet (metadata + channel-named feature columns), HDF5 compatible with the
original Microsnoop (``embeddings``, ``inds``, ``chans``) and AnnData ``.h5ad``. All written to a temp
file and renamed, streamed chunk by chunk where the format allows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def feature_columns(channel_names: list[str], dim: int) -> list[str]:
    """``DNA_emb_000`` ...: the channel a feature came from is always in its name."""
    return [f"{ch}_emb_{j:03d}" for ch in channel_names for j in range(dim)]


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


def write_h5ad(path: Path, metadata: pd.DataFrame, chunks: Iterable[np.ndarray], columns: list[str],
               provenance: dict[str, Any]) -> None:
    import anndata as ad

    x = np.concatenate(list(chunks), axis=0) if len(metadata) else np.zeros((0, len(columns)), np.float32)
    obs = metadata.reset_index(drop=True).copy()
    obs.index = obs.index.astype(str)
    for col in obs.columns:  # h5ad wants plain str/number columns
        if obs[col].dtype == object:
            obs[col] = obs[col].astype(str)
    var = pd.DataFrame({"channel": [c.rsplit("_emb_", 1)[0] for c in columns]}, index=columns)
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    adata.uns["microsnoop"] = json.dumps(provenance)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


WRITERS = {"parquet": write_parquet, "h5": write_h5, "h5ad": write_h5ad}


def write_embeddings(path: str | Path, metadata: pd.DataFrame, chunks: Iterable[np.ndarray], channel_names: list[str],
                     dim: int, provenance: dict[str, Any], fmt: str | None = None) -> Path:
    path = Path(path)
    fmt = format_for(path, fmt)
    columns = feature_columns(channel_names, dim)
    provenance = {**provenance, "channel_names": list(channel_names),
                  "channel_features": {ch: [columns[i * dim], columns[(i + 1) * dim - 1]] for i, ch in enumerate(channel_names)}}
    WRITERS[fmt](path, metadata, chunks, columns, provenance)
    return path


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Read any output back as (metadata frame, features (N, D) float32, provenance)."""
    path = Path(path)
    fmt = format_for(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        tab = pq.read_table(path)
        prov = json.loads((tab.schema.metadata or {}).get(b"microsnoop", b"{}"))
        feats = [c for c in tab.column_names if "_emb_" in c]
        meta = tab.select([c for c in tab.column_names if c not in set(feats)]).to_pandas()
        x = np.stack([tab.column(c).to_numpy() for c in feats], axis=1) if feats else np.zeros((len(meta), 0), np.float32)
        return meta, x.astype(np.float32), prov
    if fmt == "h5":
        import h5py

        with h5py.File(path, "r") as fh:
            x = fh["embeddings"][:]
            meta = pd.DataFrame({k: (v[:].astype(str) if v.dtype.kind in "OS" else v[:]) for k, v in fh["metadata"].items()})
            prov = json.loads(fh.attrs["provenance"])
        return meta, x, prov
    import anndata as ad

    adata = ad.read_h5ad(path)
    return adata.obs.reset_index(drop=True), np.asarray(adata.X, dtype=np.float32), json.loads(adata.uns["microsnoop"])


def iter_npy(paths: Iterable[Path]) -> Iterator[np.ndarray]:
    for p in paths:
        yield np.load(p)
