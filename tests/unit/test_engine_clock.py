"""The engine's expiry with an event-time outlier: one event 23 h ahead closes no window early (issue 11, point 4).

In-memory stores and the rules policy (pure logic); the same fault on the real stack is
``tests/integration/test_event_time_outlier.py``.
"""

from __future__ import annotations

import asyncio
import random

from models.policy.attribution import OutcomeStats
from models.policy.budget import BudgetGate
from models.state.budget_memory import MemoryBudgetStore
from models.policy.catalogue import parse_catalogue
from models.clock import EventClock
from models.decision import decision_id_for
from models.engine import Engine
from models.events import Event
from models.policy.rules import RulePolicy
from models.state.engine_memory import MemoryStore

CAT = """
offers:
  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 100000, eligibility: {min_cart_value: 1}}
caps: {max_offers_per_day: 1000, min_gap_s: 0}
"""
MIN = 60_000
H = 60 * MIN
T0 = 1_569_888_000_000  # 2019-10-01, as the REES46 replay
WINDOW_S = 3600


class Wall:
    def __init__(self, ms: int = 1_700_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def engine(store=None, budgets=None, wall=None, **clock_kw) -> Engine:
    cat = parse_catalogue(CAT)
    wall = wall or Wall()
    return Engine(store or MemoryStore(), RulePolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                  budget=BudgetGate(cat, budgets or MemoryBudgetStore(), window_ms=WINDOW_S * 1000),
                  conversions=OutcomeStats(), decision_cooldown_s=0, attribution_window_s=WINDOW_S,
                  clock_ms=wall, event_clock=EventClock(wall_ms=wall, **clock_kw))


def ev(eid, etype, user, ts, partition=None, **kw) -> Event:
    e = Event(eid, etype, user, "i1", ts, price=kw.pop("price", 50.0), **kw)
    e.partition = partition
    return e


def run(coro):
    return asyncio.run(coro)


def stream(n_users: int = 20, minutes: int = 30, start: int = T0, carts: bool = True, tag: str = "") -> list[Event]:
    """Each user views once a minute, in event-time order, and carts (a decision) in the first minute."""
    out = []
    for m in range(minutes):
        for u in range(n_users):
            t = start + m * MIN + u * 1000
            out.append(ev(f"{tag}v{m}-{u}", "view", f"u{u}", t))
            if m == 0 and carts:
                out.append(ev(f"{tag}c{u}", "cart", f"u{u}", t + 500))
    return out


def test_one_event_23h_ahead_expires_nothing_and_a_later_purchase_still_redeems():
    eng = engine()
    run(eng.process_batch(stream()))
    assert len(eng.store.open_until) == 20
    # a device with a wrong clock: one valid view, 23 h ahead of the stream
    run(eng.process_batch([ev("x", "view", "other", T0 + 30 * MIN + 23 * H)]))
    assert eng.watermark_ms < T0 + 30 * MIN
    assert run(eng.sweep()).closed == [] and run(eng.budget.sweep(eng.watermark_ms)) == {"c5": 0}
    assert len(eng.store.open_until) == 20
    # a purchase that quotes its decision, 10 minutes later in the stream, is attributed and charged
    buy = ev("p0", "purchase", "u0", T0 + 40 * MIN, decision_id=decision_id_for("c0"))
    closed = run(eng.process_batch([buy])).closed
    assert [(c.decision.decision_id, c.outcome, c.cost) for c in closed] == [(decision_id_for("c0"), "redeemed", 5.0)]
    assert run(eng.budget.store.spend(["c5"]))["c5"].committed == 5.0


def test_a_users_own_event_23h_ahead_closes_none_of_that_users_decisions():
    eng = engine()
    run(eng.process_batch(stream()))
    res = run(eng.process_batch([ev("x", "view", "u3", T0 + 30 * MIN + 23 * H)]))  # lazy expiry at this event
    assert res.closed == [] and "u3" in eng.store.open_until
    buy = ev("p3", "purchase", "u3", T0 + 31 * MIN, decision_id=decision_id_for("c3"))
    assert [c.outcome for c in run(eng.process_batch([buy])).closed] == ["redeemed"]


def test_a_purchase_timed_after_the_window_does_not_redeem_and_the_sweep_expires_it_in_time():
    eng = engine()
    run(eng.process_batch(stream()))
    late_clock = ev("p1", "purchase", "u1", T0 + 2 * H, decision_id=decision_id_for("c1"))  # after the window
    assert run(eng.process_batch([late_clock])).closed == []
    assert "u1" in eng.store.open_until  # still open: the stream is 30 min in, its window lasts an hour
    # the stream moves past the windows (a partition without these users): the sweep closes them all, expired,
    # and releases their reservations
    others = stream(minutes=40, start=T0 + 80 * MIN, carts=False, tag="later")
    for e in others:
        e.user_id = "o" + e.user_id
    assert run(eng.process_batch(others)).closed == []
    assert eng.watermark_ms >= T0 + 61 * MIN
    closed = run(eng.sweep()).closed
    assert sorted(c.decision.decision_id for c in closed) == sorted(decision_id_for(f"c{u}") for u in range(20))
    assert {c.outcome for c in closed} == {"expired"} and all(c.closed_ms <= eng.watermark_ms for c in closed)
    spend = run(eng.budget.store.spend(["c5"]))["c5"]
    assert spend.reserved == 0 and spend.committed == 0


def test_a_lagging_partition_keeps_its_users_windows_open():
    """Partition 1 is two hours ahead of partition 0: the clock follows partition 0, so a purchase of a partition-0
    user 50 minutes after its decision still converts it."""
    eng = engine()
    p0 = [e for e in stream(n_users=10)]
    for e in p0:
        e.partition = 0
    p1 = stream(n_users=10, start=T0 + 2 * H)
    for e in p1:
        e.user_id, e.partition = "b" + e.user_id, 1
        e.event_id = "b" + e.event_id
    run(eng.process_batch(p0[:40] + p1))
    assert T0 < eng.watermark_ms < T0 + 30 * MIN
    assert run(eng.sweep()).closed == []
    buy = ev("p2", "purchase", "u2", T0 + 50 * MIN, partition=0)
    assert [c.outcome for c in run(eng.process_batch([buy])).closed] == ["converted"]


def test_the_clock_is_shared_through_the_store_and_a_restart_does_not_take_an_outlier_back():
    store, budgets, wall = MemoryStore(), MemoryBudgetStore(), Wall()
    a = engine(store, budgets, wall)
    events = stream()
    for e in events:
        e.partition = int(e.user_id[1:]) % 2
    run(a.process_batch(events))
    outlier = ev("x", "view", "u0", T0 + 30 * MIN + 23 * H, partition=0)
    run(a.process_batch([outlier] * 3))  # the same outlier, redelivered: still one event
    before = run(a.sync_clock())
    assert T0 < before < T0 + 30 * MIN and set(store.clock) == {"0", "1"}
    store.clock["7"] = [T0 + 23 * H, wall.ms]  # and a wrong entry, e.g. from an older version
    b = engine(store, budgets, wall)  # a restarted worker
    b.clock.merge(run(store.sync_clock({})), restored=True)
    assert b.clock.advance() == before  # not the outlier: partition 7's entry is held back by the others
    assert run(b.sweep()).closed == [] and len(store.open_until) == 20


def test_closings_do_not_depend_on_batching_or_partition_interleaving():
    """What closes a decision, and how, is a function of its user's events (and of when the clock passes its window,
    which in-order partitions never make late): two workers that interleave three partitions differently, one far
    behind the others, and cut different batches close the same decisions the same way, an outlier included."""
    rnd = random.Random(5)
    parts: list[list[Event]] = [[], [], []]
    for p in range(3):
        t = T0
        for i in range(300):
            t += rnd.randrange(0, 40_000)
            u = f"p{p}u{rnd.randrange(12)}"
            kind = rnd.choices(["view", "cart", "purchase"], [6, 2, 1])[0]
            extra = {}
            if kind == "purchase" and rnd.random() < 0.5:  # quotes one of the user's earlier decisions, if any
                mine = [e for e in parts[p] if e.user_id == u and e.type == "cart"]
                if mine:
                    extra["decision_id"] = decision_id_for(rnd.choice(mine).event_id)
            ts = t + (23 * H if (p, i) == (1, 150) else 0)  # one event 23 h ahead
            parts[p].append(ev(f"{p}-{i}", kind, u, ts, partition=p, **extra))

    def replay(seed: int, batch: int) -> dict:
        rng = random.Random(seed)
        weights = [rng.random() ** 3 for _ in range(3)]  # some partitions fall far behind the others
        eng = engine(partitions=range(3))  # as the worker's: every partition of the topic holds the clock
        queues = [list(q) for q in parts]
        order = []
        while any(queues):  # partitions interleave at random, each in its own order
            live = [i for i, q in enumerate(queues) if q]
            q = queues[rng.choices(live, [weights[i] for i in live])[0]]
            order += [q.pop(0) for _ in range(min(len(q), rng.randrange(1, 20)))]
        closed = []
        for i in range(0, len(order), batch):
            closed += run(eng.process_batch(order[i:i + batch])).closed
            closed += run(eng.sweep()).closed
        closed += run(eng.sweep(T0 + 48 * H)).closed
        return {c.decision.decision_id: (c.outcome, c.reward, c.revenue, c.cost, c.closed_ms) for c in closed}

    one = replay(1, 1)
    assert {o for o, *_ in one.values()} == {"expired", "converted", "redeemed"}
    assert replay(2, 50) == one
    assert replay(3, 7) == one


def test_the_clock_does_not_move_while_a_batch_is_being_retried():
    """The maintenance timer syncs the clock while a batch waits to retry a transient error. A batch's plans close
    windows by the clock it began with (its first plan may have settled budgets already): the merged watermarks
    move the clock only once the batch is committed."""
    from models.batch import BatchProgress

    class CommitFailsOnce(MemoryStore):
        failed = False

        async def commit(self, commits):
            if not self.failed:
                self.failed = True
                raise ConnectionError("Connection reset by peer")
            return await super().commit(commits)

    wall = Wall()
    store = CommitFailsOnce()
    eng = engine(store, wall=wall)
    batch = [ev(f"v{i}", "view", f"u{i}", T0 + i * MIN, partition=0) for i in range(6)]
    progress = BatchProgress()
    try:
        run(eng.process_batch(batch, progress=progress))
    except ConnectionError:
        pass
    else:
        raise AssertionError("the first commit should have failed")
    began = eng.clock.time_ms
    store.clock["0"] = [T0 + 5 * H, wall.ms]  # partition 0's previous owner published a later watermark
    assert run(eng.sync_clock()) == began == eng.clock.time_ms
    run(eng.process_batch(batch, progress=progress))  # the retry commits the batch
    assert run(eng.sync_clock()) == T0 + 5 * H
