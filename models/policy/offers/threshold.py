"""``threshold``: spend ``min_spend``, save ``value``.

>>> from models.policy.catalogue import OfferSpec
>>> spec = OfferSpec("s", "threshold", value=15.0, min_spend=100.0)
>>> spec.cost(99.0), spec.cost(100.0), spec.max_cost(60.0)
(0.0, 15.0, 15.0)
"""

from __future__ import annotations

from models.policy.offers.base import OfferKind, register


@register
class Threshold(OfferKind):
    name = "threshold"
    doc = "spend min_spend, save value: cost = value when basket >= min_spend, else 0"

    def cost(self, spec, basket: float) -> float:
        return float(spec.value) if basket >= spec.min_spend else 0.0

    def max_cost(self, spec, cart_value: float) -> float:
        return float(spec.value)

    def check(self, spec):
        if not (spec.min_spend and spec.min_spend > spec.value):
            return None, "a threshold offer needs min_spend greater than value (spend X, save Y)"
        return None
