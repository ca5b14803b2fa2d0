"""Confidence intervals for the evaluator's scores: AUC (DeLong) and a ratio of means clustered by user.

The public slices have few positives (52 purchases within an hour in the Taobao slice's scored points), so two AUCs
0.02 apart, or an HR@20 5 % above a baseline's, may be chance. These intervals say how far a figure can move under
resampling, so a comparison is read with its uncertainty:

* :func:`delong` gives the AUCs of several scores on the same points and their covariance (DeLong, DeLong &
  Clarke-Pearson 1988, in the midrank form of Sun & Xu 2014: O(n log n)); :func:`auc_interval` and
  :func:`auc_difference` are the normal intervals of one AUC and of the paired difference of two. They take the
  points as independent; a user who has several points makes the true interval somewhat wider.
* :func:`ratio_interval` is the interval of a ratio of two sums over the same targets, for example the engine's
  HR@20 over a baseline's (both are sums over the same next-item targets, divided by the same count). The
  targets of one user are not independent (a user who re-visits items is easy for every method), so the variance
  is computed over users (clusters), by linearising the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Z95", "delong", "auc_interval", "auc_difference", "ratio_interval", "rounded"]

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95 % interval."""


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties given their average rank."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inv]


def delong(y, scores: Sequence) -> tuple[np.ndarray, np.ndarray] | None:
    """AUCs of ``scores`` (each scored at the same points, labels ``y``) and their DeLong covariance matrix;
    ``None`` when ``y`` holds one class only.

    >>> aucs, cov = delong([0, 0, 1, 1], [[0.1, 0.4, 0.35, 0.8]])
    >>> float(aucs[0]), round(float(cov[0, 0]), 6)
    (0.75, 0.125)
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
        ranks = _midranks(s)
        rx, ry = _midranks(s[pos]), _midranks(s[~pos])
        aucs[i] = (ranks[pos].sum() - m * (m + 1) / 2.0) / (m * n)
        v_pos[i] = (ranks[pos] - rx) / n
        v_neg[i] = 1.0 - (ranks[~pos] - ry) / m
    cov_pos = np.atleast_2d(np.cov(v_pos)) if m > 1 else np.zeros((k, k))
    cov_neg = np.atleast_2d(np.cov(v_neg)) if n > 1 else np.zeros((k, k))
    return aucs, cov_pos / m + cov_neg / n


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def auc_interval(y, p, z: float = Z95) -> list[float] | None:
    """The normal interval ``[low, high]`` of the AUC of ``p`` (clipped to [0, 1]); ``None`` with one class.

    >>> auc_interval([0, 1] * 50, [0.2, 0.8] * 50)
    [1.0, 1.0]
    >>> low, high = auc_interval([0, 0, 1, 1] * 25, [0.1, 0.4, 0.35, 0.8] * 25)
    >>> round(low, 3), round(high, 3)
    (0.651, 0.849)
    """
    d = delong(y, [p])
    if d is None:
        return None
    aucs, cov = d
    half = z * math.sqrt(max(float(cov[0, 0]), 0.0))
    return [_clip01(float(aucs[0]) - half), _clip01(float(aucs[0]) + half)]


def auc_difference(y, p1, p2, z: float = Z95) -> dict | None:
    """AUC of ``p1`` minus AUC of ``p2`` on the same points, with its paired normal interval: ``{"difference",
    "ci95"}``; ``None`` with one class. Paired: what the two scores share (the same hard points) cancels, so the
    interval of the difference is narrower than the two AUCs' intervals suggest.

    >>> d = auc_difference([0, 0, 1, 1] * 25, [0.1, 0.4, 0.35, 0.8] * 25, [0.1, 0.2, 0.35, 0.8] * 25)
    >>> d["difference"], [round(x, 3) for x in d["ci95"]]
    (-0.25, [-0.349, -0.151])
    """
    d = delong(y, [p1, p2])
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
