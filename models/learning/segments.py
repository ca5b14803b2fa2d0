"""User segments: fixed lifecycle (RFM-style) rules on a few profile features, the same on every worker.

The segment of a user is a pure function of their profile's features (:meth:`models.profile.Profile.features`):
no learnt state, no seed, no dependence on which events a worker saw. Segments key state that every worker
shares (the Thompson-sampling cells of :mod:`models.policy.thompson` in Redis) and the catalogue's eligibility
(:class:`models.policy.catalogue.Eligibility` ``segments``), so two workers must give the same profile the same
segment; an online clustering (the k-means used before) numbers its clusters by the order of the points each
worker saw, and mixed unrelated users in one cell across workers.

The six segments (:data:`SEGMENT_NAMES`), first matching rule wins:

=====  ====================  ============================================================================
 id     name                  rule (counts over the whole profile; thresholds are :class:`ProfileSegments`
                              parameters, defaults in brackets)
=====  ====================  ============================================================================
 0      new visitor           no order, fewer than ``engaged_events`` [5] events and no cart ever
 1      engaged browser       no order, and ``engaged_events`` [5]+ events or at least one cart
 5      lapsing buyer         1+ orders, churn risk >= ``lapsing_churn`` [0.5] and the last order at least
                              ``lapsing_days`` [7] days ago (checked before 2-4: a lapsing buyer is one)
 4      high-value buyer      ``high_value_orders`` [5]+ orders, or 2+ orders and spend >=
                              ``high_value_spend`` [500, in the currency of the event prices]
 3      repeat buyer          2+ orders (not high-value)
 2      one-time buyer        exactly 1 order
=====  ====================  ============================================================================

Churn risk (:meth:`models.profile.Profile.churn_risk_at`) is ``1 - exp(-elapsed / rhythm)`` with the user's own
mean time between orders as rhythm (30 days before a second order): 0.5 means the last order is 0.69 rhythm ago
(about 21 days for a one-order user). The 7-day floor keeps users who placed two orders minutes apart (a rhythm
of minutes) from "lapsing" in the same session. Recency and churn are measured at the time the features are
taken: :meth:`models.learning.core.LearningCore.segment` takes them at the profile's last event, so the segment
depends on the profile alone.

The thresholds are set on the shared real data: a 3-hour REES46 slice (4,504 users: median 2 events, a quarter
with 5+, buyers' median spend 175 USD, three quarters under 370) and a 2-hour Taobao slice (58,732 users: median
1 event, 3 % with 5+, 8 % carted without buying; no prices, so no spend). Short slices hold almost no lapsing or
high-value users; on a live stream profiles span weeks.

The features come ``log1p``-scaled (counts, money and hours; orders as
:func:`models.profile_features.feature_values` encodes them); the rules turn counts back into counts and compare
money and hours with ``log1p`` of their thresholds. A missing or non-finite feature counts as
0, so ``predict_one({})`` is segment 0. With ``n_segments`` below 6 the last segments merge into
``n_segments - 1`` (3 segments: new visitors, engaged browsers, buyers).

Examples
--------
>>> from models.events import Event
>>> from models.profile import Profile
>>> seg = ProfileSegments()
>>> p = Profile()
>>> p.apply(Event("e1", "view", "u1", "i1", ts=1_000, price=300.0))
>>> seg.predict_one(p.features(p.last_ts)), seg.name(0)
(0, 'new visitor')
>>> p.apply(Event("e2", "cart", "u1", "i1", ts=2_000, price=300.0))
>>> seg.predict_one(p.features(p.last_ts))
1
>>> p.apply(Event("e3", "purchase", "u1", "i1", ts=3_000, price=300.0))
>>> seg.predict_one(p.features(p.last_ts))
2
>>> p.apply(Event("e4", "purchase", "u1", "i2", ts=4_000, price=300.0))
>>> seg.predict_one(p.features(p.last_ts)), seg.name(4)
(4, 'high-value buyer')
>>> seg.predict_one(p.features(p.last_ts + 30 * 86_400_000))
5
>>> seg.learn_one({"n_orders": 9.0})  # nothing to learn: the rules are fixed
>>> seg.predict_one({}), ProfileSegments(n_segments=3).predict_one(p.features(p.last_ts))
(0, 2)
"""

from __future__ import annotations

import math

__all__ = ["N_SEGMENTS", "SEGMENT_FEATURES", "SEGMENT_NAMES", "ProfileSegments"]

SEGMENT_NAMES: tuple[str, ...] = (
    "new visitor", "engaged browser", "one-time buyer", "repeat buyer", "high-value buyer", "lapsing buyer",
)
"""Name of each segment, by id."""

N_SEGMENTS = len(SEGMENT_NAMES)
"""How many segments the rules define (the default ``n_segments``)."""

SEGMENT_FEATURES: tuple[str, ...] = ("n_events", "n_carts", "n_orders", "spend", "recency_h", "churn_risk")
"""Profile features (see :meth:`models.profile.Profile.features`) the rules read; each depends on the profile
(and the time the features are taken) only, never on state a worker learnt."""

_DAY_H = 24.0


def _value(x: dict, key: str) -> float:
    v = x.get(key, 0.0)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0.0 else 0.0


def _count(v: float) -> int:
    """A ``log1p``-scaled count back as a count."""
    return int(round(math.expm1(v)))


def _orders(v: float) -> int:
    """The ``n_orders`` feature (``n`` below 3, then ``2 + log1p(n - 2)``) back as a count."""
    return int(round(v)) if v <= 2.0 else 2 + _count(v - 2.0)


class ProfileSegments:
    """Deterministic lifecycle segments of profile feature vectors (the rules: see the module docstring).

    The River-style interface of the clustering it replaces is kept: :meth:`learn_one` only counts (there is
    nothing to learn), :meth:`predict_one` applies the rules.

    Parameters
    ----------
    n_segments
        Segment ids are ``0 .. n_segments - 1``; at most :data:`N_SEGMENTS` (6). Fewer merge the last
        segments into ``n_segments - 1``.
    seed
        Unused (the rules draw nothing); accepted so callers of the former clustering keep working.
    engaged_events
        Events (any type) from which a user without orders is an engaged browser (a cart is enough).
    high_value_spend, high_value_orders
        A buyer with 2+ orders and at least this spend, or with at least this many orders, is high-value.
    lapsing_churn, lapsing_days
        A buyer is lapsing when their churn risk is at least ``lapsing_churn`` and their last order at least
        ``lapsing_days`` old.
    """

    def __init__(self, n_segments: int = N_SEGMENTS, seed: int = 0, *, engaged_events: int = 5,
                 high_value_spend: float = 500.0, high_value_orders: int = 5, lapsing_churn: float = 0.5,
                 lapsing_days: float = 7.0) -> None:
        if not 1 <= n_segments <= N_SEGMENTS:
            raise ValueError(f"n_segments must be in 1..{N_SEGMENTS} (the rules define {N_SEGMENTS} segments: "
                             f"{', '.join(SEGMENT_NAMES)}), got {n_segments}")
        self.n_segments = int(n_segments)
        self.seed = seed
        self.engaged_events = int(engaged_events)
        self.high_value_spend = float(high_value_spend)
        self.high_value_orders = int(high_value_orders)
        self.lapsing_churn = float(lapsing_churn)
        self.lapsing_days = float(lapsing_days)
        self.n_learned = 0

    # money and hours are compared on the features' log1p scale: exact at the threshold (expm1(log1p(v)) may
    # fall just below v)
    @property
    def _log_high_spend(self) -> float:
        return math.log1p(self.high_value_spend)

    @property
    def _log_lapsing_h(self) -> float:
        return math.log1p(self.lapsing_days * _DAY_H)

    @property
    def features(self) -> tuple[str, ...]:
        """The feature keys the rules read (:data:`SEGMENT_FEATURES`)."""
        return SEGMENT_FEATURES

    def learn_one(self, x: dict) -> None:
        """Count the point; the rules are fixed, so nothing else changes."""
        self.n_learned += 1

    def predict_one(self, x: dict) -> int:
        """The segment of the feature vector ``x`` (keys of :meth:`models.profile.Profile.features`)."""
        orders = _orders(_value(x, "n_orders"))
        if orders == 0:
            engaged = _count(_value(x, "n_events")) >= self.engaged_events or _count(_value(x, "n_carts")) >= 1
            s = 1 if engaged else 0
        elif _value(x, "churn_risk") >= self.lapsing_churn and _value(x, "recency_h") >= self._log_lapsing_h:
            s = 5
        elif orders >= self.high_value_orders or (orders >= 2 and _value(x, "spend") >= self._log_high_spend):
            s = 4
        elif orders >= 2:
            s = 3
        else:
            s = 2
        return s if s < self.n_segments else self.n_segments - 1

    def name(self, segment: int) -> str:
        """What segment id ``segment`` holds (merged segments are named by their first one)."""
        if not 0 <= segment < self.n_segments:
            raise ValueError(f"segment must be in 0..{self.n_segments - 1}, got {segment}")
        if segment == self.n_segments - 1 and self.n_segments < N_SEGMENTS:
            return " or ".join(SEGMENT_NAMES[segment:])
        return SEGMENT_NAMES[segment]

    def clone(self) -> "ProfileSegments":
        return ProfileSegments(self.n_segments, self.seed, engaged_events=self.engaged_events,
                               high_value_spend=self.high_value_spend, high_value_orders=self.high_value_orders,
                               lapsing_churn=self.lapsing_churn, lapsing_days=self.lapsing_days)

    def __setstate__(self, state: dict) -> None:
        """Also restores a pickle of the former k-means segments (a model snapshot written before the rules):
        its centres are dropped, its segment count kept (within 1..6), the rules take their defaults."""
        n = state.get("n_segments", N_SEGMENTS)
        fresh = ProfileSegments(min(max(1, int(n)), N_SEGMENTS), state.get("seed", 0))
        self.__dict__.update(fresh.__dict__)
        self.n_learned = int(state.get("n_learned", 0))
        if "model" not in state:  # a pickle of this class: its own thresholds
            self.__dict__.update({k: v for k, v in state.items() if k in fresh.__dict__ and k != "n_segments"})
