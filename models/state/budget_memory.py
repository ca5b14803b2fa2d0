"""Campaign budgets in process memory (tests, simulator, offline runs): thread-safe, the same semantics as
Redis (:mod:`models.state.budget_store`)."""

from __future__ import annotations

import threading

from models.state.budget_store import UNITS, BudgetStore, CampaignSpend, ReserveRequest, ReserveResult, to_units, to_units_floor


class MemoryBudgetStore(BudgetStore):
    """In-process implementation (tests, simulator, offline runs). Thread-safe; same semantics as Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._camp: dict[str, dict[str, int]] = {}
        self._res: dict[str, dict[str, str]] = {}
        self._open: dict[str, dict[str, int]] = {}
        self._gc: dict[str, dict[str, int]] = {}

    def _campaign(self, oid: str) -> dict[str, int]:
        c = self._camp.get(oid)
        if c is None:
            c = self._camp[oid] = {"spent": 0, "reserved": 0, "committed": 0, "n": 0}
            self._res[oid], self._open[oid], self._gc[oid] = {}, {}, {}
        return c

    def reserve_one(self, r: ReserveRequest) -> ReserveResult:
        with self._lock:
            c = self._campaign(r.offer_id)
            res = self._res[r.offer_id]
            state = res.get(r.decision_id)
            if state is not None:
                return ReserveResult(state[0] != "R", c["spent"] / UNITS)
            amt = to_units(r.amount)
            self._gc[r.offer_id][r.decision_id] = r.forget_at_ms
            if c["spent"] + amt > to_units_floor(r.budget):
                res[r.decision_id] = "R"
                return ReserveResult(False, c["spent"] / UNITS)
            c["spent"] += amt
            c["reserved"] += amt
            c["n"] += 1
            res[r.decision_id] = f"A{amt}"
            self._open[r.offer_id][r.decision_id] = r.open_until_ms
            return ReserveResult(True, c["spent"] / UNITS)

    def settle_one(self, offer_id: str, decision_id: str, cost: float) -> float | None:
        with self._lock:
            return self._settle_locked(offer_id, decision_id, to_units(max(0.0, cost)))

    def _settle_locked(self, offer_id: str, decision_id: str, cost_u: int) -> float | None:
        c = self._campaign(offer_id)
        state = self._res[offer_id].get(decision_id)
        if state is None or state[0] != "A":
            return None
        amt = int(state[1:])
        charge = min(cost_u, amt)
        c["spent"] += charge - amt
        c["reserved"] -= amt
        c["committed"] += charge
        self._res[offer_id][decision_id] = f"S{charge}"
        self._open[offer_id].pop(decision_id, None)
        return charge / UNITS

    def spend_one(self, offer_id: str) -> CampaignSpend:
        with self._lock:
            c = self._camp.get(offer_id)
            if c is None:
                return CampaignSpend()
            return CampaignSpend(c["spent"] / UNITS, c["reserved"] / UNITS, c["committed"] / UNITS, c["n"])

    def sweep_one(self, offer_id: str, now_ms: int, limit: int = 1000) -> int:
        with self._lock:
            self._campaign(offer_id)
            due = sorted((t, d) for d, t in self._open[offer_id].items() if t <= now_ms)[:limit]
            for _, d in due:
                self._settle_locked(offer_id, d, 0)
            old = sorted((t, d) for d, t in self._gc[offer_id].items() if t <= now_ms)[:limit]
            for _, d in old:
                self._gc[offer_id].pop(d, None)
                if self._res[offer_id].get(d, "R")[0] != "A":
                    self._res[offer_id].pop(d, None)
            return len(due)

    async def reserve(self, reqs):
        return [self.reserve_one(r) for r in reqs]

    async def settle(self, items):
        return [self.settle_one(o, d, c) for o, d, c in items]

    async def spend(self, offer_ids):
        return {o: self.spend_one(o) for o in offer_ids}

    async def sweep(self, offer_ids, now_ms, limit=1000):
        return {o: self.sweep_one(o, now_ms, limit) for o in offer_ids}
