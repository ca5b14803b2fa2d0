"""Purchase propensity: P(user buys within H hours | profile, session, context), learned with delayed labels.

A **decision point** (:meth:`DelayedLabelLearner.observe`) records the features of a user at event time ``ts``
and the models' predictions for it, made before any label is known. Its label arrives later, in event time:

* ``1`` when the user purchases at ``ts' > ts`` with ``ts' - ts <= H`` (:meth:`~DelayedLabelLearner.purchase`);
* ``0`` when the watermark (the largest event time seen) passes ``ts + H`` first
  (:meth:`~DelayedLabelLearner.advance`).

When a point's horizon closes (``learn_at="horizon"``, the default; or as soon as its label is known with
``learn_at="label"``), the online metrics (River ``RollingROCAUC`` and a rolling ``LogLoss`` over the last
``metric_window`` points: what the Prometheus gauges show) are updated with the prediction made at the decision
point, then the model learns: a prequential (test-then-train) estimate with delayed labels. At most
``max_pending`` decision points wait; beyond that the oldest are dropped, and counted.

Two models are scored side by side on the same decision points: the engine model
(:class:`PurchasePropensity`, standardised and clipped features into a River logistic regression) and a
frequency baseline (:class:`FrequencyPropensity`, the user's orders per session shrunk to the global rate).

Examples
--------
>>> learner = DelayedLabelLearner(horizon_ms=1_000)
>>> learner.observe("u1", 0, {"carts": 1.0}, base_p=0.5)
>>> learner.observe("u2", 0, {"carts": 0.0}, base_p=0.5)
>>> learner.purchase("u1", 500)        # u1 buys within the horizon: label 1
>>> learner.advance(2_000)             # the horizon of u2's point elapses: label 0
>>> learner.n_labels, learner.n_positive, len(learner)
(2, 1, 0)
>>> sorted(learner.quality())
['auc', 'base_auc', 'base_logloss', 'logloss']
"""

from __future__ import annotations

import math
from array import array
from collections import deque

import numpy as np
from river import linear_model, metrics, optim

__all__ = ["PurchasePropensity", "FrequencyPropensity", "DelayedLabelLearner", "ConversionRates"]

_EPS = 1e-6


class PurchasePropensity:
    """Standardised, clipped features into a River ``LogisticRegression``.

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
        return min(max(p, _EPS), 1 - _EPS)

    def predict_profile(self, profile) -> float:
        return self.predict_counts(profile.n_orders, profile.n_sessions)

    def learn_one(self, y: bool) -> None:
        self.n += 1
        self.pos += bool(y)

    def clone(self) -> "FrequencyPropensity":
        return FrequencyPropensity(self.m)


class ConversionRates:
    """Purchases per interaction of keys (items, categories), learnt from past events: a feature for the model.

    :meth:`log_odds` is the smoothed conversion ``(purchases + a * g) / (events + a)`` on the log-odds scale,
    where ``g`` is the global rate; unknown keys get the global rate. At most ``max_keys`` keys are kept (when
    over, the least active half is dropped).

    >>> c = ConversionRates(a=1.0)
    >>> for t in ("view", "view", "purchase"):
    ...     c.update("i1", t)
    >>> c.update("i2", "view")
    >>> c.log_odds("i1") > c.log_odds("unseen") > c.log_odds("i2")
    True
    """

    def __init__(self, a: float = 10.0, max_keys: int = 200_000) -> None:
        self.a = a
        self.max_keys = max_keys
        self.events: dict[str, int] = {}  # flat str -> int dicts: not tracked by the garbage collector
        self.purchases: dict[str, int] = {}
        self.n = 0
        self.pos = 0

    def update(self, key: str, etype: str) -> None:
        if not key:
            return
        ev = self.events
        c = ev.get(key)
        if c is None:
            if len(ev) >= self.max_keys:
                keep = sorted(ev.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_keys // 2]
                self.events = ev = dict(keep)
                self.purchases = {k: v for k, v in self.purchases.items() if k in ev}
            c = 0
        ev[key] = c + 1
        self.n += 1
        if etype == "purchase":
            self.purchases[key] = self.purchases.get(key, 0) + 1
            self.pos += 1

    def add_totals(self, n: int, purchases: int) -> None:
        """Count ``n`` events (``purchases`` of them purchases) updated directly in :attr:`events` /
        :attr:`purchases` by a caller's fast loop, and keep the key count bounded."""
        self.n += n
        self.pos += purchases
        if len(self.events) > self.max_keys:
            keep = sorted(self.events.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_keys // 2]
            self.events = dict(keep)
            self.purchases = {k: v for k, v in self.purchases.items() if k in self.events}

    def log_odds(self, key: str | None) -> float:
        g = (self.pos + 1) / (self.n + 100)
        c = self.events.get(key) if key else None
        p = g if c is None else (self.purchases.get(key, 0) + self.a * g) / (c + self.a)
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))


class RollingLogLoss:
    """Mean binary log loss over the last ``window`` updates (the same number as River's
    ``utils.Rolling(metrics.LogLoss, window_size=window)``, without its per-update overhead).

    >>> m = RollingLogLoss(2)
    >>> for y, p in ((True, 0.9), (False, 0.2), (True, 0.5)):
    ...     m.update(y, p)
    >>> round(m.get(), 6)  # mean of -log(0.8) and -log(0.5)
    0.458145
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.losses: deque[float] = deque()
        self.total = 0.0

    def update(self, y: bool, p: float) -> None:
        p = min(max(p, 1e-15), 1 - 1e-15)
        loss = -math.log(p) if y else -math.log(1.0 - p)
        self.losses.append(loss)
        self.total += loss
        if len(self.losses) > self.window:
            self.total -= self.losses.popleft()

    def get(self) -> float:
        n = len(self.losses)
        if not n:
            return 0.0
        if n % 4096 == 0:  # refresh the running sum now and then (no drift)
            self.total = math.fsum(self.losses)
        return self.total / n


class _Point:
    __slots__ = ("user", "ts", "values", "extra", "preds", "open", "label")

    def __init__(self, user, ts, values, extra, preds):
        self.user = user
        self.ts = ts
        self.values = values
        self.extra = extra
        self.preds = preds
        self.open = True
        self.label = -1  # -1: none (open or dropped)


class DelayedLabelLearner:
    """Pending decision points, their delayed labels, the engine and baseline models, and online metrics.

    Parameters
    ----------
    horizon_ms
        H: a purchase within this event time after a decision point makes it positive.
    model
        The engine model (default :class:`PurchasePropensity`); its ``feature_names`` are stored compactly
        (an ``array('d')``) while a point waits, other keys as a dict.
    baseline
        The baseline (default :class:`FrequencyPropensity`); its prediction is passed in ``observe``.
    max_pending
        Decision points waiting for a label; the oldest beyond are dropped (counted in ``n_dropped``).
    keep_predictions
        Also keep every ``(label, engine p, baseline p, point ts)`` (offline evaluation: exact AUC).
    metric_window
        Labels the online AUC and log loss are computed over (the most recent ones).
    negative_rate
        Share of negative labels the model learns from (every ``round(1 / rate)``-th one, with sample weight
        ``1 / rate`` so the model stays calibrated); positives are always learnt. Negatives are most labels
        and learning is the expensive step. Every label is scored.
    learn_at
        When the model learns a point. ``"label"`` (default): as soon as its label is known (a purchase, or the
        horizon elapsing); positives are known early and negatives only after H, so during the first H of a
        stream the model sees mostly positives (the delayed-feedback bias; the prior intercept of
        :class:`PurchasePropensity` limits it). ``"horizon"``: when the point's horizon closes, whatever the
        label (no bias, but nothing is learnt during the first H). ``"fake_negative"``: at once as a negative,
        again as a positive when the purchase comes; the model then estimates ``p / (1 + p)``, which
        predictions invert (fake-negative calibration, Ktena et al., RecSys 2019). On the REES46 and Taobao
        samples ``"label"`` scored best (see ``models/evaluation/prequential.py``). In every mode a point is scored (online
        metrics) when its horizon closes, with the prediction made at the decision point.
    """

    def __init__(
        self,
        horizon_ms: int = 3_600_000,
        model: PurchasePropensity | None = None,
        baseline: FrequencyPropensity | None = None,
        max_pending: int = 200_000,
        keep_predictions: bool = False,
        metric_window: int = 10_000,
        negative_rate: float = 0.25,
        learn_at: str = "label",
    ) -> None:
        if horizon_ms <= 0:
            raise ValueError(f"the propensity horizon must be > 0 ms, got {horizon_ms}")
        self.horizon_ms = int(horizon_ms)
        self.model = model or PurchasePropensity()
        self.baseline = baseline or FrequencyPropensity()
        self.max_pending = max_pending
        self.keep_predictions = keep_predictions
        self.metric_window = metric_window
        if not 0 < negative_rate <= 1:
            raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
        self.negative_rate = negative_rate
        self._neg_every = max(1, round(1 / negative_rate))
        if learn_at not in ("horizon", "label", "fake_negative"):
            raise ValueError(f"learn_at must be 'horizon', 'label' or 'fake_negative', got {learn_at!r}")
        self.learn_at = learn_at
        self.reset()

    def reset(self) -> None:
        self.model = self.model.clone()
        self.baseline = self.baseline.clone()
        self.queue: deque[_Point] = deque()
        self.by_user: dict[str, list[_Point]] = {}
        w = self.metric_window
        self.metrics = {prefix: (metrics.RollingROCAUC(window_size=w), RollingLogLoss(w)) for prefix in ("", "base_")}
        self.n_observed = self.n_labels = self.n_positive = self.n_dropped = 0
        self.n_open = 0
        self.n_negative_seen = 0
        self.n_scored = 0
        self.predictions: list[tuple[int, float, float, int]] = []

    def clone(self) -> "DelayedLabelLearner":
        return DelayedLabelLearner(self.horizon_ms, self.model.clone(), self.baseline.clone(), self.max_pending,
                                   self.keep_predictions, self.metric_window, self.negative_rate, self.learn_at)

    def __len__(self) -> int:
        """Decision points still waiting for a label."""
        return self.n_open

    # ----------------------------------------------------------------------------------------
    def predict_proba(self, x: dict) -> float:
        return self._calibrated(self.model.predict_proba(x))

    def _calibrated(self, b: float) -> float:
        """With fake negatives the model learns ``b = p / (1 + p)`` (each positive is seen twice, once as a
        negative): invert it."""
        if self.learn_at != "fake_negative":
            return b
        return min(b / (1.0 - b), 1.0 - _EPS) if b < 1.0 else 1.0 - _EPS

    def observe(self, user: str, ts: int, x: dict, base_p: float | None = None) -> None:
        """Record a decision point: predict now (engine; the baseline's ``base_p``, default its global rate),
        learn when the label arrives."""
        values, extra = self.model._split(x)
        self.observe_values(user, ts, values, extra, base_p)

    def observe_values(self, user: str, ts: int, values, extra: dict | None = None,
                       base_p: float | None = None) -> None:
        """:meth:`observe` with the features as dense ``values`` (model ``feature_names`` order) + ``extra``."""
        p = self._calibrated(self.model.predict_values(values, extra))
        if self.learn_at == "fake_negative":  # learn it as a negative now; a purchase adds it as a positive
            self.n_negative_seen += 1
            if self.n_negative_seen % self._neg_every == 0:
                self.model.learn_values(values, extra, False, float(self._neg_every))
        b = self.baseline.rate if base_p is None else float(base_p)
        pt = _Point(user, int(ts), array("d", values), extra, (p, b))
        self.queue.append(pt)
        pts = self.by_user.get(user)
        if pts is None:
            self.by_user[user] = [pt]
        else:
            pts.append(pt)
        self.n_observed += 1
        self.n_open += 1
        while len(self.queue) > self.max_pending:
            old = self.queue.popleft()
            if old.open:
                self._close(old)
                self.n_dropped += 1
            elif old.values is not None:
                self._learn(old)  # labelled, waiting for its horizon: learn it as it leaves

    def purchase(self, user: str, ts: int) -> None:
        """A purchase by ``user`` at ``ts``: open points before it within H become positive (older: 0)."""
        pts = self.by_user.get(user)
        if not pts:
            return
        keep = []
        for pt in pts:
            if pt.ts >= ts:
                keep.append(pt)  # not before the purchase: stays open
            elif ts - pt.ts <= self.horizon_ms:
                self._label(pt, 1)
            else:
                self._label(pt, 0)
        if keep:
            self.by_user[user] = keep
        else:
            del self.by_user[user]

    def advance(self, watermark: int) -> None:
        """Event time reached ``watermark``: points older than ``watermark - H`` become negative."""
        limit = watermark - self.horizon_ms
        q = self.queue
        while q and q[0].ts < limit:
            pt = q.popleft()
            if pt.open:
                pts = self.by_user.get(pt.user)
                if pts is not None:
                    pts.remove(pt)
                    if not pts:
                        del self.by_user[pt.user]
                self._label(pt, 0)
            if pt.values is not None:
                self._learn(pt)
            if pt.label >= 0:
                self.baseline.learn_one(bool(pt.label))  # the horizon elapsed: unbiased global rate

    def users(self) -> set[str]:
        """Users with a decision point held: open, or labelled and waiting for its horizon (with its features)."""
        return set(self.by_user) | {pt.user for pt in self.queue}

    def forget(self, users) -> int:
        """Drop every decision point of ``users`` (open or waiting for its horizon, features included) without
        learning or scoring it; returns how many points were dropped."""
        users = set(users)
        for u in users & self.by_user.keys():
            for pt in self.by_user.pop(u):
                if pt.open:
                    pt.open = False
                    self.n_open -= 1
        before = len(self.queue)
        if any(pt.user in users for pt in self.queue):
            self.queue = deque(pt for pt in self.queue if pt.user not in users)
        return before - len(self.queue)

    # ----------------------------------------------------------------------------------------
    def _close(self, pt: _Point) -> None:
        pt.open = False
        self.n_open -= 1
        pts = self.by_user.get(pt.user)
        if pts is not None and pt in pts:
            pts.remove(pt)
            if not pts:
                del self.by_user[pt.user]

    def _label(self, pt: _Point, y: int) -> None:
        pt.open = False
        self.n_open -= 1
        pt.label = y
        self.n_labels += 1
        self.n_positive += y
        if self.keep_predictions:
            p, b = pt.preds
            self.predictions.append((y, p, b, pt.ts))
        if self.learn_at == "label":
            self._fit(pt)
        elif self.learn_at == "fake_negative" and y:
            self.model.learn_values(pt.values, pt.extra, True)

    def _fit(self, pt: _Point) -> None:
        """Learn the point with its label (negatives subsampled, with weight)."""
        if pt.label:
            self.model.learn_values(pt.values, pt.extra, True)
        else:
            self.n_negative_seen += 1
            if self.n_negative_seen % self._neg_every == 0:
                self.model.learn_values(pt.values, pt.extra, False, float(self._neg_every))

    def _learn(self, pt: _Point) -> None:
        """The point's horizon closed: score the prediction made at the decision point, learn if the mode
        learns now, and free the features."""
        y = pt.label
        p, b = pt.preds
        (auc, ll), (bauc, bll) = self.metrics[""], self.metrics["base_"]
        yb = bool(y)
        auc.update(yb, p)
        ll.update(yb, min(max(p, _EPS), 1 - _EPS))
        bauc.update(yb, b)
        bll.update(yb, b)
        self.n_scored += 1
        if self.learn_at == "horizon":
            self._fit(pt)
        pt.values = pt.extra = None

    def quality(self) -> dict[str, float]:
        """Online AUC and log loss (last ``metric_window`` scored points) of the engine model and the baseline;
        NaN before the first point is scored."""
        out = {}
        for prefix, (auc, ll) in self.metrics.items():
            out[f"{prefix}auc"] = float(auc.get()) if self.n_scored else math.nan
            out[f"{prefix}logloss"] = float(ll.get()) if self.n_scored else math.nan
        return out
