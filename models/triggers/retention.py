"""``retention``: a customer (at least one order) comes back after staying away longer than their usual rhythm:
at the first event of the returning session, if their churn risk at that moment was at least ``min_churn_risk``
(:meth:`models.profile.Profile.churn_risk_at`: time since the last order against the user's own mean gap between
orders), the engine decides a retention offer. Only the offers the catalogue lists for this trigger are given: mark
the offers meant for retention there.

>>> from models.events import Event
>>> from models.profile import DAY_MS, Profile
>>> t = RetentionTrigger(min_churn_risk=0.6)
>>> p = Profile()
>>> p.apply(Event("e1", "purchase", "u1", "i1", 1_000, price=9.0))
>>> back_soon = Event("e2", "view", "u1", "i2", 2 * DAY_MS)
>>> p.apply(back_soon)
>>> round(p.churn_risk_at(2 * DAY_MS), 3), t.fires(back_soon, p)  # 2 days against a 30-day rhythm
(0.064, False)
>>> back_late = Event("e3", "view", "u1", "i3", 60 * DAY_MS)
>>> p.apply(back_late)
>>> round(p.churn_risk_at(60 * DAY_MS), 3), t.fires(back_late, p)
(0.865, True)
"""

from __future__ import annotations

from models.events import Event
from models.profile import Profile
from models.triggers.base import Trigger, register


@register
class RetentionTrigger(Trigger):
    name = "retention"
    DEFAULT_COOLDOWN_MS = 7 * 86_400_000
    PARAMS = {"min_churn_risk": (0.6, 0.0, 1.0)}  # a churn risk is a probability: above 1 it would never fire
    min_churn_risk: float

    def may_fire(self, event: Event) -> bool:
        return event.type != "purchase"  # any event may open the returning session

    def fires(self, event: Event, profile: Profile) -> bool:
        return (event.type != "purchase" and profile.n_orders > 0 and profile.session_events == 1
                and profile.prev_session_gap_ms > 0 and profile.churn_risk_at(event.ts) >= self.min_churn_risk
                and self.allows(profile, event.ts))
