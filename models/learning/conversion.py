"""Item and category conversion rates: purchases per interaction, learnt from past events (a model feature).

Examples
--------
>>> rates = ConversionRates(a=1.0)
>>> for etype in ("view", "cart", "purchase"):
...     rates.update("shoes", etype)
>>> rates.log_odds("shoes") > rates.log_odds(None)
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
