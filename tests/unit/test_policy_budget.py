"""Budget store semantics (shared mixin: the Redis run is in tests/integration/test_budget_two_workers.py),
budget gate and pacing."""

from __future__ import annotations

import asyncio
import random

import pytest

from models.policy.budget import BudgetGate
from models.state.budget_memory import MemoryBudgetStore
from models.state.budget_store import ReserveRequest
from models.policy.catalogue import parse_catalogue
from models.policy.pacing import BudgetPacer, PacingController
from models.policy.base import DecisionContext


def req(did: str, amount: float = 5.0, budget: float = 20.0, offer: str = "c", open_until: int = 1000,
        forget_at: int = 10_000) -> ReserveRequest:
    return ReserveRequest(offer, did, amount, budget, open_until, forget_at)


class BudgetStoreContract:
    """Behaviour every BudgetStore implementation must have. Subclasses provide ``store`` (a fixture)."""

    def run(self, coro):
        return asyncio.run(coro)

    def test_reserve_until_budget_then_refuse(self, store):
        res = self.run(store.reserve([req(f"d{i}") for i in range(6)]))
        assert [r.ok for r in res] == [True] * 4 + [False] * 2
        assert [r.spent for r in res] == [5.0, 10.0, 15.0, 20.0, 20.0, 20.0]
        sp = self.run(store.spend(["c", "other"]))
        assert (sp["c"].spent, sp["c"].reserved, sp["c"].committed, sp["c"].n) == (20.0, 20.0, 0.0, 4)
        assert sp["other"].spent == 0.0 and sp["other"].n == 0

    def test_idempotent_per_decision(self, store):
        a = self.run(store.reserve([req("d1"), req("d1"), req("d1")]))
        assert [r.ok for r in a] == [True] * 3 and self.run(store.spend(["c"]))["c"].spent == 5.0
        # a refused decision stays refused even if budget frees up later (same answer on redelivery)
        self.run(store.reserve([req(f"x{i}") for i in range(3)]))
        assert self.run(store.reserve([req("late")]))[0].ok is False
        self.run(store.settle([("c", "x0", 0.0)]))
        assert self.run(store.reserve([req("late")]))[0].ok is False
        assert self.run(store.reserve([req("new")]))[0].ok is True

    def test_settle_charges_at_most_the_reservation_once(self, store):
        self.run(store.reserve([req("a"), req("b"), req("c2")]))
        out = self.run(store.settle([("c", "a", 2.5), ("c", "a", 2.5), ("c", "b", 99.0), ("c", "zz", 1.0),
                                     ("c", "c2", -3.0)]))
        assert out == [2.5, None, 5.0, None, 0.0]
        sp = self.run(store.spend(["c"]))["c"]
        assert (sp.spent, sp.reserved, sp.committed) == (7.5, 0.0, 7.5)
        # freed budget can be reserved again
        assert [r.ok for r in self.run(store.reserve([req(f"n{i}") for i in range(3)]))] == [True, True, False]

    def test_sweep_releases_lapsed_reservations_and_forgets_old_ids(self, store):
        self.run(store.reserve([req("early", open_until=100, forget_at=500), req("later", open_until=900)]))
        assert self.run(store.sweep(["c"], 99)) == {"c": 0}
        assert self.run(store.sweep(["c"], 100)) == {"c": 1}
        sp = self.run(store.spend(["c"]))["c"]
        assert (sp.spent, sp.reserved, sp.committed) == (5.0, 5.0, 0.0)
        assert self.run(store.settle([("c", "early", 1.0)])) == [None]  # already released
        assert self.run(store.settle([("c", "later", 1.0)])) == [1.0]
        self.run(store.sweep(["c"], 600))  # "early" forgotten: its id could be reserved anew
        assert self.run(store.reserve([req("early", open_until=700)]))[0].ok is True

    def test_fractional_amounts_do_not_drift(self, store):
        reqs = [req(f"f{i}", amount=0.1, budget=1.0) for i in range(12)]
        res = self.run(store.reserve(reqs))
        assert sum(r.ok for r in res) == 10
        assert self.run(store.spend(["c"]))["c"].spent == pytest.approx(1.0, abs=1e-9)

    def test_random_sequences_never_exceed_budget(self, store):
        rnd = random.Random(3)
        budget = 50.0
        open_ids = []
        for step in range(300):
            if open_ids and rnd.random() < 0.4:
                did = open_ids.pop(rnd.randrange(len(open_ids)))
                self.run(store.settle([("c", did, rnd.uniform(0, 8))]))
            else:
                did = f"r{step}"
                r = self.run(store.reserve([req(did, amount=rnd.uniform(0.5, 7.0), budget=budget)]))[0]
                if r.ok:
                    open_ids.append(did)
            sp = self.run(store.spend(["c"]))["c"]
            assert sp.spent <= budget + 1e-9
            assert sp.spent == pytest.approx(sp.reserved + sp.committed, abs=1e-6)


class TestMemoryBudgetStore(BudgetStoreContract):
    @pytest.fixture
    def store(self):
        return MemoryBudgetStore()


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
    gate = BudgetGate(CAT, store, pacing=PacingController(CAT), export_metrics=True)
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
