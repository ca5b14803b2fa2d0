"""Per-user profile: a pure, deterministic fold of a user's events, stored as one Redis hash.

Every field is written as an absolute value (never an increment), so re-applying a batch after a crash writes
the same bytes: the update is idempotent once event ids are de-duplicated. :meth:`Profile.apply` depends only on
the profile and the event (no clock, no shared state), so the same events give the same bytes on every worker.

What the profile holds (all bounded in size):

* counts by event type, first / last event time, spend, orders, the open cart, the last :attr:`Profile.RECENT`
  distinct items, the last decision and per-offer history (used by the policy's caps);
* **RFM**: recency of the last purchase, number of orders, spend;
* **affinities**: exponentially decayed scores (half-life :attr:`Profile.AFFINITY_HALF_LIFE_MS`, weights
  :data:`EVENT_WEIGHTS`) per category (top :attr:`Profile.TOP_CATEGORIES`) and per item (top
  :attr:`Profile.TOP_ITEMS`); each category also keeps the user's mean log unit price in it;
* **price level**: the user's typical unit price (running mean of log price), and, given a shared
  :class:`~models.profile_features.CategoryStats`, how it compares to the typical price of the same categories
  (``price_level`` > 0: the user buys above the category norm);
* **session**: a new session starts after :attr:`Profile.SESSION_GAP_MS` of inactivity or on a new
  ``session_id``; events, views, carts, cart value added and duration of the current session;
* **loyalty** (orders and tenure, in [0, 1]) and **churn risk** (time since the last purchase against the
  user's own inter-purchase rhythm, in [0, 1]).

:meth:`Profile.features` turns all of it into a flat ``dict[str, float]`` for the models
(:mod:`models.profile_features`).

Examples
--------
>>> from models.events import Event
>>> p = Profile()
>>> p.apply(Event("e1", "view", "u1", "i1", ts=1_000, price=10.0, category="shoes"))
>>> p.apply(Event("e2", "cart", "u1", "i1", ts=2_000, price=10.0, quantity=2, category="shoes"))
>>> p.counts["cart"], p.cart_value, p.is_new
(1, 20.0, True)
>>> p.apply(Event("e3", "purchase", "u1", "i1", ts=3_000, price=10.0, quantity=2))
>>> p.spend, p.cart_value, p.n_orders, p.is_new
(20.0, 0.0, 1, False)
>>> p.session_events, p.session_carts, p.top_categories(1)
(3, 1, ['shoes'])
>>> Profile.from_redis(p.to_redis()) == p
True
>>> f = p.features(now_ms=3_000)
>>> f["n_orders"], f["session_events"], round(f["churn_risk"], 6)
(1.0, 3.0, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.events import EVENT_TYPES, Event
from models.profile_codec import ProfileCodec
from models.profile_features import FEATURE_NAMES, CategoryStats, feature_values, price_level

__all__ = ["Profile", "EVENT_WEIGHTS", "DAY_MS", "FEATURE_NAMES", "CategoryStats"]

EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 1.5, "cart": 3.0, "remove_from_cart": 0.0, "purchase": 4.0}
"""Interest carried by one event of each type (affinities, item similarity, popularity)."""

DAY_MS = 86_400_000


def _weakest_key(d: dict, now: int, half_life: float) -> str:
    """Key of the decayed scores ``d`` (``{key: [score, time, ...]}``) smallest at ``now`` (ties: smallest key)."""
    # score * 2^(-(now - t)/hl) compared in log2 space: log2(score) + t/hl
    best_k, best_v = None, math.inf
    for k, v in d.items():
        s = v[0]
        val = (math.log2(s) if s > 0 else -1e300) + v[1] / half_life
        if val < best_v or (val == best_v and k < best_k):
            best_k, best_v = k, val
    return best_k


def _add_weight(a: list, w: float, ts: int, hl: float) -> None:
    """Add weight ``w`` at time ``ts`` to a decayed score ``a = [score, time, ...]``."""
    t = a[1]
    if ts >= t:
        a[0] = a[0] * 2.0 ** (-(ts - t) / hl) + w
        a[1] = ts
    else:  # an older event: add it decayed to the score's time
        a[0] += w * 2.0 ** (-(t - ts) / hl)


@dataclass
class Profile:
    """What the engine knows about one user.

    ``cart`` maps item id to ``[quantity, unit price, category]``. ``recent_items`` holds the last
    :attr:`RECENT` distinct items the user touched, most recent last. ``cat_aff`` maps category to
    ``[decayed score, score time, priced events, mean log price]`` and ``item_aff`` maps item to
    ``[decayed score, score time]``; scores are as of their time, decayed with :attr:`AFFINITY_HALF_LIFE_MS`.
    """

    RECENT = 20
    DAY_LOG_MAX = 1000  # decisions a day kept per offer and per trigger (the daily caps' bound)
    TOP_CATEGORIES = 10
    TOP_ITEMS = 20
    AFFINITY_HALF_LIFE_MS = 3 * DAY_MS
    SESSION_GAP_MS = 30 * 60_000
    PRICE_MAX_COUNT = 50  # the price mean follows the last ~50 priced events
    PRIOR_PURCHASE_GAP_MS = 30 * DAY_MS  # rhythm assumed before a user has two orders
    IPI_ALPHA = 0.3  # weight of the newest inter-purchase gap in its moving average

    counts: dict[str, int] = field(default_factory=lambda: {t: 0 for t in EVENT_TYPES})
    first_ts: int = 0
    last_ts: int = 0
    spend: float = 0.0
    n_orders: int = 0
    last_purchase_ts: int = 0
    cart: dict[str, list] = field(default_factory=dict)
    recent_items: list[str] = field(default_factory=list)
    # the co-occurrence window [[item, ts, weight], ...] most recent first (models.learning.contrib; the engine moves it)
    item_window: list = field(default_factory=list)
    last_decision_ts: int = 0
    n_decisions: int = 0
    offer_history: dict[str, list[int]] = field(default_factory=dict)  # the last RECENT times of each offer
    offer_totals: dict[str, int] = field(default_factory=dict)  # every time, counted (per-user total caps)
    # --- learning-core fields ----------------------------------------------------------------
    cat_aff: dict[str, list] = field(default_factory=dict)
    item_aff: dict[str, list] = field(default_factory=dict)
    price_n: int = 0
    price_log_mean: float = 0.0
    session_id: str = ""
    session_start: int = 0
    session_events: int = 0
    session_views: int = 0
    session_carts: int = 0
    session_cart_value: float = 0.0
    n_sessions: int = 0
    purchase_gap_ms: float = 0.0  # moving average of the time between orders (0: fewer than two orders)
    last_type: str = ""  # type, category and unit price of the latest event (the decision context)
    last_category: str = ""
    last_price: float = 0.0
    prev_ts: int = 0  # time of the event before the latest one (dwell time)
    last_repeat: int = 0  # 1 when the latest event's item is the one of the event before
    session_new_items: int = 0  # events of the session on an item not among the recent items before
    prev_session_gap_ms: int = 0  # from the previous session's last event to this session's first (0: first session)
    last_cart_ts: int = 0  # time of the latest add-to-cart (0: none yet)
    # --- triggers (models.triggers) -----------------------------------------------------------
    # armed timers: trigger name -> [due event time, id of the event that armed it, its item, its partition]
    timers: dict[str, list] = field(default_factory=dict)
    # timer-fired decisions not yet seen as delivered: trigger id -> [due event time, partition]; the sweep drops
    # each once its stored decision is marked sent, and sends it again if a crash left it unsent
    fired: dict[str, list] = field(default_factory=dict)
    # event times of each trigger's recent decisions (its cooldown and daily cap), newest last
    trigger_log: dict[str, list[int]] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------
    @property
    def cart_value(self) -> float:
        return float(sum(q * p for q, p, _ in self.cart.values()))

    @property
    def cart_categories(self) -> list[str]:
        return sorted({c for _, _, c in self.cart.values() if c})

    @property
    def is_new(self) -> bool:
        """A user who has never purchased."""
        return self.n_orders == 0

    @property
    def n_events(self) -> int:
        return sum(self.counts.values())

    @property
    def session_ms(self) -> int:
        """Duration of the current session so far (first to last event), milliseconds."""
        return max(0, self.last_ts - self.session_start) if self.session_events else 0

    @property
    def loyalty(self) -> float:
        """In [0, 1): grows with orders (most) and tenure; 0 for a brand-new user."""
        tenure_days = max(0, self.last_ts - self.first_ts) / DAY_MS if self.first_ts else 0.0
        return 0.75 * (1.0 - math.exp(-self.n_orders / 3.0)) + 0.25 * (1.0 - math.exp(-tenure_days / 30.0))

    @property
    def churn_risk(self) -> float:
        """Churn risk as of the user's last event (see :meth:`churn_risk_at`)."""
        return self.churn_risk_at(self.last_ts)

    def churn_risk_at(self, now_ms: int) -> float:
        """``1 - exp(-elapsed / rhythm)``: elapsed time since the last purchase (since the last event for a user
        who never bought) against the user's own mean time between orders (a 30-day prior before two orders).

        >>> p = Profile(n_orders=3, last_purchase_ts=0, purchase_gap_ms=float(DAY_MS), last_ts=1)
        >>> round(p.churn_risk_at(DAY_MS), 4), round(p.churn_risk_at(5 * DAY_MS), 4)
        (0.6321, 0.9933)
        """
        if self.n_orders:
            since = now_ms - self.last_purchase_ts
        elif self.last_ts:
            since = now_ms - self.last_ts
        else:
            return 0.0
        rhythm = self.purchase_gap_ms if self.purchase_gap_ms > 0 else self.PRIOR_PURCHASE_GAP_MS
        return 1.0 - math.exp(-max(0, since) / rhythm)

    def top_categories(self, n: int = 3) -> list[str]:
        """The ``n`` categories with the highest decayed affinity (as of the last event), best first."""
        hl = self.AFFINITY_HALF_LIFE_MS
        return [c for c, _ in sorted(self.cat_aff.items(), key=lambda kv: (-(math.log2(kv[1][0]) + kv[1][1] / hl)
                                                                           if kv[1][0] > 0 else math.inf, kv[0]))][:n]

    # ----------------------------------------------------------------------------------------
    def apply(self, e: Event) -> None:
        """Fold one (valid, not yet applied) event into the profile. Deterministic: no clock, no shared state.

        The steps run in this order: the session is decided before the latest event time moves, and what the
        latest event repeats or adds is judged against the recent items before it."""
        etype = e.type
        self.counts[etype] = self.counts.get(etype, 0) + 1
        self._follow_session(e.ts, e.session_id)
        self._note_latest(e)
        if etype == "view" or etype == "click":
            self.session_views += 1
        elif etype == "cart":
            self._add_to_cart(e)
        elif etype == "remove_from_cart":
            self._remove_from_cart(e)
        elif etype == "purchase":
            self._record_purchase(e)
        w = EVENT_WEIGHTS.get(etype, 0.0)
        if w > 0.0:
            self._add_interest(e, w)
        if not self.last_repeat:
            self._remember_item(e.item_id)

    def _follow_session(self, ts: int, session_id: str | None) -> None:
        """Start a new session after :attr:`SESSION_GAP_MS` of inactivity or on a new session id, count the
        event in the current one, and move the first event time back if the event is older."""
        if (
            not self.session_events
            or ts - self.last_ts > self.SESSION_GAP_MS
            or (session_id and session_id != self.session_id)
        ):
            if self.session_events and ts > self.last_ts:  # how long the user stayed away: a return signal
                self.prev_session_gap_ms = ts - self.last_ts
            self.n_sessions += 1
            self.session_id = session_id or ""
            self.session_start = ts
            self.session_events = self.session_views = self.session_carts = self.session_new_items = 0
            self.session_cart_value = 0.0
        elif ts < self.session_start:
            self.session_start = ts
        self.session_events += 1
        if not self.first_ts or ts < self.first_ts:
            self.first_ts = ts

    def _note_latest(self, e: Event) -> None:
        """Whether the event repeats the previous item or brings a new one to the session; the latest event's
        time, type, category and price (the decision context), unless the event is older than the latest."""
        recent = self.recent_items
        self.last_repeat = 1 if recent and recent[-1] == e.item_id else 0
        if e.item_id not in recent:
            self.session_new_items += 1
        if e.ts >= self.last_ts:
            self.prev_ts = self.last_ts
            self.last_ts = e.ts
            self.last_type = e.type
            self.last_category = e.category or ""
            self.last_price = float(e.price or 0.0)

    def _add_to_cart(self, e: Event) -> None:
        """Add the quantity to the item's cart line; the event's price and category, else the line's, stay."""
        line = self.cart.get(e.item_id)
        qty = (line[0] if line else 0) + e.quantity
        self.cart[e.item_id] = [qty, float(e.price or (line[1] if line else 0.0)), e.category or (line and line[2])]
        self.session_carts += 1
        self.session_cart_value += e.value
        if e.ts > self.last_cart_ts:
            self.last_cart_ts = e.ts

    def _remove_from_cart(self, e: Event) -> None:
        """Take the quantity off the item's cart line; the line goes when nothing is left."""
        line = self.cart.get(e.item_id)
        if line is not None:
            if line[0] - e.quantity > 0:
                line[0] -= e.quantity
            else:
                del self.cart[e.item_id]

    def _record_purchase(self, e: Event) -> None:
        """Spend, orders and the user's rhythm between orders; the bought item leaves the cart."""
        ts = e.ts
        self.spend += e.value
        if ts != self.last_purchase_ts:  # lines of one order share a timestamp
            if self.n_orders and ts > self.last_purchase_ts:
                gap = float(ts - self.last_purchase_ts)
                self.purchase_gap_ms = (
                    gap if self.purchase_gap_ms <= 0
                    else self.purchase_gap_ms + self.IPI_ALPHA * (gap - self.purchase_gap_ms)
                )
            self.n_orders += 1
        self.last_purchase_ts = max(self.last_purchase_ts, ts)
        self.cart.pop(e.item_id, None)

    def _add_interest(self, e: Event, w: float) -> None:
        """Weight ``w`` of the event into the decayed category and item affinities, and its price into the
        user's price means (overall and in the category)."""
        ts = e.ts
        hl = self.AFFINITY_HALF_LIFE_MS
        logp = math.log(e.price) if e.price and e.price > 0 else None
        if logp is not None:
            n = self.price_n + 1 if self.price_n < self.PRICE_MAX_COUNT else self.price_n
            self.price_n = n
            self.price_log_mean += (logp - self.price_log_mean) / n
        cat = e.category
        if cat:
            a = self.cat_aff.get(cat)
            if a is None:
                a = self.cat_aff[cat] = [w, ts, 0, 0.0]
                if len(self.cat_aff) > self.TOP_CATEGORIES:  # the weakest goes, possibly the new one
                    del self.cat_aff[_weakest_key(self.cat_aff, ts, hl)]
            else:
                _add_weight(a, w, ts, hl)
            if logp is not None and cat in self.cat_aff:
                n = a[2] + 1 if a[2] < self.PRICE_MAX_COUNT else a[2]
                a[2] = n
                a[3] += (logp - a[3]) / n
        a = self.item_aff.get(e.item_id)
        if a is None:
            self.item_aff[e.item_id] = [w, ts]
            if len(self.item_aff) > self.TOP_ITEMS:
                del self.item_aff[_weakest_key(self.item_aff, ts, hl)]
        else:
            _add_weight(a, w, ts, hl)

    def _remember_item(self, item_id: str) -> None:
        """Move the item to the end of the recent items (at most :attr:`RECENT`, distinct)."""
        recent = self.recent_items
        if item_id in recent:
            recent.remove(item_id)
        recent.append(item_id)
        if len(recent) > self.RECENT:
            del recent[0]

    def mark_decision(self, ts: int, offer_id: str | None = None, trigger: str | None = None) -> None:
        """Record a decision at event time ``ts``; offers other than ``none`` feed the per-user caps, and
        ``trigger`` its log (the trigger's cooldown and daily cap)."""
        self.last_decision_ts = ts
        self.n_decisions += 1
        if trigger:
            self._log_time(self.trigger_log.setdefault(trigger, []), ts)
        if offer_id and offer_id != "none":
            hist = self.offer_history.setdefault(offer_id, [])
            # the total counts on past the times kept (a profile written before the totals existed has its
            # history's length for a start)
            self.offer_totals[offer_id] = max(self.offer_totals.get(offer_id, 0), len(hist)) + 1
            self._log_time(hist, ts)

    def _log_time(self, log: list[int], ts: int) -> None:
        """Append ``ts`` to a decision log, which keeps its last :attr:`RECENT` times and every time of ``ts``'s day
        (the daily caps count them: a cap above RECENT would otherwise never be reached), at most
        :attr:`DAY_LOG_MAX` (the largest daily cap a catalogue may set).

        >>> p = Profile()
        >>> for t in range(30):
        ...     p.mark_decision(DAY_MS + t, "c5")  # thirty on one day: all kept
        >>> p.mark_decision(2 * DAY_MS, "c5")  # the next day: the last RECENT
        >>> len(p.offer_history["c5"]), p.offers_total()["c5"]
        (20, 31)
        """
        log.append(ts)
        excess = len(log) - self.RECENT
        if excess > 0:
            day_start = ts - ts % DAY_MS
            old = 0
            while old < excess and log[old] < day_start:
                old += 1
            del log[:old]
            del log[:-self.DAY_LOG_MAX]

    def offers_since(self, since_ts: int) -> int:
        """How many offers (any kind but ``none``) the user got at or after event time ``since_ts``."""
        return sum(1 for h in self.offer_history.values() for t in h if t >= since_ts)

    def offers_total(self) -> dict[str, int]:
        """How many times the user got each offer (the per-user total caps), beyond the :attr:`RECENT` times of
        :attr:`offer_history`.

        >>> p = Profile()
        >>> for day in range(25):
        ...     p.mark_decision(day * DAY_MS, "c5")
        >>> len(p.offer_history["c5"]), p.offers_total()
        (20, {'c5': 25})
        """
        totals = self.offer_totals
        return {k: max(len(v), totals.get(k, 0)) for k, v in self.offer_history.items()}

    def last_offer_ts(self) -> dict[str, int]:
        return {k: max(v) for k, v in self.offer_history.items() if v}

    # ----------------------------------------------------------------------------------------
    def price_level(self, stats: CategoryStats | None = None) -> float:
        """Log ratio of the user's typical unit price to the typical price of the categories they engage with
        (:func:`models.profile_features.price_level`); 0 when unknown."""
        return price_level(self, stats)

    def features(self, now_ms: int, stats: CategoryStats | None = None) -> dict[str, float]:
        """The profile as model features at event time ``now_ms`` (keys :data:`FEATURE_NAMES`; see
        :mod:`models.profile_features`).

        >>> Profile().features(0)["n_events"]
        0.0
        >>> list(Profile().features(0)) == list(FEATURE_NAMES) and len(Profile().feature_values(0)) == len(FEATURE_NAMES)
        True
        """
        return dict(zip(FEATURE_NAMES, feature_values(self, now_ms, stats)))

    def feature_values(self, now_ms: int, stats: CategoryStats | None = None) -> list[float]:
        """:meth:`features` as a list in :data:`FEATURE_NAMES` order (the models' fast path)."""
        return feature_values(self, now_ms, stats)

    # ----------------------------------------------------------------------------------------
    def to_redis(self) -> dict[str, str]:
        """The full hash to write (absolute values; floats in ``repr`` so they round-trip exactly)."""
        return _CODEC.to_redis(self)

    def to_dict(self) -> dict:
        """The profile as plain JSON values (what the engine's store packs into ONE JSON document, encoded once).

        >>> Profile.from_dict(Profile(n_orders=2, spend=1.5).to_dict()) == Profile(n_orders=2, spend=1.5)
        True
        """
        return _CODEC.to_dict(self)

    @classmethod
    def from_dict(cls, mapping: dict) -> "Profile":
        """Inverse of :meth:`to_dict`; also reads :meth:`to_redis` mappings (values as text), so profiles written
        by earlier versions load unchanged. An empty mapping is a new user."""
        return _CODEC.from_dict(mapping)

    @classmethod
    def from_redis(cls, mapping: dict) -> "Profile":
        """Build from an ``HGETALL`` answer (bytes or str); an empty mapping is a new user."""
        return _CODEC.from_redis(mapping)


_CODEC = ProfileCodec(Profile)
