"""Campaign budgets: atomic, idempotent reservations that are never exceeded, shared by all workers.

A decision that gives a budgeted offer **reserves** the most one redemption may cost
(:meth:`models.catalogue.OfferSpec.max_cost`) before it is sent. When its attribution window closes it is
**settled** with the actual cost (0 if not redeemed) and the rest of the reservation returns to the budget.
``spent = committed + reserved`` never exceeds the budget, so the actual spend cannot either.

Every operation is keyed by ``decision_id``: a redelivered trigger gets the same answer and is never
charged twice; settling twice is a no-op. Reservations whose decision never settles (a worker crashed
between reserving and committing the decision) are released by :meth:`sweep` after their window.

Redis layout, one hash tag per campaign (Redis-Cluster-ready, every script touches one slot)::

    <prefix>:{b:<offer>}        hash   spent, reserved, committed, n   (integer units of 1/10000)
    <prefix>:{b:<offer>}:res    hash   decision_id -> A<amount> | R (refused) | S<charge> (settled)
    <prefix>:{b:<offer>}:open   zset   decision_id scored by the event time its reservation lapses
    <prefix>:{b:<offer>}:gc     zset   decision_id scored by the event time its entry may be forgotten

Both implementations share the same semantics and one test mixin (``tests/unit/test_budget.py``).

>>> import asyncio
>>> store = MemoryBudgetStore()
>>> req = ReserveRequest("c5", "d1", amount=5.0, budget=12.0, open_until_ms=100, forget_at_ms=1000)
>>> asyncio.run(store.reserve([req, req]))  # the same decision twice: charged once
[ReserveResult(ok=True, spent=5.0), ReserveResult(ok=True, spent=5.0)]
>>> asyncio.run(store.reserve([ReserveRequest("c5", "d2", 5.0, 12.0, 100, 1000),
...                            ReserveRequest("c5", "d3", 5.0, 12.0, 100, 1000)]))
[ReserveResult(ok=True, spent=10.0), ReserveResult(ok=False, spent=10.0)]
>>> asyncio.run(store.settle([("c5", "d1", 0.0), ("c5", "d1", 0.0), ("c5", "d2", 3.5)]))
[0.0, None, 3.5]
>>> asyncio.run(store.spend(["c5"]))["c5"]
CampaignSpend(spent=3.5, reserved=0.0, committed=3.5, n=2)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from models.catalogue import Catalogue

UNITS = 10_000  # amounts are stored as integers of 1/UNITS currency units: no float drift in Redis


def to_units(amount: float) -> int:
    """Currency to integer units, rounding up (a reservation never under-counts).

    >>> to_units(0.00001), to_units(5.0), to_units(4.16625)
    (1, 50000, 41663)
    """
    u = amount * UNITS
    i = int(u)
    return i + 1 if u - i > 1e-9 else i


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    offer_id: str
    decision_id: str
    amount: float
    budget: float
    open_until_ms: int  # event time after which an unsettled reservation is released
    forget_at_ms: int  # event time after which the decision id is forgotten (idempotency horizon)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    spent: float  # campaign spend (reserved + committed) after this request


@dataclass(frozen=True, slots=True)
class CampaignSpend:
    spent: float = 0.0
    reserved: float = 0.0
    committed: float = 0.0
    n: int = 0


class BudgetStore(Protocol):
    async def reserve(self, reqs: list[ReserveRequest]) -> list[ReserveResult]:
        """Reserve each request atomically, in order; refused when it would exceed its budget."""

    async def settle(self, items: list[tuple[str, str, float]]) -> list[float | None]:
        """``(offer_id, decision_id, actual_cost)`` -> amount charged (at most the reservation), ``None``
        when there is no open reservation (refused, unknown or already settled)."""

    async def spend(self, offer_ids: list[str]) -> dict[str, CampaignSpend]: ...

    async def sweep(self, offer_ids: list[str], now_ms: int, limit: int = 1000) -> dict[str, int]:
        """Release reservations open past their window and forget old decision ids; returns the number of
        released reservations per offer."""


class MemoryBudgetStore:
    """In-process implementation (tests, simulator, offline runs). Thread-safe; same semantics as Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._camp: dict[str, dict[str, int]] = {}
        self._res: dict[str, dict[str, str]] = {}
        self._open: dict[str, dict[str, int]] = {}
        self._gc: dict[str, dict[str, int]] = {}

    def _c(self, oid: str) -> dict[str, int]:
        c = self._camp.get(oid)
        if c is None:
            c = self._camp[oid] = {"spent": 0, "reserved": 0, "committed": 0, "n": 0}
            self._res[oid], self._open[oid], self._gc[oid] = {}, {}, {}
        return c

    def reserve_one(self, r: ReserveRequest) -> ReserveResult:
        with self._lock:
            c = self._c(r.offer_id)
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
        c = self._c(offer_id)
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
            self._c(offer_id)
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


def to_units_floor(amount: float) -> int:
    """Budget to integer units, rounding down (a budget never over-counts)."""
    return int(amount * UNITS + 1e-9)


# KEYS: campaign hash, res hash, open zset, gc zset
# ARGV: amount units, budget units, open_until_ms, forget_at_ms, decision_id
_RESERVE_LUA = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local st = redis.call('HGET', KEYS[2], ARGV[5])
if st then
  if string.sub(st, 1, 1) == 'R' then return {0, spent} end
  return {1, spent}
end
local amt = tonumber(ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
if spent + amt > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[5], 'R')
  return {0, spent}
end
redis.call('HINCRBY', KEYS[1], 'spent', amt)
redis.call('HINCRBY', KEYS[1], 'reserved', amt)
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[2], ARGV[5], 'A' .. amt)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
return {1, spent + amt}
"""

# KEYS: campaign hash, res hash, open zset
# ARGV: cost units, decision_id
_SETTLE_LUA = """
local st = redis.call('HGET', KEYS[2], ARGV[2])
if (not st) or string.sub(st, 1, 1) ~= 'A' then return -1 end
local amt = tonumber(string.sub(st, 2))
local charge = math.min(tonumber(ARGV[1]), amt)
redis.call('HINCRBY', KEYS[1], 'spent', charge - amt)
redis.call('HINCRBY', KEYS[1], 'reserved', -amt)
redis.call('HINCRBY', KEYS[1], 'committed', charge)
redis.call('HSET', KEYS[2], ARGV[2], 'S' .. charge)
redis.call('ZREM', KEYS[3], ARGV[2])
return charge
"""

# KEYS: campaign hash, res hash, open zset, gc zset
# ARGV: now_ms, limit
_SWEEP_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, d in ipairs(due) do
  local st = redis.call('HGET', KEYS[2], d)
  if st and string.sub(st, 1, 1) == 'A' then
    local amt = tonumber(string.sub(st, 2))
    redis.call('HINCRBY', KEYS[1], 'spent', -amt)
    redis.call('HINCRBY', KEYS[1], 'reserved', -amt)
    redis.call('HSET', KEYS[2], d, 'S0')
  end
  redis.call('ZREM', KEYS[3], d)
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, d in ipairs(old) do
  local st = redis.call('HGET', KEYS[2], d)
  if (not st) or string.sub(st, 1, 1) ~= 'A' then redis.call('HDEL', KEYS[2], d) end
  redis.call('ZREM', KEYS[4], d)
end
return #due
"""


class RedisBudgetStore:
    """Budgets in Redis (redis-py asyncio client): one Lua call per request, pipelined per batch."""

    def __init__(self, client, prefix: str = "promo") -> None:
        self.r = client
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._sweep = client.register_script(_SWEEP_LUA)

    @classmethod
    def from_settings(cls, settings) -> "RedisBudgetStore":
        import redis.asyncio as aioredis

        kw = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
        if settings.redis_ssl_ca_certs:
            kw["ssl_ca_certs"] = settings.redis_ssl_ca_certs
        return cls(aioredis.Redis.from_url(settings.redis_url, **kw), prefix=settings.redis_prefix)

    def keys(self, offer_id: str) -> list[str]:
        tag = f"{self.prefix}:{{b:{offer_id}}}"
        return [tag, f"{tag}:res", f"{tag}:open", f"{tag}:gc"]

    async def reserve(self, reqs):
        if not reqs:
            return []
        pipe = self.r.pipeline(transaction=False)
        for q in reqs:
            await self._reserve(
                keys=self.keys(q.offer_id),
                args=[to_units(q.amount), to_units_floor(q.budget), q.open_until_ms, q.forget_at_ms, q.decision_id],
                client=pipe,
            )
        res = await pipe.execute()
        return [ReserveResult(bool(ok), int(sp) / UNITS) for ok, sp in res]

    async def settle(self, items):
        if not items:
            return []
        pipe = self.r.pipeline(transaction=False)
        for oid, did, cost in items:
            await self._settle(keys=self.keys(oid)[:3], args=[to_units(max(0.0, cost)), did], client=pipe)
        res = await pipe.execute()
        return [None if int(x) < 0 else int(x) / UNITS for x in res]

    async def spend(self, offer_ids):
        if not offer_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for oid in offer_ids:
            pipe.hmget(self.keys(oid)[0], "spent", "reserved", "committed", "n")
        res = await pipe.execute()
        out = {}
        for oid, vals in zip(offer_ids, res):
            s, r, c, n = (int(v) if v is not None else 0 for v in vals)
            out[oid] = CampaignSpend(s / UNITS, r / UNITS, c / UNITS, n)
        return out

    async def sweep(self, offer_ids, now_ms, limit=1000):
        if not offer_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for oid in offer_ids:
            await self._sweep(keys=self.keys(oid), args=[now_ms, limit], client=pipe)
        res = await pipe.execute()
        return {oid: int(n) for oid, n in zip(offer_ids, res)}

    async def close(self) -> None:
        await self.r.aclose()


class BudgetGate:
    """What the engine calls around the policy: blocks offers whose budget is short, reserves, settles.

    Per batch: ``await gate.refresh(now_ms)`` (one round trip; also updates pacing), then for each
    decision ``ctx.blocked = gate.blocked(ctx)`` before ``policy.choose``, ``gate.request(...)`` for the
    chosen offer, and ``await gate.reserve(requests)`` before sending. A refused reservation (another
    worker took the rest of the budget meanwhile) means: decide again with that offer blocked.

    >>> import asyncio
    >>> from models.catalogue import parse_catalogue
    >>> from models.policy import DecisionContext
    >>> cat = parse_catalogue("offers: [{offer_id: c, kind: coupon, value: 5, budget: 7}]")
    >>> gate = BudgetGate(cat, MemoryBudgetStore(), window_ms=1000)
    >>> _ = asyncio.run(gate.refresh(0))
    >>> ctx = DecisionContext("u", 0, 50.0, [], [], False, 0, None, 0.0, 0.1)
    >>> gate.blocked(ctx)
    {}
    >>> req = gate.request("d1", "c", 50.0, 0)
    >>> gate.blocked(ctx)                  # 2 left, an offer may cost 5
    {'c': 'budget exhausted (2.00 of 7 left)'}
    >>> asyncio.run(gate.reserve([req]))
    [True]
    """

    def __init__(
        self,
        catalogue: Catalogue,
        store: BudgetStore,
        window_ms: int = 86_400_000,
        grace_ms: int = 3_600_000,
        forget_ms: int = 7 * 86_400_000,
        pacing=None,
        export_metrics: bool = False,
    ) -> None:
        self.catalogue = catalogue
        self.store = store
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.forget_ms = forget_ms
        self.pacing = pacing
        self.export_metrics = export_metrics
        self.budgets = catalogue.budgets()
        self.local: dict[str, float] = {o: 0.0 for o in self.budgets}

    async def refresh(self, now_ms: int) -> dict[str, CampaignSpend]:
        """Read every campaign's spend (one round trip), update pacing; returns the spends.

        Pacing follows the committed spend (actual redemption costs): reservations hold the most an offer
        may cost for a whole attribution window, far more than it will cost on average.
        """
        spends = await self.store.spend(list(self.budgets))
        self.local = {o: s.spent for o, s in spends.items()}
        if self.pacing is not None:
            self.pacing.update(now_ms, {o: s.committed for o, s in spends.items()})
        if self.export_metrics:
            from stream import metrics as M

            for o, s in spends.items():
                M.BUDGET_SPENT.labels(o).set(s.spent)
                M.BUDGET_REMAINING.labels(o).set(self.budgets[o] - s.spent)
                if self.pacing is not None:
                    M.PACING_PRICE.labels(o).set(self.pacing.price(o))
        return spends

    def remaining(self) -> dict[str, float]:
        return {o: b - self.local.get(o, 0.0) for o, b in self.budgets.items()}

    def blocked(self, ctx) -> dict[str, str]:
        """Offers whose budget left (as last read, minus this batch's requests) cannot cover one more."""
        out = {}
        for oid, budget in self.budgets.items():
            left = budget - self.local.get(oid, 0.0)
            if left < self.catalogue[oid].max_cost(ctx.cart_value):
                out[oid] = f"budget exhausted ({max(left, 0.0):.2f} of {budget:g} left)"
        return out

    def request(self, decision_id: str, offer_id: str, cart_value: float, ts_ms: int) -> ReserveRequest | None:
        """The reservation a decision needs (``None`` for ``none`` and offers without a budget)."""
        if offer_id not in self.budgets:
            return None
        amount = self.catalogue[offer_id].max_cost(cart_value)
        self.local[offer_id] = self.local.get(offer_id, 0.0) + amount
        return ReserveRequest(offer_id, decision_id, amount, self.budgets[offer_id],
                              ts_ms + self.window_ms + self.grace_ms, ts_ms + self.forget_ms)

    async def reserve(self, reqs: list[ReserveRequest]) -> list[bool]:
        """Reserve (one pipelined round trip); ``False`` where the budget could not cover the request."""
        res = await self.store.reserve(reqs)
        for q, r in zip(reqs, res):
            self.local[q.offer_id] = max(self.local.get(q.offer_id, 0.0), r.spent)
        if self.export_metrics:
            from stream import metrics as M

            for q, r in zip(reqs, res):
                if not r.ok:
                    M.BUDGET_REFUSED.labels(q.offer_id).inc()
        return [r.ok for r in res]

    async def settle(self, items: list[tuple[str, str, float]]) -> list[float | None]:
        """``(offer_id, decision_id, actual_cost)`` for closed decisions of budgeted offers."""
        idx = [k for k, i in enumerate(items) if i[0] in self.budgets]
        res = await self.store.settle([items[k] for k in idx])
        out: list[float | None] = [None] * len(items)
        for k, r in zip(idx, res):
            out[k] = r
        return out

    async def sweep(self, now_ms: int) -> dict[str, int]:
        return await self.store.sweep(list(self.budgets), now_ms)
