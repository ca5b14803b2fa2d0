"""The validated event v1, as the engine sees it after decoding.

>>> e = Event(event_id="e1", type="cart", user_id="u1", item_id="i9", ts=1_700_000_000_000, price=9.5)
>>> e.quantity, e.value
(1, 9.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "remove_from_cart", "purchase")


@dataclass(slots=True)
class Event:
    """One valid event v1. ``ts`` is event time in epoch milliseconds.

    ``recv_ns`` is the monotonic receipt time in the worker (``time.perf_counter_ns``), used only to measure
    decision latency; it is 0 offline. ``partition`` is the events topic partition the worker read it from, for the
    engine's event-time clock (a watermark per partition, :mod:`models.clock`); ``None`` offline (one stream). It is
    a transport detail, left out of ``repr`` and equality.
    """

    event_id: str
    type: str
    user_id: str
    item_id: str
    ts: int
    price: float | None = None
    quantity: int = 1
    category: str | None = None
    session_id: str | None = None
    order_id: str | None = None
    decision_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    recv_ns: int = 0
    partition: int | None = field(default=None, repr=False, compare=False)

    @property
    def value(self) -> float:
        """Line value ``price * quantity`` (0 when the price is unknown)."""
        return (self.price or 0.0) * self.quantity
