"""``coupon``: ``value`` off the basket (at least ``min_spend``).

>>> from models.policy.catalogue import OfferSpec
>>> spec = OfferSpec("c5", "coupon", value=5.0, min_spend=30.0)
>>> spec.cost(40.0), spec.cost(20.0), spec.max_cost(40.0)
(5.0, 0.0, 5.0)
"""

from __future__ import annotations

from models.policy.offers.base import OfferKind, register


@register
class Coupon(OfferKind):
    name = "coupon"
    doc = "value off the basket: cost = min(value, basket)"

    def cost(self, spec, basket: float) -> float:
        return float(min(spec.value, basket)) if basket >= spec.min_spend else 0.0

    def max_cost(self, spec, cart_value: float) -> float:
        return float(spec.value)

    def check(self, spec):
        if spec.min_spend and spec.value >= spec.min_spend:
            return "value", f"coupon value {spec.value:g} must be below min_spend {spec.min_spend:g}"
        return None
