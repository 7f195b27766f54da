"""Plate-level evaluation of well profiles: how well do they separate controls and rank doses?

- **mAP per treatment** (copairs): each treated well's replicates should retrieve each other ahead of
  the negative-control wells (cosine similarity); mAP is averaged over a treatment's replicate wells,
  with copairs' permutation p-value (BH-corrected). This is the "phenotypic activity" protocol.
- **Control direction**: ``u = (mean(pos) - mean(neg)) / |...|``; each well's score is
  ``(x - mean(neg)) . u``. **Z'-factor** = ``1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg|`` of the
  scores of positive and negative control wells (sample std). The direction is fitted on the same
  control wells it scores, so Z' here is an in-sample, optimistic figure; it is a mean difference with
  no per-feature fitting, so the optimism is small compared with a fitted classifier.
- **Dose response**: Spearman correlation of the score with the dose index in each row block.
- **NSC / NSCB**: 1-NN accuracy of a label (e.g. mechanism of action) over treatment profiles when the
  neighbour may not share the compound (NSC), nor the compound or the batch (NSCB).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError


def control_direction(x: np.ndarray, neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vector from the negative- to the positive-control mean, and the negative mean."""
    if neg.sum() == 0 or pos.sum() == 0:
        raise MicrosnoopError(f"need negative and positive control wells (found {int(neg.sum())} negative, "
                              f"{int(pos.sum())} positive)")
    mu_n, mu_p = x[neg].mean(axis=0), x[pos].mean(axis=0)
    d = mu_p - mu_n
    norm = np.linalg.norm(d)
    if norm == 0:
        raise MicrosnoopError("negative and positive controls have identical mean profiles")
    return d / norm, mu_n


def control_scores(x: np.ndarray, neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Each profile's position along the control direction (0 = negative-control mean)."""
    u, mu_n = control_direction(x, neg, pos)
    return (x - mu_n) @ u


def z_prime(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Z'-factor (Zhang et al. 1999): 1 - 3 (sd_p + sd_n) / |mu_p - mu_n|; > 0.5 is an excellent assay."""
    if len(pos_scores) < 2 or len(neg_scores) < 2:
        raise MicrosnoopError("Z' needs at least 2 positive and 2 negative control wells")
    gap = abs(np.mean(pos_scores) - np.mean(neg_scores))
    return float(1 - 3 * (np.std(pos_scores, ddof=1) + np.std(neg_scores, ddof=1)) / gap)


def dose_spearman(scores: np.ndarray, dose: pd.Series, block: pd.Series | None = None,
                  include: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Spearman rho (and p) of score vs dose in each block (one block "all" if ``block`` is None)."""
    from scipy.stats import spearmanr

    include = np.ones(len(scores), bool) if include is None else include
    blocks = pd.Series(["all"] * len(scores)) if block is None else block.astype(str).reset_index(drop=True)
    out = {}
    for b in pd.unique(blocks):
        m = (blocks.to_numpy() == b) & include
        d = dose.to_numpy()[m]
        if m.sum() < 3 or len(np.unique(d)) < 2:
            continue
        res = spearmanr(scores[m], d)
        out[str(b)] = {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(m.sum())}
    return out


def map_per_treatment(df: pd.DataFrame, features: Sequence[str], treatment: Sequence[str], negative: np.ndarray,
                      null_size: int = 10000, seed: int = 0) -> pd.DataFrame:
    """copairs mAP of each treatment's replicate wells against the negative-control wells.

    Returns one row per treatment (the ``treatment`` columns, ``mean_average_precision``,
    ``p_value``, ``corrected_p_value``, ``below_corrected_p``, ``n_wells``).
    """
    from copairs.map import average_precision, mean_average_precision

    treatment = list(treatment)
    meta = df[treatment].reset_index(drop=True).astype(str).copy()
    meta["Metadata_Treatment_"] = meta.agg("|".join, axis=1)
    ref = "Metadata_reference_index"
    meta[ref] = np.where(negative, np.arange(len(meta)), -1)
    meta.loc[negative, "Metadata_Treatment_"] = "negative_control"
    x = df[list(features)].to_numpy(dtype=np.float64)
    ap = average_precision(meta, x, pos_sameby=["Metadata_Treatment_", ref], pos_diffby=[], neg_sameby=[],
                           neg_diffby=["Metadata_Treatment_", ref], progress_bar=False)
    ap = ap[~negative & ap["average_precision"].notna()]
    if ap.empty:
        raise MicrosnoopError("no treatment has two or more replicate wells to compute mAP")
    res = mean_average_precision(ap, ["Metadata_Treatment_"], null_size=null_size, threshold=0.05, seed=seed,
                                 progress_bar=False)
    counts = ap.groupby("Metadata_Treatment_").size().rename("n_wells")
    firsts = meta[~negative].drop_duplicates("Metadata_Treatment_").set_index("Metadata_Treatment_")[treatment]
    res = res.join(counts, on="Metadata_Treatment_").join(firsts, on="Metadata_Treatment_")
    keep = treatment + ["mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p", "n_wells"]
    return res[keep].reset_index(drop=True)


def nsc_nscb(df: pd.DataFrame, features: Sequence[str], label: str, compound: str,
             batch: str | None = None) -> dict[str, float]:
    """1-NN (cosine) accuracy of ``label`` excluding neighbours of the same compound (NSC) and, with
    ``batch``, also of the same batch (NSCB). Queries with no eligible neighbour are skipped."""
    for col in [label, compound] + ([batch] if batch else []):
        if col not in df.columns:
            raise MicrosnoopError(f"column {col} not in the profiles")
    x = df[list(features)].to_numpy(dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    lab, comp = df[label].astype(str).to_numpy(), df[compound].astype(str).to_numpy()
    out = {"NSC": _nn_accuracy(sim, lab, comp[:, None] == comp[None, :])}
    if batch:
        bat = df[batch].astype(str).to_numpy()
        out["NSCB"] = _nn_accuracy(sim, lab, (comp[:, None] == comp[None, :]) | (bat[:, None] == bat[None, :]))
    return out


def _nn_accuracy(sim: np.ndarray, labels: np.ndarray, excluded: np.ndarray) -> float:
    s = np.where(excluded, -np.inf, sim)
    ok = np.isfinite(s).any(axis=1)
    if not ok.any():
        return float("nan")
    nn = s[ok].argmax(axis=1)
    return float((labels[ok][nn] == labels[ok]).mean())


def evaluate_plate(wells: pd.DataFrame, features: Sequence[str], negative: np.ndarray, positive: np.ndarray,
                   dose: str | None = "Metadata_DoseIndex", block: str | None = "Metadata_RowBlock",
                   treatment: Sequence[str] | None = None, null_size: int = 10000) -> dict[str, Any]:
    """All plate metrics for well profiles, as a JSON-ready dict (and the mAP table under ``map``)."""
    x = wells[list(features)].to_numpy(dtype=np.float64)
    scores = control_scores(x, negative, positive)
    report: dict[str, Any] = {"n_wells": int(len(wells)), "n_negative": int(negative.sum()),
                              "n_positive": int(positive.sum()),
                              "z_prime": z_prime(scores[positive], scores[negative])}
    if dose and dose in wells.columns:
        blk = wells[block] if block and block in wells.columns else None
        report["dose_spearman"] = dose_spearman(scores, wells[dose], blk)
        report["dose_spearman_series_only"] = dose_spearman(scores, wells[dose], blk, include=~(negative | positive))
    if treatment is None:
        treatment = [c for c in (block, dose) if c and c in wells.columns]
    if treatment:
        try:
            table = map_per_treatment(wells, features, treatment, negative, null_size=null_size)
            report["map"] = table.to_dict(orient="records")
            report["mean_map"] = float(table["mean_average_precision"].mean())
            report["fraction_retrieved"] = float(table["below_corrected_p"].mean())
        except MicrosnoopError as exc:
            report["map_error"] = str(exc)
    report["control_scores"] = scores.tolist()
    return report
