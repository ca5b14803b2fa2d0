"""Off-policy estimators, one small class each under one base (OBP's ``obp/ope/estimators.py``).

Each accumulates, row by row, what it needs to estimate the mean reward per decision of ``k`` target policies at
once (vectorised over policies) from a log made by another policy, and reports an estimate with its standard
error. Per row and target policy the caller passes the importance weight ``w = pi(a_t | x) / p_t``, the logged
reward ``r``, and the doubly robust term ``sum_a pi(a|x) rhat(x, a) + w (r - rhat(x, a_t))``.

>>> import numpy as np
>>> est = [InverseProbabilityWeighting(1), SelfNormalisedIPS(1), DoublyRobust(1)]
>>> for w, r in [(2.0, 1.0), (0.0, 0.0), (2.0, 0.0), (0.0, 1.0)]:
...     for e in est:
...         e.add(np.array([w]), r, np.array([0.5 + w * (r - 0.5)]))
>>> [round(e.estimate(0)[0], 3) for e in est]
[0.5, 0.5, 0.5]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

Z95 = 1.959963984540054


class OffPolicyEstimator(ABC):
    """Running sums for ``k`` target policies; :meth:`estimate` gives ``(value, standard error)`` of one."""

    name: ClassVar[str]

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"an estimator needs k >= 1 target policies, got {k}")
        self.k = k
        self.n = 0

    @abstractmethod
    def add(self, w: np.ndarray, r: float, dr: np.ndarray) -> None:
        """One logged row: importance weights ``w`` and doubly robust terms ``dr`` (one per policy), reward ``r``."""

    @abstractmethod
    def estimate(self, i: int) -> tuple[float, float]:
        """``(value, standard error)`` of policy ``i``; NaN where undefined."""

    def interval(self, i: int, z: float = Z95) -> tuple[float, float]:
        """Normal-approximation confidence interval (95 % by default)."""
        v, se = self.estimate(i)
        return v - z * se, v + z * se


class InverseProbabilityWeighting(OffPolicyEstimator):
    """IPS: the mean of ``w r``. Unbiased, high variance when the target strays from the logging policy."""

    name = "ips"

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.s = np.zeros(k)
        self.s2 = np.zeros(k)

    def add(self, w, r, dr) -> None:
        self.n += 1
        wr = w * r
        self.s += wr
        self.s2 += wr * wr

    def estimate(self, i):
        m = self.s[i] / self.n
        return float(m), math.sqrt(max(self.s2[i] / self.n - m * m, 0.0) / self.n)


class SelfNormalisedIPS(OffPolicyEstimator):
    """SNIPS: ``sum(w r) / sum(w)``; standard error by the delta method. Also the effective sample size."""

    name = "snips"

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.wr = np.zeros(k)
        self.wr2 = np.zeros(k)
        self.w = np.zeros(k)
        self.w2 = np.zeros(k)
        self.w2r = np.zeros(k)

    def add(self, w, r, dr) -> None:
        self.n += 1
        wr = w * r
        self.wr += wr
        self.wr2 += wr * wr
        self.w += w
        self.w2 += w * w
        self.w2r += w * w * r

    def estimate(self, i):
        if self.w[i] <= 0:
            return float("nan"), float("nan")
        sn = self.wr[i] / self.w[i]
        # delta method: Var(SNIPS) ~ sum((w r - sn w)^2) / (sum w)^2
        num = self.wr2[i] - 2 * sn * self.w2r[i] + sn * sn * self.w2[i]
        return float(sn), math.sqrt(max(num, 0.0)) / self.w[i]

    def effective_sample_size(self, i: int) -> float:
        """``(sum w)^2 / sum w^2``: how many on-policy rows the weighted log is worth."""
        return float(self.w[i] ** 2 / self.w2[i]) if self.w2[i] > 0 else 0.0


class DoublyRobust(OffPolicyEstimator):
    """DR: the mean of the doubly robust terms; unbiased when the reward model is fit on earlier rows only."""

    name = "dr"

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.s = np.zeros(k)
        self.s2 = np.zeros(k)

    def add(self, w, r, dr) -> None:
        self.n += 1
        self.s += dr
        self.s2 += dr * dr

    def estimate(self, i):
        m = self.s[i] / self.n
        return float(m), math.sqrt(max(self.s2[i] / self.n - m * m, 0.0) / self.n)


ESTIMATORS: tuple[type[OffPolicyEstimator], ...] = (InverseProbabilityWeighting, SelfNormalisedIPS, DoublyRobust)
