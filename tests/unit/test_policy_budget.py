"""The budget gate and pacing (the budget stores' contract is in tests/contracts/)."""

from __future__ import annotations

import asyncio
import random


from models.policy.budget import BudgetGate
from models.state.budget_memory import MemoryBudgetStore
from models.state.budget_store import ReserveRequest
from models.policy.catalogue import parse_catalogue
from models.policy.pacing import BudgetPacer, PacingController
from models.policy.base import DecisionContext


def req(did: str, amount: float = 5.0, budget: float = 20.0, offer: str = "c", open_until: int = 1000,
        forget_at: int = 10_000) -> ReserveRequest:
    return ReserveRequest(offer, did, amount, budget, open_until, forget_at)


CAT = parse_catalogue(
    """
offers:
  - {offer_id: c, kind: coupon, value: 5, budget: 12, period: {start: 0, end: 100000}}
  - {offer_id: p, kind: percent_off, value: 10, max_discount: 8, budget: 100}
  - {offer_id: free, kind: coupon, value: 1}
""",
    "t.yaml",
)


def ctx(cart=50.0) -> DecisionContext:
    return DecisionContext("u", 10, cart, [], [], False, 0, None, 0.0, 0.1)


def test_gate_blocks_reserves_and_settles():
    store = MemoryBudgetStore()
    gate = BudgetGate(CAT, store, window_ms=100, pacing=PacingController(CAT))
    asyncio.run(gate.refresh(10))
    assert gate.blocked(ctx()) == {}
    assert gate.request("d0", "free", 50.0, 10) is None and gate.request("d0", "none", 50.0, 10) is None
    reqs = [gate.request("d1", "c", 50.0, 10), gate.request("d2", "c", 50.0, 10), gate.request("d3", "p", 50.0, 10)]
    assert reqs[2].amount == 8.0  # percent_off reserves its max_discount
    assert gate.blocked(ctx()) == {"c": "budget exhausted (2.00 of 12 left)"}
    assert asyncio.run(gate.reserve(reqs)) == [True, True, True]
    assert asyncio.run(gate.settle([("free", "d0", 1.0), ("c", "d1", 5.0), ("p", "d3", 3.0)])) == [None, 5.0, 3.0]
    spends = asyncio.run(gate.refresh(20))
    assert spends["c"].committed == 5.0 and spends["p"].spent == 3.0
    assert gate.remaining() == {"c": 2.0, "p": 97.0}
    assert gate.pacing.price("c") > 0  # 5 of 12 committed at 0.02 % of the period: far ahead of schedule


def test_gate_exports_metrics_and_paces_on_committed_spend():
    from stream import metrics as M

    store = MemoryBudgetStore()
    gate = BudgetGate(CAT, store, pacing=PacingController(CAT), metrics=M.PrometheusSink())
    asyncio.run(gate.refresh(0))
    refused_before = M.BUDGET_REFUSED.labels("c")._value.get()
    assert asyncio.run(gate.reserve([gate.request("d1", "c", 50, 0), gate.request("d2", "c", 50, 0),
                                     gate.request("d3", "c", 50, 0)])) == [True, True, False]
    asyncio.run(gate.refresh(10))
    assert M.BUDGET_SPENT.labels("c")._value.get() == 10.0
    assert M.BUDGET_REMAINING.labels("c")._value.get() == 2.0
    assert M.BUDGET_REFUSED.labels("c")._value.get() == refused_before + 1
    assert gate.pacing.price("c") == 0.0  # only reservations so far: nothing committed, no pacing pressure
    asyncio.run(store.settle([("c", "d1", 5.0), ("c", "d2", 5.0)]))
    asyncio.run(gate.refresh(20))
    assert gate.pacing.price("c") > 0 and M.PACING_PRICE.labels("c")._value.get() == gate.pacing.price("c")


def test_gate_refused_reservation_updates_local_view():
    store = MemoryBudgetStore()
    other = BudgetGate(CAT, store)
    asyncio.run(other.refresh(0))
    asyncio.run(other.reserve([other.request("x1", "c", 50, 0), other.request("x2", "c", 50, 0)]))
    gate = BudgetGate(CAT, store)
    gate.local = {"c": 0.0, "p": 0.0}  # stale view: thinks the budget is untouched
    assert asyncio.run(gate.reserve([gate.request("d1", "c", 50, 0)])) == [False]
    assert "c" in gate.blocked(ctx())


def test_pacer_tracks_schedule():
    """Simulated steady demand twice what the schedule allows: the paced spend follows the schedule."""
    budget, T = 1000.0, 100_000
    pacer = BudgetPacer(budget, 0, T)
    rnd = random.Random(1)
    spent = 0.0
    checkpoints = {}
    for t in range(0, T, 10):
        price = pacer.update(t, spent)
        # demand: 0.3 users per step could take an offer of cost 1 worth a value in [0, 1.5] to them; a user
        # takes it when its value exceeds the priced cost (1 + price): 2000 takers at price 0 for a budget of 1000
        for _ in range(3):
            if rnd.random() < 0.1 and rnd.uniform(0, 1.5) > 1.0 + price and spent + 1 <= budget:
                spent += 1
        if t in (25_000, 50_000, 75_000):
            checkpoints[t] = spent
    for t, s in checkpoints.items():
        assert abs(s - budget * t / T) < 0.1 * budget, (t, s)
    assert spent > 0.9 * budget
