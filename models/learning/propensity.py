"""Purchase propensity models: P(user buys within H hours | profile, session, context).

Two models are scored side by side on the same decision points
(:class:`models.learning.delayed_labels.DelayedLabelLearner`, which gives them their delayed labels): the engine
model (:class:`PurchasePropensity`, standardised and clipped features into a River logistic regression) and a
frequency baseline (:class:`FrequencyPropensity`, the user's orders per session shrunk to the global rate).

Examples
--------
>>> m = PurchasePropensity(feature_names=("carts",), intercept_init=0.0)
>>> m.learn_one({"carts": 1.0}, True); m.learn_one({"carts": 0.0}, False)
>>> m.predict_proba({"carts": 1.0}) > 0.5 > m.predict_proba({"carts": 0.0})
True
>>> round(FrequencyPropensity().predict_counts(n_orders=1, n_sessions=1), 4)
0.2083
"""

from __future__ import annotations

import numpy as np
from river import linear_model, optim

__all__ = ["PurchasePropensity", "FrequencyPropensity", "PROBABILITY_FLOOR"]

PROBABILITY_FLOOR = 1e-6
"""Predicted probabilities stay in ``[PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]`` (finite log loss)."""


class PurchasePropensity:
    """Standardised, clipped features into a River ``LogisticRegression``.

    Why linear: on the REES46 and Taobao slices (issue 13, ``promo evaluate stream``'s ``auc_by_horizon_h``)
    River's Hoeffding (adaptive) trees scored below it at every horizon (they split on a few hundred positives
    only late) at 1-3 ms per ``learn_one``, bagged logistic regressions and a small wide-and-deep network scored
    the same at 3-10 times its cost; the decision path predicts in about 10 us.

    The features named in ``feature_names`` are standardised with running means and variances (updated on
    ``learn_one``, in numpy) and clipped to ``[-clip, clip]``, so a feature that is nearly constant early on
    cannot blow up the weights; other keys (context one-hots) are passed through, clipped.

    Parameters
    ----------
    lr
        Learning rate of the weights (and of the intercept).
    l2
        L2 regularisation.
    optimizer
        ``sgd``, ``adam`` or ``adagrad`` (River optimisers).
    clip
        Bound of a standardised feature.
    feature_names
        Dense features (any order; missing ones are 0).
    intercept_init, intercept_lr
        Starting intercept (a prior log-odds: purchases are rare, -3 is about 5 %) and its learning rate
        (``None``: ``lr``).

    Examples
    --------
    >>> round(PurchasePropensity().predict_proba({}), 4)  # the prior: sigmoid(-3)
    0.0474
    >>> m = PurchasePropensity(feature_names=("x",), lr=0.02, intercept_init=0.0)
    >>> m.predict_proba({"x": 1.0})
    0.5
    >>> for _ in range(200):
    ...     m.learn_one({"x": 1.0}, True); m.learn_one({"x": -1.0}, False)
    >>> m.predict_proba({"x": 1.0}) > 0.8 > 0.2 > m.predict_proba({"x": -1.0})
    True
    """

    def __init__(self, lr: float = 0.005, l2: float = 0.0, optimizer: str = "sgd", clip: float = 5.0,
                 feature_names: tuple[str, ...] = (), intercept_init: float = -3.0,
                 intercept_lr: float | None = 0.02) -> None:
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
        self.lr = lr
        self.l2 = l2
        self.optimizer = optimizer
        self.clip = clip
        self.feature_names = tuple(feature_names)
        self.intercept_init = intercept_init
        self.intercept_lr = lr if intercept_lr is None else intercept_lr
        d = len(self.feature_names)
        self.n = 0
        self.mean = np.zeros(d)
        self.m2 = np.zeros(d)
        self.inv_sd = np.zeros(d)  # 0 for a constant feature
        self._mean_l = [0.0] * d
        self._inv_l = [0.0] * d
        self.model = linear_model.LogisticRegression(
            optimizer=_OPTIMIZERS[optimizer](lr), l2=l2, intercept_init=intercept_init,
            intercept_lr=self.intercept_lr,
        )

    def _scaled(self, values, extra: dict | None) -> dict:
        c = self.clip
        if self.n > 1:
            lo = -c
            x = {}
            for name, v, m, k in zip(self.feature_names, values, self._mean_l, self._inv_l):
                z = (v - m) * k
                x[name] = c if z > c else lo if z < lo else z
        else:
            x = dict.fromkeys(self.feature_names, 0.0)
        if extra:
            for k, v in extra.items():
                x[k] = c if v > c else -c if v < -c else v
        return x

    def _split(self, x: dict):
        names = self.feature_names
        values = [x.get(k, 0.0) for k in names]
        extra = {k: v for k, v in x.items() if k not in self._names} if len(x) > len(names) or not names else None
        return values, extra

    @property
    def _names(self) -> frozenset:
        fs = self.__dict__.get("_names_set")
        if fs is None:
            fs = self.__dict__["_names_set"] = frozenset(self.feature_names)
        return fs

    def predict_values(self, values, extra: dict | None = None) -> float:
        """P(positive) for dense ``values`` (in ``feature_names`` order) and ``extra`` keys."""
        return float(self.model.predict_proba_one(self._scaled(values, extra)).get(True, 0.0))

    def learn_values(self, values, extra: dict | None, y: bool, w: float = 1.0) -> None:
        """Learn one example (dense ``values`` + ``extra``) with sample weight ``w``."""
        v = np.asarray(values, dtype=float)
        self.n += 1
        d = v - self.mean
        self.mean += d / self.n
        self.m2 += d * (v - self.mean)
        var = self.m2 / self.n
        np.divide(1.0, np.sqrt(var), out=self.inv_sd, where=var > 1e-12)
        self.inv_sd[var <= 1e-12] = 0.0
        self._mean_l = self.mean.tolist()  # lists: the predict path scales in plain Python (32 floats)
        self._inv_l = self.inv_sd.tolist()
        self.model.learn_one(self._scaled(v, extra), bool(y), w)

    def predict_proba(self, x: dict) -> float:
        return self.predict_values(*self._split(x))

    def learn_one(self, x: dict, y: bool, w: float = 1.0) -> None:
        values, extra = self._split(x)
        self.learn_values(values, extra, y, w)

    def contributions(self, x: dict) -> dict[str, float]:
        """Each feature's share of the log-odds of ``predict_proba(x)`` (weight times standardised, clipped value),
        with the intercept as ``"(intercept)"``; they sum to the log-odds. What ``promo explain`` shows.

        >>> m = PurchasePropensity(feature_names=("x",), intercept_init=-1.0)
        >>> for _ in range(50):
        ...     m.learn_one({"x": 1.0}, True); m.learn_one({"x": -1.0}, False)
        >>> c = m.contributions({"x": 1.0})
        >>> import math
        >>> c["x"] > 0, round(1 / (1 + math.exp(-sum(c.values()))), 6) == round(m.predict_proba({"x": 1.0}), 6)
        (True, True)
        """
        scaled = self._scaled(*self._split(x))
        weights = self.model.weights
        out = {k: weights.get(k, 0.0) * v for k, v in scaled.items()}
        out["(intercept)"] = float(self.model.intercept)
        return out

    def clone(self) -> "PurchasePropensity":
        return PurchasePropensity(self.lr, self.l2, self.optimizer, self.clip, self.feature_names,
                                  self.intercept_init, self.intercept_lr)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_names_set", None)
        return state

_OPTIMIZERS = {"sgd": optim.SGD, "adam": optim.Adam, "adagrad": optim.AdaGrad}

class FrequencyPropensity:
    """Baseline: the user's orders per session, shrunk towards the global rate of positive labels.

    ``p = (orders + m * g) / (sessions + m)`` with ``g = (positives + 0.5) / (labels + 10)`` (a 5 % prior).
    :class:`DelayedLabelLearner` feeds it every label when the point's horizon has elapsed, positives
    included, so ``g`` is not inflated by positives arriving before negatives.

    >>> b = FrequencyPropensity(m=2.0)
    >>> round(b.predict_counts(n_orders=0, n_sessions=1), 4)
    0.0333
    >>> b.learn_one(True); b.learn_one(False); b.learn_one(False)
    >>> round(b.predict_counts(n_orders=1, n_sessions=2), 4)
    0.3077
    """

    def __init__(self, m: float = 5.0) -> None:
        self.m = m
        self.pos = 0
        self.n = 0

    @property
    def rate(self) -> float:
        return (self.pos + 0.5) / (self.n + 10)

    def predict_counts(self, n_orders: int, n_sessions: int) -> float:
        p = (n_orders + self.m * self.rate) / (max(n_sessions, 1) + self.m)
        return min(max(p, PROBABILITY_FLOOR), 1 - PROBABILITY_FLOOR)

    def predict_profile(self, profile) -> float:
        return self.predict_counts(profile.n_orders, profile.n_sessions)

    def learn_one(self, y: bool) -> None:
        self.n += 1
        self.pos += bool(y)

    def clone(self) -> "FrequencyPropensity":
        return FrequencyPropensity(self.m)
