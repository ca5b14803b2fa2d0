"""The engine with the production policy, budgets and attribution, on in-memory stores."""

from __future__ import annotations

import asyncio
import json

from models.policy.attribution import OutcomeStats
from models.policy.base import DecisionContext
from models.policy.thompson import ThompsonPolicy
from models.policy.budget import BudgetGate
from models.state.budget_memory import MemoryBudgetStore
from models.policy.catalogue import parse_catalogue
from models.engine import Engine
from models.events import Event
from models.state.engine_memory import MemoryStore
from tests.helpers import choosing, refusing_first_reservation

CAT = """
offers:
  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 12}
"""
H = 3_600_000


def engine(store=None, budget_store=None, holdout=0.0):
    cat = parse_catalogue(CAT)
    gate = BudgetGate(cat, budget_store or MemoryBudgetStore(), window_ms=24 * H)
    return Engine(store or MemoryStore(), ThompsonPolicy(cat, holdout_pct=holdout, floor=0.2), catalogue=cat,
                  holdout_pct=holdout, budget=gate, conversions=OutcomeStats(), clock_ms=lambda: 0,
                  decision_cooldown_s=0)


def cart(i, user="u1", ts=0, price=50.0):
    return Event(f"c{i}", "cart", user, f"i{i}", ts, price=price)


def run(coro):
    return asyncio.run(coro)


def test_redeemed_purchase_closes_the_decision_and_charges_the_budget_once():
    eng = engine()
    d = run(eng.process_batch([cart(1)])).decisions[0]
    buy = Event("p1", "purchase", "u1", "i1", 10, price=50.0, decision_id=d.decision_id)
    res = run(eng.process_batch([buy, buy]))
    assert [(c.decision.decision_id, c.outcome) for c in res.closed] == [
        (d.decision_id, "redeemed" if d.offer.kind != "none" else "converted")]
    spend = run(eng.budget.store.spend(["c5"]))["c5"]
    assert spend.committed == (5.0 if d.offer.kind != "none" else 0.0) and spend.reserved == 0.0
    assert run(eng.process_batch([buy])).closed == []  # redelivered: nothing closes twice


def test_a_redemption_is_charged_even_when_the_worker_dies_right_after_the_commit():
    """The charge is settled before the commit that closes the decision (as the reservation is made before the
    commit that stores it): a kill between the commit and ``learn`` loses nothing, and the redelivered batch,
    a duplicate, charges nothing twice."""
    store, budgets = MemoryStore(), MemoryBudgetStore()
    eng = engine(store, budgets)
    d = next(d for i in range(40) if (d := run(eng.process_batch([cart(i, user=f"u{i}")])).decisions[0])
             .offer.offer_id == "c5")
    buy = Event("p1", "purchase", d.user_id, "i1", 10, price=50.0, decision_id=d.decision_id)
    res = run(eng.process_batch([buy], learn=False))  # committed; the worker dies before learn()
    assert [c.outcome for c in res.closed] == ["redeemed"]
    restarted = engine(store, budgets)
    assert run(restarted.process_batch([buy])).closed == []  # the redelivery is a duplicate
    spend = run(budgets.spend(["c5"]))["c5"]
    assert spend.committed == 5.0 and spend.reserved == 0.0 and spend.n == 1


def test_the_policy_learns_every_decision_exactly_once_across_a_kill_and_a_redelivery():
    """The posterior updates ride on the users' commits: a worker killed after a commit (before ``learn``) loses
    none of them, the restarted worker reads them back from the store, and the redelivered batch adds nothing."""
    from models.policy.base import DecisionContext

    store = MemoryStore()
    eng = engine(store)
    carts = [cart(i, user=f"u{i}") for i in range(6)]
    decisions = run(eng.process_batch(carts, learn=False)).decisions  # committed; the worker dies before learn()
    assert len(decisions) == 6
    exposure = sum(ThompsonPolicy.exposure(DecisionContext.from_dict(d["ctx"]))
                   for doc in store.profiles.values() for d in json.loads(doc)["open"])
    buys = [Event(f"p{i}", "purchase", d.user_id, "i1", 10, price=50.0, decision_id=d.decision_id)
            for i, d in enumerate(decisions[:4])]
    assert len(run(eng.process_batch(buys, learn=False)).closed) == 4  # committed; the worker dies again

    restarted = engine(store)
    run(restarted.load_policy())
    cells = {k: list(ab) for k, ab in restarted.policy.cells.items()}
    assert restarted.policy.n_learned == 4
    assert restarted.conversions.closed["treatment"] == restarted.conversions.converted["treatment"] == 4
    prior_beta = restarted.policy.prior_strength * len(cells)  # every cell starts at beta = prior_strength
    assert abs(sum(b for _, b in cells.values()) - prior_beta - exposure) < 1e-9, "each exposure counted once"

    assert run(restarted.process_batch(carts + buys)).duplicates == 10  # redelivered: nothing learnt twice
    assert restarted.policy.n_learned == 4 and restarted.policy.cells == cells
    assert restarted.conversions.closed == {"treatment": 4, "holdout": 0}


def test_budget_is_never_exceeded_and_offers_fall_back_to_none():
    eng = engine()
    decisions = [run(eng.process_batch([cart(i, user=f"u{i}")])).decisions[0] for i in range(20)]
    offered = [d for d in decisions if d.offer.offer_id == "c5"]
    assert 1 <= len(offered) <= 2  # budget 12, a coupon may cost 5
    spend = run(eng.budget.store.spend(["c5"]))["c5"]
    assert spend.spent <= 12.0
    blocked = [d for d in decisions[-5:] if any("budget" in r for r in d.reasons)]
    assert blocked, "late decisions must say the budget blocked the offer"


def test_window_expiry_by_the_sweep_closes_with_reward_zero():
    store = MemoryStore()
    eng = engine(store)
    run(eng.process_batch([cart(1)]))
    assert run(store.due_users(24 * H)) == ["u1"]
    res = run(eng.sweep(24 * H))
    assert [(c.outcome, c.reward) for c in res.closed] == [("expired", 0.0)]
    assert run(store.due_users(48 * H)) == []
    assert run(eng.sweep(48 * H)).closed == []


def _sweep_in_chunks_of_10(n_users: int):
    """An engine with ``n_users`` due by ``24 * H``, sweeping 10 users at a time; the list of its passes' sizes."""
    store = MemoryStore()
    eng = engine(store)
    eng.sweep_chunk = 10
    run(eng.process_batch([cart(i, user=f"u{i}") for i in range(n_users)]))
    assert len(run(store.due_users(24 * H))) == n_users
    passes: list[int] = []
    sweep_once = eng._sweep_once

    async def counted(users, *args):
        passes.append(len(users))
        return await sweep_once(users, *args)

    eng._sweep_once = counted
    return eng, store, passes


def test_the_sweep_works_in_chunks_and_lets_the_loop_run_between_them():
    """Planning is synchronous: a sweep over many due users in one go would hold the event loop (and the batches
    waiting in it) for all of them. In chunks of ``sweep_chunk`` users, a task waiting in the loop runs before the
    sweep ends, and every due window still closes once."""
    eng, store, passes = _sweep_in_chunks_of_10(35)

    async def sweep_with_a_waiting_task():
        sweeping = asyncio.ensure_future(eng.sweep(24 * H))
        await asyncio.sleep(0)  # the sweep starts (the memory store never waits)

        async def waiting() -> bool:  # e.g. a batch: runs as soon as the loop gets to it
            return not sweeping.done()

        waited = asyncio.ensure_future(waiting())
        return await sweeping, await waited

    res, ran_during_the_sweep = run(sweep_with_a_waiting_task())
    assert passes == [10, 10, 10, 5]
    assert ran_during_the_sweep
    assert sorted(c.decision.user_id for c in res.closed) == sorted(f"u{i}" for i in range(35))
    assert run(store.due_users(48 * H)) == []


def test_the_sweep_awaits_the_callers_gap_between_its_chunks():
    """The worker passes ``between`` (stream.handler.BatchesFirst.gap): awaited before every chunk but the first."""
    eng, _store, passes = _sweep_in_chunks_of_10(25)
    gaps = []

    async def between():
        gaps.append(len(passes))

    res = run(eng.sweep(24 * H, between=between))
    assert passes == [10, 10, 5] and gaps == [1, 2]  # before the second chunk and before the third
    assert len(res.closed) == 25


def test_purchase_without_decision_id_inside_the_window_converts():
    eng = engine()
    run(eng.process_batch([cart(1)]))
    res = run(eng.process_batch([Event("p1", "purchase", "u1", "i9", 2 * H, price=20.0)]))
    assert [c.outcome for c in res.closed] == ["converted"]


def test_holdout_users_get_no_offer():
    eng = engine(holdout=100.0)
    d = run(eng.process_batch([cart(1)])).decisions[0]
    assert d.group == "holdout" and d.offer.kind == "none"


def test_a_stale_plan_is_refused_and_replanned():
    """Two engines on one store (a rebalance overlap): the second commit is refused, then re-planned."""
    store = MemoryStore()
    a, b = engine(store), engine(store)
    run(a.process_batch([Event("v1", "view", "u1", "i1", 0)]))
    loads = run(store.load({"u1": ["v2"]}, {}))
    run(b.process_batch([Event("v3", "view", "u1", "i3", 1)]))  # changes u1 after a's load
    plan = a.planner.plan_user("u1", [Event("v2", "view", "u1", "i2", 2)], loads["u1"])
    assert run(store.commit([plan.commit])) == [False]
    res = run(a.process_batch([Event("v2", "view", "u1", "i2", 2)]))
    assert res.applied == {"view": 1}
    assert json.loads(store.profiles["u1"])["counts"]["view"] == 3


def test_a_trigger_re_decided_after_a_crash_releases_the_first_reservation():
    """Crash between reserve and commit; the redelivered trigger gets another offer: no budget stays held."""
    from models.policy.rules import RulePolicy

    budget, store = MemoryBudgetStore(), MemoryStore()
    cat = parse_catalogue(CAT)
    first = Engine(store, RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                   budget=BudgetGate(cat, budget, window_ms=24 * H), clock_ms=lambda: 0)
    load = run(store.load({"u1": ["c1"]}, {"u1": ["c1"]}))["u1"]
    plan = first.planner.plan_user("u1", [cart(1)], load, {})
    assert plan.decisions[0].offer.offer_id == "c5"
    run(first.budget.reserve_for([plan]))  # ... and the worker dies before its commit
    assert run(budget.spend(["c5"]))["c5"].reserved == 5.0
    second = engine(store, budget_store=budget, holdout=100.0)  # the restarted worker decides `none` this time
    res = run(second.process_batch([cart(1)]))
    assert res.decisions[0].decision_id == plan.decisions[0].decision_id
    assert res.decisions[0].offer.offer_id == "none"
    assert run(budget.spend(["c5"]))["c5"].reserved == 0.0


def reserved_then_killed() -> tuple[MemoryBudgetStore, MemoryStore]:
    """Stores as a worker left them that reserved c5's budget for u1's cart ``c1`` and died before its commit."""
    from models.policy.rules import RulePolicy

    budget, store = MemoryBudgetStore(), MemoryStore()
    cat = parse_catalogue(CAT)
    first = Engine(store, RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                   budget=BudgetGate(cat, budget, window_ms=24 * H), clock_ms=lambda: 0)
    plan = first.planner.plan_user("u1", [cart(1)], run(store.load({"u1": ["c1"]}, {"u1": ["c1"]}))["u1"], {})
    assert plan.decisions[0].offer.offer_id == "c5"
    run(first.budget.reserve_for([plan]))
    return budget, store


def test_a_stale_reservation_is_released_even_when_the_worker_dies_again_after_the_commit():
    """As above, but the second worker dies after its commit, before releasing: the third one, which gets the
    batch redelivered and re-sends the stored decision, releases it."""
    budget, store = reserved_then_killed()
    second = engine(store, budget_store=budget, holdout=100.0)

    async def dies(decisions):
        raise SystemExit("kill -9 after the commit")

    second._release_stale = dies
    try:
        run(second.process_batch([cart(1)]))
    except SystemExit:
        pass
    assert run(budget.spend(["c5"]))["c5"].reserved == 5.0  # held for an offer the stored decision does not give
    third = engine(store, budget_store=budget, holdout=100.0)
    res = run(third.process_batch([cart(1)]))  # redelivered: a duplicate, its stored decision re-sent
    assert res.duplicates == 1 and [d.offer.offer_id for d in res.resend] == ["none"]
    assert run(budget.spend(["c5"]))["c5"].reserved == 0.0


def test_the_worker_releases_a_stale_reservation_after_delivery_then_marks_the_decision_sent():
    """The worker's path (``learn=False``): the release is not on the decision's critical path; it runs in
    ``delivered``, after the send, and before the mark, so a kill before the mark re-sends and releases again."""
    budget, store = reserved_then_killed()
    second = engine(store, budget_store=budget, holdout=100.0)
    res = run(second.process_batch([cart(1)], learn=False))
    assert [d.offer.offer_id for d in res.decisions] == ["none"]
    assert run(budget.spend(["c5"]))["c5"].reserved == 5.0  # nothing between the commit and the send
    third = engine(store, budget_store=budget, holdout=100.0)  # the second died after sending, before delivered
    again = run(third.process_batch([cart(1)], learn=False))
    assert [d.decision_id for d in again.resend] == [res.decisions[0].decision_id]
    run(third.delivered(again))
    run(third.delivered(again))  # a retry after an exception: nothing twice
    assert run(budget.spend(["c5"]))["c5"].reserved == 0.0
    assert run(engine(store, budget_store=budget).process_batch([cart(1)], learn=False)).resend == []  # marked


def test_sweep_corrects_a_stale_index_entry():
    """An index entry left behind (e.g. a crash between a commit and the index update) does not stay due."""
    store = MemoryStore()
    eng = engine(store)
    run(eng.process_batch([Event("v1", "view", "u1", "i1", 0)]))
    store.open_until["u1"] = 5  # stale: u1 has no open decision
    assert run(store.due_users(24 * H)) == ["u1"]
    assert run(eng.sweep(24 * H)).closed == []
    assert run(store.due_users(48 * H)) == []


def test_a_decision_planned_again_counts_its_exposure_once():
    """A commit refused once (the user changed meanwhile) re-plans the decision: the policy's exposure
    (``beta`` of the chosen cell) grows by one decision's exposure, not two."""
    cat = parse_catalogue(CAT)

    class RefuseOnce(MemoryStore):
        def __init__(self):
            super().__init__()
            self.refused = False

        async def commit(self, commits):
            if not self.refused:
                self.refused = True
                return [False] * len(commits)
            return await super().commit(commits)

    def beta_total(policy):
        return sum(ab[1] for ab in policy.cells.values())

    totals = {}
    for store in (MemoryStore(), RefuseOnce()):
        policy = ThompsonPolicy(cat, holdout_pct=0.0, floor=0.2, defer_exposure=True)
        eng = Engine(store, policy, catalogue=cat, holdout_pct=0.0, clock_ms=lambda: 0)
        before = beta_total(policy)  # cells are created lazily; read after choosing
        res = run(eng.process_batch([cart(1)]))
        assert len(res.decisions) == 1
        totals[type(store).__name__] = beta_total(policy) - before
    assert totals["RefuseOnce"] == totals["MemoryStore"] > 0


def test_a_user_planned_again_after_a_refused_reservation_folds_the_batch_once():
    """A refused budget reservation (another decision took the rest of the budget) makes the user decide again
    from the same load: the second plan starts from the stored profile, so the batch's events are folded once (a
    plan folded them into the loaded profile in place, and the cart counted twice)."""

    folded = {}
    for name, budgets in (("plain", MemoryBudgetStore()), ("refused", refusing_first_reservation())):
        store = MemoryStore()
        cat = parse_catalogue(CAT)
        eng = Engine(store, choosing("c5")(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                     budget=BudgetGate(cat, budgets, window_ms=24 * H), conversions=OutcomeStats(),
                     clock_ms=lambda: 0, decision_cooldown_s=0)
        run(eng.process_batch([Event("v1", "view", "u1", "i0", 0, price=20.0)]))  # a stored profile to load
        batch = [Event("v2", "view", "u1", "i1", 1_000, price=50.0), cart(1, ts=2_000)]
        (d,) = run(eng.process_batch(batch)).decisions
        assert d.offer.offer_id == ("none" if name == "refused" else "c5")
        prof = json.loads(store.profiles["u1"])
        folded[name] = {k: prof[k] for k in ("counts", "cart", "recent_items", "cat_aff",
                                                                 "item_aff", "session_events", "session_carts")}
    assert folded["refused"] == folded["plain"]
    assert folded["refused"]["counts"] == {**folded["refused"]["counts"], "view": 2, "cart": 1}


def test_the_policy_setting_picks_the_policy():
    from models.policy.rules import RulePolicy
    from stream.settings import Settings

    rules = Engine.from_settings(Settings(_env_file=None, policy="rules"), MemoryStore())
    assert isinstance(rules.policy, RulePolicy) and not rules.shares_policy and rules.shares_outcomes
    default = Engine.from_settings(Settings(_env_file=None), MemoryStore())
    assert isinstance(default.policy, ThompsonPolicy) and default.shares_policy and default.shares_outcomes


def test_a_user_refused_in_every_round_decides_without_a_budgeted_offer():
    """Another worker took every campaign's budget after this worker last read the spends. Each reservation the
    user's plan asks for is refused, and the user decides again with that offer blocked; after the last round no
    plan may be committed unreserved: the user decides with every budgeted offer blocked, and no campaign is
    overspent."""
    from models.policy.rules import RulePolicy
    from models.engine import RESERVE_ROUNDS

    cat = parse_catalogue("offers:\n" + "".join(
        f"  - {{offer_id: {o}, kind: coupon, value: 5, prior_uplift: {0.9 - i / 10}, budget: 10}}\n"
        for i, o in enumerate("abcd")))
    assert len(cat.budgets()) > RESERVE_ROUNDS  # more offers than rounds: the last plan would pick a fresh one
    budgets = MemoryBudgetStore()
    other = BudgetGate(cat, budgets)
    for o in "abcd":
        assert run(other.reserve([other.request(f"x-{o}-{k}", o, 100.0, 0) for k in (1, 2)])) == [True, True]
    eng = Engine(MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                 budget=BudgetGate(cat, budgets), clock_ms=lambda: 0, decision_cooldown_s=0)
    (d,) = run(eng.process_batch([Event("e1", "cart", "u1", "i1", 1_000, price=100.0)])).decisions
    assert d.offer.offer_id == "none"
    assert any("budget contended" in r for r in d.reasons), d.reasons
    spent = run(budgets.spend(list("abcd")))
    assert all(s.spent <= 10.0 for s in spent.values()), spent


def test_a_purchase_line_delivered_twice_in_one_batch_counts_once_in_its_order():
    """A producer's retry can put one purchase line twice into a batch. The fold counts the copy as a duplicate,
    and the order the open decision is attributed with holds the line once: the outcome, revenue and cost are those
    of the line delivered once (a threshold offer's minimum spend is not reached by counting the line twice)."""
    from models.policy.rules import RulePolicy

    closed = {}
    for copies in (1, 2):
        cat = parse_catalogue("offers:\n  - {offer_id: t100, kind: threshold, value: 15, min_spend: 100, "
                              "prior_uplift: 0.9}\n")
        eng = Engine(MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                     clock_ms=lambda: 0, decision_cooldown_s=0)
        (d,) = run(eng.process_batch([Event("c1", "cart", "u1", "i1", 1_000, price=60.0)])).decisions
        assert d.offer.offer_id == "t100"
        line = Event("p1", "purchase", "u1", "i1", 2_000, price=60.0, order_id="o1", decision_id=d.decision_id)
        res = run(eng.process_batch([line] * copies))
        assert res.duplicates == copies - 1 and res.applied == {"purchase": 1}
        (c,) = res.closed
        closed[copies] = (c.outcome, c.revenue, c.cost, c.reward)
    assert closed[2] == closed[1] == ("converted", 60.0, 0.0, 15.0)


def test_caps_above_the_twenty_decisions_a_profile_kept_are_enforced():
    """A profile kept the last 20 times of each offer and trigger, and the caps were counted from them, so a cap
    above 20 was never reached: per_user_total 25 gave the offer on 40 days out of 40, per_user_per_day 25 and a
    trigger's max_per_day 25 gave it 30 times on one day. Each now stops at its cap."""
    from models.policy.rules import RulePolicy

    def given(caps: str, trigger_caps: str, days: int, per_day: int) -> int:
        cat = parse_catalogue(f"offers:\n  - {{offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.9{caps}}}\n"
                              f"caps: {{min_gap_s: 0}}\ntriggers:\n  cart: {{cooldown_s: 0{trigger_caps}}}\n")
        eng = Engine(MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                     clock_ms=lambda: 0, decision_cooldown_s=0, trigger_names=["cart"])
        n = 0
        for day in range(days):
            for k in range(per_day):
                e = Event(f"c{day}-{k}", "cart", "u1", f"i{k}", 1_000 + day * 24 * H + k * 1_000, price=50.0)
                n += sum(d.offer.offer_id == "c5" for d in run(eng.process_batch([e])).decisions)
        return n

    assert given(", caps: {per_user_total: 25}", "", days=40, per_day=1) == 25
    assert given(", caps: {per_user_per_day: 25}", "", days=2, per_day=30) == 50
    assert given("", ", max_per_day: 25", days=2, per_day=30) == 50
    assert given("", "", days=1, per_day=30) == 30  # no cap: every cart


def test_an_offer_is_never_said_valid_past_its_attribution_window(caplog):
    """An offer valid 3 days (validity_s) under a 1-day attribution window told the shop it could be redeemed on day
    3, when the redemption would be neither attributed nor charged to its budget (the reservation lapses with the
    window). The decision's expires_at is the window's end, and the engine warns of such a catalogue."""
    from models.policy.rules import RulePolicy

    cat = parse_catalogue("offers:\n  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 100, "
                          "validity_s: 259200}\n  - {offer_id: brief, kind: coupon, value: 1, validity_s: 600}\n")
    with caplog.at_level("WARNING", logger="promo.engine"):
        eng = Engine(MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                     budget=BudgetGate(cat, MemoryBudgetStore(), window_ms=24 * H), attribution_window_s=86_400,
                     clock_ms=lambda: 0, decision_cooldown_s=0)
    (warning,) = [r.getMessage() for r in caplog.records if "valid longer" in r.getMessage()]
    assert "offer(s) c5 are" in warning and "brief" not in warning and "PROMO_ATTRIBUTION_WINDOW_S=86400" in warning
    (d,) = run(eng.process_batch([cart(1, ts=1_000, price=80.0)])).decisions
    assert d.offer.offer_id == "c5" and d.offer.expires_at == 1_000 + 24 * H


def test_a_decision_planned_again_is_counted_once_in_the_budget_left():
    """A user planned again after a refused reservation asks for the same decision's amount again. The gate's view
    of the spend (what blocks offers until its next refresh) is what the store holds after the reservations, not
    the amount asked twice: otherwise the offer looks exhausted early."""
    budgets = refusing_first_reservation()
    cat = parse_catalogue("offers:\n  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 12}\n")
    gate = BudgetGate(cat, budgets, window_ms=24 * H)
    eng = Engine(MemoryStore(), choosing("c5")(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0, budget=gate,
                 clock_ms=lambda: 0, decision_cooldown_s=0)
    (d,) = run(eng.process_batch([cart(1, ts=1_000)])).decisions
    assert budgets.refusals == 1 and d.offer.offer_id == "none"  # refused: decided again, c5 blocked for it
    (d2,) = run(eng.process_batch([cart(2, user="u2", ts=2_000)])).decisions
    assert d2.offer.offer_id == "c5"
    assert gate.local["c5"] == run(budgets.spend(["c5"]))["c5"].spent == 5.0
    assert gate.blocked(DecisionContext("u3", 3_000, 50.0, [], [], False, 0, None, 0.0, 0.1)) == {}  # 7 left
