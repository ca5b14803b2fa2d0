"""``none``: no offer. Built in (every catalogue has it, first), costs nothing, changes no basket."""

from __future__ import annotations

from models.policy.offers.base import OfferKind, register


@register
class NoOffer(OfferKind):
    name = "none"
    doc = "no offer: costs nothing"
    in_catalogue = False

    def basket(self, spec, cart_value: float) -> float:
        return cart_value

    def cost(self, spec, basket: float) -> float:
        return 0.0

    def max_cost(self, spec, cart_value: float) -> float:
        return 0.0
