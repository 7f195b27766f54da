"""Segmentation quality against ground-truth label masks: object matching at an IoU threshold.

A predicted object matches a true one when their IoU is at least ``threshold`` (0.5 by default);
matches are one-to-one (Hungarian assignment on IoU, which above 0.5 is unique anyway). Reported:
true positives, false positives, false negatives, precision, recall and F1 = 2TP / (2TP + FP + FN).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from ..core.errors import MicrosnoopError


@dataclass
class MatchResult:
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else float("nan")

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    def __add__(self, other: "MatchResult") -> "MatchResult":
        return MatchResult(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                           self.n_true + other.n_true, self.n_pred + other.n_pred)

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every (true object, predicted object) pair, shape (n_true, n_pred); labels need not be sequential."""
    from skimage.segmentation import relabel_sequential

    if true.shape != pred.shape:
        raise MicrosnoopError(f"mask shapes differ: true {true.shape}, predicted {pred.shape}")
    t = relabel_sequential(np.asarray(true).astype(np.int64))[0]
    p = relabel_sequential(np.asarray(pred).astype(np.int64))[0]
    nt, np_ = int(t.max()), int(p.max())
    inter = np.bincount(t.ravel() * (np_ + 1) + p.ravel(), minlength=(nt + 1) * (np_ + 1)).reshape(nt + 1, np_ + 1)
    area_t, area_p = inter.sum(axis=1), inter.sum(axis=0)
    inter = inter[1:, 1:]
    union = area_t[1:, None] + area_p[None, 1:] - inter
    return inter / np.maximum(union, 1)


def match_masks(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> MatchResult:
    """Match two label images (0 = background) one-to-one at IoU >= ``threshold``."""
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(true, pred)
    nt, np_ = iou.shape
    tp = 0
    if nt and np_:
        r, c = linear_sum_assignment(-iou)
        tp = int((iou[r, c] >= threshold).sum())
    return MatchResult(tp, np_ - tp, nt - tp, nt, np_)


def match_many(trues: Iterable[np.ndarray], preds: Iterable[np.ndarray], threshold: float = 0.5) -> MatchResult:
    """Pooled counts over many images (F1 of the pooled counts, not a mean of per-image F1s)."""
    total = MatchResult(0, 0, 0, 0, 0)
    for t, p in zip(trues, preds):
        total = total + match_masks(t, p, threshold)
    return total
