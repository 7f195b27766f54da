"""Aggregate profiles at any metadata level (cells -> fields -> wells -> treatments).

Mean or median of the feature columns per group; metadata columns that are constant within every
group are kept (so aggregating wells by ``Metadata_Plate,Metadata_Well`` keeps the dose, control
and row-block annotations), the others are dropped because one value cannot describe the group.
``Metadata_Count`` records how many rows each output row summarises.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .table import feature_columns, is_feature_column, metadata_columns, renamed_arguments

METHODS = ("mean", "median")
COUNT = "Metadata_Count"


@renamed_arguments(by="strata", method="operation")
def aggregate(profiles: pd.DataFrame, strata: Sequence[str], features: Sequence[str] | None = None,
              operation: str = "mean", count_column: str | None = COUNT) -> pd.DataFrame:
    """One row per distinct value of ``strata``: the mean/median of each feature, constant metadata kept.

    Groups come out in order of first appearance, so aggregating an ordered plate keeps its order.
    Arguments are named as in ``pycytominer.aggregate`` (``by=`` and ``method=`` still work, deprecated).

    Parameters
    ----------
    profiles : pandas.DataFrame
        Metadata columns and feature columns (e.g. :func:`microsnoop.read_embeddings`).
    strata : sequence of str
        Metadata columns to group by, e.g. ``["Metadata_Plate", "Metadata_Well"]``.
    features : sequence of str, optional
        Feature columns. Default: every ``<channel>_emb_<k>`` column (pycytominer's ``"infer"``).
    operation : str
        ``mean`` or ``median``.
    count_column : str, optional
        Name of the column counting the rows behind each output row (None: no count).

    Returns
    -------
    pandas.DataFrame
        One row per group: the group's constant metadata, the count, then the aggregated float32 features.
    """
    df, by, method = profiles, list(strata), operation
    if not by:
        raise MicrosnoopError("--aggregate needs at least one metadata column")
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise MicrosnoopError(f"cannot aggregate by missing column(s) {', '.join(missing)}; metadata columns are "
                              f"{', '.join(c for c in df.columns if not is_feature_column(c))}")
    if method not in METHODS:
        raise MicrosnoopError(f"unknown aggregation '{method}' (choose {' or '.join(METHODS)})")
    feats = feature_columns(df, features)
    if len(df) == 0:
        raise MicrosnoopError("no profiles to aggregate")
    keys = df[by].astype(str).agg("\x1f".join, axis=1) if len(by) > 1 else df[by[0]].astype(str)
    codes, uniques = pd.factorize(keys, sort=False)
    x = df[feats].to_numpy(dtype=np.float64)
    out_x = _group_reduce(x, codes, len(uniques), method)
    first = pd.Series(np.arange(len(df))).groupby(codes).first().to_numpy()
    meta_cols = [c for c in metadata_columns(df, feats) if c != count_column]
    constant = [c for c in meta_cols if c in by or _constant_within(df[c], codes)]
    meta = df[constant].iloc[first].reset_index(drop=True)
    if count_column:
        meta[count_column] = np.bincount(codes, minlength=len(uniques))
    feats_df = pd.DataFrame(out_x.astype(np.float32), columns=feats)
    return pd.concat([meta, feats_df], axis=1)


def _group_reduce(x: np.ndarray, codes: np.ndarray, n: int, method: str) -> np.ndarray:
    if method == "mean":
        sums = np.zeros((n, x.shape[1]))
        np.add.at(sums, codes, x)
        return sums / np.bincount(codes, minlength=n)[:, None]
    return np.stack([np.median(x[codes == g], axis=0) for g in range(n)])


def _constant_within(col: pd.Series, codes: np.ndarray) -> bool:
    values = col.astype(str).to_numpy()
    return bool(pd.Series(values).groupby(codes).nunique().max() <= 1)


def aggregate_step(by: Sequence[str], method: str, n_in: int, n_out: int) -> dict[str, Any]:
    """The provenance record of an aggregation."""
    return {"step": "aggregate", "by": list(by), "method": method, "rows_in": n_in, "rows_out": n_out}
