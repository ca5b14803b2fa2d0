"""The reward model of the learned policy and of the doubly robust estimator: shrunk per-action means, learnt
progressively (row ``t`` predicted from rows before it only)."""

from __future__ import annotations

import math

import numpy as np


def _feature(name: str, value) -> str:
    """The context feature ``name=value`` for strings and integers under 100, else ``name~bucket``: the value's
    sign and half-octave (0 is an integer, so the logarithm is defined).

    >>> _feature("seg", "a"), _feature("pos", 2.0), _feature("cart", 154.0), _feature("cart", -2.5)
    ('seg=a', 'pos=2', 'cart~14', 'cart~-2')
    """
    if isinstance(value, str):
        return f"{name}={value}"
    value = float(value)
    if value == int(value) and abs(value) < 100:
        return f"{name}={int(value)}"
    return f"{name}~{'-' if value < 0 else ''}{math.floor(2 * math.log2(abs(value)))}"  # half-octave buckets


class ShrinkageRewardModel:
    """Progressive reward model over all actions at once: per-action means shrunk to the global mean, and
    per (action, context feature) means shrunk to the action's, averaged over the context's features.

    ``strength``: the mean a mean is shrunk to counts as that many rows.

    >>> m = ShrinkageRewardModel(["a", "b"], strength=1.0)
    >>> for _ in range(20):
    ...     m.learn({"s": "x"}, "a", 1.0); m.learn({"s": "y"}, "a", 0.0); m.learn({"s": "x"}, "b", 0.5)
    >>> [round(float(v), 2) for v in m.predict({"s": "x"})]
    [0.98, 0.5]
    """

    def __init__(self, actions: list[str], strength: float = 5.0) -> None:
        self.actions = list(actions)
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.strength = strength
        n_actions = len(self.actions)
        self.count = np.zeros(n_actions)
        self.reward_sum = np.zeros(n_actions)
        self.feature_count: dict[str, np.ndarray] = {}
        self.feature_reward_sum: dict[str, np.ndarray] = {}
        self.total_count = 0
        self.total_reward = 0.0

    def predict(self, context: dict) -> np.ndarray:
        """The predicted reward of each action in ``context`` (an array in action order)."""
        global_mean = self.total_reward / self.total_count if self.total_count else 0.0
        action_mean = (self.reward_sum + self.strength * global_mean) / (self.count + self.strength)
        features = [_feature(k, v) for k, v in context.items()]
        feature_means = [(self.feature_reward_sum[f] + self.strength * action_mean)
                         / (self.feature_count[f] + self.strength) for f in features if f in self.feature_count]
        if not feature_means:
            return action_mean
        return np.mean(feature_means, axis=0)

    def learn(self, context: dict, action: str, reward: float) -> None:
        i = self.index[action]
        self.count[i] += 1
        self.reward_sum[i] += reward
        self.total_count += 1
        self.total_reward += reward
        n_actions = len(self.actions)
        for k, v in context.items():
            feature = _feature(k, v)
            if feature not in self.feature_count:
                self.feature_count[feature] = np.zeros(n_actions)
                self.feature_reward_sum[feature] = np.zeros(n_actions)
            self.feature_count[feature][i] += 1
            self.feature_reward_sum[feature][i] += reward


def greedy(rhat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Greedy distribution on ``rhat`` over allowed actions, ties split uniformly."""
    vals = rhat if mask is None else np.where(mask, rhat, -np.inf)
    best = vals >= vals.max() - 1e-12
    return best / best.sum()
