"""Small statistics for the audit report: binomial and beta-binomial tails, a threshold-free ROC, and
the share above a calibration's median that tells data unlike the calibration data.

scipy is not a dependency, so the tails are computed here from log-probabilities (math.lgamma). The
binomial tail sums only the terms that can matter: exact to double precision and O(sqrt(n)) terms, so
a billion-sample run costs the same as a small one. The beta-binomial tail is one integral on a fixed
grid, whatever n.
"""

from __future__ import annotations

import math

import numpy as np

# Above this share of a run's scores over the calibration's median the data as a whole rebuilds worse
# than the calibration data: a backdoor moves only its triggered share t of the scores (to 0.5 + t / 2
# at most), so 0.8 needs 60% of the data triggered. On the detection benchmark (session 13): decoders
# trained on the victims' own data 0.52-0.54 (1% triggered) and 0.76-0.77 (50%); the same victims'
# decoders trained on MNIST digits, scoring Fashion-MNIST, 0.83-0.97.
SHIFT_LIMIT = 0.8


def above_median(scores: np.ndarray, calibration: np.ndarray) -> int:
    """How many scores are above the calibration's median, compared in float32 as manifests hold them."""
    return int((np.asarray(scores, np.float32) > np.float32(np.median(calibration))).sum())


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


def _log_beta(a: float, b: float) -> float:
    """log B(a, b), the beta function (symmetric in a and b)."""
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def log_betainc(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """log I_x(a, b), the regularised incomplete beta function, for 0 < x < 1 (vectorised over x).

    The continued fraction (modified Lentz) converges fast for x < (a + 1) / (a + b + 2); above that
    I_x(a, b) = 1 - I_{1-x}(b, a). Working in logs keeps tails of 1e-300 and below.
    """
    x = np.asarray(x, np.float64)
    direct = x < (a + 1) / (a + b + 2)
    xs, aa, bb = np.where(direct, x, 1 - x), np.where(direct, a, b), np.where(direct, b, a)
    log_front = aa * np.log(xs) + bb * np.log1p(-xs) - np.log(aa) - _log_beta(a, b)
    tiny = 1e-300
    c, d = np.ones_like(xs), 1 - (aa + bb) * xs / (aa + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    cf = d.copy()
    for m in range(1, 10_000):
        for num in (
            m * (bb - m) * xs / ((aa + 2 * m - 1) * (aa + 2 * m)),
            -(aa + m) * (aa + bb + m) * xs / ((aa + 2 * m) * (aa + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            cf = cf * c * d
        if np.all(np.abs(c * d - 1) < 1e-15):
            break
    log_part = log_front + np.log(cf)
    return np.where(direct, log_part, np.log(-np.expm1(np.minimum(log_part, -1e-300))))


def beta_binomial_sf(k: int, n: int, a: float, b: float, points: int = 4001) -> float:
    """P(X >= k) where X ~ Binomial(n, P) and P ~ Beta(a, b): a flag count whose rate is itself uncertain.

    X >= k exactly when the k-th smallest of n uniforms, V ~ Beta(k, n - k + 1), lies below P, so
    P(X >= k) = E[P(Beta(a, b) > V)]: one integral over V's density, which is narrow (width ~ sqrt(k) / n),
    on a grid of `points` over +-12 of its standard deviations. Relative error ~1e-4.
    """
    if k < 0 or n < 0 or a <= 0 or b < 0:
        raise ValueError(f"beta_binomial_sf needs 0 <= k, 0 <= n, a > 0 and b >= 0, got {k}, {n}, {a}, {b}")
    if k == 0 or b == 0:  # nothing to exceed, or P = 1 surely
        return 1.0
    if k > n:
        return 0.0
    mean = k / (n + 1)
    sd = math.sqrt(mean * (1 - mean) / (n + 2))
    lo, hi = max(mean - 12 * sd, 0.0), min(mean + 12 * sd, 1.0)
    v = lo + (hi - lo) * (np.arange(points) + 0.5) / points  # midpoints: never exactly 0 or 1
    log_density = (k - 1) * np.log(v) + (n - k) * np.log1p(-v) - _log_beta(k, n - k + 1)
    log_terms = log_density + log_betainc(1 - v, b, a) + math.log((hi - lo) / points)
    return min(1.0, math.exp(_log_sum_exp(log_terms)))


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


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, P(score of a positive > score of a negative) with ties counting half:
    the Mann-Whitney U statistic from the ranks, exact and O(n log n)."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUC needs both positive and negative samples")
    ranks = average_ranks(np.asarray(scores, np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
