"""Campaign budgets around the policy: block offers whose budget is short, reserve before sending, settle on close.

The store that keeps the money (atomic, idempotent per decision id, shared by all workers) is
:mod:`models.state.budget_store`.
"""

from __future__ import annotations

from models import failpoints
from models.batch import UserPlan
from models.decision import Decision
from models.metrics import NULL, MetricsSink
from models.policy.catalogue import Catalogue
from models.state.budget_store import BudgetStore, CampaignSpend, ReserveRequest


class BudgetGate:
    """What the engine calls around the policy: blocks offers whose budget is short, reserves, settles.

    Per batch: ``await gate.refresh(now_ms)`` (one round trip; also updates pacing), then for each
    decision ``ctx.blocked = gate.blocked(ctx)`` before ``policy.choose``, ``gate.request(...)`` for the
    chosen offer, and ``await gate.reserve(requests)`` before sending. A refused reservation (another
    worker took the rest of the budget meanwhile) means: decide again with that offer blocked.

    >>> import asyncio
    >>> from models.policy.catalogue import parse_catalogue
    >>> from models.policy.base import DecisionContext
    >>> from models.state.budget_memory import MemoryBudgetStore
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
        metrics: MetricsSink = NULL,
    ) -> None:
        self.catalogue = catalogue
        self.store = store
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.forget_ms = forget_ms
        self.pacing = pacing
        self.metrics = metrics  # budget spent, remaining, pacing prices, refused reservations
        self.budgets = catalogue.budgets()
        self.local: dict[str, float] = {o: 0.0 for o in self.budgets}
        # campaigns an earlier catalogue of this process budgeted and this one does not (removed, or no budget any
        # more): their open decisions still settle and their lapsed reservations are still swept, nothing reserves
        self.retired: frozenset[str] = frozenset()

    def for_catalogue(self, catalogue: Catalogue, pacing=None) -> "BudgetGate":
        """The gate of a new catalogue (:mod:`models.catalogue_swap`): the same store and windows, the new limits
        (from the next reservation on), this gate's last read spend of the campaigns still budgeted (so the first
        batch does not plan offers it knows to be short), and every campaign budgeted before as :attr:`retired`.

        >>> from models.policy.catalogue import parse_catalogue
        >>> from models.state.budget_memory import MemoryBudgetStore
        >>> g = BudgetGate(parse_catalogue("offers: [{offer_id: a, kind: coupon, value: 5, budget: 9}]"),
        ...                MemoryBudgetStore())
        >>> g.local["a"] = 5.0
        >>> g2 = g.for_catalogue(parse_catalogue(
        ...     "offers: [{offer_id: a, kind: coupon, value: 5, budget: 12}, {offer_id: b, kind: coupon, value: 5}]"))
        >>> g2.budgets, g2.local, sorted(g2.retired)  # a's new limit, its spend as read; b has no budget
        ({'a': 12}, {'a': 5.0}, [])
        >>> g3 = g2.for_catalogue(parse_catalogue("offers: [{offer_id: b, kind: coupon, value: 5, budget: 20}]"))
        >>> g3.budgets, g3.local, g3.accounted  # a removed: still settled and swept, never reserved
        ({'b': 20}, {'b': 0.0}, ['b', 'a'])
        """
        gate = BudgetGate(catalogue, self.store, self.window_ms, self.grace_ms, self.forget_ms, pacing, self.metrics)
        gate.local.update({o: s for o, s in self.local.items() if o in gate.budgets})
        gate.retired = frozenset((self.retired | set(self.budgets)) - set(gate.budgets))
        return gate

    @property
    def accounted(self) -> list[str]:
        """Campaigns whose reservations this gate settles and sweeps: the budgeted ones, then the retired ones."""
        return list(self.budgets) + sorted(self.retired)

    async def refresh(self, now_ms: int) -> dict[str, CampaignSpend]:
        """Read every campaign's spend (one round trip), update pacing; returns the spends.

        Pacing follows the committed spend (actual redemption costs): reservations hold the most an offer
        may cost for a whole attribution window, far more than it will cost on average.
        """
        spends = await self.store.spend(list(self.budgets))
        self.local = {o: s.spent for o, s in spends.items()}
        if self.pacing is not None:
            self.pacing.update(now_ms, {o: s.committed for o, s in spends.items()})
        for o, s in spends.items():
            labels = {"offer_id": o}
            self.metrics.gauge("promo_budget_spent", s.spent, labels)
            self.metrics.gauge("promo_budget_remaining", self.budgets[o] - s.spent, labels)
            if self.pacing is not None:
                self.metrics.gauge("promo_pacing_shadow_price", self.pacing.price(o), labels)
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
        # what the store holds now replaces this batch's planned amounts: a decision planned again (a refused
        # reservation or commit) asked again for the same amount, which counted twice would block offers early
        spent: dict[str, float] = {}
        for q, r in zip(reqs, res):
            spent[q.offer_id] = max(spent.get(q.offer_id, 0.0), r.spent)
        self.local.update(spent)
        for q, r in zip(reqs, res):
            if not r.ok:
                self.metrics.increment("promo_budget_refused", labels={"offer_id": q.offer_id})
        return [r.ok for r in res]

    async def settle(self, items: list[tuple[str, str, float]]) -> list[float | None]:
        """``(offer_id, decision_id, actual_cost)`` for closed decisions of budgeted offers."""
        idx = [k for k, i in enumerate(items) if i[0] in self.budgets or i[0] in self.retired]
        res = await self.store.settle([items[k] for k in idx])
        out: list[float | None] = [None] * len(items)
        for k, r in zip(idx, res):
            out[k] = r
        return out

    async def sweep(self, now_ms: int) -> dict[str, int]:
        return await self.store.sweep(self.accounted, now_ms)

    # --- around a batch's commits (models.engine.Engine) ------------------------------------------
    async def reserve_for(self, plans: list[UserPlan]) -> dict[str, dict[str, str]]:
        """Reserve the budgets a batch's planned decisions need (before their commits); the users whose reservation
        was refused, with why (the engine plans them again without that offer)."""
        reqs = [(p, r) for p in plans for r in p.requests]
        if not reqs:
            return {}
        oks = await self.reserve([r for _, r in reqs])
        failpoints.hit("reserved")
        refused: dict[str, dict[str, str]] = {}
        for (p, r), ok in zip(reqs, oks):
            if not ok:
                refused.setdefault(p.user_id, {})[r.offer_id] = "budget taken meanwhile by another decision"
        return refused

    async def settle_closing(self, plans: list[UserPlan]) -> None:
        """Settle the budgets of the decisions these commits close, BEFORE the commits (as reservations are made
        before them): a worker killed after a commit that closed a redeemed decision would otherwise lose the
        charge (the reservation would lapse uncharged). Settling is keyed by decision id, so a commit that is
        refused and planned again, or a redelivered batch, settles nothing twice; what closes is a function of
        the user's events, so a re-plan settles the same amount."""
        closing = [(c.decision.offer_id, c.decision.decision_id, c.cost) for p in plans for c in p.closed]
        if closing:
            await self.settle(closing)

    async def release_stale(self, decisions: list[Decision]) -> None:
        """Free what a decision id holds on campaigns other than its committed offer.

        A worker that crashed after reserving but before committing left a reservation; the redelivered trigger
        is decided again (same decision id) and the policy, having learnt meanwhile, may pick another offer.
        Settling the other campaigns at cost 0 returns that budget at once (a no-op where nothing is held). It runs
        for re-sent decisions too (a worker killed after such a commit, before this release, is covered when the
        batch is redelivered); after ``mark_sent`` a redelivered trigger is not re-sent and its reservations lapse
        with the attribution window (:meth:`sweep`).
        """
        if not decisions:
            return
        budgeted = self.accounted
        stale = [(o, d.decision_id, 0.0) for d in decisions for o in budgeted if o != d.offer.offer_id]
        if stale:
            await self.settle(stale)
