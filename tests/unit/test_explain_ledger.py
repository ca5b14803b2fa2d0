"""``promo explain``'s verdicts and ``promo ledger export``'s rows, as pure functions (models/policy/explain.py,
models/policy/ledger.py)."""

from __future__ import annotations

import json

from models.decision import Decision, Offer
from models.evaluation.ope.logged import iter_jsonl
from models.policy.attribution import Closed, OpenDecision
from models.policy.base import DecisionContext
from models.policy.catalogue import load_catalogue
from models.policy.explain import explain_decision, offer_verdicts, top_contributions
from models.policy.ledger import ledger_record, ope_row

CAT = load_catalogue()


def ctx(**kw) -> DecisionContext:
    base = dict(user_id="u1", now_ms=10 * 86_400_000, cart_value=120.0, cart_items=["i1"],
                cart_categories=["shoes"], is_new=False, n_purchases=2, segment=1, churn_risk=0.1, propensity=0.2)
    return DecisionContext(**{**base, **kw})


def test_every_offer_gets_the_engines_own_verdict():
    verdicts = offer_verdicts(CAT, ctx(blocked={"pct_10": "budget exhausted"}))
    assert list(verdicts) == list(CAT.offers) and verdicts["none"] == "eligible"
    assert verdicts["pct_10"] == "budget exhausted"
    assert verdicts["welcome_10"] != "eligible"  # a returning customer
    capped = offer_verdicts(CAT, ctx(offers_today=2))  # the global daily cap of the default catalogue
    assert all(v != "eligible" for o, v in capped.items() if o != "none")
    assert all("offers today" in v for o, v in capped.items() if o != "none")


def test_explanation_marks_the_chosen_offer_with_its_probability_and_budget():
    d = Decision("d1", "u1", 5, "e1", Offer("coupon_5", "coupon", 5.0), propensity=0.4,
                 scores={"none": 0.0, "coupon_5": 1.5})
    budgets = {"coupon_5": {"budget": 2000, "spent": 10.0, "reserved": 5.0, "committed": 5.0, "remaining": 1990.0}}
    out = explain_decision(d.to_dict(), ctx(), CAT, budgets, {"carts": 0.7, "recency": -0.1, "(intercept)": -3.0})
    (chosen,) = [o for o in out["offers"] if o["chosen"]]
    assert chosen["offer_id"] == "coupon_5" and chosen["probability"] == 0.4 and chosen["score"] == 1.5
    assert chosen["budget"]["remaining"] == 1990.0
    assert all(o["probability"] is None for o in out["offers"] if not o["chosen"])
    assert [c["feature"] for c in out["p_buy_contributions"]] == ["carts", "recency", "(intercept)"]
    gone = explain_decision(Decision("d2", "u1", 5, "e2", Offer("old_offer", "coupon")).to_dict(), None, CAT)
    assert gone["offers"][-1]["offer_id"] == "old_offer" and gone["offers"][-1]["verdict"] == "not in the catalogue now"


def test_top_contributions_are_the_largest_by_magnitude_with_the_intercept_last():
    c = {f"f{i}": (-1) ** i * i for i in range(12)} | {"(intercept)": -2.0}
    top = top_contributions(c, n=3)
    assert [x["feature"] for x in top] == ["f11", "f10", "f9", "(intercept)"]


def test_ledger_rows_are_read_by_evaluate_policy(tmp_path):
    rows = []
    for i, (outcome, reward) in enumerate([("converted", 12.0), ("expired", 0.0)]):
        d = OpenDecision(f"d{i}", "u1", "coupon_5", "treatment", ts=1000, expires_ms=9000, propensity=0.5,
                         ctx=ctx(features={"carts": 2.0, "bad": float("nan")}).to_dict())
        rows.append(ope_row(ledger_record(Closed(d, outcome, reward, closed_ms=5000), logged_ms=7)))
    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = list(iter_jsonl(path))
    assert [(r.action, r.propensity, r.reward) for r in logged] == [("coupon_5", 0.5, 12.0), ("coupon_5", 0.5, 0.0)]
    assert logged[0].context["segment"] == "segment_1" and "bad" not in logged[0].context
    assert logged[0].context["is_new"] == 0 and logged[0].context["carts"] == 2.0
