"""Behaviour features of purchase propensity: rates, rhythms and the current category, beside the profile's
counts (:mod:`models.profile_features`).

Raw running counts grow with a user's tenure, so a model learnt on early users misreads later ones; these
features are rates and times instead:

* **per-session rates**: events, add-to-carts and orders per session, and the current session's carts per event;
* **time of day**: the hour (UTC) on a circle (``hour_sin``, ``hour_cos``: 23:00 is next to 00:00);
* **rhythm**: the gap between the previous session and this one, and the time since the latest add-to-cart
  (both capped, and at the cap when there is none);
* **the current category** (the latest event's): its share of all events and its purchases per add-to-cart
  (shared by all users, :class:`models.learning.conversion.ConversionRates`), and the user's own decayed
  interest in it, absolute and as a share of their interest in all categories.

Examples
--------
>>> from models.events import Event
>>> from models.learning.conversion import ConversionRates
>>> from models.profile import Profile
>>> p = Profile()
>>> p.apply(Event("e1", "view", "u", "i", 0, category="tv"))
>>> p.apply(Event("e2", "cart", "u", "i", 6 * HOUR_MS, category="tv"))
>>> x = dict(zip(BEHAVIOUR_FEATURES, behaviour_values(p, 6 * HOUR_MS, ConversionRates())))
>>> x["carts_per_session"], round(x["hour_sin"], 6), round(math.expm1(x["prev_session_gap_h"]), 6)
(0.5, 1.0, 6.0)
>>> x["since_last_cart_min"], x["category_affinity_share"]
(0.0, 1.0)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.learning.conversion import ConversionRates
    from models.profile import Profile

__all__ = ["BEHAVIOUR_FEATURES", "behaviour_values"]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MAX_GAP_H = 2160.0  # 90 days: a longer gap (or none) reads as this one
MAX_SINCE_CART_MIN = 60.0 * MAX_GAP_H
_TWO_PI_PER_DAY = 2.0 * math.pi / DAY_MS

BEHAVIOUR_FEATURES: tuple[str, ...] = (
    "events_per_session", "carts_per_session", "orders_per_session", "session_cart_rate",
    "hour_sin", "hour_cos", "prev_session_gap_h", "since_last_cart_min",
    "category_share", "category_buy_per_cart", "category_affinity", "category_affinity_share",
)
"""The names of :func:`behaviour_values`, in its order."""


def behaviour_values(p: Profile, now_ms: int, cat_conv: ConversionRates) -> list[float]:
    """The behaviour features of ``p`` at event time ``now_ms``, in :data:`BEHAVIOUR_FEATURES` order.

    >>> from models.learning.conversion import ConversionRates
    >>> from models.profile import Profile
    >>> values = behaviour_values(Profile(), 0, ConversionRates())  # a user with no event yet
    >>> dict(zip(BEHAVIOUR_FEATURES, values))["prev_session_gap_h"] == math.log1p(MAX_GAP_H)
    True
    """
    lg = math.log1p
    c = p.counts
    sessions = p.n_sessions if p.n_sessions > 0 else 1
    sev = p.session_events
    live = sev and now_ms - p.last_ts <= p.SESSION_GAP_MS
    gap = p.prev_session_gap_ms
    cart_ts = p.last_cart_ts
    angle = (now_ms % DAY_MS) * _TWO_PI_PER_DAY
    cat = p.last_category
    aff = p.cat_aff.get(cat) if cat else None
    if aff is not None:
        interest = aff[0] * 2.0 ** (-max(0, now_ms - aff[1]) / p.AFFINITY_HALF_LIFE_MS)
        total = sum(a[0] for a in p.cat_aff.values())
        share = aff[0] / total if total > 0 else 0.0
    else:
        interest = share = 0.0
    return [
        lg(sum(c.values()) / sessions),  # events_per_session
        c.get("cart", 0) / sessions,  # carts_per_session
        p.n_orders / sessions,  # orders_per_session
        p.session_carts / sev if live else 0.0,  # session_cart_rate
        math.sin(angle),  # hour_sin
        math.cos(angle),  # hour_cos
        lg(min(gap / HOUR_MS, MAX_GAP_H) if gap > 0 else MAX_GAP_H),  # prev_session_gap_h
        lg(min(max(0, now_ms - cart_ts) / 60_000, MAX_SINCE_CART_MIN) if cart_ts else MAX_SINCE_CART_MIN),
        cat_conv.log_share(cat),  # category_share
        cat_conv.log_buy_per_cart(cat),  # category_buy_per_cart
        lg(interest),  # category_affinity
        share,  # category_affinity_share
    ]
