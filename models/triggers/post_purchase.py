"""``post_purchase``: an order was placed; the decision recommends complementary items (what is bought with the
order's items, not the items themselves) and offers a next-order incentive (list which offers in the catalogue).
Fires once per order, at its first line (the lines of one order share a timestamp).

>>> from models.events import Event
>>> from models.profile import Profile
>>> t = PostPurchaseTrigger(cooldown_ms=0)
>>> p = Profile()
>>> first, second = Event("e1", "purchase", "u1", "i1", 5_000, price=9.0), Event("e2", "purchase", "u1", "i2", 5_000)
>>> p.apply(first)
>>> t.may_fire(first), t.fires(first, p)
(True, True)
>>> p.mark_decision(5_000, "none", "post_purchase")
>>> p.apply(second)
>>> t.fires(second, p)  # the same order: one decision
False
"""

from __future__ import annotations

from models.events import Event
from models.profile import Profile
from models.triggers.base import Trigger, register


@register
class PostPurchaseTrigger(Trigger):
    name = "post_purchase"
    DEFAULT_COOLDOWN_MS = 3_600_000

    def may_fire(self, event: Event) -> bool:
        return event.type == "purchase"

    def fires(self, event: Event, profile: Profile) -> bool:
        if event.type != "purchase":
            return False
        log = profile.trigger_log.get(self.name)
        if log and log[-1] == event.ts:  # another line of an order already decided at
            return False
        return self.allows(profile, event.ts)
