"""Delayed labels: the decision points of purchase propensity, labelled later in event time, scored, then learnt.

A **decision point** (:meth:`DelayedLabelLearner.observe`, a :class:`DecisionPoint`) records the features of a
user at event time ``ts`` and the models' predictions for it, made before any label is known. Its label arrives
later, in event time:

* ``1`` when the user purchases at ``ts' > ts`` with ``ts' - ts <= H`` (:meth:`~DelayedLabelLearner.purchase`);
* ``0`` when the watermark (the engine's event-time clock; offline, the largest event time seen) passes ``ts + H``
  first (:meth:`~DelayedLabelLearner.advance`).

When a point's horizon closes, the online metrics (River ``RollingROCAUC`` and a rolling log loss,
:class:`models.learning.rolling_logloss.RollingLogLoss`, over the last ``metric_window`` points: what the
Prometheus gauges show) are updated with the prediction made at the decision point: a prequential
(test-then-train) estimate with delayed labels. The model learns the point as soon as its label is known
(``learn_at="label"``, the default), when its horizon closes (``"horizon"``) or with fake negatives
(``"fake_negative"``). At most ``max_pending`` decision points wait; beyond that the oldest are dropped, and
counted.

Two models are scored side by side on the same decision points (:mod:`models.learning.propensity`): the engine
model (:class:`~models.learning.propensity.PurchasePropensity`) and a frequency baseline
(:class:`~models.learning.propensity.FrequencyPropensity`).

Examples
--------
>>> learner = DelayedLabelLearner(horizon_ms=1_000)
>>> learner.observe("u1", 0, {"carts": 1.0}, base_p=0.5)
>>> learner.observe("u2", 0, {"carts": 0.0}, base_p=0.5)
>>> learner.purchase("u1", 500)        # u1 buys within the horizon: label 1
>>> _ = learner.advance(2_000)         # the horizon of u2's point elapses: label 0
>>> learner.n_labels, learner.n_positive, len(learner)
(2, 1, 0)
>>> sorted(learner.quality())
['auc', 'base_auc', 'base_logloss', 'logloss']
"""

from __future__ import annotations

import math
from array import array
from collections import deque

from river import metrics

from models.learning.propensity import PROBABILITY_FLOOR, FrequencyPropensity, PurchasePropensity
from models.learning.rolling_logloss import RollingLogLoss

__all__ = ["DelayedLabelLearner", "DecisionPoint"]


class DecisionPoint:
    """A user's features and the models' predictions at event time ``ts``, waiting for its label (``-1``: none
    yet, or dropped) and then for its horizon (``open`` until labelled or dropped)."""

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
        Also keep every ``(label, engine p, baseline p, point ts, user)`` (offline evaluation: exact AUC, and its
        interval clustered by user).
    keep_features
        With ``keep_predictions``, also keep each of those points' ``(dense values, extra)`` in
        :attr:`kept_features` (same order): offline models can then learn from the very points the engine is
        scored on (``load_tests/propensity_yardstick.py``).
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
        samples ``"label"`` scored best (see ``models/evaluation/prequential.py``). In every mode a point is
        scored (online metrics) when its horizon closes, with the prediction made at the decision point.
    """

    keep_features = False  # a learner unpickled from before the attribute existed keeps none
    expired_before = -(2**63)  # points before this event time have passed their horizon (see :meth:`advance`)

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
        keep_features: bool = False,
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
        self.keep_features = keep_features
        self.reset()

    def reset(self) -> None:
        self.model = self.model.clone()
        self.baseline = self.baseline.clone()
        self.queue: deque[DecisionPoint] = deque()
        self.by_user: dict[str, list[DecisionPoint]] = {}
        w = self.metric_window
        self.metrics = {prefix: (metrics.RollingROCAUC(window_size=w), RollingLogLoss(w)) for prefix in ("", "base_")}
        self.n_observed = self.n_labels = self.n_positive = self.n_dropped = 0
        self.n_open = 0
        self.n_negative_seen = 0
        self.n_scored = 0
        self.predictions: list[tuple[int, float, float, int, str]] = []
        self.kept_features: list[tuple[tuple[float, ...], dict | None]] = []

    def clone(self) -> "DelayedLabelLearner":
        return DelayedLabelLearner(self.horizon_ms, self.model.clone(), self.baseline.clone(), self.max_pending,
                                   self.keep_predictions, self.metric_window, self.negative_rate, self.learn_at,
                                   self.keep_features)

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
        return min(b / (1.0 - b), 1.0 - PROBABILITY_FLOOR) if b < 1.0 else 1.0 - PROBABILITY_FLOOR

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
        pt = DecisionPoint(user, int(ts), array("d", values), extra, (p, b))
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
            if old.ts < self.expired_before:
                self._expire(old)  # past its horizon, left by a capped advance: negative, as advance would make it
            elif old.open:
                self._drop(old)
                self.n_dropped += 1
            elif old.values is not None:
                self._close_horizon(old)  # labelled, waiting for its horizon: learn it as it leaves

    def purchase(self, user: str, ts: int) -> None:
        """A purchase by ``user`` at ``ts``: open points before it within H become positive (older: 0, and so do
        points the clock had already put past their horizon, which a capped :meth:`advance` left open)."""
        pts = self.by_user.get(user)
        if not pts:
            return
        keep = []
        for pt in pts:
            if pt.ts >= ts:
                keep.append(pt)  # not before the purchase: stays open
            elif ts - pt.ts <= self.horizon_ms and pt.ts >= self.expired_before:
                self._label(pt, 1)
            else:  # past its horizon, or past the clock's (an advance would have closed it already, uncapped
                self._label(pt, 0)  # and whatever the queue's order: the label must not depend on either)
        if keep:
            self.by_user[user] = keep
        else:
            del self.by_user[user]

    def advance(self, watermark: int, max_points: int | None = None) -> bool:
        """Event time reached ``watermark``: points older than ``watermark - H`` become negative (unless a purchase
        labelled them), are scored and leave. Returns True when ``max_points`` left some for a later call.

        ``max_points``: close at most this many (None: all). When the clock jumps (an idle partition stops
        holding it back, a replay) tens of thousands of points may close at once, and learning them holds the
        caller (the worker's event loop) for as long: capped, the rest close in the next calls, oldest first.
        Labels do not depend on it: a purchase after a point's horizon labels it 0 (:meth:`purchase`).

        >>> learner = DelayedLabelLearner(horizon_ms=10)
        >>> for u in ("a", "b", "c"):
        ...     learner.observe(u, 0, {"carts": 1.0})
        >>> learner.advance(100, max_points=2), learner.n_labels
        (True, 2)
        >>> learner.purchase("c", 50)  # after c's horizon: no positive
        >>> learner.advance(100), learner.n_labels, learner.n_positive
        (False, 3, 0)
        """
        limit = watermark - self.horizon_ms
        if limit > self.expired_before:
            self.expired_before = limit
        limit = self.expired_before  # a lower watermark than before does not reopen anything
        q = self.queue
        n = 0
        while q and q[0].ts < limit:
            if max_points is not None and n >= max_points:
                return True
            self._expire(q.popleft())
            n += 1
        return False

    def _expire(self, pt: DecisionPoint) -> None:
        """``pt`` (out of the queue) passed its horizon: negative if still open, scored, the baseline learns it."""
        if pt.open:
            pts = self.by_user.get(pt.user)
            if pts is not None:
                pts.remove(pt)
                if not pts:
                    del self.by_user[pt.user]
            self._label(pt, 0)
        if pt.values is not None:
            self._close_horizon(pt)
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
    def _drop(self, pt: DecisionPoint) -> None:
        """Drop an open point unlabelled (the pending queue is full)."""
        pt.open = False
        self.n_open -= 1
        pts = self.by_user.get(pt.user)
        if pts is not None and pt in pts:
            pts.remove(pt)
            if not pts:
                del self.by_user[pt.user]

    def _label(self, pt: DecisionPoint, y: int) -> None:
        """The point's label is known: count it, keep its predictions if asked, learn it if the mode learns now."""
        pt.open = False
        self.n_open -= 1
        pt.label = y
        self.n_labels += 1
        self.n_positive += y
        if self.keep_predictions:
            p, b = pt.preds
            self.predictions.append((y, p, b, pt.ts, pt.user))
            if self.keep_features:
                self.kept_features.append((tuple(pt.values), pt.extra))
        if self.learn_at == "label":
            self._fit(pt)
        elif self.learn_at == "fake_negative" and y:
            self.model.learn_values(pt.values, pt.extra, True)

    def _fit(self, pt: DecisionPoint) -> None:
        """Learn the point with its label (negatives subsampled, with weight)."""
        if pt.label:
            self.model.learn_values(pt.values, pt.extra, True)
        else:
            self.n_negative_seen += 1
            if self.n_negative_seen % self._neg_every == 0:
                self.model.learn_values(pt.values, pt.extra, False, float(self._neg_every))

    def _close_horizon(self, pt: DecisionPoint) -> None:
        """The point's horizon closed: score the prediction made at the decision point, learn if the mode
        learns now, and free the features."""
        y = pt.label
        p, b = pt.preds
        (auc, ll), (bauc, bll) = self.metrics[""], self.metrics["base_"]
        yb = bool(y)
        auc.update(yb, p)
        ll.update(yb, min(max(p, PROBABILITY_FLOOR), 1 - PROBABILITY_FLOOR))
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
