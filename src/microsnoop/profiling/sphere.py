"""Sphering (ZCA-correlation whitening) fitted on negative controls, regularised at the spectrum's knee.

Negative-control wells show only nuisance variation (plate position, staining, cell density). ZCA-cor
whitening fitted on them rescales every direction of that variation to unit variance, so what is left
to stand out in a treated well is what the controls do not vary in. As in the Microsnoop paper:

1. standardise every feature by the controls' mean and std (ddof=0), per batch or globally;
2. eigen-decompose the controls' correlation matrix ``R = V diag(lam) V^T`` (from the SVD of the
   standardised controls, ``lam = s^2 / (n - 1)``);
3. regularise: ``W = V diag((lam + eps)^-1/2) V^T`` with ``eps`` the eigenvalue at the knee of the
   sorted spectrum, found with ``kneed`` (a fixed ``eps`` may be given instead);
4. apply ``(x - mean_ctrl) / std_ctrl @ W`` to every profile (controls and treatments).

Differences from ``pycytominer.normalize(method="spherize", spherize_method="ZCA-cor")``:
pycytominer adds ``epsilon`` (1e-6) to the *singular values* ``s`` rather than to the eigenvalues, fills
the singular values beyond the rank (n <= d) with the last non-zero one, refuses constant features,
and fits on all rows it is given at once (no per-batch loop). With ``eps -> 0`` on full-rank controls
(n > d) both give the same matrix (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .normalize import groups_of
from .table import feature_columns, renamed_arguments, select_rows


@dataclass
class Sphering:
    """A fitted ZCA-cor transform: ``((x - mean) / std) @ W``."""

    mean: np.ndarray
    std: np.ndarray
    W: np.ndarray
    eigenvalues: np.ndarray
    epsilon: float
    knee_index: int | None
    n_controls: int
    info: dict[str, Any] = field(default_factory=dict)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std) @ self.W


def knee_epsilon(eigenvalues: np.ndarray) -> tuple[float, int]:
    """The eigenvalue at the knee (elbow) of the descending spectrum and its index.

    Only the non-zero part (the controls' rank) is searched: zeros beyond the rank are an artefact of
    having fewer controls than features, not part of the spectrum's shape.
    """
    from kneed import KneeLocator

    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    tol = lam[0] * max(len(lam), 1) * np.finfo(np.float64).eps if len(lam) else 0.0
    lam = lam[lam > tol]
    if len(lam) < 3:
        raise MicrosnoopError(f"cannot find the knee of an eigenvalue spectrum with {len(lam)} non-zero values; "
                              f"sphering needs at least 4 control profiles that differ")
    idx = np.arange(len(lam))
    knee = KneeLocator(idx, lam, curve="convex", direction="decreasing").knee
    k = int(knee) if knee is not None else len(lam) - 1
    return float(lam[k]), k


def fit_sphering(x_ctrl: np.ndarray, epsilon: float | str = "knee") -> Sphering:
    """Fit ZCA-cor whitening on control profiles (n, d); ``epsilon`` = ``"knee"`` or a number >= 0."""
    x = np.asarray(x_ctrl, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise MicrosnoopError(f"sphering needs at least 2 control profiles, got {n}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant feature is only centred (its correlation row is 0)
    z = (x - mean) / std
    if not np.isfinite(z).all():
        raise MicrosnoopError("control profiles have NaN or inf features; sphering needs finite values")
    try:
        _, s, vt = np.linalg.svd(z, full_matrices=False)
    except np.linalg.LinAlgError as exc:
        raise MicrosnoopError(f"sphering failed on the control profiles ({exc}); check them for extreme values") from None
    lam = s ** 2 / (n - 1)
    knee = None
    if epsilon == "knee":
        eps, knee = knee_epsilon(lam)
    else:
        eps = float(epsilon)
        if eps < 0:
            raise MicrosnoopError("sphering epsilon must be >= 0")
    if eps == 0 and (len(lam) < d or lam.min() <= lam.max() * 1e-12):
        raise MicrosnoopError(f"unregularised sphering needs full-rank controls (n > d), got n={n}, d={d}; "
                              f"use epsilon='knee' or a positive value")
    # directions the controls never vary in (beyond their rank) have eigenvalue 0: scaled by eps^-1/2
    w = vt.T @ np.diag(1.0 / np.sqrt(lam + eps)) @ vt
    if len(lam) < d:
        w += (np.eye(d) - vt.T @ vt) / np.sqrt(eps)
    return Sphering(mean=mean, std=std, W=w, eigenvalues=lam, epsilon=eps, knee_index=knee, n_controls=n)


@renamed_arguments(controls="samples")
def sphere(profiles: pd.DataFrame, samples: str | None = "all", by: Sequence[str] | None = None,
           features: Sequence[str] | None = None, epsilon: float | str = "knee") -> tuple[pd.DataFrame, list[dict]]:
    """Sphere (ZCA-cor whitening) every profile with a transform fitted on the ``samples`` rows of its batch.

    pycytominer does this as ``normalize(method="spherize", samples=...)``; the argument is named the same
    (``controls=`` still works, deprecated).

    Parameters
    ----------
    profiles : pandas.DataFrame
        Metadata columns and feature columns.
    samples : str, optional
        Query selecting the rows the transform is fitted on (the negative controls), e.g.
        ``'Metadata_Control == "negative"'``; ``"all"`` or None: every row.
    by : sequence of str, optional
        Batch columns (e.g. ``["Metadata_Plate"]``) fitted separately; None fits once on all rows.
    features : sequence of str, optional
        Feature columns. Default: every ``<channel>_emb_<k>`` column.
    epsilon : float or str
        Regulariser added to the eigenvalues; ``"knee"`` takes the eigenvalue at the spectrum's knee.

    Returns
    -------
    (pandas.DataFrame, list of dict)
        The sphered copy (float32 features) and one record per batch (epsilon, knee index, number of
        fitted rows, rank).
    """
    df, controls = profiles, None if samples == "all" else samples
    feats = feature_columns(df, features)
    ctrl = select_rows(df, controls)
    x = df[feats].to_numpy(dtype=np.float64)
    out = np.empty_like(x)
    fits = []
    for rows in groups_of(df, by):
        c = rows[ctrl[rows]]
        where = ", ".join(f"{c_}={df[c_].iloc[rows[0]]}" for c_ in by) if by else "all rows"
        if len(c) < 2:
            raise MicrosnoopError(f"a batch ({where}) has {len(c)} row(s) matching the controls {controls!r}; "
                                  f"sphering needs at least 2 (see --controls / --sphere-by)")
        sph = fit_sphering(x[c], epsilon)
        out[rows] = sph.transform(x[rows])
        rec = {"n_controls": sph.n_controls, "epsilon": sph.epsilon, "knee_index": sph.knee_index,
               "rank": int((sph.eigenvalues > sph.eigenvalues[0] * 1e-12).sum())}
        if by:
            rec["batch"] = {c_: str(df[c_].iloc[rows[0]]) for c_ in by}
        fits.append(rec)
    res = df.copy()
    res[feats] = out.astype(np.float32)
    return res, fits


def sphere_step(controls: str | None, by: Sequence[str] | None, epsilon: float | str, fits: list[dict]) -> dict[str, Any]:
    return {"step": "sphere", "method": "ZCA-cor", "controls": controls, "by": list(by or []),
            "regularisation": "eigenvalue at the knee of the control spectrum (kneed)" if epsilon == "knee"
            else f"fixed epsilon {epsilon}", "fits": fits}
