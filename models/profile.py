"""Per-user profile: a pure, deterministic fold of a user's events, stored as one Redis hash.

Every field is written as an absolute value (never an increment), so re-applying a batch after a crash writes
the same bytes: the update is idempotent once event ids are de-duplicated.

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
>>> Profile.from_redis(p.to_redis()) == p
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from models.events import EVENT_TYPES, Event

_JSON_FIELDS = ("counts", "cart", "recent_items", "offer_history")


@dataclass
class Profile:
    """What the engine knows about one user.

    ``cart`` maps item id to ``[quantity, unit price, category]``. ``recent_items`` holds the last
    :attr:`RECENT` distinct items the user touched, most recent last.
    """

    RECENT = 20

    counts: dict[str, int] = field(default_factory=lambda: {t: 0 for t in EVENT_TYPES})
    first_ts: int = 0
    last_ts: int = 0
    spend: float = 0.0
    n_orders: int = 0
    last_purchase_ts: int = 0
    cart: dict[str, list] = field(default_factory=dict)
    recent_items: list[str] = field(default_factory=list)
    last_decision_ts: int = 0
    n_decisions: int = 0
    offer_history: dict[str, list[int]] = field(default_factory=dict)

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

    # ----------------------------------------------------------------------------------------
    def apply(self, e: Event) -> None:
        """Fold one (valid, not yet applied) event into the profile."""
        self.counts[e.type] = self.counts.get(e.type, 0) + 1
        if not self.first_ts or e.ts < self.first_ts:
            self.first_ts = e.ts
        if e.ts > self.last_ts:
            self.last_ts = e.ts
        if e.type == "cart":
            line = self.cart.get(e.item_id)
            qty = (line[0] if line else 0) + e.quantity
            self.cart[e.item_id] = [qty, float(e.price or (line[1] if line else 0.0)), e.category or (line and line[2])]
        elif e.type == "remove_from_cart":
            line = self.cart.get(e.item_id)
            if line is not None:
                if line[0] - e.quantity > 0:
                    line[0] -= e.quantity
                else:
                    del self.cart[e.item_id]
        elif e.type == "purchase":
            self.spend += e.value
            if e.ts != self.last_purchase_ts:  # lines of one order share a timestamp
                self.n_orders += 1
            self.last_purchase_ts = max(self.last_purchase_ts, e.ts)
            self.cart.pop(e.item_id, None)
        if e.item_id in self.recent_items:
            self.recent_items.remove(e.item_id)
        self.recent_items.append(e.item_id)
        if len(self.recent_items) > self.RECENT:
            del self.recent_items[0]

    def mark_decision(self, ts: int, offer_id: str | None = None) -> None:
        """Record a decision at event time ``ts``; offers other than ``none`` feed the per-user caps."""
        self.last_decision_ts = ts
        self.n_decisions += 1
        if offer_id and offer_id != "none":
            hist = self.offer_history.setdefault(offer_id, [])
            hist.append(ts)
            del hist[:-self.RECENT]

    def offers_since(self, since_ts: int) -> int:
        """How many offers (any kind but ``none``) the user got at or after event time ``since_ts``."""
        return sum(1 for h in self.offer_history.values() for t in h if t >= since_ts)

    def last_offer_ts(self) -> dict[str, int]:
        return {k: max(v) for k, v in self.offer_history.items() if v}

    # ----------------------------------------------------------------------------------------
    def to_redis(self) -> dict[str, str]:
        """The full hash to write (absolute values; floats in ``repr`` so they round-trip exactly)."""
        out: dict[str, str] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = json.dumps(v, separators=(",", ":")) if f.name in _JSON_FIELDS else repr(v)
        return out

    @classmethod
    def from_redis(cls, mapping: dict) -> "Profile":
        """Build from an ``HGETALL`` answer (bytes or str); an empty mapping is a new user."""
        p = cls()
        if not mapping:
            return p
        types = {f.name: f.type for f in fields(cls)}
        for k, v in mapping.items():
            k = k.decode() if isinstance(k, bytes) else k
            v = v.decode() if isinstance(v, bytes) else v
            if k not in types:
                continue  # a field of another version: ignored (and dropped on the next write)
            if k in _JSON_FIELDS:
                setattr(p, k, json.loads(v))
            elif types[k] in ("int", int):
                setattr(p, k, int(v))
            else:
                setattr(p, k, float(v))
        for t in EVENT_TYPES:
            p.counts.setdefault(t, 0)
        return p
