"""Budget pacing: a shadow price per campaign from a feedback controller on spend vs schedule.

A campaign with a budget and a period (both ends) should spend evenly over the period. The controller
compares the spend (reserved + committed) with the linear schedule ``budget * elapsed / period`` and
moves a shadow price ``lambda >= 0``: ahead of schedule it rises, behind it decays to 0. The policy adds
``lambda * cost`` to an offer's cost when scoring, so a scarce budget goes to the users where the offer
earns the most per unit of cost, instead of to whoever comes first.

>>> p = BudgetPacer(budget=100.0, start_ms=0, end_ms=1000)
>>> p.update(100, 10.0)           # on schedule: no price
0.0
>>> p.update(200, 60.0) > 0       # 40 % of the budget ahead of schedule: the price rises
True
>>> p.update(900, 60.0)           # behind schedule again: the price falls back to 0
0.0
>>> BudgetPacer(100.0, None, None).update(5, 99.0)   # no period: no pacing (the hard budget still holds)
0.0
"""

from __future__ import annotations

from dataclasses import dataclass

from models.policy.catalogue import Catalogue


@dataclass(slots=True)
class BudgetPacer:
    """Proportional-integral controller of one campaign's shadow price.

    Parameters
    ----------
    budget, start_ms, end_ms
        The campaign; without both period ends the price stays 0.
    kp
        Price per unit of relative error (spend ahead of schedule as a fraction of the budget).
    ki
        Integral gain per unit of relative error and fraction of the period elapsed.
    max_price
        Upper bound of the price (in units of the offer's cost).
    """

    budget: float
    start_ms: int | None
    end_ms: int | None
    kp: float = 20.0
    ki: float = 200.0
    max_price: float = 20.0
    price_: float = 0.0
    integral_: float = 0.0
    last_ms_: int | None = None

    def target(self, now_ms: int) -> float:
        """Spend the schedule allows by ``now_ms``."""
        if self.start_ms is None or self.end_ms is None:
            return self.budget
        frac = (now_ms - self.start_ms) / (self.end_ms - self.start_ms)
        return self.budget * min(1.0, max(0.0, frac))

    def update(self, now_ms: int, spent: float) -> float:
        """Feed the current spend at (event) time ``now_ms``; returns the new shadow price."""
        if self.start_ms is None or self.end_ms is None or self.budget <= 0:
            self.price_ = 0.0
            return 0.0
        err = (spent - self.target(now_ms)) / self.budget
        if self.last_ms_ is not None and now_ms > self.last_ms_:
            dt = (now_ms - self.last_ms_) / (self.end_ms - self.start_ms)
            self.integral_ = min(self.max_price, max(0.0, self.integral_ + self.ki * err * dt))
        self.last_ms_ = now_ms if self.last_ms_ is None else max(self.last_ms_, now_ms)
        self.price_ = min(self.max_price, max(0.0, self.kp * err + self.integral_))
        return self.price_


class PacingController:
    """Shadow prices of every paced campaign of a catalogue (offers with a budget and a full period).

    The engine calls :meth:`update` with the spend per offer (e.g. after reading the budget store once
    per batch); the policy calls :meth:`price`.

    >>> from models.policy.catalogue import parse_catalogue
    >>> cat = parse_catalogue('''
    ... offers:
    ...   - {offer_id: c, kind: coupon, value: 5, budget: 100, period: {start: 0, end: 1000}}
    ...   - {offer_id: d, kind: coupon, value: 5, budget: 100}
    ... ''')
    >>> pc = PacingController(cat)
    >>> sorted(pc.pacers)
    ['c']
    >>> pc.update(500, {"c": 90.0, "d": 99.0})["c"] > 0, pc.price("d")
    (True, 0.0)
    """

    def __init__(self, catalogue: Catalogue, kp: float = 20.0, ki: float = 200.0, max_price: float = 20.0):
        self.pacers: dict[str, BudgetPacer] = {
            o.offer_id: BudgetPacer(o.budget, o.start_ms, o.end_ms, kp=kp, ki=ki, max_price=max_price)
            for o in catalogue
            if o.budget is not None and o.start_ms is not None and o.end_ms is not None
        }

    def update(self, now_ms: int, spent: dict[str, float]) -> dict[str, float]:
        """Update every paced campaign with its spend; returns offer id -> shadow price."""
        out = {}
        for oid, p in self.pacers.items():
            out[oid] = p.update(now_ms, float(spent.get(oid, 0.0)))
        return out

    def price(self, offer_id: str) -> float:
        p = self.pacers.get(offer_id)
        return p.price_ if p is not None else 0.0

    def prices(self) -> dict[str, float]:
        return {k: p.price_ for k, p in self.pacers.items()}
