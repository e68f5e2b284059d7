"""Evaluation metrics of paper section VI: AUC with bootstrap confidence intervals (VI-B),
Dice similarity coefficient and pixel average precision of saliency maps (VI-C).

Plain numpy, so that results can be checked by hand and no scikit-learn is needed at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MetricError(ValueError):
    """A metric is undefined for its input (e.g. an AUC without positive or negative cases)."""


def _binary(labels: np.ndarray | list, scores: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise MetricError("labels must be 0 or 1")
    return y, s


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg), ties counted as one half (average ranks)."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank of each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg = (starts + ends + 1) / 2.0  # 1-based ranks: mean of start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray | list, scores: np.ndarray | list) -> float:
    """Area under the ROC curve; raises MetricError without both classes."""
    y, s = _binary(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise MetricError(f"AUC needs positive and negative cases; got {n_pos} positive of "
                          f"{y.size}")
    return _rank_auc(y, s)


def roc_curve(labels: np.ndarray | list, scores: np.ndarray | list
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds decreasing,
    starting at (0, 0) with threshold +inf."""
    y, s = _binary(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.concatenate([np.flatnonzero(np.diff(s)), [s.size - 1]])  # end of each score run
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    n_pos, n_neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    return fpr, tpr, np.concatenate([[np.inf], s[last]])


@dataclass(frozen=True)
class AUCResult:
    auc: float
    low: float  # lower bound of the confidence interval
    high: float
    n: int
    n_positive: int
    resamples: int  # bootstrap resamples that had both classes (the CI is over these)

    def __str__(self) -> str:
        return f"{self.auc:.3f} ({self.low:.3f}-{self.high:.3f})"

    def to_dict(self) -> dict[str, float | int]:
        return {"auc": self.auc, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "n_positive": self.n_positive, "resamples": self.resamples}


def bootstrap_auc(labels: np.ndarray | list, scores: np.ndarray | list, *,
                  resamples: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> AUCResult:
    """AUC with a percentile bootstrap confidence interval (paper VI-B: 1,000 resamples).

    Cases are drawn with replacement; resamples that lack a class are redrawn from the same
    generator's stream (skipped), as an AUC is undefined there.
    """
    y, s = _binary(labels, scores)
    auc = roc_auc(y, s)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    attempts = 0
    while len(values) < resamples and attempts < resamples * 20:
        attempts += 1
        idx = rng.integers(0, y.size, y.size)
        yb = y[idx]
        n_pos = int(yb.sum())
        if 0 < n_pos < yb.size:
            values.append(_rank_auc(yb, s[idx]))
    if not values:
        return AUCResult(auc, float("nan"), float("nan"), y.size, int(y.sum()), 0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values), [tail, 1.0 - tail])
    return AUCResult(auc, float(low), float(high), y.size, int(y.sum()), len(values))


# ----------------------------------------------------------------------------- localisation


def max_projection(array: np.ndarray) -> np.ndarray:
    """(D, H, W) -> (H, W) maximum over slices; 2D input is returned as is (paper VI-C)."""
    a = np.asarray(array)
    return a.max(axis=0) if a.ndim == 3 else a


def dice(saliency: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """DSC between the saliency map thresholded at `threshold` (>=) and a binary mask.

    Both empty gives 1.0 (nothing to find, nothing flagged).
    """
    pred = np.asarray(saliency) >= threshold
    truth = np.asarray(mask).astype(bool)
    if pred.shape != truth.shape:
        raise MetricError(f"saliency {pred.shape} and mask {truth.shape} differ in shape")
    denominator = int(pred.sum()) + int(truth.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / denominator


def pixel_average_precision(saliency: np.ndarray, mask: np.ndarray) -> float:
    """PxAP (Choe et al.): area under the pixel precision-recall curve over all thresholds,
    sum over thresholds of (recall_l - recall_{l-1}) * precision_l, as scikit-learn's
    average_precision_score on the flattened pixels. Raises MetricError for an empty mask."""
    s = np.asarray(saliency, dtype=np.float64).ravel()
    y = np.asarray(mask).astype(bool).ravel()
    if s.shape != y.shape:
        raise MetricError(f"saliency {np.shape(saliency)} and mask {np.shape(mask)} differ")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise MetricError("PxAP needs a mask with at least one pixel")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.concatenate([np.flatnonzero(np.diff(s)), [s.size - 1]])
    tp = np.cumsum(y)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / n_pos
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * precision))


__all__ = ["AUCResult", "MetricError", "bootstrap_auc", "dice", "max_projection",
           "pixel_average_precision", "roc_auc", "roc_curve"]
