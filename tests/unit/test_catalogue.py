"""Offer catalogue: the default loads, the cost model, and every invalid input names its line."""

from __future__ import annotations

import re
import textwrap

import pytest

from models.policy.catalogue import DEFAULT_PATH, CatalogueError, load_catalogue, parse_catalogue

GOOD = textwrap.dedent("""\
    version: 1
    margin_rate: 0.2
    caps: {max_offers_per_day: 1, min_gap_s: 60}
    offers:
      - offer_id: c5
        kind: coupon
        value: 5
        min_spend: 20
        eligibility: {segments: [1, 2], churn_risk: [0.2, 0.8]}
        caps: {per_user_per_day: 1, cooldown_s: 10}
        budget: 100
        period: {start: 2020-01-01T00:00:00Z, end: 2020-02-01}
      - offer_id: p10
        kind: percent_off
        value: 10
        max_discount: 30
        margin_rate: 0.4
""")


def test_default_catalogue_has_one_offer_of_each_kind():
    cat = load_catalogue(DEFAULT_PATH)
    assert cat.kinds() == {"none", "coupon", "percent_off", "threshold", "gift"}
    assert cat.offer_ids[0] == "none"
    assert 5 <= len(cat) <= 7
    assert all(o.budget for o in cat if o.kind != "none")


def test_parse_values_and_defaults():
    cat = parse_catalogue(GOOD, "x.yaml")
    c5, p10 = cat["c5"], cat["p10"]
    assert c5.margin_rate == 0.2 and p10.margin_rate == 0.4
    assert c5.eligibility.segments == frozenset({1, 2})
    assert c5.eligibility.churn_risk == (0.2, 0.8)
    assert c5.caps.per_user_per_day == 1 and c5.caps.cooldown_s == 10
    assert c5.start_ms == 1577836800000 and c5.end_ms == 1580515200000
    assert cat.caps.max_offers_per_day == 1 and cat.caps.min_gap_s == 60
    assert c5.line == 5 and p10.line == 13
    assert cat.budgets() == {"c5": 100}


def test_cost_model():
    cat = parse_catalogue(GOOD, "x.yaml")
    assert cat["c5"].cost(19.99) == 0.0  # below min_spend: not redeemable
    assert cat["c5"].cost(20.0) == 5.0
    assert cat["p10"].cost(100.0) == 10.0
    assert cat["p10"].cost(1000.0) == 30.0  # capped by max_discount
    assert cat["p10"].max_cost(1000.0) == 30.0
    assert cat["c5"].basket(10.0) == 20.0  # the user tops up to min_spend to redeem
    default = load_catalogue()
    gift = default["gift_tote"]
    assert gift.cost(50.0) == gift.params["gift_cost"] == gift.max_cost(50.0)


def test_to_offer_sets_expiry():
    cat = parse_catalogue(GOOD, "x.yaml")
    o = cat["c5"].to_offer(1000)
    assert (o.offer_id, o.kind, o.value, o.min_spend, o.expires_at) == ("c5", "coupon", 5.0, 20.0, 1000 + 86400_000)
    assert cat["none"].to_offer(1000).expires_at is None


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        (_replace("kind: coupon", "kind: voucher"), 6, "kind 'voucher' is not one of"),
        (_replace("value: 5\n", "value: -5\n"), 7, "value must be > 0"),
        (_replace("value: 10", "value: 120"), 15, "value must be <= 100"),
        (_replace("    max_discount: 30\n", ""), 13, "percent_off needs max_discount"),
        (_replace("budget: 100", "budgett: 100"), 11, "unknown key 'budgett'"),
        (_replace("churn_risk: [0.2, 0.8]", "churn_risk: [0.9, 0.1]"), 9, "churn_risk must be [lo, hi]"),
        (_replace("segments: [1, 2]", "segments: gold"), 9, "segments must be a list"),
        (_replace("end: 2020-02-01", "end: 2019-02-01"), 12, "period end must be after its start"),
        (_replace("start: 2020-01-01T00:00:00Z", "start: yesterday"), 12, "cannot parse time 'yesterday'"),
        (_replace("offer_id: p10", "offer_id: c5"), 13, "defined twice (first at line 5)"),
        (_replace("offer_id: p10", "offer_id: none"), 13, "'none' is built in"),
        (_replace("margin_rate: 0.2", "margin_rate: 2"), 2, "margin_rate must be <= 1"),
        (_replace("version: 1", "version: 7"), 1, "unsupported catalogue version 7"),
        (_replace("cooldown_s: 10", "cooldown_s: 1.5"), 10, "must be an integer"),
        (_replace("value: 5\n", "value: [5\n"), 8, "invalid YAML"),
        ("offers: {}\n", 1, "'offers' must be a list"),
        ("", 1, "empty"),
        ("version: 1\n", 1, "no 'offers'"),
    ],
)
def test_errors_name_file_and_line(text, line, fragment):
    with pytest.raises(CatalogueError) as info:
        parse_catalogue(text, "shop.yaml")
    msg = str(info.value)
    assert msg.startswith(f"shop.yaml:{line}: "), msg
    assert fragment in msg, msg


def test_threshold_and_gift_need_their_fields():
    base = "offers:\n  - offer_id: t\n    kind: threshold\n    value: 15\n    min_spend: 10\n"
    with pytest.raises(CatalogueError, match=r"^t.yaml:2: offer t: a threshold offer needs min_spend greater"):
        parse_catalogue(base, "t.yaml")
    gift = "offers:\n  - offer_id: g\n    kind: gift\n    value: 15\n"
    with pytest.raises(CatalogueError, match=r"^g.yaml:2: offer g: gift needs gift_cost"):
        parse_catalogue(gift, "g.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(CatalogueError, match="catalogue file not found"):
        load_catalogue(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("offers:\n  - offer_id: a\n    kind: coupon\n")
    with pytest.raises(CatalogueError, match=rf"^{p}:2: offer a: missing value"):
        load_catalogue(p)


def test_free_shipping_is_a_kind_of_its_own_module():
    """The offer-kind seam: free_shipping lives in models/policy/offers/free_shipping.py only; the catalogue parses
    it, budgets reserve its shipping cost, decisions carry it and validate against the decision schema."""
    import asyncio
    import json
    from pathlib import Path

    from jsonschema import Draft202012Validator

    from models.decision import Decision
    from models.policy.budget import BudgetGate
    from models.state.budget_memory import MemoryBudgetStore

    cat = parse_catalogue("offers:\n  - {offer_id: ship, kind: free_shipping, value: 6.9, min_spend: 40,\n"
                          "     shipping_cost: 4.5, budget: 9}\n", "s.yaml")
    ship = cat["ship"]
    assert (ship.cost(39.0), ship.cost(40.0), ship.max_cost(10.0), ship.basket(25.0)) == (0.0, 4.5, 4.5, 40.0)
    gate = BudgetGate(cat, MemoryBudgetStore())
    asyncio.run(gate.refresh(0))
    reqs = [gate.request(f"d{i}", "ship", 45.0, 0) for i in range(3)]
    assert [r.amount for r in reqs] == [4.5, 4.5, 4.5]
    assert asyncio.run(gate.reserve(reqs)) == [True, True, False]  # 9 of budget: two reservations
    offer = ship.to_offer(0)
    schema = json.loads((Path(__file__).resolve().parents[2] / "stream/schemas/decision.v1.json").read_text())
    doc = Decision("d1", "u1", 0, "e1", offer, propensity=0.5).to_dict()
    Draft202012Validator(schema).validate(doc)
    assert doc["offer"]["kind"] == "free_shipping"
    with pytest.raises(CatalogueError, match=r"^s.yaml:2: offer ship: free_shipping needs shipping_cost"):
        parse_catalogue("offers:\n  - {offer_id: ship, kind: free_shipping, value: 6.9}\n", "s.yaml")
    with pytest.raises(CatalogueError, match=r"shipping_cost only applies to free_shipping"):
        parse_catalogue("offers:\n  - {offer_id: c, kind: coupon, value: 5, shipping_cost: 3}\n", "s.yaml")


def test_catalogue_check_command_reports_the_offers_or_one_line_with_file_and_line(tmp_path):
    """``promo catalogue check FILE``: the worker's own validation, as a command."""
    import json

    from click.testing import CliRunner

    from stream.cli import cli

    good = tmp_path / "good.yaml"
    good.write_text("offers:\n  - {offer_id: c5, kind: coupon, value: 5, budget: 100}\n")
    res = CliRunner().invoke(cli, ["catalogue", "check", str(good), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ok"] and rep["offers"] == {"none": "none", "c5": "coupon"} and rep["budgets"] == {"c5": 100}
    assert len(rep["version"]) == 12

    bad = tmp_path / "bad.yaml"
    bad.write_text("offers:\n  - {offer_id: c5, kind: coupon, value: 5}\n  - {offer_id: c6, kind: coupon, value: -1}\n")
    res = CliRunner().invoke(cli, ["catalogue", "check", str(bad), "--json"])
    assert res.exit_code == 2
    assert res.output.strip() == f"promo: error: {bad}:3: offer c6: value must be > 0, got -1"


@pytest.mark.parametrize("text, what", [
    ("caps: {max_offers_per_day: 1001}\noffers: [{offer_id: a, kind: coupon, value: 5}]", "caps.max_offers_per_day"),
    ("offers:\n  - {offer_id: a, kind: coupon, value: 5, caps: {per_user_per_day: 5000}}", "caps.per_user_per_day"),
    ("offers: [{offer_id: a, kind: coupon, value: 5}]\ntriggers: {cart: {max_per_day: 1001}}",
     "triggers.cart.max_per_day"),
])
def test_a_daily_cap_the_profile_cannot_count_is_refused(text, what):
    """Daily caps are counted from the decisions of the day a profile keeps (at most Profile.DAY_LOG_MAX per offer
    and per trigger): a larger cap would silently never be enforced, so the catalogue refuses it."""
    with pytest.raises(CatalogueError, match=rf"{what} must be <= 1000 \(a user's profile keeps at most 1000"):
        parse_catalogue(text, "c.yaml")
    parse_catalogue(text.replace("1001", "1000").replace("5000", "1000"), "c.yaml")  # the bound itself is fine


@pytest.mark.parametrize("text, fragment", [
    ("offers:\n  - {offer_id: a, kind: coupon, value: 5, period: {start: 1700000000}}",
     "period.start: 1700000000 looks like epoch seconds; give epoch milliseconds (1700000000000)"),
    ("offers: [{offer_id: a, kind: coupon, value: 5}]\ntriggers: {retention: {min_churn_risk: 1.5}}",
     "triggers.retention.min_churn_risk must be <= 1"),
])
def test_values_that_validate_but_would_silently_do_nothing_are_refused(text, fragment):
    """Epoch seconds in a period were read as milliseconds (a campaign of January 1970, never running), and a
    retention trigger needing a churn risk above 1 never fired: both are refused, with the line."""
    with pytest.raises(CatalogueError, match=re.escape(fragment)):
        parse_catalogue(text, "c.yaml")
