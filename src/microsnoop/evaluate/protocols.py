"""Evaluation protocols of the benchmark sets: ``knn`` and ``mlp_cv`` (see ../shared/data/README.md).

Both score how well embeddings separate a biological label. The protocol dictionaries come straight
from a set's ``dataset.json``; every key they use is echoed into the report so a number can be traced
to its exact settings.

Semantics chosen where the README leaves room (documented in docs/benchmarks.md):
- features are z-scored over the whole set (all rows), constant features are left at 0;
- ``subset`` restricts both the scored rows and the rows that may serve as neighbours / training data;
- a query with no admissible neighbour (all excluded) is not scored and counted in ``n_unscored``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from ..core.errors import MicrosnoopError

PROTOCOL_NAMES = ("knn", "mlp_cv")


@dataclass
class ProtocolResult:
    """Scores of one protocol on one embedding; ``y_true``/``y_pred`` feed the confusion matrix."""

    protocol: str
    params: dict[str, Any]
    accuracy: float
    macro_f1: float
    n: int
    y_true: np.ndarray
    y_pred: np.ndarray
    labels: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def zscore(X: np.ndarray) -> np.ndarray:
    """Standardise each feature over the rows given; a constant feature becomes 0 (not NaN)."""
    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    return (X - mu) / np.where(sd > 0, sd, 1.0)


def label_values(meta: pd.DataFrame, column: str) -> np.ndarray:
    """Labels as strings (so 0.0 and '0.0' agree); missing values stay ``None``."""
    if column not in meta.columns:
        raise MicrosnoopError(f"label column '{column}' not in metadata (columns: {', '.join(meta.columns)})")
    col = meta[column]
    return np.array([None if pd.isna(v) else str(v) for v in col], dtype=object)


def subset_mask(meta: pd.DataFrame, subset: dict[str, list] | None) -> np.ndarray:
    """Rows whose values are listed for every column of ``subset`` (compared as strings)."""
    mask = np.ones(len(meta), dtype=bool)
    for column, values in (subset or {}).items():
        if column not in meta.columns:
            raise MicrosnoopError(f"subset column '{column}' not in metadata")
        allowed = {str(v) for v in values}
        mask &= meta[column].astype(str).isin(allowed).to_numpy()
    return mask


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 (over the classes present in truth or prediction)."""
    if len(y_true) == 0:
        return float("nan"), float("nan")
    return float(accuracy_score(y_true, y_pred)), float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def sort_labels(values) -> list[str]:
    """Class names in a readable order: numerically when every one is a number (0.0, 5.0, 15.0, 50.0)."""
    uniq = set(values)
    try:
        return sorted(uniq, key=float)
    except (TypeError, ValueError):
        return sorted(uniq)


def vote(neighbour_labels: list) -> Any:
    """Majority of the (nearest-first) neighbour labels; a tie goes to the tied label seen first, i.e. nearest."""
    counts: dict[Any, int] = {}
    for lab in neighbour_labels:
        counts[lab] = counts.get(lab, 0) + 1
    best = max(counts.values())
    for lab in neighbour_labels:
        if counts[lab] == best:
            return lab
    raise AssertionError("empty neighbour list")


def knn_predict(Z: np.ndarray, labels: np.ndarray, queries: np.ndarray, refs: np.ndarray, k: int,
                groups: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """Predict each query's label from its ``k`` most cosine-similar reference rows.

    A query is never its own neighbour; with ``groups`` a reference sharing the query's group is
    skipped too (not-same-well, not-same-plate). Equal similarities are ordered by row index, so the
    result never depends on sort instability. Returns ``None`` where no reference is admissible.
    """
    if k < 1:
        raise MicrosnoopError(f"knn: k must be at least 1, got {k}")
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    U = Z / np.where(norms > 0, norms, 1.0)
    R = U[refs]
    ref_labels = labels[refs]
    ref_groups = None if groups is None else groups[refs]
    pred = np.empty(len(queries), dtype=object)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        sim = U[q] @ R.T
        sim[q[:, None] == refs[None, :]] = -np.inf
        if ref_groups is not None:
            sim[groups[q][:, None] == ref_groups[None, :]] = -np.inf
        order = np.argsort(-sim, axis=1, kind="stable")
        for i in range(len(q)):
            row = order[i]
            valid = row[np.isfinite(sim[i, row])][:k]
            pred[s + i] = vote(list(ref_labels[valid])) if len(valid) else None
    return pred


def run_knn(X: np.ndarray, meta: pd.DataFrame, protocol: dict[str, Any], default_label: str) -> ProtocolResult:
    """The ``knn`` protocol: z-score over the set, cosine, majority of ``k`` (ties to the nearest)."""
    k = int(protocol.get("k", 1))
    reference = protocol.get("reference", "leave-one-out")
    label_col = protocol.get("label") or default_label
    exclude = protocol.get("exclude_same")
    labels = label_values(meta, label_col)
    usable = subset_mask(meta, protocol.get("subset")) & np.array([v is not None for v in labels])
    if reference == "leave-one-out":
        queries = refs = np.flatnonzero(usable)
    elif reference == "train":
        if "Metadata_Split" not in meta.columns:
            raise MicrosnoopError("knn reference 'train' needs a Metadata_Split column (train/test)")
        split = meta["Metadata_Split"].astype(str).to_numpy()
        refs = np.flatnonzero(usable & (split == "train"))
        queries = np.flatnonzero(usable & (split == "test"))
    else:
        raise MicrosnoopError(f"knn: unknown reference '{reference}' (leave-one-out or train)")
    groups = None
    if exclude:
        if exclude not in meta.columns:
            raise MicrosnoopError(f"knn exclude_same column '{exclude}' not in metadata")
        groups = meta[exclude].astype(str).to_numpy()
    Z = zscore(X)
    pred = knn_predict(Z, labels, queries, refs, k, groups)
    scored = np.array([p is not None for p in pred], dtype=bool)
    y_true, y_pred = labels[queries][scored].astype(str), pred[scored].astype(str)
    acc, f1 = scores(y_true, y_pred)
    params = {"k": k, "reference": reference, "label": label_col, "exclude_same": exclude,
              "subset": protocol.get("subset")}
    return ProtocolResult("knn", params, acc, f1, int(scored.sum()), y_true, y_pred,
                          sort_labels(set(y_true) | set(y_pred)), {"n_unscored": int((~scored).sum())})


def cv_splits(y: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified folds; with ``groups`` (StratifiedGroupKFold) a group never spans train and test."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    _, counts = np.unique(y, return_counts=True)
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < folds:
            raise MicrosnoopError(f"mlp_cv: {folds} folds need at least {folds} groups, got {n_groups}")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # sklearn warns when a class has fewer groups than folds
            warnings.simplefilter("ignore", UserWarning)
            return list(splitter.split(np.zeros(len(y)), y, groups))
    if counts.min() < folds:
        raise MicrosnoopError(f"mlp_cv: the smallest class has {counts.min()} rows, fewer than {folds} folds")
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def run_mlp_cv(X: np.ndarray, meta: pd.DataFrame, protocol: dict[str, Any], default_label: str) -> ProtocolResult:
    """The ``mlp_cv`` protocol: MLPClassifier(max_iter=1000) on per-fold standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    folds = int(protocol.get("folds", 5))
    seed = int(protocol.get("seed", 0))
    label_col = protocol.get("label") or default_label
    group_col = protocol.get("group")
    labels = label_values(meta, label_col)
    rows = np.flatnonzero(subset_mask(meta, protocol.get("subset")) & np.array([v is not None for v in labels]))
    y = labels[rows].astype(str)
    Xr = np.asarray(X, dtype=np.float64)[rows]
    groups = None
    if group_col:
        if group_col not in meta.columns:
            raise MicrosnoopError(f"mlp_cv group column '{group_col}' not in metadata")
        groups = meta[group_col].astype(str).to_numpy()[rows]
    accs, f1s = [], []
    y_pred = np.empty(len(rows), dtype=object)
    for train, test in cv_splits(y, folds, seed, groups):
        clf = make_pipeline(StandardScaler(), MLPClassifier(max_iter=1000, random_state=seed))
        # one BLAS thread: these matrices are small, so threads only add contention (6x slower on a shared
        # 2-core machine), and a fixed thread count keeps the floating-point results the same everywhere
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(Xr[train], y[train])
            pred = clf.predict(Xr[test])
        y_pred[test] = pred
        a, f = scores(y[test], pred)
        accs.append(a)
        f1s.append(f)
    y_pred = y_pred.astype(str)
    params = {"folds": folds, "seed": seed, "label": label_col, "group": group_col, "subset": protocol.get("subset")}
    extra = {"accuracy_sd": float(np.std(accs, ddof=1)) if folds > 1 else 0.0,
             "macro_f1_sd": float(np.std(f1s, ddof=1)) if folds > 1 else 0.0,
             "fold_accuracy": [round(a, 6) for a in accs]}
    return ProtocolResult("mlp_cv", params, float(np.mean(accs)), float(np.mean(f1s)), len(rows), y, y_pred,
                          sort_labels(set(y) | set(y_pred)), extra)


def run_protocol(X: np.ndarray, meta: pd.DataFrame, protocol: dict[str, Any], default_label: str) -> ProtocolResult:
    """Dispatch on the protocol's ``name``; unknown names are an error, never silently skipped."""
    name = protocol.get("name")
    if name == "knn":
        return run_knn(X, meta, protocol, default_label)
    if name == "mlp_cv":
        return run_mlp_cv(X, meta, protocol, default_label)
    raise MicrosnoopError(f"unknown protocol '{name}' (known: {', '.join(PROTOCOL_NAMES)})")


def protocol_key(protocol: dict[str, Any], default_label: str) -> str:
    """A short human-readable column name: ``knn k=11 loo !Image`` / ``mlp_cv 5f grp Well``."""
    label = protocol.get("label") or default_label
    lab = "" if label == default_label else f" [{label.removeprefix('Metadata_')}]"
    sub = protocol.get("subset")
    sub_s = ""
    if sub:
        sub_s = " {" + ";".join(f"{','.join(map(str, v))}" for v in sub.values()) + "}"
    if protocol.get("name") == "knn":
        ref = "loo" if protocol.get("reference", "leave-one-out") == "leave-one-out" else "train->test"
        excl = f" !{protocol['exclude_same'].removeprefix('Metadata_')}" if protocol.get("exclude_same") else ""
        return f"knn k={protocol.get('k', 1)} {ref}{excl}{lab}{sub_s}"
    grp = f" grp {protocol['group'].removeprefix('Metadata_')}" if protocol.get("group") else ""
    return f"mlp_cv {protocol.get('folds', 5)}f{grp}{lab}{sub_s}"
