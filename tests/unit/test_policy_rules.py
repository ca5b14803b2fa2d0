"""Rule policy, eligibility/caps filtering and the deterministic holdout."""

from __future__ import annotations

import random

import pytest

from models.policy.catalogue import load_catalogue, parse_catalogue
from models.policy.base import DecisionContext, Policy
from models.policy.eligibility import filter_offers, holdout
from models.policy.rules import RulePolicy

NOW = 1_700_000_000_000
CAT = parse_catalogue(
    """
margin_rate: 0.3
caps: {max_offers_per_day: 2, min_gap_s: 600}
offers:
  - offer_id: big
    kind: coupon
    value: 20
    min_spend: 50
    prior_uplift: 0.05
  - offer_id: small
    kind: coupon
    value: 2
    prior_uplift: 0.05
    eligibility: {min_cart_value: 10, segments: [1], categories: [shoes]}
    caps: {per_user_per_day: 1, per_user_total: 2, cooldown_s: 3600}
""",
    "t.yaml",
)


def ctx(**kw) -> DecisionContext:
    base = dict(user_id="u1", now_ms=NOW, cart_value=100.0, cart_items=["i"], cart_categories=["shoes.boots"],
                is_new=False, n_purchases=1, segment=1, churn_risk=0.2, propensity=0.3)
    base.update(kw)
    return DecisionContext(**base)


def test_protocol_and_roundtrip():
    p = RulePolicy(CAT, holdout_pct=0)
    assert isinstance(p, Policy)
    c = ctx(last_offer_ms={"small": 5}, features={"f": 1.0})
    assert DecisionContext.from_dict(c.to_dict()) == c


def test_best_static_margin_wins_and_none_when_nothing_pays():
    p = RulePolicy(CAT, holdout_pct=0)
    ch = p.choose(ctx(), random.Random(1))
    # small: 0.35*(30-2) - 0.3*30 = 0.8 ; big: 0.35*(30-20) - 9 < 0
    assert ch.offer.offer_id == "small" and ch.group == "treatment" and ch.propensity == 1.0
    assert ch.scores["small"] == pytest.approx(0.8) and ch.scores["big"] < 0 < ch.scores["small"]
    ch = p.choose(ctx(propensity=0.9), random.Random(1))  # a sure buyer: any discount is lost margin
    assert ch.offer.kind == "none"
    assert ch.reasons[-1] == "none: no eligible offer pays for its cost"


@pytest.mark.parametrize(
    "kw, reason",
    [
        (dict(segment=2), "small: segment 2 not eligible"),
        (dict(cart_categories=["hats"]), "small: no eligible category in cart"),
        (dict(cart_value=5.0), "small: cart 5.00 < min 10"),
        (dict(offer_counts_today={"small": 1}), "small: cap 1/day reached"),
        (dict(offer_counts_total={"small": 2}), "small: cap 2 per user reached"),
        (dict(last_offer_ms={"small": NOW - 1000_000}), "small: cooldown 3600s"),
        (dict(blocked={"small": "budget exhausted"}), "small: budget exhausted"),
    ],
)
def test_each_rule_filters_with_a_reason(kw, reason):
    eligible, reasons = filter_offers(CAT, ctx(**kw))
    assert "small" not in [o.offer_id for o in eligible]
    assert reason in reasons
    ch = RulePolicy(CAT, holdout_pct=0).choose(ctx(**kw), random.Random(0))
    assert ch.offer.offer_id != "small" and reason in ch.reasons


def test_global_caps_leave_only_none():
    for kw in (dict(offers_today=2), dict(last_offer_ms={"big": NOW - 60_000})):
        eligible, reasons = filter_offers(CAT, ctx(**kw))
        assert [o.offer_id for o in eligible] == ["none"]
        assert reasons[0].startswith("all offers: ")


def test_holdout_users_get_none_and_share_matches_setting():
    p = RulePolicy(CAT, holdout_pct=5.0)
    n, held = 10_000, 0
    for i in range(n):
        uid = f"user-{i}"
        if holdout(uid, 5.0):
            held += 1
            ch = p.choose(ctx(user_id=uid), random.Random(i))
            assert ch.offer.kind == "none" and ch.group == "holdout"
    assert abs(held / n * 100 - 5.0) <= 1.0
    # salted hash gives another, equally sized group
    assert sum(holdout(f"user-{i}", 5.0, salt="s2") for i in range(n)) != held


def test_default_catalogue_rule_policy_runs_on_varied_contexts():
    cat = load_catalogue()
    p = RulePolicy(cat, holdout_pct=5.0)
    rng = random.Random(7)
    kinds = set()
    for i in range(2000):
        c = ctx(user_id=f"u{i}", cart_value=rng.uniform(0, 300), is_new=rng.random() < 0.3,
                churn_risk=rng.random(), propensity=rng.uniform(0, 0.4), segment=rng.randrange(4),
                cart_categories=[rng.choice(["electronics.audio", "apparel", ""])])
        ch = p.choose(c, random.Random(i))
        assert ch.offer.offer_id in cat
        ok, _ = filter_offers(cat, c)
        assert ch.offer.offer_id in [o.offer_id for o in ok]
        kinds.add(ch.offer.kind)
    assert {"none", "coupon"} <= kinds
