"""Item and category conversion rates: purchases per interaction and per add-to-cart, and each key's share of
the traffic, learnt from past events (model features).

Examples
--------
>>> rates = ConversionRates(a=1.0)
>>> for etype in ("view", "cart", "purchase"):
...     rates.update("shoes", etype)
>>> rates.log_odds("shoes") > rates.log_odds(None)
True
>>> rates.update("hats", "view")
>>> rates.log_share("shoes") > rates.log_share("hats") > rates.log_share("unseen")
True
"""

from __future__ import annotations

import math

__all__ = ["ConversionRates"]


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

    :meth:`log_buy_per_cart` is the smoothed purchases per add-to-cart of a key (log scale; above 0 when a key
    is often bought without a cart event) and :meth:`log_share` the key's smoothed share of all events (log scale):
    shares and rates, not raw counts, so they do not drift as the stream gets longer.

    >>> for t in ("cart", "cart", "purchase"):
    ...     c.update("i3", t)
    >>> c.log_buy_per_cart("i1") > c.log_buy_per_cart("unseen") > c.log_buy_per_cart("i3")
    True
    """

    def __init__(self, a: float = 10.0, max_keys: int = 200_000) -> None:
        self.a = a
        self.max_keys = max_keys
        self.events: dict[str, int] = {}  # flat str -> int dicts: not tracked by the garbage collector
        self.purchases: dict[str, int] = {}
        self.carts: dict[str, int] = {}
        self.n = 0
        self.pos = 0
        self.n_carts = 0

    def __setstate__(self, state: dict) -> None:
        # snapshots written before cart counts were kept: start counting carts from zero
        state.setdefault("carts", {})
        state.setdefault("n_carts", 0)
        self.__dict__.update(state)

    def update(self, key: str, etype: str) -> None:
        if not key:
            return
        ev = self.events
        c = ev.get(key)
        if c is None:
            if len(ev) >= self.max_keys:
                keep = sorted(ev.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_keys // 2]
                self.events = ev = dict(keep)
                self._keep_only(ev)
            c = 0
        ev[key] = c + 1
        self.n += 1
        if etype == "purchase":
            self.purchases[key] = self.purchases.get(key, 0) + 1
            self.pos += 1
        elif etype == "cart":
            self.carts[key] = self.carts.get(key, 0) + 1
            self.n_carts += 1

    def add_totals(self, n: int, purchases: int, carts: int = 0) -> None:
        """Count ``n`` events (``purchases`` of them purchases, ``carts`` add-to-carts) updated directly in
        :attr:`events` / :attr:`purchases` / :attr:`carts` by a caller's fast loop, and keep the key count bounded."""
        self.n += n
        self.pos += purchases
        self.n_carts += carts
        if len(self.events) > self.max_keys:
            keep = sorted(self.events.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_keys // 2]
            self._keep_only(dict(keep))

    def _keep_only(self, events: dict[str, int]) -> None:
        self.events = events
        self.purchases = {k: v for k, v in self.purchases.items() if k in events}
        self.carts = {k: v for k, v in self.carts.items() if k in events}

    def log_odds(self, key: str | None) -> float:
        g = (self.pos + 1) / (self.n + 100)
        c = self.events.get(key) if key else None
        p = g if c is None else (self.purchases.get(key, 0) + self.a * g) / (c + self.a)
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))

    def log_buy_per_cart(self, key: str | None) -> float:
        """``log((purchases + a * g) / (carts + a))``, ``g`` the global purchases per cart (unknown keys: ``g``)."""
        g = (self.pos + 1) / (self.n_carts + 1)
        if not key or key not in self.events:
            return math.log(g)
        return math.log((self.purchases.get(key, 0) + self.a * g) / (self.carts.get(key, 0) + self.a))

    def log_share(self, key: str | None) -> float:
        """``log((events + 1) / (n + keys + 1))``: the key's share of the events, unknown keys as if seen once."""
        c = self.events.get(key, 0) if key else 0
        return math.log((c + 1) / (self.n + len(self.events) + 1))
