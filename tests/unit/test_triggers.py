"""Triggers beyond the cart (issue 14): configuration, the four new moments, and the timer's guarantees.

In-memory stores and the rules policy (pure logic). The same on the real stack: ``tests/integration/
test_triggers_replay.py`` (every kind on the public slices) and the crash tests (a timer-fired decision inside a
kill window).
"""

from __future__ import annotations

import asyncio

import pytest

from models.clock import EventClock
from models.decision import decision_id_for
from models.engine import Engine
from models.events import Event
from models.policy.attribution import OutcomeStats
from models.policy.budget import BudgetGate
from models.policy.catalogue import CatalogueError, parse_catalogue
from models.policy.rules import RulePolicy
from models.profile import DAY_MS
from models.state.budget_memory import MemoryBudgetStore
from models.state.engine_memory import MemoryStore
from models.triggers import TRIGGERS, build_triggers, trigger_names
from models.triggers.base import timer_trigger_id
from tests.helpers import refusing_first_reservation

CAT = """
offers:
  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 100000, eligibility: {min_cart_value: 1}}
  - {offer_id: back10, kind: percent_off, value: 10, max_discount: 20, prior_uplift: 0.5, budget: 100000}
  - {offer_id: next5, kind: coupon, value: 5, min_spend: 20, prior_uplift: 0.5}
caps: {max_offers_per_day: 1000, min_gap_s: 0}
triggers:
  cart: {cooldown_s: 0}
  post_purchase: {offers: [next5], cooldown_s: 0}
  retention: {offers: [back10], min_churn_risk: 0.6}
  cart_abandonment: {offers: [c5], idle_s: 3600}
  browse_abandonment: {offers: [back10], min_views: 3, idle_s: 1800}
"""
MIN = 60_000
H = 60 * MIN
T0 = 1_569_888_000_000


class Wall:
    def __init__(self, ms: int = 1_700_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def engine(store=None, names=None, cat_text: str = CAT, budgets=None, wall=None) -> Engine:
    cat = parse_catalogue(cat_text)
    wall = wall or Wall()
    return Engine(store or MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                  budget=BudgetGate(cat, budgets or MemoryBudgetStore(), window_ms=DAY_MS),
                  conversions=OutcomeStats(), attribution_window_s=86_400, clock_ms=wall,
                  event_clock=EventClock(wall_ms=wall), trigger_names=names if names is not None else [])


def ev(eid, etype, user, ts, item="i1", partition=None, **kw) -> Event:
    e = Event(eid, etype, user, item, ts, price=kw.pop("price", 50.0), **kw)
    e.partition = partition
    return e


def run(coro):
    return asyncio.run(coro)


def deliver(eng: Engine, result) -> None:
    """What the worker does with a batch's or a sweep's decisions once they are on the broker."""
    run(eng.delivered(result))


# --- configuration ---------------------------------------------------------------------------------------------
def test_the_catalogue_configures_each_trigger_and_only_cart_is_on_by_default():
    cat = parse_catalogue(CAT)
    assert trigger_names(cat) == ["cart", "post_purchase", "retention", "cart_abandonment", "browse_abandonment"]
    triggers = {t.name: t for t in build_triggers(cat, None, 99_000)}
    assert triggers["cart"].cooldown_ms == 0  # the catalogue's cooldown wins over PROMO_DECISION_COOLDOWN_S
    assert triggers["browse_abandonment"].min_views == 3 and triggers["browse_abandonment"].idle_s == 1800
    assert triggers["retention"].offers == frozenset({"back10"})
    plain = parse_catalogue(CAT.split("triggers:")[0])
    assert trigger_names(plain) == ["cart"]
    assert [t.cooldown_ms for t in build_triggers(plain, None, 99_000)] == [99_000]
    assert trigger_names(cat, ["cart_abandonment"]) == ["cart_abandonment"]  # PROMO_TRIGGERS decides when set
    off = parse_catalogue(CAT.replace("cart: {cooldown_s: 0}", "cart: {enabled: false}"))
    assert "cart" not in trigger_names(off)


@pytest.mark.parametrize("bad, message", [
    ("  gossip: {}", "triggers: unknown key 'gossip'"),
    ("  retention: {offers: [nope]}", "triggers.retention.offers: no offer 'nope'"),
    ("  browse_abandonment: {min_views: 0}", "triggers.browse_abandonment.min_views must be >= 1"),
    ("  browse_abandonment: {min_views: 2.5}", "triggers.browse_abandonment.min_views must be an integer"),
    ("  cart_abandonment: {min_views: 3}", "triggers.cart_abandonment: unknown key 'min_views'"),
    ("  cart: {enabled: maybe}", "triggers.cart.enabled must be true or false"),
])
def test_a_bad_trigger_section_names_the_line(bad, message):
    text = CAT.split("triggers:")[0] + "triggers:\n" + bad + "\n"
    with pytest.raises(CatalogueError) as exc:
        parse_catalogue(text, "shop.yaml")
    assert str(exc.value).startswith(f"shop.yaml:{text.count(chr(10))}: ") and message in str(exc.value)


def test_every_trigger_is_registered_and_checks_its_settings():
    assert set(TRIGGERS) == {"cart", "post_purchase", "retention", "cart_abandonment", "browse_abandonment"}
    with pytest.raises(ValueError, match="has no setting"):
        TRIGGERS["cart"](idle_s=5)
    with pytest.raises(ValueError, match="cooldown_ms must be >= 0"):
        TRIGGERS["retention"](cooldown_ms=-1)


# --- timers ----------------------------------------------------------------------------------------------------
def test_cart_abandonment_fires_once_from_the_sweep_and_leaves_the_index_once_delivered():
    eng = engine(names=["cart_abandonment"])
    res = run(eng.process_batch([ev("c1", "cart", "u1", T0), ev("v1", "view", "u1", T0 + 10 * MIN, item="i2")]))
    assert res.decisions == []  # the cart trigger is off: only the timer
    store = eng.store
    assert run(store.due_users(T0 + H - 1)) == [] and run(store.due_users(T0 + H)) == ["u1"]
    swept = run(eng.sweep(T0 + H))
    (d,) = swept.decisions
    tid = timer_trigger_id("cart_abandonment", "c1")
    assert (d.trigger, d.trigger_event_id, d.decision_id) == ("cart_abandonment", tid, decision_id_for(tid))
    assert d.offer.offer_id in ("c5", "none") and "i1" not in d.items
    assert tid in eng.inflight
    assert run(eng.sweep(T0 + 2 * H)).to_send() == []  # being sent by this process: not sent twice
    deliver(eng, swept)
    assert tid not in eng.inflight
    again = run(eng.sweep(T0 + 2 * H))  # sees it delivered: the fired record goes
    assert again.to_send() == [] and run(store.due_users(T0 + 2 * H)) == []
    assert run(store.due_users(T0 + H + DAY_MS)) == ["u1"]  # until its attribution window closes
    assert run(eng.sweep(T0 + 3 * H)).to_send() == []


def test_a_purchase_or_an_emptied_cart_cancels_cart_abandonment():
    eng = engine(names=["cart_abandonment"])
    run(eng.process_batch([ev("c1", "cart", "u1", T0), ev("p1", "purchase", "u1", T0 + MIN)]))
    run(eng.process_batch([ev("c2", "cart", "u2", T0, item="i9"), ev("r2", "remove_from_cart", "u2", T0 + MIN,
                                                                      item="i9")]))
    assert run(eng.sweep(T0 + 5 * H)).to_send() == []
    assert run(eng.store.due_users(T0 + 30 * DAY_MS)) == []


def test_a_crash_between_commit_and_send_sends_the_same_decision_again():
    store, wall = MemoryStore(), Wall()
    first = engine(store, names=["cart_abandonment"], wall=wall)
    run(first.process_batch([ev("c1", "cart", "u1", T0)]))
    lost = run(first.sweep(T0 + H)).decisions  # committed, then the worker died before sending
    assert len(lost) == 1
    second = engine(store, names=["cart_abandonment"], wall=wall)  # a new process: nothing in flight
    assert run(second.sweep(T0 + H)).to_send() == []  # decided just now: it may still be on its way
    wall.ms += 30_000
    again = run(second.sweep(T0 + H))
    assert again.decisions == [] and [d.to_json() for d in again.resend] == [d.to_json() for d in lost]
    deliver(second, again)
    assert run(second.sweep(T0 + 2 * H)).to_send() == [] and run(store.due_users(T0 + 2 * H)) == []


def test_only_the_owner_of_the_users_partition_fires_the_timer():
    eng = engine(names=["cart_abandonment"])
    run(eng.process_batch([ev("c1", "cart", "u1", T0, partition=3)]))
    assert run(eng.sweep(T0 + H, owned={0, 1})).to_send() == []
    assert run(eng.store.due_users(T0 + H)) == ["u1"]  # still due: its owner has not swept yet
    (d,) = run(eng.sweep(T0 + H, owned={3})).decisions
    assert d.trigger == "cart_abandonment"


def test_browse_abandonment_needs_enough_views_and_no_cart():
    eng = engine(names=["browse_abandonment"])
    views = [ev(f"v{i}", "view", "u1", T0 + i * MIN, item=f"i{i}") for i in range(3)]
    few = [ev(f"w{i}", "view", "u2", T0 + i * MIN, item=f"i{i}") for i in range(2)]
    carted = [ev(f"x{i}", "view", "u3", T0 + i * MIN, item=f"i{i}") for i in range(3)]
    carted.append(ev("xc", "cart", "u3", T0 + 4 * MIN))
    run(eng.process_batch(views + few + carted))
    swept = run(eng.sweep(T0 + 2 * MIN + 1800_000))
    assert [(d.user_id, d.trigger_event_id) for d in swept.decisions] == [
        ("u1", timer_trigger_id("browse_abandonment", "v2"))]
    assert swept.decisions[0].offer.offer_id in ("back10", "none")


def test_a_due_timer_fires_before_the_users_next_event_whether_or_not_the_sweep_ran():
    """The same decision (id and content) when the sweep fires it as when the user's next, later event does."""
    evs = [ev("c1", "cart", "u1", T0), ev("v9", "view", "u1", T0 + 2 * H, item="i2")]
    swept = engine(names=["cart_abandonment"])
    run(swept.process_batch(evs[:1]))
    by_sweep = run(swept.sweep(T0 + H + MIN)).decisions
    lazy = engine(names=["cart_abandonment"])
    run(lazy.process_batch(evs[:1]))
    by_event = run(lazy.process_batch(evs[1:])).decisions  # no sweep ran: the view comes after the timer was due
    assert len(by_sweep) == len(by_event) == 1
    assert by_sweep[0].to_json() == by_event[0].to_json()
    assert run(lazy.sweep(T0 + 3 * H)).decisions == []  # fired once


# --- event triggers ----------------------------------------------------------------------------------------------
def test_post_purchase_decides_once_per_order_with_complementary_items_and_its_offers():
    eng = engine(names=["post_purchase"])
    order = [ev("p1", "purchase", "u1", T0, item="i1", order_id="o1"),
             ev("p2", "purchase", "u1", T0, item="i2", order_id="o1")]
    res = run(eng.process_batch([ev("v0", "view", "u1", T0 - MIN, item="i7")] + order))
    (d,) = res.decisions
    assert (d.trigger, d.trigger_event_id) == ("post_purchase", "p1")
    assert d.offer.offer_id in ("next5", "none") and "i1" not in d.items


@pytest.mark.parametrize("order_id", ["o1", None])
def test_a_post_purchase_decision_is_not_credited_with_the_order_it_followed(order_id):
    """An order's lines may reach the engine in two batches (a batch boundary between them). The post-purchase
    decision made at the first line followed that order: the second line closes nothing (it would have counted the
    order as the decision's conversion); the user's next order does. Without order ids, lines at one time are one
    order."""
    eng = engine(names=["post_purchase"])
    (d,) = run(eng.process_batch([ev("p1", "purchase", "u1", T0, item="i1", order_id=order_id)])).decisions
    assert d.trigger == "post_purchase"
    second_line = run(eng.process_batch([ev("p2", "purchase", "u1", T0, item="i2", order_id=order_id)]))
    assert second_line.closed == [] and second_line.decisions == []
    nxt = run(eng.process_batch([ev("p3", "purchase", "u1", T0 + H, item="i3", order_id=order_id and "o2")]))
    assert [(c.decision.decision_id, c.outcome) for c in nxt.closed] == [(d.decision_id, "converted")]


def test_retention_fires_at_a_customers_return_after_a_long_absence_with_retention_offers_only():
    eng = engine(names=["retention"])
    run(eng.process_batch([ev("p1", "purchase", "u1", T0, order_id="o1"), ev("p2", "purchase", "u2", T0)]))
    res = run(eng.process_batch([ev("v1", "view", "u1", T0 + 60 * DAY_MS), ev("v2", "view", "u2", T0 + DAY_MS)]))
    assert [(d.user_id, d.trigger) for d in res.decisions] == [("u1", "retention")]
    assert res.decisions[0].offer.offer_id in ("back10", "none")
    nxt = run(eng.process_batch([ev("v3", "view", "u1", T0 + 60 * DAY_MS + MIN)]))
    assert nxt.decisions == []  # the same session: one decision at the return


def test_offers_not_listed_for_a_trigger_are_never_given_there():
    """Across many users, the cart abandonment decisions give only c5 (or none), never back10 or next5."""
    eng = engine(names=["cart_abandonment"])
    run(eng.process_batch([ev(f"c{u}", "cart", f"u{u}", T0 + u) for u in range(200)]))
    offers = {d.offer.offer_id for d in run(eng.sweep(T0 + 2 * H)).decisions}
    assert offers and offers <= {"c5", "none"}


def test_a_sweep_decides_again_from_the_stored_profile_when_a_reservation_is_refused():
    """A timer's decision planned again in the sweep (another worker took the budget meanwhile) starts from the
    stored profile, not from the one the first plan changed: the timer already fired there, so the decision was
    lost."""

    budgets = refusing_first_reservation()
    eng = engine(names=["cart_abandonment"], budgets=budgets)
    run(eng.process_batch([ev("c1", "cart", "u1", T0)]))
    swept = run(eng.sweep(T0 + H))
    assert budgets.refusals == 1
    (d,) = swept.decisions  # decided again, with the refused offer blocked
    assert d.trigger_event_id == timer_trigger_id("cart_abandonment", "c1") and d.offer.offer_id == "none"
    deliver(eng, swept)
    assert run(eng.sweep(T0 + 2 * H)).to_send() == []  # fired once


def test_a_timer_decision_is_charged_once_even_when_a_crash_makes_it_sent_again():
    budgets, store, wall = MemoryBudgetStore(), MemoryStore(), Wall()
    eng = engine(store, names=["cart_abandonment"], budgets=budgets, wall=wall)
    run(eng.process_batch([ev(f"c{u}", "cart", f"u{u}", T0 + u) for u in range(20)]))
    swept = run(eng.sweep(T0 + 2 * H))  # committed; the worker dies before sending
    given = sorted(d.decision_id for d in swept.decisions if d.offer.offer_id == "c5")
    assert given
    restarted = engine(store, names=["cart_abandonment"], budgets=budgets, wall=wall)
    wall.ms += 60_000
    again = run(restarted.sweep(T0 + 2 * H))
    assert sorted(d.decision_id for d in again.resend if d.offer.offer_id == "c5") == given and not again.decisions
    deliver(restarted, again)
    run(restarted.sweep(T0 + 3 * H))
    assert sorted(budgets._res["c5"]) == given and budgets.spend_one("c5").n == len(given)
