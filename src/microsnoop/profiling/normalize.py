"""Per-plate normalisation of profiles against negative controls, with pycytominer's definitions.

Plate effects (staining, focus, illumination) shift every well of a plate together, so each plate
is scaled by statistics of its own negative-control wells:

- ``standardize``: ``(x - mean_ctrl) / std_ctrl`` with the population std (ddof=0, as scikit-learn's
  ``StandardScaler`` that pycytominer uses); a feature constant in the controls is only centred.
- ``mad_robustize``: ``(x - median_ctrl) / (1.4826 * MAD_ctrl + epsilon)`` (pycytominer's ``RobustMAD``,
  epsilon 1e-18), robust to outlying control wells.

``pycytominer.normalize(profiles, samples=<controls>, method=...)`` applied to one plate gives the same
numbers (tested); this module adds the per-plate loop and provenance.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .table import feature_columns, renamed_arguments, select_rows

METHODS = ("standardize", "mad_robustize")
MAD_SCALE = 1.4826


def fit_scaler(x_ctrl: np.ndarray, method: str, epsilon: float = 1e-18) -> tuple[np.ndarray, np.ndarray]:
    """(centre, scale) per feature from the control rows."""
    if method == "standardize":
        centre = x_ctrl.mean(axis=0)
        scale = x_ctrl.std(axis=0)
        # scikit-learn leaves constant features unscaled instead of dividing by zero
        scale = np.where(scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(centre), 1.0), 1.0, scale)
        return centre, scale
    if method == "mad_robustize":
        centre = np.median(x_ctrl, axis=0)
        mad = np.median(np.abs(x_ctrl - centre), axis=0) * MAD_SCALE
        return centre, mad + epsilon
    raise MicrosnoopError(f"unknown normalisation '{method}' (choose {' or '.join(METHODS)})")


def groups_of(df: pd.DataFrame, by: Sequence[str] | None) -> list[np.ndarray]:
    """Row-index arrays of each batch (all rows as one batch when ``by`` is empty)."""
    by = [c for c in (by or [])]
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise MicrosnoopError(f"batch column(s) {', '.join(missing)} not in the profiles")
    if not by:
        return [np.arange(len(df))]
    codes, _ = pd.factorize(df[by].astype(str).agg("\x1f".join, axis=1), sort=False)
    return [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]


@renamed_arguments(controls="samples")
def normalize(profiles: pd.DataFrame, method: str = "standardize", samples: str | None = "all",
              by: Sequence[str] | None = ("Metadata_Plate",), features: Sequence[str] | None = None,
              epsilon: float = 1e-18) -> pd.DataFrame:
    """Normalise the features of every row by statistics of the ``samples`` rows of its batch.

    Arguments are named as in ``pycytominer.normalize`` (``controls=`` still works, deprecated); on one
    plate both give the same numbers.

    Parameters
    ----------
    profiles : pandas.DataFrame
        Metadata columns and feature columns.
    method : str
        ``standardize`` ((x - mean) / std, ddof=0) or ``mad_robustize`` ((x - median) / (1.4826 MAD + epsilon)).
    samples : str, optional
        Query selecting the rows the statistics come from, e.g. ``'Metadata_Control == "negative"'``
        (column comparisons, ``in``, and/or/not); ``"all"`` or None: every row.
    by : sequence of str, optional
        Batch columns normalised separately (default per plate; without ``Metadata_Plate``: one batch).
    features : sequence of str, optional
        Feature columns. Default: every ``<channel>_emb_<k>`` column.
    epsilon : float
        Added to the MAD (``mad_robustize``).

    Returns
    -------
    pandas.DataFrame
        A copy with the features normalised (float32); metadata unchanged.
    """
    df, controls = profiles, None if samples == "all" else samples
    feats = feature_columns(df, features)
    if by is not None and tuple(by) == ("Metadata_Plate",) and "Metadata_Plate" not in df.columns:
        by = None
    ctrl = select_rows(df, controls)
    x = df[feats].to_numpy(dtype=np.float64)
    out = np.empty_like(x)
    for rows in groups_of(df, by):
        c = rows[ctrl[rows]]
        if len(c) == 0:
            raise MicrosnoopError(f"a batch ({_describe(df, rows, by)}) has no rows matching the controls {controls!r}")
        if method == "standardize" and len(c) < 2:
            raise MicrosnoopError(f"a batch ({_describe(df, rows, by)}) has only one control row; standardize needs 2")
        centre, scale = fit_scaler(x[c], method, epsilon)
        out[rows] = (x[rows] - centre) / scale
    res = df.copy()
    res[feats] = out.astype(np.float32)
    return res


def _describe(df: pd.DataFrame, rows: np.ndarray, by: Sequence[str] | None) -> str:
    if not by:
        return "all rows"
    return ", ".join(f"{c}={df[c].iloc[rows[0]]}" for c in by)


def normalize_step(method: str, controls: str | None, by: Sequence[str] | None, n_controls: int) -> dict[str, Any]:
    return {"step": "normalize", "method": method, "controls": controls, "by": list(by or []),
            "n_control_rows": n_controls,
            "definition": ("(x - mean_ctrl) / std_ctrl (ddof=0)" if method == "standardize"
                           else "(x - median_ctrl) / (1.4826 * MAD_ctrl + 1e-18)")}
