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

from ..core.errors import MicrosnoopError

EMB_TOKEN = "_emb_"


def feature_columns(df: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """The feature columns: ``features`` if given (checked), else every ``*_emb_*`` column."""
    if features is not None:
        if len(features) == 0:
            raise MicrosnoopError("no feature columns (named <channel>_emb_<j>) in the profiles")
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


def select_rows(df: pd.DataFrame, query: str | None, option: str = "--controls") -> np.ndarray:
    """Boolean mask of the rows matching a query such as ``Metadata_Control == "negative"``.

    The query language is a safe subset of pandas' (column comparisons, ``in``, and/or/not; see
    :mod:`microsnoop.profiling.query`): it is never evaluated as Python."""
    from .query import select

    if query is None:
        return np.ones(len(df), dtype=bool)
    return select(df, query, option)


def check_finite_features(df: pd.DataFrame, features: Sequence[str], source: object = None) -> None:
    """One NaN would turn a whole normalised or sphered column NaN (or stop the SVD): refuse it, naming where."""
    x = df[list(features)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        r, c = int(rows[0]), int(np.flatnonzero(bad[rows[0]])[0])
        raise MicrosnoopError(f"{len(rows)} profile row(s) have NaN or inf features (first: row {r}, column "
                              f"{features[c]}); drop or re-embed them before profiling", source)


def _numeric_features(meta: pd.DataFrame, x: Any, names: list[str], path: Path) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise MicrosnoopError("feature columns are not numbers (text in a *_emb_* column?)", path) from None


def read_profiles(path: str | Path) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """Read an embeddings/profiles file (.parquet/.h5/.h5ad) as (frame, feature names, provenance)."""
    from ..io.writers import format_for, read_embeddings

    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    if not path.is_file():
        raise MicrosnoopError("is a folder, not a profiles file", path)
    fmt = format_for(path)
    try:
        meta, x, prov = read_embeddings(path)
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
    except MicrosnoopError:
        raise
    except Exception as exc:  # truncated/empty files, missing datasets, wrong layouts: name the file
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise MicrosnoopError(f"cannot read profiles ({type(exc).__name__}: {msg[:200]})", path) from None
    if not isinstance(prov, dict):
        raise MicrosnoopError("provenance is not a JSON object", path)
    x = _numeric_features(meta, x, names, path)
    if x.ndim != 2 or len(names) != x.shape[1] or len(meta) != x.shape[0]:
        raise MicrosnoopError(f"{len(names)} feature names and {len(meta)} metadata rows for features of shape "
                              f"{x.shape}", path)
    if not names:
        raise MicrosnoopError("no feature columns (named <channel>_emb_<j>) in the file", path)
    if len(set(names)) != len(names):
        raise MicrosnoopError("feature column names repeat", path)
    frame = to_frame(meta.reset_index(drop=True), x, names)
    check_finite_features(frame, names, path)
    return frame, names, prov


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
