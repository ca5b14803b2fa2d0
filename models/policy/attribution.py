"""Delayed reward attribution: each decision opens a window, a purchase or the window's expiry closes it.

Rules (event time):

* a decision opens a window ``[ts, ts + window)`` (default 24 h);
* a purchase carrying the decision's ``decision_id`` and timed before the window's end closes it as ``redeemed``
  (when the offer's conditions hold, e.g. ``min_spend``): reward = margin of the order - offer cost (timed before
  the decision too: the shop's clock may be behind the one that timed the trigger);
* any purchase by the user inside the window closes the user's open decisions as ``converted``
  (reward = margin; the offer was not used, so it cost nothing). Only the most recent decision gets the
  order's revenue (last touch), so revenue is never counted twice;
* a window that ends without a purchase closes as ``expired`` with reward 0 (:func:`expire`, a timer sweep).

A purchase closes a decision only by its own event time, whatever the engine's clock says: an open decision whose
window a purchase is after stays open for the sweep to expire. So what closes a decision, and how, does not depend
on when the sweep runs, unless the purchase is processed after the sweep's clock passed the window's end.

Everything here is pure: the engine keeps the open decisions (e.g. in the user's Redis hash) and calls
:func:`close_on_purchase` / :func:`expire`; :class:`AttributionTracker` is the in-memory version.

>>> from models.policy.catalogue import load_catalogue
>>> cat = load_catalogue()
>>> d = OpenDecision("d1", "u1", "coupon_5", "treatment", ts=0, expires_ms=1000, cart_value=80.0)
>>> closed, still = close_on_purchase(cat, [d], Purchase("u1", 10, 80.0, decision_id="d1"))
>>> closed[0].outcome, closed[0].revenue, closed[0].cost, closed[0].reward, still
('redeemed', 80.0, 5.0, 15.0, [])
>>> closed, still = expire([d], now_ms=1000)
>>> closed[0].outcome, closed[0].reward
('expired', 0.0)
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field

from models.metrics import NULL, MetricsSink
from models.policy.catalogue import NONE_ID, Catalogue

OUTCOMES: tuple[str, ...] = ("redeemed", "converted", "expired")


@dataclass(slots=True)
class OpenDecision:
    """A decision waiting for its outcome. ``ctx`` is the ``DecisionContext.to_dict()`` the policy saw."""

    decision_id: str
    user_id: str
    offer_id: str
    group: str
    ts: int
    expires_ms: int
    cart_value: float = 0.0
    propensity: float = 1.0
    ctx: dict = field(default_factory=dict)
    # the order whose purchase made this decision (post_purchase), as order_key gives it: another line of that order,
    # in a later batch, is the order the decision followed, never one it earned
    after_order: str | None = None

    def to_dict(self) -> dict:
        """JSON-able dict, kept in the user's profile document while the decision is open.

        The engine writes every open decision of a user again at each of the user's commits, so this is written out
        rather than ``dataclasses.asdict`` (a deep copy, field by field, of ``ctx`` too). ``ctx`` is copied one
        level deep: its values are numbers, strings and flat containers that nothing changes in place.

        >>> d = OpenDecision("d1", "u", "coupon_5", "treatment", 1, 2, ctx={"features": {"x": 1.0}})
        >>> d.to_dict() == asdict(d), OpenDecision.from_dict(d.to_dict()) == d
        (True, True)
        """
        return {"decision_id": self.decision_id, "user_id": self.user_id, "offer_id": self.offer_id,
                "group": self.group, "ts": self.ts, "expires_ms": self.expires_ms, "cart_value": self.cart_value,
                "propensity": self.propensity, "ctx": dict(self.ctx), "after_order": self.after_order}

    @classmethod
    def from_dict(cls, d: dict) -> "OpenDecision":
        return cls(**d)


@dataclass(slots=True)
class Purchase:
    """One order: the purchase lines of a user sharing ``order_id`` (or timestamp), summed."""

    user_id: str
    ts: int
    value: float
    decision_id: str | None = None
    order_id: str | None = None


@dataclass(slots=True)
class Closed:
    """A decision whose window closed, with what it earned."""

    decision: OpenDecision
    outcome: str  # redeemed | converted | expired
    reward: float  # margin - cost (0 when expired): what the policy learns from
    revenue: float = 0.0  # order value attributed to this decision (last touch)
    cost: float = 0.0
    margin: float = 0.0
    closed_ms: int = 0

    @property
    def converted(self) -> bool:
        return self.outcome != "expired"


def order_key(order_id: str | None, ts: int) -> str:
    """What groups purchase lines into one order: the ``order_id``, else the lines' timestamp.

    >>> order_key("o1", 5), order_key(None, 5)
    ('o1', 'ts:5')
    """
    return order_id if order_id else f"ts:{ts}"


def orders_from_events(events) -> list[Purchase]:
    """Group ``purchase`` events (event v1 lines) into orders, keeping first-seen order.

    >>> from models.events import Event
    >>> evs = [Event("a", "purchase", "u", "i1", 5, price=10.0, order_id="o1"),
    ...        Event("b", "purchase", "u", "i2", 5, price=2.5, quantity=2, order_id="o1", decision_id="d9"),
    ...        Event("c", "view", "u", "i3", 6)]
    >>> orders_from_events(evs)
    [Purchase(user_id='u', ts=5, value=15.0, decision_id='d9', order_id='o1')]
    """
    orders: dict[tuple, Purchase] = {}
    for e in events:
        if e.type != "purchase":
            continue
        key = (e.user_id, order_key(e.order_id, e.ts))
        o = orders.get(key)
        if o is None:
            orders[key] = Purchase(e.user_id, e.ts, e.value, e.decision_id, e.order_id)
        else:
            o.value += e.value
            o.ts = max(o.ts, e.ts)
            o.decision_id = o.decision_id or e.decision_id
    return list(orders.values())


def close_on_purchase(
    catalogue: Catalogue, pending: list[OpenDecision], p: Purchase
) -> tuple[list[Closed], list[OpenDecision]]:
    """Close the user's decisions that purchase ``p`` settles; returns (closed, still open).

    The decision named by ``p.decision_id`` (if open, and ``p.ts`` before its window's end) is redeemed; other open
    decisions of the user whose window contains ``p.ts`` convert. The most recent closed decision gets the revenue.
    A decision made at an order (``after_order``) is not closed by that order's lines.

    >>> from models.policy.catalogue import load_catalogue
    >>> d = OpenDecision("d1", "u1", "coupon_5", "treatment", ts=0, expires_ms=1000)
    >>> closed, still = close_on_purchase(load_catalogue(), [d], Purchase("u1", 1000, 80.0, decision_id="d1"))
    >>> closed, still == [d]  # timed after the window: the decision stays open, for the sweep to expire
    ([], True)
    """
    hits: list[OpenDecision] = []
    rest: list[OpenDecision] = []
    key = order_key(p.order_id, p.ts)
    for d in pending:
        named = p.decision_id is not None and d.decision_id == p.decision_id
        if (d.user_id == p.user_id and (d.ts <= p.ts or named) and p.ts < d.expires_ms
                and (d.after_order is None or d.after_order != key)):
            hits.append(d)
        else:
            rest.append(d)
    if not hits:
        return [], rest
    last = max(hits, key=lambda d: (d.decision_id == p.decision_id, d.ts))
    closed = []
    for d in hits:
        spec = catalogue.offers.get(d.offer_id) or catalogue[NONE_ID]
        named = d.decision_id == p.decision_id
        margin = spec.margin(p.value)
        cost = spec.cost(p.value) if (named and spec.kind != "none") else 0.0
        outcome = "redeemed" if (named and spec.kind != "none" and p.value >= spec.min_spend) else "converted"
        closed.append(Closed(d, outcome, reward=margin - cost, revenue=p.value if d is last else 0.0,
                             cost=cost, margin=margin, closed_ms=p.ts))
    return closed, rest


def expire(pending: list[OpenDecision], now_ms: int) -> tuple[list[Closed], list[OpenDecision]]:
    """Close every decision whose window ended at or before ``now_ms`` with reward 0."""
    closed, rest = [], []
    for d in pending:
        if d.expires_ms <= now_ms:
            closed.append(Closed(d, "expired", 0.0, closed_ms=d.expires_ms))
        else:
            rest.append(d)
    return closed, rest


class AttributionTracker:
    """In-memory open windows for many users (simulator, offline evaluation, single-process runs).

    >>> from models.policy.catalogue import load_catalogue
    >>> t = AttributionTracker(load_catalogue(), window_ms=1000)
    >>> t.open(OpenDecision("d1", "u1", "none", "holdout", 0, 0, 50.0))
    >>> t.open(OpenDecision("d2", "u2", "coupon_5", "treatment", 0, 0, 50.0))
    >>> [c.decision.decision_id for c in t.on_purchase(Purchase("u1", 500, 40.0))]
    ['d1']
    >>> [(c.decision.decision_id, c.outcome) for c in t.sweep(1000)]
    [('d2', 'expired')]
    >>> len(t)
    0
    """

    def __init__(self, catalogue: Catalogue, window_ms: int = 86_400_000) -> None:
        self.catalogue = catalogue
        self.window_ms = window_ms
        self.by_user: dict[str, list[OpenDecision]] = {}
        self._heap: list[tuple[int, str, str]] = []  # (expires_ms, decision_id, user_id)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def open(self, d: OpenDecision) -> None:
        """Open a window; ``expires_ms`` is set to ``ts + window`` when it is not after ``ts``."""
        if d.expires_ms <= d.ts:
            d.expires_ms = d.ts + self.window_ms
        lst = self.by_user.setdefault(d.user_id, [])
        if any(x.decision_id == d.decision_id for x in lst):
            return  # redelivered decision: already open
        lst.append(d)
        self._n += 1
        heapq.heappush(self._heap, (d.expires_ms, d.decision_id, d.user_id))

    def on_purchase(self, p: Purchase) -> list[Closed]:
        pending = self.by_user.get(p.user_id)
        if not pending:
            return []
        closed, rest = close_on_purchase(self.catalogue, pending, p)
        self._n -= len(closed)
        if rest:
            self.by_user[p.user_id] = rest
        else:
            del self.by_user[p.user_id]
        return closed

    def sweep(self, now_ms: int) -> list[Closed]:
        """Close the windows that ended at or before ``now_ms`` (reward 0)."""
        out: list[Closed] = []
        while self._heap and self._heap[0][0] <= now_ms:
            _, did, uid = heapq.heappop(self._heap)
            pending = self.by_user.get(uid)
            if not pending:
                continue
            keep = []
            for d in pending:
                if d.decision_id == did and d.expires_ms <= now_ms:
                    out.append(Closed(d, "expired", 0.0, closed_ms=d.expires_ms))
                    self._n -= 1
                else:
                    keep.append(d)
            if keep:
                self.by_user[uid] = keep
            else:
                del self.by_user[uid]
        return out


class OutcomeStats:
    """Running conversion per group and uplift (treatment - holdout), plus per-offer money totals.

    >>> s = OutcomeStats()
    >>> d = OpenDecision("d", "u", "none", "holdout", 0, 1)
    >>> s.update([Closed(d, "expired", 0.0), Closed(d, "converted", 5.0, revenue=20.0)])
    >>> s.conversion("holdout"), s.uplift()
    (0.5, None)
    """

    def __init__(self, metrics: MetricsSink = NULL) -> None:
        self.metrics = metrics  # closed decisions by outcome, redemptions, revenue, cost, conversion, uplift
        self.closed = {"treatment": 0, "holdout": 0}
        self.converted = {"treatment": 0, "holdout": 0}
        self.money: dict[tuple[str, str], list[float]] = {}  # (offer, group) -> [revenue, cost, reward, redeemed]

    def group(self, c: Closed) -> str:
        return c.decision.group if c.decision.group in self.closed else "treatment"

    def counts(self, closed: list[Closed]) -> dict[str, int]:
        """``closed:<group>`` and ``converted:<group>`` increments of ``closed``, as a store's shared hash keeps
        them (:meth:`load_state` reads them back).

        >>> d = OpenDecision("d", "u", "none", "holdout", 0, 1)
        >>> OutcomeStats().counts([Closed(d, "expired", 0.0), Closed(d, "converted", 5.0)])
        {'closed:holdout': 2, 'converted:holdout': 1}
        """
        out: dict[str, int] = {}
        for c in closed:
            g = self.group(c)
            out["closed:" + g] = out.get("closed:" + g, 0) + 1
            if c.converted:
                out["converted:" + g] = out.get("converted:" + g, 0) + 1
        return out

    def load_state(self, state: dict) -> None:
        """Take the closed and converted counts per group from a store's shared hash (all workers' decisions)."""
        for g in self.closed:
            for name, target in (("closed:", self.closed), ("converted:", self.converted)):
                v = state.get(name + g, state.get((name + g).encode()))
                target[g] = int(float(v)) if v is not None else 0

    def update(self, closed: list[Closed]) -> None:
        for c in closed:
            g = self.group(c)
            self.closed[g] += 1
            self.converted[g] += c.converted
            m = self.money.setdefault((c.decision.offer_id, g), [0.0, 0.0, 0.0, 0])
            m[0] += c.revenue
            m[1] += c.cost
            m[2] += c.reward
            m[3] += c.outcome == "redeemed"
        self.report(closed)

    def conversion(self, group: str) -> float | None:
        n = self.closed.get(group, 0)
        return self.converted[group] / n if n else None

    def uplift(self) -> float | None:
        t, h = self.conversion("treatment"), self.conversion("holdout")
        return None if t is None or h is None else t - h

    def report(self, closed: list[Closed]) -> None:
        """Report ``closed`` and the current ratios to :attr:`metrics`."""
        self.report_ratios()
        sink = self.metrics
        for c in closed:
            d = c.decision
            sink.increment("promo_decisions_closed", labels={"outcome": c.outcome})
            if c.outcome == "redeemed":
                sink.increment("promo_redemptions", labels={"offer_id": d.offer_id, "group": d.group})
            if c.revenue:
                sink.increment("promo_attributed_revenue", c.revenue, {"offer_id": d.offer_id, "group": d.group})
            if c.cost:
                sink.increment("promo_offer_cost", c.cost, {"offer_id": d.offer_id})

    def report_ratios(self) -> None:
        """Report the conversion and uplift gauges from the current counts."""
        for g in self.closed:
            v = self.conversion(g)
            if v is not None:
                self.metrics.gauge("promo_conversion_ratio", v, {"group": g})
        u = self.uplift()
        if u is not None:
            self.metrics.gauge("promo_uplift_ratio", u)
