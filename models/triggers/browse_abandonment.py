"""``browse_abandonment`` (a timer): a session with at least ``min_views`` views and no cart, then nothing for
``idle_s`` seconds of event time. Each view of such a session (re-)arms the timer from its time; an add-to-cart or
a purchase cancels it. It fires once, with the last view as its anchor.

>>> from models.events import Event
>>> from models.profile import Profile
>>> t = BrowseAbandonmentTrigger(min_views=2, idle_s=1800)
>>> p = Profile()
>>> views = [Event(f"v{i}", "view", "u1", f"i{i}", 1_000 * i) for i in (1, 2)]
>>> p.apply(views[0]); t.arm(views[0], p) is None  # one view: not yet
True
>>> p.apply(views[1]); t.arm(views[1], p)  # due 30 minutes after the last view
1802000
>>> cart = Event("c1", "cart", "u1", "i2", 3_000)
>>> p.apply(cart); t.arm(cart, p) == DISARM
True
"""

from __future__ import annotations

from models.events import Event
from models.profile import Profile
from models.triggers.base import DISARM, TimerTrigger, register


@register
class BrowseAbandonmentTrigger(TimerTrigger):
    name = "browse_abandonment"
    PARAMS = {"min_views": (3, 1), "idle_s": (1800, 1)}
    min_views: int
    idle_s: int

    def arm(self, event: Event, profile: Profile) -> int | None:
        if event.type in ("cart", "purchase"):
            return DISARM
        if event.type == "view" and profile.session_carts == 0 and profile.session_views >= self.min_views:
            return event.ts + self.idle_s * 1000
        return None

    def still_applies(self, profile: Profile) -> bool:
        return not profile.cart
