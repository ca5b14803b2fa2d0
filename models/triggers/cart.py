"""``cart``: an item added to the cart, unless the user got a decision (at any trigger) less than the cooldown ago
(event time): the default trigger, on unless the catalogue turns it off.

>>> from models.events import Event
>>> from models.profile import Profile
>>> t = CartTrigger(cooldown_ms=1_800_000)
>>> p = Profile()
>>> cart = Event("e1", "cart", "u1", "i1", 1_000)
>>> p.apply(cart)
>>> t.may_fire(cart), t.fires(cart, p)
(True, True)
>>> p.mark_decision(1_000, "coupon_5", "cart")
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
    DEFAULT_COOLDOWN_MS = 1_800_000

    def may_fire(self, event: Event) -> bool:
        return event.type == "cart"

    def fires(self, event: Event, profile: Profile) -> bool:
        # the cooldown counts from the user's last decision at any trigger, as before there were other triggers:
        # an offer at the cart minutes after another one is noise
        return event.type == "cart" and (
            profile.n_decisions == 0 or event.ts - profile.last_decision_ts >= self.cooldown_ms) and (
            self.max_per_day is None or self.allows(profile, event.ts))
