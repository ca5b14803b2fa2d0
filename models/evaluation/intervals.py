"""Confidence intervals for the evaluator's scores: AUC (DeLong) and a ratio of means clustered by user.

The public slices have few positives (52 purchases within an hour in the Taobao slice's scored points), so two AUCs
0.02 apart, or an HR@20 5 % above a baseline's, may be chance. These intervals say how far a figure can move under
resampling, so a comparison is read with its uncertainty:

* :func:`delong` gives the AUCs of several scores on the same points and their covariance (DeLong, DeLong &
  Clarke-Pearson 1988, in the midrank form of Sun & Xu 2014: O(n log n)); :func:`auc_interval` and
  :func:`auc_difference` are the normal intervals of one AUC and of the paired difference of two. Given each
  point's cluster (its user), the covariance is computed over clusters (Obuchowski 1997): a user with many
  decision points, whose points share the user's habits, counts as the evidence of one user, not of many.
* :func:`ratio_interval` is the interval of a ratio of two sums over the same targets, for example the engine's
  HR@20 over a baseline's (both are sums over the same next-item targets, divided by the same count). The
  targets of one user are not independent (a user who re-visits items is easy for every method), so the variance
  is computed over users (clusters), by linearising the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Z95", "midranks", "delong", "auc_interval", "auc_difference", "ratio_interval", "rounded"]

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95 % interval."""


def midranks(x) -> np.ndarray:
    """1-based ranks of ``x``, ties given their average rank.

    >>> midranks([0.3, 0.1, 0.3]).tolist()
    [2.5, 1.0, 2.5]
    """
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inv]


def delong(y, scores: Sequence, clusters=None) -> tuple[np.ndarray, np.ndarray] | None:
    """AUCs of ``scores`` (each scored at the same points, labels ``y``) and their DeLong covariance matrix;
    ``None`` when ``y`` holds one class only.

    ``clusters``: each point's cluster (any hashable, e.g. its user). The covariance is then Obuchowski's (1997):
    the structural components are summed per cluster, and their spread is computed over clusters. Without it every
    point is independent.

    >>> aucs, cov = delong([0, 0, 1, 1], [[0.1, 0.4, 0.35, 0.8]])
    >>> float(aucs[0]), round(float(cov[0, 0]), 6)
    (0.75, 0.125)
    >>> _, once = delong([0, 0, 1, 1], [[0.1, 0.4, 0.35, 0.8]], clusters=["a", "b", "c", "d"])
    >>> _, thrice = delong([0, 0, 1, 1] * 3, [[0.1, 0.4, 0.35, 0.8] * 3], clusters=["a", "b", "c", "d"] * 3)
    >>> round(float(once[0, 0]), 6), round(float(thrice[0, 0]), 6)  # each user's points thrice: no more evidence
    (0.083333, 0.083333)
    """
    y = np.asarray(y, dtype=np.int64)
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m == 0 or n == 0:
        return None
    k = len(scores)
    aucs = np.empty(k)
    v_pos = np.empty((k, m))  # per positive: the share of negatives it outranks (ties one half)
    v_neg = np.empty((k, n))  # per negative: the share of positives that outrank it
    for i, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float64)
        ranks = midranks(s)
        rx, ry = midranks(s[pos]), midranks(s[~pos])
        aucs[i] = (ranks[pos].sum() - m * (m + 1) / 2.0) / (m * n)
        v_pos[i] = (ranks[pos] - rx) / n
        v_neg[i] = 1.0 - (ranks[~pos] - ry) / m
    if clusters is not None:
        return aucs, _clustered_cov(aucs, v_pos, v_neg, np.asarray(clusters), pos)
    cov_pos = np.atleast_2d(np.cov(v_pos)) if m > 1 else np.zeros((k, k))
    cov_neg = np.atleast_2d(np.cov(v_neg)) if n > 1 else np.zeros((k, k))
    return aucs, cov_pos / m + cov_neg / n


def _clustered_cov(aucs: np.ndarray, v_pos: np.ndarray, v_neg: np.ndarray, clusters: np.ndarray,
                   pos: np.ndarray) -> np.ndarray:
    """Obuchowski's covariance of the AUCs over clusters.

    Per cluster ``c``: ``d10_c``, the sum of its positives' components minus ``m_c * auc``, and ``d01_c``, the same
    over its negatives with ``n_c``. With ``K`` clusters, ``M`` positives and ``N`` negatives, Obuchowski's
    ``S10 / M + S01 / N + 2 S11 / (M N)`` is ``K / (K - 1) * sum_c z_c z_c^T`` with ``z_c = d10_c / M + d01_c / N``:
    written so, it is a covariance matrix by construction. Zero with a single cluster (nothing to spread over).
    """
    _, index = np.unique(clusters, return_inverse=True)
    n_clusters = int(index.max()) + 1
    m, n = v_pos.shape[1], v_neg.shape[1]
    if n_clusters < 2:
        return np.zeros((len(aucs), len(aucs)))
    m_c = np.bincount(index[pos], minlength=n_clusters)
    n_c = np.bincount(index[~pos], minlength=n_clusters)
    z = np.empty((len(aucs), n_clusters))
    for i, auc in enumerate(aucs):
        d10 = np.bincount(index[pos], weights=v_pos[i], minlength=n_clusters) - auc * m_c
        d01 = np.bincount(index[~pos], weights=v_neg[i], minlength=n_clusters) - auc * n_c
        z[i] = d10 / m + d01 / n
    return n_clusters / (n_clusters - 1) * z @ z.T


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def auc_interval(y, p, z: float = Z95, clusters=None) -> list[float] | None:
    """The normal interval ``[low, high]`` of the AUC of ``p`` (clipped to [0, 1]); ``None`` with one class.
    ``clusters``: as :func:`delong`.

    >>> auc_interval([0, 1] * 50, [0.2, 0.8] * 50)
    [1.0, 1.0]
    >>> low, high = auc_interval([0, 0, 1, 1] * 25, [0.1, 0.4, 0.35, 0.8] * 25)
    >>> round(low, 3), round(high, 3)
    (0.651, 0.849)
    """
    d = delong(y, [p], clusters)
    if d is None:
        return None
    aucs, cov = d
    half = z * math.sqrt(max(float(cov[0, 0]), 0.0))
    return [_clip01(float(aucs[0]) - half), _clip01(float(aucs[0]) + half)]


def auc_difference(y, p1, p2, z: float = Z95, clusters=None) -> dict | None:
    """AUC of ``p1`` minus AUC of ``p2`` on the same points, with its paired normal interval: ``{"difference",
    "ci95"}``; ``None`` with one class. Paired: what the two scores share (the same hard points) cancels, so the
    interval of the difference is narrower than the two AUCs' intervals suggest. ``clusters``: as :func:`delong`.

    >>> d = auc_difference([0, 0, 1, 1] * 25, [0.1, 0.4, 0.35, 0.8] * 25, [0.1, 0.2, 0.35, 0.8] * 25)
    >>> d["difference"], [round(x, 3) for x in d["ci95"]]
    (-0.25, [-0.349, -0.151])
    """
    d = delong(y, [p1, p2], clusters)
    if d is None:
        return None
    aucs, cov = d
    diff = float(aucs[0] - aucs[1])
    half = z * math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]), 0.0))
    return {"difference": diff, "ci95": [diff - half, diff + half]}


def ratio_interval(numerator, denominator, z: float = Z95) -> dict | None:
    """``sum(numerator) / sum(denominator)`` over clusters, with its normal interval from the clusters' spread:
    ``{"ratio", "ci95"}``; ``None`` when the denominator sums to 0 or there are fewer than two clusters.

    Each element is one cluster's (user's) sum, e.g. of the engine's hits and of a baseline's hits at the same
    targets. The variance linearises the ratio ``R``: ``n / (n - 1) * sum((a - R b)^2) / sum(b)^2``.

    >>> r = ratio_interval([2, 1, 3, 2], [1, 1, 2, 2])
    >>> r["ratio"], [round(x, 3) for x in r["ci95"]]
    (1.3333333333333333, [0.936, 1.731])
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    total = float(b.sum())
    if len(a) < 2 or total == 0.0:
        return None
    ratio = float(a.sum()) / total
    n = len(a)
    var = n / (n - 1) * float(np.sum((a - ratio * b) ** 2)) / total**2
    half = z * math.sqrt(var)
    return {"ratio": ratio, "ci95": [ratio - half, ratio + half]}


def rounded(values: list[float] | None, digits: int = 4) -> list[float] | None:
    """An interval as the reports give it: each end rounded; ``None`` stays ``None``."""
    return None if values is None else [round(v, digits) for v in values]
