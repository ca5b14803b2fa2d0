"""The rule policy: eligibility and caps, then the offer with the best static expected incremental margin.

>>> from models.policy.catalogue import load_catalogue
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

import random

from models.policy.base import DecisionContext, Policy, PolicyChoice
from models.policy.catalogue import NONE_ID, Catalogue
from models.policy.eligibility import _clip01, filter_offers, holdout, static_score


class RulePolicy(Policy):
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

    def clone(self) -> "RulePolicy":
        return RulePolicy(self.catalogue, self.holdout_pct, self.holdout_salt)
