"""``gift``: a free item worth ``value`` to the user, costing the shop ``gift_cost``.

>>> from models.policy.catalogue import OfferSpec
>>> spec = OfferSpec("g", "gift", value=12.0, params={"gift_cost": 4.0})
>>> spec.cost(50.0), spec.max_cost(50.0)
(4.0, 4.0)
"""

from __future__ import annotations

from models.policy.offers.base import OfferKind, Param, register


@register
class Gift(OfferKind):
    name = "gift"
    doc = "a free item worth value to the user: cost = gift_cost (what the shop pays for it)"
    params = (Param("gift_cost", "what one gift costs the shop", required=True),)

    def cost(self, spec, basket: float) -> float:
        return float(spec.params["gift_cost"]) if basket >= spec.min_spend else 0.0

    def max_cost(self, spec, cart_value: float) -> float:
        return float(spec.params["gift_cost"])
