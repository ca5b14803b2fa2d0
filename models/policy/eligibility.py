"""Who may get which offer now: the deterministic holdout, eligibility and caps, and the static score of an offer."""

from __future__ import annotations

import hashlib

from models.policy.base import DecisionContext
from models.policy.catalogue import Catalogue, OfferSpec


def holdout(user_id: str, pct: float, salt: str = "") -> bool:
    """Deterministic holdout membership: a keyed hash of the user id falls in the first ``pct`` percent.

    >>> holdout("u1", 5.0) == holdout("u1", 5.0)
    True
    >>> sum(holdout(f"u{i}", 5.0) for i in range(10_000))
    513
    >>> holdout("u1", 0.0), holdout("u1", 100.0)
    (False, True)
    """
    if pct <= 0:
        return False
    if pct >= 100:
        return True
    h = hashlib.blake2b(f"holdout|{salt}|{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64 * 100.0 < pct


def filter_offers(catalogue: Catalogue, ctx: DecisionContext) -> tuple[list[OfferSpec], list[str]]:
    """Offers the user may get now (``none`` always first) and one reason per filtered offer.

    Applies, in order: engine-known blocks (budget), campaign period and eligibility, global
    per-user caps (offers per day, gap), per-offer caps (per day, total, cooldown).
    """
    eligible: list[OfferSpec] = []
    reasons: list[str] = []
    g = catalogue.caps
    global_block = None
    if g.max_offers_per_day is not None and ctx.offers_today >= g.max_offers_per_day:
        global_block = f"user got {ctx.offers_today} offers today (max {g.max_offers_per_day})"
    elif g.min_gap_s and ctx.last_offer_ms:
        last = max(ctx.last_offer_ms.values())
        if ctx.now_ms - last < g.min_gap_s * 1000:
            global_block = f"last offer {(ctx.now_ms - last) // 1000}s ago (min gap {g.min_gap_s}s)"
    if global_block:
        reasons.append(f"all offers: {global_block}")
    for spec in catalogue:
        if spec.kind == "none":
            eligible.append(spec)
            continue
        if global_block:
            continue
        why = ctx.blocked.get(spec.offer_id) if ctx.blocked else None
        why = why or spec.ineligible_reason(ctx) or spec.cap_reason(ctx)
        if why:
            reasons.append(f"{spec.offer_id}: {why}")
        else:
            eligible.append(spec)
    return eligible, reasons


def static_score(catalogue: Catalogue, spec: OfferSpec, ctx: DecisionContext, p_none: float, p_offer: float) -> float:
    """Expected incremental margin ``P(buy|offer)(margin - cost) - P(buy|none) margin`` of one offer.

    Both margins use the offer's margin rate (its products); with the offer the basket is at least
    ``min_spend`` (the user tops up to redeem).

    >>> from models.policy.catalogue import load_catalogue
    >>> cat = load_catalogue()
    >>> ctx = DecisionContext("u", 0, 80.0, [], [], False, 1, None, 0.0, 0.2)
    >>> round(static_score(cat, cat["coupon_5"], ctx, 0.2, 0.3), 3)
    0.5
    >>> static_score(cat, cat["none"], ctx, 0.2, 0.2)
    0.0
    """
    if spec.kind == "none":
        return 0.0
    basket = spec.basket(ctx.cart_value)
    return p_offer * (spec.margin(basket) - spec.cost(basket)) - p_none * spec.margin(ctx.cart_value)


def _clip01(x: float) -> float:
    if x != x:  # NaN
        return 0.0
    return min(1.0, max(0.0, float(x)))
