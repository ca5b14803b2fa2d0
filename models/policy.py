"""Offer policy interface: the decision context, the choice, holdout, eligibility filtering, rule policy.

The engine builds a :class:`DecisionContext` for a triggering event, seeds a ``random.Random`` from the
decision id (a redelivered trigger reproduces the same choice) and calls ``policy.choose(ctx, rng)``.
When the attribution window of a decision closes, it calls ``policy.learn_one(ctx, offer_id, reward)``.

>>> from models.catalogue import load_catalogue
>>> cat = load_catalogue()
>>> policy = RulePolicy(cat, holdout_pct=0.0)
>>> ctx = DecisionContext(user_id="u1", now_ms=1_700_000_000_000, cart_value=120.0, cart_items=["i1"],
...                       cart_categories=["apparel.shoes"], is_new=False, n_purchases=3,
...                       segment=None, churn_risk=0.5, propensity=0.1)
>>> choice = policy.choose(ctx, random.Random(0))
>>> choice.offer.offer_id, choice.group, choice.propensity
('coupon_5', 'treatment', 1.0)
>>> choice.scores
{'none': 0.0, 'coupon_5': 0.5, 'pct_10': -0.12, 'spend100_save15': -1.05}
>>> choice.reasons
['gift_tote: only for new customers', 'welcome_10: only for new customers', 'coupon_5: best expected incremental margin 0.50']
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from models.catalogue import NONE_ID, Catalogue, OfferSpec
from models.decision import Offer


@dataclass(slots=True)
class DecisionContext:
    """Everything a policy may look at to decide for one user at one moment.

    ``offers_today`` counts offers (any kind but none) the user got in the current UTC day;
    ``last_offer_ms`` maps offer id -> event time of the last time the user got it.
    ``offer_counts_today`` / ``offer_counts_total`` count per offer (for per-offer caps) and
    ``blocked`` maps offer id -> reason for offers the engine already knows are unavailable
    (e.g. budget exhausted); those are filtered before the policy draws, so propensities stay exact.
    """

    user_id: str
    now_ms: int
    cart_value: float
    cart_items: list[str]
    cart_categories: list[str]
    is_new: bool
    n_purchases: int
    segment: int | None
    churn_risk: float
    propensity: float
    features: dict[str, float] = field(default_factory=dict)
    offers_today: int = 0
    last_offer_ms: dict[str, int] = field(default_factory=dict)
    offer_counts_today: dict[str, int] = field(default_factory=dict)
    offer_counts_total: dict[str, int] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict (stored with a pending decision so the policy can learn when it closes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecisionContext":
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})  # type: ignore[attr-defined]


@dataclass(slots=True)
class PolicyChoice:
    """What the policy chose: the offer, the exact probability it had, scores and explanations."""

    offer: Offer
    propensity: float
    scores: dict[str, float]
    group: str
    reasons: list[str]
    model_version: str


@runtime_checkable
class Policy(Protocol):
    model_version: str

    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice: ...

    def learn_one(self, ctx: DecisionContext, offer_id: str, reward: float, converted: bool | None = None) -> None:
        """Outcome of a closed decision: ``reward`` = margin - cost (0 when expired); ``converted`` whether
        the user bought inside the window (default ``reward != 0``)."""


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

    >>> from models.catalogue import load_catalogue
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


class RulePolicy:
    """Eligibility and caps filter, then the eligible offer with the best static expected incremental margin.

    The static response model is the context's purchase ``propensity`` for ``none`` and
    ``propensity + prior_uplift`` of the offer (from the catalogue). ``none`` wins when no offer pays.
    Holdout users always get ``none`` with ``group="holdout"``. Deterministic: propensity is 1.0.
    """

    model_version = "rules-1"

    def __init__(self, catalogue: Catalogue, holdout_pct: float = 5.0, holdout_salt: str = ""):
        self.catalogue = catalogue
        self.holdout_pct = holdout_pct
        self.holdout_salt = holdout_salt

    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice:
        none = self.catalogue[NONE_ID]
        if holdout(ctx.user_id, self.holdout_pct, self.holdout_salt):
            return PolicyChoice(none.to_offer(ctx.now_ms), 1.0, {}, "holdout",
                                [f"holdout: user in the {self.holdout_pct:g}% control group"], self.model_version)
        eligible, reasons = filter_offers(self.catalogue, ctx)
        p0 = _clip01(ctx.propensity)
        scores = {s.offer_id: round(static_score(self.catalogue, s, ctx, p0, _clip01(p0 + s.prior_uplift)), 6)
                  for s in eligible}
        best = max(eligible, key=lambda s: (scores[s.offer_id], s.kind == "none"))
        if best.kind == "none":
            reasons.append("none: no eligible offer pays for its cost" if len(eligible) > 1
                           else "none: no eligible offer")
        else:
            reasons.append(f"{best.offer_id}: best expected incremental margin {scores[best.offer_id]:.2f}")
        return PolicyChoice(best.to_offer(ctx.now_ms), 1.0, scores, "treatment", reasons, self.model_version)

    def learn_one(self, ctx: DecisionContext, offer_id: str, reward: float, converted: bool | None = None) -> None:
        return None
