"""A profile as model features, and the category price reference its price level is measured against.

:func:`feature_values` turns a :class:`models.profile.Profile` into a flat list of floats in
:data:`FEATURE_NAMES` order (what :meth:`models.profile.Profile.features` returns as a dict): counts and money
``log1p``-scaled, times capped so one stale user does not dominate. The price-level features compare the user's
typical unit price with :class:`CategoryStats`, the typical unit price per category shared by all users
(learnt by :class:`models.learning.core.LearningCore`).

Examples
--------
>>> from models.events import Event
>>> from models.profile import Profile
>>> stats = CategoryStats(); stats.update("tv", 100.0)
>>> p = Profile(); p.apply(Event("e", "view", "u", "i", 1_000, price=200.0, category="tv"))
>>> x = dict(zip(FEATURE_NAMES, feature_values(p, 1_000, stats)))
>>> x["n_views"] == math.log1p(1), round(math.exp(x["price_level"]), 6), round(math.exp(x["last_price_level"]), 6)
(True, 2.0, 2.0)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.profile import Profile

__all__ = ["FEATURE_NAMES", "CategoryStats", "feature_values", "price_level", "last_price_level"]

HOUR_MS = 3_600_000

FEATURE_NAMES: tuple[str, ...] = (
    "n_events", "n_views", "n_carts", "n_orders", "spend", "recency_h", "since_last_event_min", "tenure_h",
    "cart_items", "cart_value", "session_events", "session_views", "session_carts", "session_cart_value",
    "session_minutes", "session_new_item_share", "n_sessions", "top_category_share", "top_item_share",
    "last_item_affinity", "n_affinity_items", "price_log_mean", "price_level", "last_price_level", "loyalty",
    "churn_risk", "last_is_cart", "last_repeat", "dwell_s", "n_decisions",
)
"""Keys of :meth:`models.profile.Profile.features`, in a fixed order (counts and money are ``log1p``-scaled)."""


class CategoryStats:
    """Typical unit price per category, shared by all users: the reference of a user's price level.

    A running mean of ``log(price)`` per category, with the count capped at ``max_count`` so the mean follows
    slow price changes; at most ``max_categories`` categories are kept (the least seen are dropped).

    Examples
    --------
    >>> s = CategoryStats()
    >>> s.update("shoes", 10.0); s.update("shoes", 1000.0)
    >>> round(math.exp(s.ref("shoes")), 6), s.ref("hats")
    (100.0, None)
    """

    def __init__(self, max_count: int = 1000, max_categories: int = 100_000) -> None:
        self.max_count = max_count
        self.max_categories = max_categories
        # two flat dicts (str -> number: not tracked by the cyclic garbage collector)
        self.n: dict[str, int] = {}
        self.mean: dict[str, float] = {}

    def update(self, category: str, price: float) -> None:
        if not category or not price or price <= 0:
            return
        x = math.log(price)
        n = self.n.get(category)
        if n is None:
            if len(self.n) >= self.max_categories:
                self._prune()
            self.n[category] = 1
            self.mean[category] = x
            return
        if n < self.max_count:
            n += 1
            self.n[category] = n
        m = self.mean[category]
        self.mean[category] = m + (x - m) / n

    def _prune(self) -> None:
        keep = sorted(self.n.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_categories // 2]
        self.n = dict(keep)
        self.mean = {k: self.mean[k] for k in self.n}

    def ref(self, category: str) -> float | None:
        """Mean log unit price of the category, ``None`` if unknown."""
        return self.mean.get(category)

    def __len__(self) -> int:
        return len(self.n)


def price_level(p: Profile, stats: CategoryStats | None = None) -> float:
    """Log ratio of the user's typical unit price to the typical price of the categories they engage with,
    weighted by affinity; 0 when unknown (no priced events or no ``stats``).

    >>> from models.events import Event
    >>> from models.profile import Profile
    >>> s = CategoryStats(); s.update("tv", 100.0)
    >>> p = Profile(); p.apply(Event("e", "view", "u", "i", 1, price=200.0, category="tv"))
    >>> round(math.exp(price_level(p, s)), 6)
    2.0
    """
    if stats is None:
        return 0.0
    num = den = 0.0
    for cat, a in p.cat_aff.items():
        if a[2] <= 0:
            continue
        ref = stats.ref(cat)
        if ref is None:
            continue
        num += a[0] * (a[3] - ref)
        den += a[0]
    return num / den if den > 0 else 0.0


def last_price_level(p: Profile, stats: CategoryStats | None) -> float:
    """Log ratio of the latest event's unit price to its category's typical price (0 when unknown)."""
    if stats is None or p.last_price <= 0 or not p.last_category:
        return 0.0
    ref = stats.ref(p.last_category)
    return 0.0 if ref is None else math.log(p.last_price) - ref


def _total_and_max(scores: dict) -> tuple[float, float]:
    """Sum and largest of the affinity scores ``{key: [score, time, ...]}`` (as of each one's last update)."""
    total = top = 0.0
    for a in scores.values():
        v = a[0]
        total += v
        if v > top:
            top = v
    return total, top


def feature_values(p: Profile, now_ms: int, stats: CategoryStats | None = None) -> list[float]:
    """The profile's features at event time ``now_ms``, in :data:`FEATURE_NAMES` order (the models' fast path).

    Affinity shares use the scores as of each entry's last update (their decay differs little within a session).
    """
    lg = math.log1p
    c = p.counts
    n_orders = p.n_orders
    recency_h = min((now_ms - p.last_purchase_ts) / HOUR_MS, 2160.0) if n_orders else 2160.0
    last_ts = p.last_ts
    if last_ts:
        since_last = min(max(0, now_ms - last_ts) / 60_000, 1440.0)
        tenure_h = min(max(0, now_ms - p.first_ts) / HOUR_MS, 8760.0)
    else:
        since_last, tenure_h = 1440.0, 0.0
    cat_total, cat_max = _total_and_max(p.cat_aff)
    item_total, item_max = _total_and_max(p.item_aff)
    recent = p.recent_items
    last_aff = p.item_aff.get(recent[-1]) if recent else None
    sev = p.session_events
    live = sev and now_ms - last_ts <= p.SESSION_GAP_MS
    if n_orders:
        rhythm = p.purchase_gap_ms if p.purchase_gap_ms > 0 else p.PRIOR_PURCHASE_GAP_MS
        churn = 1.0 - math.exp(-max(0, now_ms - p.last_purchase_ts) / rhythm)
    elif last_ts:
        churn = 1.0 - math.exp(-max(0, now_ms - last_ts) / p.PRIOR_PURCHASE_GAP_MS)
    else:
        churn = 0.0
    cart_value = p.cart_value if p.cart else 0.0
    return [
        lg(sum(c.values())),  # n_events
        lg(c.get("view", 0) + c.get("click", 0)),  # n_views
        lg(c.get("cart", 0)),  # n_carts
        float(n_orders) if n_orders < 3 else 2.0 + lg(n_orders - 2),  # n_orders
        lg(p.spend),  # spend
        lg(max(0.0, recency_h)),  # recency_h
        lg(since_last),  # since_last_event_min
        lg(tenure_h),  # tenure_h
        float(len(p.cart)),  # cart_items
        lg(cart_value),  # cart_value
        float(sev) if live else 0.0,  # session_events
        lg(p.session_views) if live else 0.0,  # session_views
        float(p.session_carts) if live else 0.0,  # session_carts
        lg(p.session_cart_value) if live else 0.0,  # session_cart_value
        lg(max(0, last_ts - p.session_start) / 60_000) if live else 0.0,  # session_minutes
        p.session_new_items / sev if live else 0.0,  # session_new_item_share
        lg(p.n_sessions),  # n_sessions
        cat_max / cat_total if cat_total > 0 else 0.0,  # top_category_share
        item_max / item_total if item_total > 0 else 0.0,  # top_item_share
        lg(last_aff[0]) if last_aff else 0.0,  # last_item_affinity
        float(len(p.item_aff)),  # n_affinity_items
        p.price_log_mean,  # price_log_mean
        price_level(p, stats) if stats is not None and p.price_n else 0.0,  # price_level
        last_price_level(p, stats),  # last_price_level
        p.loyalty,  # loyalty
        churn,  # churn_risk
        1.0 if p.last_type == "cart" else 0.0,  # last_is_cart
        float(p.last_repeat),  # last_repeat
        lg(min(last_ts - p.prev_ts, 3_600_000) / 1000) if p.prev_ts else 8.19,  # dwell_s
        lg(p.n_decisions),  # n_decisions
    ]
