"""Campaign budgets in Redis: one Lua call per reservation, one per campaign for a batch's settlements, pipelined;
key layout in :mod:`models.state.budget_store`, scripts in ``models/state/lua/budget_*.lua``."""

from __future__ import annotations

from models.state.budget_store import UNITS, BudgetStore, CampaignSpend, ReserveResult, to_units, to_units_floor
from models.state.redis_async import Scripts, async_client

SCRIPTS = Scripts("budget_reserve", "budget_settle", "budget_sweep")

SETTLE_CHUNK = 500  # settlements per Lua call: bounds the time one call holds Redis


class RedisBudgetStore(BudgetStore):
    """Budgets in Redis (redis-py asyncio client): one Lua call per reservation and one per campaign for a batch's
    settlements, pipelined per batch."""

    def __init__(self, client, prefix: str = "promo") -> None:
        self.r = client
        self.prefix = prefix
        self.scripts = SCRIPTS  # called by SHA1, loaded on each new connection (models.state.redis_async)

    @classmethod
    def from_settings(cls, settings) -> "RedisBudgetStore":
        kw = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
        if settings.redis_ssl_ca_certs:
            kw["ssl_ca_certs"] = settings.redis_ssl_ca_certs
        return cls(async_client(settings.redis_url, SCRIPTS, **kw), prefix=settings.redis_prefix)

    def keys(self, offer_id: str) -> list[str]:
        tag = f"{self.prefix}:{{b:{offer_id}}}"
        return [tag, f"{tag}:res", f"{tag}:open", f"{tag}:gc"]

    async def reserve(self, reqs):
        if not reqs:
            return []
        pipe = self.r.pipeline(transaction=False)
        for q in reqs:
            self.scripts.queue(pipe, "budget_reserve", self.keys(q.offer_id),
                               [to_units(q.amount), to_units_floor(q.budget), q.open_until_ms, q.forget_at_ms,
                                q.decision_id])
        res = await self.scripts.execute(self.r, pipe)
        return [ReserveResult(bool(ok), int(sp) / UNITS) for ok, sp in res]

    async def settle(self, items):
        if not items:
            return []
        # one call per campaign (and per SETTLE_CHUNK settlements), not per settlement: a batch's releases at
        # cost 0 are mostly no-ops, and a call each cost Redis more than the work
        by_offer: dict[str, list[int]] = {}
        for k, (oid, _, _) in enumerate(items):
            by_offer.setdefault(oid, []).append(k)
        pipe = self.r.pipeline(transaction=False)
        calls = []
        for oid, idx in by_offer.items():
            for lo in range(0, len(idx), SETTLE_CHUNK):
                chunk = idx[lo:lo + SETTLE_CHUNK]
                args = [a for k in chunk for a in (to_units(max(0.0, items[k][2])), items[k][1])]
                self.scripts.queue(pipe, "budget_settle", self.keys(oid)[:3], args)
                calls.append(chunk)
        out: list[float | None] = [None] * len(items)
        for chunk, res in zip(calls, await self.scripts.execute(self.r, pipe)):
            for k, x in zip(chunk, res):
                out[k] = None if int(x) < 0 else int(x) / UNITS
        return out

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
            self.scripts.queue(pipe, "budget_sweep", self.keys(oid), [now_ms, limit])
        res = await self.scripts.execute(self.r, pipe)
        return {oid: int(n) for oid, n in zip(offer_ids, res)}

    async def close(self) -> None:
        await self.r.aclose()
