"""Profiles as one pandas frame (``Metadata_*`` columns + feature columns), pycytominer's layout.

Every profiling step (aggregate, normalise, sphere) takes and returns such a frame so steps chain
and interoperate with pycytominer; these helpers read and write it in the package's output formats.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.writers import EMB_TOKEN, check_finite, is_feature_column, read_embeddings  # noqa: F401  (one reader for every table)


def feature_columns(df: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """The feature columns of a profiles table (pycytominer's ``features="infer"``).

    Parameters
    ----------
    df : pandas.DataFrame
        Metadata columns (``Metadata_*``) and feature columns (``<channel>_emb_<k>``), as returned by
        :func:`microsnoop.read_embeddings` or ``microsnoop.embed(..., output="frame")``.
    features : sequence of str, optional
        The feature columns to use (checked to exist). Default: every ``<channel>_emb_<k>`` column that is
        not a ``Metadata_*`` column.

    Returns
    -------
    list of str
        The feature column names, in table order.
    """
    if features is not None:
        if len(features) == 0:
            raise MicrosnoopError("no feature columns (named <channel>_emb_<j>) in the profiles")
        missing = [f for f in features if f not in df.columns]
        if missing:
            raise MicrosnoopError(f"feature column(s) not found: {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}")
        return list(features)
    cols = [c for c in df.columns if is_feature_column(c)]
    if not cols:
        raise MicrosnoopError("no feature columns (named <channel>_emb_<j>) in the profiles; pass the feature list")
    return cols


F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**renamed: str) -> Callable[[F], F]:
    """Accept the arguments' old names (``by=`` for ``strata=``) with a DeprecationWarning: the profiling
    functions took pycytominer's names (strata, samples, operation) where they mean the same thing."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; use {new}=")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated; use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


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
    """Refuse NaN or inf in the ``features`` columns of ``df`` (see :func:`microsnoop.io.writers.check_finite`)."""
    check_finite(df[list(features)].to_numpy(dtype=np.float64), list(features), source, "profile row(s)",
                 "drop or re-embed them before profiling")


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
