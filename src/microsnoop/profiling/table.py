"""Profiles as one pandas frame (``Metadata_*`` columns + feature columns), pycytominer's layout.

Every profiling step (aggregate, normalise, sphere) takes and returns such a frame so steps chain
and interoperate with pycytominer; these helpers read and write it in the package's output formats.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import MicrosnoopError

EMB_TOKEN = "_emb_"


def feature_columns(df: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """The feature columns: ``features`` if given (checked), else every ``*_emb_*`` column."""
    if features is not None:
        missing = [f for f in features if f not in df.columns]
        if missing:
            raise MicrosnoopError(f"feature column(s) not found: {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}")
        return list(features)
    cols = [c for c in df.columns if EMB_TOKEN in c]
    if not cols:
        raise MicrosnoopError("no feature columns (named <channel>_emb_<j>) in the profiles; pass the feature list")
    return cols


def metadata_columns(df: pd.DataFrame, features: Sequence[str]) -> list[str]:
    feats = set(features)
    return [c for c in df.columns if c not in feats]


def to_frame(meta: pd.DataFrame, x: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
    """(metadata, (N, D) matrix, names) -> one frame, metadata first."""
    feats = pd.DataFrame(np.asarray(x), columns=list(columns), index=meta.index)
    return pd.concat([meta, feats], axis=1)


def select_rows(df: pd.DataFrame, query: str | None) -> np.ndarray:
    """Boolean mask of the rows matching a pandas query such as ``Metadata_Control == "negative"``."""
    if query is None:
        return np.ones(len(df), dtype=bool)
    try:
        picked = df.query(query)
    except Exception as exc:  # pandas raises many types for a malformed query
        raise MicrosnoopError(f"cannot evaluate --controls query {query!r} ({type(exc).__name__}: {exc}); "
                              f"columns are {', '.join(c for c in df.columns if EMB_TOKEN not in c)}") from None
    return df.index.isin(picked.index)


def read_profiles(path: str | Path) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """Read an embeddings/profiles file (.parquet/.h5/.h5ad) as (frame, feature names, provenance)."""
    from ..io.writers import format_for, read_embeddings

    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    meta, x, prov = read_embeddings(path)
    fmt = format_for(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        names = [c for c in pq.read_schema(path).names if EMB_TOKEN in c]
    elif fmt == "h5":
        import h5py

        with h5py.File(path, "r") as fh:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in fh["feature_names"][:]]
    else:
        import anndata as ad

        names = list(ad.read_h5ad(path, backed="r").var_names)
    if len(names) != x.shape[1]:
        raise MicrosnoopError(f"{len(names)} feature names for {x.shape[1]} features", path)
    return to_frame(meta.reset_index(drop=True), x, names), names, prov


def write_profiles(path: str | Path, df: pd.DataFrame, features: Sequence[str], provenance: dict[str, Any],
                   fmt: str | None = None) -> Path:
    """Write a profile frame atomically in the format given by the suffix (or ``fmt``)."""
    from ..io.writers import WRITERS, format_for

    path = Path(path)
    fmt = format_for(path, fmt)
    meta = df[metadata_columns(df, features)].reset_index(drop=True)
    x = df[list(features)].to_numpy(dtype=np.float32)
    json.dumps(provenance)  # fail before writing if provenance is not JSON-serialisable
    WRITERS[fmt](path, meta, [x], list(features), provenance)
    return path
