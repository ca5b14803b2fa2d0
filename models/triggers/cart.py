"""``cart``: an item added to the cart, unless the user got a decision less than the cooldown ago (event time).

>>> from models.events import Event
>>> from models.profile import Profile
>>> t = CartTrigger(cooldown_ms=1_800_000)
>>> p = Profile()
>>> cart = Event("e1", "cart", "u1", "i1", 1_000)
>>> p.apply(cart)
>>> t.may_fire(cart), t.fires(cart, p)
(True, True)
>>> p.mark_decision(1_000, "coupon_5")
>>> later = Event("e2", "cart", "u1", "i2", 60_000)
>>> p.apply(later)
>>> t.fires(later, p)  # one minute later: still cooling down
False
"""

from __future__ import annotations

from models.events import Event
from models.profile import Profile
from models.triggers.base import Trigger, register


@register
class CartTrigger(Trigger):
    name = "cart"

    def __init__(self, cooldown_ms: int = 1_800_000) -> None:
        if cooldown_ms < 0:
            raise ValueError(f"cooldown_ms must be >= 0, got {cooldown_ms}")
        self.cooldown_ms = cooldown_ms

    def may_fire(self, event: Event) -> bool:
        return event.type == "cart"

    def fires(self, event: Event, profile: Profile) -> bool:
        return event.type == "cart" and (
            profile.n_decisions == 0 or event.ts - profile.last_decision_ts >= self.cooldown_ms)
