"""``percent_off``: ``value`` % off the basket, at most ``max_discount``.

>>> from models.policy.catalogue import OfferSpec
>>> spec = OfferSpec("p10", "percent_off", value=10.0, params={"max_discount": 30.0})
>>> spec.cost(200.0), spec.cost(1000.0), spec.max_cost(200.0)
(20.0, 30.0, 30.0)
"""

from __future__ import annotations

from models.policy.offers.base import OfferKind, Param, register


@register
class PercentOff(OfferKind):
    name = "percent_off"
    doc = "value % off the basket: cost = value/100 * basket, at most max_discount"
    value_hi = 100.0
    params = (Param("max_discount", "the most one redemption may cost, which a budget reserves", required=True,
                    lo_open=True),)

    def cost(self, spec, basket: float) -> float:
        c = spec.value / 100.0 * basket if basket >= spec.min_spend else 0.0
        return float(min(c, spec.params["max_discount"]))

    def max_cost(self, spec, cart_value: float) -> float:
        return float(spec.params["max_discount"])
