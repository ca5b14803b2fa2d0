"""Off-policy estimators, one small class each under one base (OBP's ``obp/ope/estimators.py``).

Each accumulates, row by row, what it needs to estimate the mean reward per decision of ``n_policies`` target
policies at once (vectorised over policies) from a log made by another policy, and reports an estimate with its
standard error. Per row and target policy the caller passes the importance weight ``w = pi(a_t | x) / p_t``, the
logged reward ``r``, and the doubly robust term ``sum_a pi(a|x) rhat(x, a) + w (r - rhat(x, a_t))``.

>>> import numpy as np
>>> estimators = [InverseProbabilityWeighting(1), SelfNormalisedIPS(1), DoublyRobust(1)]
>>> for w, r in [(2.0, 1.0), (0.0, 0.0), (2.0, 0.0), (0.0, 1.0)]:
...     for estimator in estimators:
...         estimator.add(np.array([w]), r, np.array([0.5 + w * (r - 0.5)]))
>>> [round(estimator.estimate(0)[0], 3) for estimator in estimators]
[0.5, 0.5, 0.5]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from models.evaluation.intervals import Z95


class OffPolicyEstimator(ABC):
    """Running sums for ``n_policies`` target policies; :meth:`estimate` gives ``(value, standard error)`` of one."""

    name: ClassVar[str]

    def __init__(self, n_policies: int) -> None:
        if n_policies < 1:
            raise ValueError(f"an estimator needs n_policies >= 1 target policies, got {n_policies}")
        self.n_policies = n_policies
        self.n = 0

    @abstractmethod
    def add(self, w: np.ndarray, r: float, dr: np.ndarray) -> None:
        """One logged row: importance weights ``w`` and doubly robust terms ``dr`` (one per policy), reward ``r``."""

    @abstractmethod
    def estimate(self, i: int) -> tuple[float, float]:
        """``(value, standard error)`` of policy ``i``; NaN where undefined."""

    def interval(self, i: int, z: float = Z95) -> tuple[float, float]:
        """Normal-approximation confidence interval (95 % by default)."""
        value, se = self.estimate(i)
        return value - z * se, value + z * se


class InverseProbabilityWeighting(OffPolicyEstimator):
    """IPS: the mean of ``w r``. Unbiased, high variance when the target strays from the logging policy."""

    name = "ips"

    def __init__(self, n_policies: int) -> None:
        super().__init__(n_policies)
        self.sum_wr = np.zeros(n_policies)
        self.sum_wr2 = np.zeros(n_policies)

    def add(self, w, r, dr) -> None:
        self.n += 1
        wr = w * r
        self.sum_wr += wr
        self.sum_wr2 += wr * wr

    def estimate(self, i):
        mean = self.sum_wr[i] / self.n
        return float(mean), math.sqrt(max(self.sum_wr2[i] / self.n - mean * mean, 0.0) / self.n)


class SelfNormalisedIPS(OffPolicyEstimator):
    """SNIPS: ``sum(w r) / sum(w)``; standard error by the delta method. Also the effective sample size."""

    name = "snips"

    def __init__(self, n_policies: int) -> None:
        super().__init__(n_policies)
        self.sum_wr = np.zeros(n_policies)
        self.sum_wr2 = np.zeros(n_policies)
        self.sum_w = np.zeros(n_policies)
        self.sum_w2 = np.zeros(n_policies)
        self.sum_w2r = np.zeros(n_policies)

    def add(self, w, r, dr) -> None:
        self.n += 1
        wr = w * r
        self.sum_wr += wr
        self.sum_wr2 += wr * wr
        self.sum_w += w
        self.sum_w2 += w * w
        self.sum_w2r += w * w * r

    def estimate(self, i):
        if self.sum_w[i] <= 0:
            return float("nan"), float("nan")
        snips = self.sum_wr[i] / self.sum_w[i]
        # delta method: Var(SNIPS) ~ sum((w r - snips w)^2) / (sum w)^2
        sq_residuals = self.sum_wr2[i] - 2 * snips * self.sum_w2r[i] + snips * snips * self.sum_w2[i]
        return float(snips), math.sqrt(max(sq_residuals, 0.0)) / self.sum_w[i]

    def effective_sample_size(self, i: int) -> float:
        """``(sum w)^2 / sum w^2``: how many on-policy rows the weighted log is worth."""
        return float(self.sum_w[i] ** 2 / self.sum_w2[i]) if self.sum_w2[i] > 0 else 0.0


class DoublyRobust(OffPolicyEstimator):
    """DR: the mean of the doubly robust terms; unbiased when the reward model is fit on earlier rows only."""

    name = "dr"

    def __init__(self, n_policies: int) -> None:
        super().__init__(n_policies)
        self.sum_dr = np.zeros(n_policies)
        self.sum_dr2 = np.zeros(n_policies)

    def add(self, w, r, dr) -> None:
        self.n += 1
        self.sum_dr += dr
        self.sum_dr2 += dr * dr

    def estimate(self, i):
        mean = self.sum_dr[i] / self.n
        return float(mean), math.sqrt(max(self.sum_dr2[i] / self.n - mean * mean, 0.0) / self.n)


ESTIMATORS: tuple[type[OffPolicyEstimator], ...] = (InverseProbabilityWeighting, SelfNormalisedIPS, DoublyRobust)
