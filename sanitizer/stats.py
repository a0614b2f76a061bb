"""Small statistics for the audit report: a binomial tail and a threshold-free ROC.

scipy is not a dependency, so the binomial tail is computed here from log-probabilities (math.lgamma),
summed only over the terms that can matter: exact to double precision and O(sqrt(n)) terms, so a
billion-sample run costs the same as a small one.
"""

from __future__ import annotations

import math

import numpy as np

_SIGMAS = 40.0  # terms further than this from the mode are below exp(-800): they cannot change a double


def _log_pmf(ks: np.ndarray, n: int, p: float) -> np.ndarray:
    """log P(X = k) for X ~ Binomial(n, p), 0 < p < 1, vectorised over ks."""
    lgamma = np.vectorize(math.lgamma, otypes=[float])
    log_choose = math.lgamma(n + 1) - lgamma(ks + 1.0) - lgamma(n - ks + 1.0)
    return log_choose + ks * math.log(p) + (n - ks) * math.log1p(-p)


def _log_sum_exp(values: np.ndarray) -> float:
    top = float(values.max())
    return top + math.log(float(np.exp(values - top).sum()))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of seeing k or more successes.

    Sums whichever tail is the small one (so a p-value of 1e-300 is not lost to 1 - (1 - 1e-300)).
    """
    if k < 0 or n < 0 or not 0 <= p <= 1:
        raise ValueError(f"binomial_sf needs 0 <= k, 0 <= n and 0 <= p <= 1, got k={k}, n={n}, p={p}")
    if k == 0:
        return 1.0
    if k > n or p == 0:
        return 0.0
    if p == 1:
        return 1.0
    mode = (n + 1) * p
    reach = int(_SIGMAS * math.sqrt(n * p * (1 - p)) + 50)
    if k > mode:  # upper tail: terms fall from k upwards
        ks = np.arange(k, min(n, k + reach) + 1, dtype=float)
        return min(1.0, math.exp(_log_sum_exp(_log_pmf(ks, n, p))))
    ks = np.arange(max(0, k - 1 - reach), k, dtype=float)  # lower tail P(X <= k-1), falls downwards
    return max(0.0, 1.0 - math.exp(_log_sum_exp(_log_pmf(ks, n, p))))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds), one point per distinct score.

    A sample is called positive when its score is >= the threshold; the curve starts at (0, 0).
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    pos, neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    fpr = np.r_[0.0, fp / neg]
    tpr = np.r_[0.0, tp / pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), i.e. P(score of a positive > score of a negative)."""
    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        raise ValueError("AUC needs both positive and negative samples")
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))
