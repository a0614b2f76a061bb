"""Detection metrics without scikit-learn: rank-based AUC, TPR and FPR at a threshold, TPR at a
false-positive budget, and the kNN-distance baseline."""

from __future__ import annotations

import numpy as np

from sanitizer.collapse import neighbour_similarity


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


def knn_distance(queries: np.ndarray, reference: np.ndarray, k: int = 10) -> np.ndarray:
    """Mean cosine distance of each query to its k nearest reference embeddings (a baseline detector):
    the collapse pass's neighbour search, on the embeddings made unit length."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

    return 1 - neighbour_similarity(unit(queries), unit(reference), k=k)
