"""The reward model of the learned policy and of the doubly robust estimator: shrunk per-action means, learnt
progressively (row ``t`` predicted from rows before it only)."""

from __future__ import annotations

import math

import numpy as np


def _feature(k: str, v) -> str:
    if isinstance(v, str):
        return f"{k}={v}"
    v = float(v)
    if v == int(v) and abs(v) < 100:
        return f"{k}={int(v)}"
    if v == 0:
        return f"{k}~0"
    return f"{k}~{'-' if v < 0 else ''}{math.floor(2 * math.log2(abs(v)))}"  # half-octave buckets


class ShrinkageRewardModel:
    """Progressive reward model over all actions at once: per-action means shrunk to the global mean, and
    per (action, context feature) means shrunk to the action's, averaged over the context's features.

    >>> m = ShrinkageRewardModel(["a", "b"], strength=1.0)
    >>> for _ in range(20):
    ...     m.learn({"s": "x"}, "a", 1.0); m.learn({"s": "y"}, "a", 0.0); m.learn({"s": "x"}, "b", 0.5)
    >>> [round(float(v), 2) for v in m.predict({"s": "x"})]
    [0.98, 0.5]
    """

    def __init__(self, actions: list[str], strength: float = 5.0) -> None:
        self.actions = list(actions)
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.lam = strength
        A = len(self.actions)
        self.n = np.zeros(A)
        self.s = np.zeros(A)
        self.fn: dict[str, np.ndarray] = {}
        self.fs: dict[str, np.ndarray] = {}
        self.total_n = 0
        self.total_s = 0.0

    def predict(self, context: dict) -> np.ndarray:
        mu = self.total_s / self.total_n if self.total_n else 0.0
        mu_a = (self.s + self.lam * mu) / (self.n + self.lam)
        feats = [_feature(k, v) for k, v in context.items()]
        parts = [(self.fs[f] + self.lam * mu_a) / (self.fn[f] + self.lam) for f in feats if f in self.fn]
        if not parts:
            return mu_a
        return np.mean(parts, axis=0)

    def learn(self, context: dict, action: str, reward: float) -> None:
        i = self.index[action]
        self.n[i] += 1
        self.s[i] += reward
        self.total_n += 1
        self.total_s += reward
        A = len(self.actions)
        for k, v in context.items():
            f = _feature(k, v)
            if f not in self.fn:
                self.fn[f] = np.zeros(A)
                self.fs[f] = np.zeros(A)
            self.fn[f][i] += 1
            self.fs[f][i] += reward


def greedy(rhat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Greedy distribution on ``rhat`` over allowed actions, ties split uniformly."""
    vals = rhat if mask is None else np.where(mask, rhat, -np.inf)
    best = vals >= vals.max() - 1e-12
    return best / best.sum()
