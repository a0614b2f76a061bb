"""Detection metrics in plain numpy (no scikit-learn): rank-based AUC, TPR and FPR at a threshold,
TPR at a false-positive budget."""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = average_ranks(np.asarray(scores, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rates(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) when every score above the threshold is flagged."""
    positive = positive.astype(bool)
    flagged = np.asarray(scores) > threshold
    tpr = float(flagged[positive].mean()) if positive.any() else float("nan")
    fpr = float(flagged[~positive].mean()) if (~positive).any() else float("nan")
    return tpr, fpr


def tpr_at_fpr(scores: np.ndarray, positive: np.ndarray, fpr: float) -> float:
    """TPR at the lowest threshold that flags at most `fpr` of the negatives. The threshold is chosen
    on the labels, so this is what the ranking allows, apart from how a threshold is calibrated."""
    positive = positive.astype(bool)
    negatives = np.sort(np.asarray(scores)[~positive])[::-1]
    if not positive.any() or not len(negatives):
        return float("nan")
    return rates(scores, positive, negatives[min(int(fpr * len(negatives)), len(negatives) - 1)])[0]


def knn_distance(
    queries: np.ndarray, reference: np.ndarray, k: int = 10, exclude_self: bool = False
) -> np.ndarray:
    """Mean cosine distance of each query to its k nearest reference embeddings (a baseline detector)."""
    q = queries / (np.linalg.norm(queries, axis=1, keepdims=True) + 1e-12)
    r = reference / (np.linalg.norm(reference, axis=1, keepdims=True) + 1e-12)
    out = np.empty(len(q), np.float32)
    skip = 1 if exclude_self else 0
    for start in range(0, len(q), 1024):
        dist = 1 - q[start : start + 1024] @ r.T
        nearest = np.partition(dist, k + skip - 1, axis=1)[:, : k + skip]
        out[start : start + 1024] = np.sort(nearest, axis=1)[:, skip:].mean(1)
    return out
