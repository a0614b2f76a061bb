"""Detection metrics without scikit-learn: TPR and FPR at a threshold, TPR at a false-positive budget,
and the kNN-distance baseline (the AUC is sanitizer.stats.roc_auc, which the report uses too)."""

from __future__ import annotations

import numpy as np

from sanitizer.neighbours import neighbour_similarity


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
    the collapse pass's neighbour search, on the embeddings made unit length. NaN for a non-finite
    embedding, which the search takes for a row without a sketch."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

    similarity = neighbour_similarity(unit(queries), unit(reference), k=k)
    return 1 - similarity
