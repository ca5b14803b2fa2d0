"""``cart_abandonment`` (a timer): an add-to-cart not followed by a purchase within ``idle_s`` seconds of event
time. Each add-to-cart (re-)arms it from its time; a purchase, or removals that empty the cart, cancel it. It fires
once, with the last add-to-cart as its anchor, if the cart still holds something.

>>> from models.events import Event
>>> from models.profile import Profile
>>> t = CartAbandonmentTrigger(idle_s=3600)
>>> p = Profile()
>>> cart = Event("c1", "cart", "u1", "i1", 1_000, price=20.0)
>>> p.apply(cart); t.arm(cart, p)
3601000
>>> buy = Event("b1", "purchase", "u1", "i1", 2_000, price=20.0)
>>> p.apply(buy); t.arm(buy, p) == DISARM
True
"""

from __future__ import annotations

from models.events import Event
from models.profile import Profile
from models.triggers.base import DISARM, TimerTrigger, register


@register
class CartAbandonmentTrigger(TimerTrigger):
    name = "cart_abandonment"
    PARAMS = {"idle_s": (3600, 1)}
    idle_s: int

    def arm(self, event: Event, profile: Profile) -> int | None:
        if event.type == "cart":
            return event.ts + self.idle_s * 1000
        if event.type == "purchase" or (event.type == "remove_from_cart" and not profile.cart):
            return DISARM
        return None

    def still_applies(self, profile: Profile) -> bool:
        return bool(profile.cart)
