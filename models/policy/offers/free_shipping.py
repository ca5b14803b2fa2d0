"""``free_shipping``: the shop pays the delivery of an order of at least ``min_spend``.

``value`` is what the shipping is worth to the user (shown in the offer); ``shipping_cost`` what it costs the shop
(a carrier's fee can differ from the price the shop charges for it).

>>> from models.policy.catalogue import OfferSpec
>>> spec = OfferSpec("ship", "free_shipping", value=6.9, min_spend=40.0, params={"shipping_cost": 4.5})
>>> spec.cost(39.0), spec.cost(40.0), spec.max_cost(25.0)
(0.0, 4.5, 4.5)
"""

from __future__ import annotations

from models.policy.offers.base import OfferKind, Param, register


@register
class FreeShipping(OfferKind):
    name = "free_shipping"
    doc = "the shop pays the delivery: cost = shipping_cost when basket >= min_spend, else 0"
    params = (Param("shipping_cost", "what one delivery costs the shop", required=True),)

    def cost(self, spec, basket: float) -> float:
        return float(spec.params["shipping_cost"]) if basket >= spec.min_spend else 0.0

    def max_cost(self, spec, cart_value: float) -> float:
        return float(spec.params["shipping_cost"])
