"""Delayed reward attribution: windows open per decision, close on purchase (named or any), expire to 0."""

from __future__ import annotations

import random

import pytest

from models.policy.attribution import AttributionTracker, Closed, OutcomeStats, OpenDecision, Purchase, close_on_purchase, expire, orders_from_events
from models.policy.catalogue import load_catalogue
from models.events import Event

CAT = load_catalogue()
W = 1000


def dec(did, uid="u1", offer="coupon_5", ts=0, group="treatment") -> OpenDecision:
    return OpenDecision(did, uid, offer, group, ts, ts + W, 80.0, 0.5, {"k": 1})


def test_named_purchase_redeems_with_cost_and_other_purchase_converts_free():
    closed, rest = close_on_purchase(CAT, [dec("d1")], Purchase("u1", 10, 100.0, decision_id="d1"))
    c = closed[0]
    assert (c.outcome, c.revenue, c.cost, c.margin, c.reward, c.converted) == ("redeemed", 100.0, 5.0, 25.0, 20.0, True)
    closed, _ = close_on_purchase(CAT, [dec("d1")], Purchase("u1", 10, 100.0))
    assert (closed[0].outcome, closed[0].cost, closed[0].reward) == ("converted", 0.0, 25.0)


def test_below_min_spend_is_not_redeemed():
    closed, _ = close_on_purchase(CAT, [dec("d1")], Purchase("u1", 10, 20.0, decision_id="d1"))
    assert closed[0].outcome == "converted" and closed[0].cost == 0.0  # coupon_5 needs 30


def test_window_bounds_and_other_users():
    d = dec("d1", ts=100)
    for p in (Purchase("u1", 99, 50.0), Purchase("u1", 100 + W, 50.0), Purchase("u2", 150, 50.0)):
        closed, rest = close_on_purchase(CAT, [d], p)
        assert closed == [] and rest == [d]
    closed, _ = close_on_purchase(CAT, [d], Purchase("u1", 100 + W - 1, 50.0))
    assert len(closed) == 1


def test_last_touch_gets_the_revenue_once():
    pending = [dec("old", ts=0), dec("new", ts=500)]
    closed, rest = close_on_purchase(CAT, pending, Purchase("u1", 600, 70.0))
    assert rest == [] and {c.decision.decision_id: c.revenue for c in closed} == {"old": 0.0, "new": 70.0}
    assert all(c.converted for c in closed)
    # a purchase naming a decision gives that one the revenue, even when another decision is more recent
    closed, _ = close_on_purchase(CAT, [dec("a", ts=0), dec("b", ts=500)], Purchase("u1", 600, 70.0, decision_id="a"))
    assert {c.decision.decision_id: (c.outcome, c.revenue) for c in closed} == {
        "a": ("redeemed", 70.0), "b": ("converted", 0.0)}


def test_expiry_closes_with_zero_reward():
    closed, rest = expire([dec("d1", ts=0), dec("d2", ts=500)], now_ms=W)
    assert [(c.decision.decision_id, c.outcome, c.reward, c.closed_ms) for c in closed] == [("d1", "expired", 0.0, W)]
    assert [d.decision_id for d in rest] == ["d2"]


def test_orders_group_lines():
    evs = [Event("1", "purchase", "u", "a", 5, price=3.0, order_id="o"), Event("2", "purchase", "u", "b", 5, price=4.0),
           Event("3", "purchase", "u", "c", 5, price=1.0, order_id="o"), Event("4", "cart", "u", "d", 6, price=9.0)]
    orders = orders_from_events(evs)
    assert [(o.order_id, o.value) for o in orders] == [("o", 4.0), (None, 4.0)]


def test_tracker_matches_pure_functions_on_a_random_stream():
    rnd = random.Random(2)
    t = AttributionTracker(CAT, window_ms=W)
    open_by_id = {}
    closed_ids = []
    now = 0
    for step in range(2000):
        now += rnd.randrange(0, 30)
        closed = t.sweep(now)
        if rnd.random() < 0.5:
            d = dec(f"d{step}", uid=f"u{rnd.randrange(20)}", ts=now)
            d.expires_ms = 0  # the tracker sets ts + window
            t.open(d)
            t.open(dec(f"d{step}", uid=d.user_id, ts=now))  # redelivered: not opened twice
            open_by_id[d.decision_id] = d
        else:
            uid = f"u{rnd.randrange(20)}"
            closed += t.on_purchase(Purchase(uid, now, 50.0))
            assert all(c.decision.user_id == uid and c.converted for c in closed if c.outcome != "expired")
        for c in closed:
            assert c.decision.decision_id not in closed_ids
            closed_ids.append(c.decision.decision_id)
            if c.outcome == "expired":
                assert c.decision.expires_ms <= now
            else:
                assert c.decision.ts <= now < c.decision.expires_ms
    closed_ids += [c.decision.decision_id for c in t.sweep(now + 2 * W)]
    assert sorted(closed_ids) == sorted(open_by_id) and len(t) == 0


def test_outcome_stats_and_their_metrics():
    from stream import metrics as M

    s = OutcomeStats(M.PrometheusSink())
    t = [Closed(dec("a"), "redeemed", 20.0, revenue=100.0, cost=5.0), Closed(dec("b"), "expired", 0.0)]
    h = [Closed(dec("c", offer="none", group="holdout"), "expired", 0.0)] * 3 + [
        Closed(dec("d", offer="none", group="holdout"), "converted", 10.0, revenue=40.0)]
    before = M.REDEMPTIONS.labels("coupon_5", "treatment")._value.get()
    cost_before = M.OFFER_COST.labels("coupon_5")._value.get()
    s.update(t + h)
    assert s.conversion("treatment") == 0.5 and s.conversion("holdout") == 0.25
    assert s.uplift() == pytest.approx(0.25)
    assert M.REDEMPTIONS.labels("coupon_5", "treatment")._value.get() == before + 1
    assert M.OFFER_COST.labels("coupon_5")._value.get() == cost_before + 5.0
    assert M.UPLIFT._value.get() == pytest.approx(0.25)
    assert s.money[("coupon_5", "treatment")] == [100.0, 5.0, 20.0, 1]


def test_hand_written_to_dicts_cover_every_field_and_copy_the_containers():
    """``to_dict`` of a context, an open decision and a decision are written out for speed: a field added to one
    of these dataclasses must be added there too, and the dict must not share a container that may change."""
    from dataclasses import asdict, fields

    from models.policy.attribution import OpenDecision
    from models.policy.base import DecisionContext

    ctx = DecisionContext("u", 5, 10.0, ["i1"], ["c1"], True, 2, 3, 0.4, 0.2, features={"hour": 3.0},
                          offers_today=1, last_offer_ms={"coupon_5": 4}, offer_counts_today={"coupon_5": 1},
                          offer_counts_total={"coupon_5": 2}, blocked={"pct_10": "budget"}, trigger="retention")
    d = ctx.to_dict()
    assert list(d) == [f.name for f in fields(DecisionContext)]
    assert d == asdict(ctx)
    for name in ("cart_items", "cart_categories", "features", "last_offer_ms", "offer_counts_today",
                 "offer_counts_total", "blocked"):
        assert d[name] is not getattr(ctx, name), name
    ctx.features["hour"] = 4.0
    assert d["features"] == {"hour": 3.0}

    open_ = OpenDecision("d1", "u", "coupon_5", "treatment", 5, 9, cart_value=10.0, propensity=0.5, ctx=d)
    od = open_.to_dict()
    assert list(od) == [f.name for f in fields(OpenDecision)]
    assert od == asdict(open_) and od["ctx"] is not d
    assert OpenDecision.from_dict(od) == open_

    from models.decision import Decision, Offer

    dec = Decision("d1", "u", 5, "e1", Offer("coupon_5", "coupon", 5.0, 30.0, 99), items=["i1", "i2"],
                   propensity=0.4, scores={"none": 0.0, "coupon_5": 1.5}, group="holdout", model_version="ts-3",
                   reasons=["why"], latency_ms=3.5, trigger="retention")
    dd = dec.to_dict()
    assert list(dd) == [f.name for f in fields(Decision)]
    assert list(dd["offer"]) == [f.name for f in fields(Offer)]
    assert dd == asdict(dec) and Decision.from_dict(dd) == dec
    for name in ("items", "scores", "reasons"):
        assert dd[name] is not getattr(dec, name), name
