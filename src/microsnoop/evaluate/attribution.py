"""Channel attribution: how much each channel's block of a concatenated embedding drives a decision.

microsnoop embeddings are per-channel blocks ([ch0 | ch1 | ...], ``dim`` features each), so "which
channel carries the phenotype" is a well-posed question (uniDINO reports it). For each block we
measure the accuracy of a kNN (the benchmark protocol, leave-one-out or train->test) or a
cross-validated logistic regression with

- ``permute``: that block's rows shuffled (the block keeps its distribution but loses its link to
  the label; the mean over ``repeats`` shuffles) - a permutation importance;
- ``drop``: that block removed (for kNN, cosine over the other blocks only);
- ``alone``: only that block kept.

``drop_*`` = baseline accuracy minus the ablated accuracy: large = the decision depends on it.

    microsnoop attribution EMBEDDINGS.parquet --label Metadata_Protein [--classifier knn|logistic]
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .protocols import cv_splits, label_values, run_knn, zscore


def channel_blocks(feature_names: Sequence[str] | None = None, n_features: int | None = None,
                   channel_names: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """(channel name, feature column indices) per block: from ``<channel>_emb_<k>`` names, else equal splits."""
    if feature_names is not None and len(feature_names) and all("_emb_" in f for f in feature_names):
        chans = [f.rsplit("_emb_", 1)[0] for f in feature_names]
        order = list(dict.fromkeys(chans))
        arr = np.array(chans)
        return [(c, np.flatnonzero(arr == c)) for c in order]
    if n_features is None or not channel_names:
        raise MicrosnoopError("channel blocks need feature names '<channel>_emb_<k>' or n_features + channel names")
    if n_features % len(channel_names):
        raise MicrosnoopError(f"{n_features} features do not split into {len(channel_names)} equal channel blocks")
    d = n_features // len(channel_names)
    return [(c, np.arange(i * d, (i + 1) * d)) for i, c in enumerate(channel_names)]


def _logistic_accuracy(X: np.ndarray, y: np.ndarray, folds: int, seed: int, transform: Any = None) -> float:
    """Cross-validated accuracy; ``transform(X_test, rng)`` alters only the held-out rows (permutation importance)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    correct, total = 0, 0
    rng = np.random.default_rng(seed)
    for train, test in cv_splits(y, folds, seed):
        scaler = StandardScaler().fit(X[train])
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(X[train]), y[train])
        Xt = X[test] if transform is None else transform(X[test], rng)
        correct += int((clf.predict(scaler.transform(Xt)) == y[test]).sum())
        total += len(test)
    return correct / max(total, 1)


def channel_attribution(X: np.ndarray, meta: pd.DataFrame, label: str, blocks: Sequence[tuple[str, np.ndarray]], *,
                        classifier: str = "knn", protocol: dict[str, Any] | None = None, repeats: int = 3,
                        folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """One row per channel block: baseline, permuted, dropped and alone accuracies and the drops.

    ``classifier="knn"`` scores with the benchmark kNN (``protocol``: a dataset.json knn protocol;
    default k=11 leave-one-out); ``"logistic"``: ``folds``-fold logistic regression, where a
    permutation shuffles the block within the held-out fold (the model is not refitted) and
    drop/alone refit on the kept blocks.
    """
    X = np.asarray(X, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if classifier == "knn":
        proto = {"name": "knn", "k": 11, "reference": "leave-one-out", **(protocol or {}), "label": label}

        def score(Z: np.ndarray) -> float:
            return run_knn(Z, meta, proto, label).accuracy

        def permuted(cols: np.ndarray) -> float:
            accs = []
            for _ in range(repeats):
                Z = X.copy()
                Z[:, cols] = X[rng.permutation(len(X))][:, cols]
                accs.append(score(Z))
            return float(np.mean(accs))
    elif classifier == "logistic":
        y = label_values(meta, label)
        keep = np.array([v is not None for v in y])
        X, y = X[keep], y[keep].astype(str)

        def score(Z: np.ndarray) -> float:
            return _logistic_accuracy(Z, y, folds, seed)

        def permuted(cols: np.ndarray) -> float:
            def shuffle(Xt: np.ndarray, r: np.random.Generator) -> np.ndarray:
                Xt = Xt.copy()
                Xt[:, cols] = Xt[r.permutation(len(Xt))][:, cols]
                return Xt
            return float(np.mean([_logistic_accuracy(X, y, folds, seed + 1 + i, shuffle) for i in range(repeats)]))
    else:
        raise MicrosnoopError(f"classifier must be 'knn' or 'logistic', not '{classifier}'")
    base = score(X)
    rows = []
    all_cols = np.arange(X.shape[1])
    for name, cols in blocks:
        cols = np.asarray(cols)
        rest = np.setdiff1d(all_cols, cols)
        acc_perm = permuted(cols)
        acc_drop = score(X[:, rest]) if len(rest) else float("nan")
        acc_alone = score(X[:, cols])
        rows.append({"channel": name, "features": int(len(cols)), "baseline": base, "permuted": acc_perm,
                     "dropped": acc_drop, "alone": acc_alone, "drop_permuted": base - acc_perm,
                     "drop_dropped": base - acc_drop})
    out = pd.DataFrame(rows)
    out.attrs.update({"classifier": classifier, "label": label, "repeats": repeats,
                      "protocol": json.dumps(proto) if classifier == "knn" else f"{folds}-fold logistic"})
    return out


def attribution_from_file(path: str, label: str, classifier: str = "knn", protocol: dict[str, Any] | None = None,
                          repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Channel attribution of an ``embed`` output (.parquet / .h5 / .h5ad) with its channel-named features."""
    from ..profiling.table import feature_columns, read_embeddings

    df = read_embeddings(path)
    names = feature_columns(df)
    prov = df.attrs["microsnoop"]
    meta, X = df.drop(columns=names), df[names].to_numpy(dtype=np.float32)
    if label not in meta.columns:
        raise MicrosnoopError(f"label column '{label}' not in the file (metadata columns: "
                              f"{', '.join(map(str, meta.columns))})", path)
    blocks = channel_blocks(names, X.shape[1], prov.get("channel_names") or prov.get("channels"))
    return channel_attribution(X, meta, label, blocks, classifier=classifier, protocol=protocol, repeats=repeats, seed=seed)


def render_attribution(df: pd.DataFrame) -> str:
    """The attribution table as text: a header naming classifier and label, then one row per channel.

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`channel_attribution`.

    Returns
    -------
    str
        Lines for a terminal or a log.
    """
    head = (f"# channel attribution ({df.attrs['classifier']}, label {df.attrs['label']}; "
            "drop = baseline - ablated accuracy)")
    return head + "\n" + df.to_string(index=False, float_format=lambda v: f"{v:.3f}")
