"""Campaign budgets: atomic, idempotent reservations that are never exceeded, shared by all workers.

A decision that gives a budgeted offer **reserves** the most one redemption may cost
(:meth:`models.policy.catalogue.OfferSpec.max_cost`) before it is sent. When its attribution window closes it is
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

Both implementations (:mod:`models.state.budget_memory`, :mod:`models.state.budget_redis`) share the same
semantics and one contract suite. What decides which offer reserves what is :class:`models.policy.budget.BudgetGate`.

>>> import asyncio
>>> from models.state.budget_memory import MemoryBudgetStore
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

from abc import ABC, abstractmethod
from dataclasses import dataclass

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


class BudgetStore(ABC):
    """Campaign budgets shared by all workers: :meth:`reserve` before a decision is sent, :meth:`settle` when its
    window closes, :meth:`sweep` what never settles, :meth:`spend` to read. Every operation is atomic and keyed by
    decision id (idempotent). ``tests/contracts/`` runs one suite over every implementation."""

    @abstractmethod
    async def reserve(self, reqs: list[ReserveRequest]) -> list[ReserveResult]:
        """Reserve each request atomically, in order; refused when it would exceed its budget."""

    @abstractmethod
    async def settle(self, items: list[tuple[str, str, float]]) -> list[float | None]:
        """``(offer_id, decision_id, actual_cost)`` -> amount charged (at most the reservation), ``None``
        when there is no open reservation (refused, unknown or already settled)."""

    @abstractmethod
    async def spend(self, offer_ids: list[str]) -> dict[str, CampaignSpend]:
        """Every campaign's spend, reserved and committed amounts and number of reservations."""

    @abstractmethod
    async def sweep(self, offer_ids: list[str], now_ms: int, limit: int = 1000) -> dict[str, int]:
        """Release reservations open past their window and forget old decision ids; returns the number of
        released reservations per offer."""

    async def close(self) -> None:
        """Release connections."""


def to_units_floor(amount: float) -> int:
    """Budget to integer units, rounding down (a budget never over-counts)."""
    return int(amount * UNITS + 1e-9)
