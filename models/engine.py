"""The batch engine: de-duplicate, fold events into profiles, decide on triggers, commit atomically per user.

One call of :meth:`Engine.process_batch` handles a batch of valid events (any users, partition order kept per
user): one round trip loads every user of the batch, each user's part is planned (:mod:`models.planning`),
budgets are reserved (and those of the decisions the batch closes settled), one round trip commits every user
atomically (a user changed meanwhile is planned again), and, after the caller delivered the decisions,
:meth:`Engine.delivered` and :meth:`Engine.learn` finish it, off the decisions' critical path.

Crash safety: the commit of a user (event-id markers, profile, decisions) is one atomic step. A batch that Kafka
redelivers after a crash finds its markers: its events count as duplicates, nothing is applied twice, and the
decisions their triggers produced are returned again (same ``decision_id``) unless already marked as sent.

Examples
--------
>>> import asyncio
>>> from models.events import Event
>>> from models.state.engine_memory import MemoryStore
>>> engine = Engine(MemoryStore(), clock_ms=lambda: 1_700_000_000_000)
>>> batch = [Event("e1", "view", "u1", "i7", 1_000, price=30.0), Event("e2", "cart", "u1", "i1", 2_000, price=30.0),
...          Event("e2", "cart", "u1", "i1", 2_000, price=30.0)]
>>> res = asyncio.run(engine.process_batch(batch))
>>> res.applied, res.duplicates, len(res.decisions)
({'view': 1, 'cart': 1}, 1, 1)
>>> res.decisions[0].trigger_event_id, res.decisions[0].items  # what the cart holds is no recommendation
('e2', ['i7'])
>>> again = asyncio.run(engine.process_batch(batch))  # redelivered before the decision was marked sent
>>> again.applied, again.duplicates, [d.decision_id for d in again.resend] == [res.decisions[0].decision_id]
({}, 3, True)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from models import failpoints
from models.batch import BatchProgress, BatchResult, UserPlan, group_by_user
from models.clock import EventClock
from models.decision import Decision
from models.events import Event
from models.metrics import NULL, MetricsSink
from models.planning import Planner
from models.policy.attribution import expire
from models.policy.base import DecisionContext
from models.policy.catalogue import Catalogue, load_catalogue
from models.policy.rules import RulePolicy
from models.profile import Profile
from models.state.engine_store import EngineStore
from models.triggers import build_triggers
from models.triggers.base import Trigger, is_timer_trigger_id
from models.triggers.cart import CartTrigger

log = logging.getLogger("promo.engine")

RESERVE_ROUNDS = 3
"""Times a batch's users may see a budget reservation refused and decide again with that offer blocked; the last
time every budgeted offer is blocked for them (:meth:`Engine._plan_and_reserve`)."""

SWEEP_CHUNK = 50
"""Users the expiry sweep loads, plans and commits at a time. Planning is synchronous: a sweep that found 1,000
users due (timers, expired windows) planned them in one go and stopped the event loop, and every batch waiting in
it, for 200-280 ms; in chunks the waiting batches run between them (the worker awaits
:class:`stream.handler.BatchesFirst` there, so a chunk does not start while a batch is on its way)."""


class Engine:
    """Turns batches of valid events into state updates and decisions.

    Parameters
    ----------
    store
        Where profiles, markers and decisions live (:class:`models.state.engine_redis.RedisStore` in production).
    policy
        Chooses the offer (``choose(ctx, rng) -> PolicyChoice``); default a :class:`models.policy.rules.RulePolicy`
        over ``catalogue``.
    learning
        Optional learning core (``learn_batch``, ``recommend``, ``propensity``, ``segment``); without it items are
        the user's most recent ones and propensity is a frequency estimate.
    decision_cooldown_s
        Minimum event time between two decisions for one user, for the default trigger (a ``cart``).
    triggers
        The moments to decide at (:mod:`models.triggers`); default a :class:`models.triggers.cart.CartTrigger`
        with ``decision_cooldown_s``. ``trigger_names`` instead: the triggers of these names, configured by the
        catalogue's ``triggers:`` section (rebuilt from each new catalogue, :meth:`set_catalogue`).
    resend_after_s
        Wall-clock age after which the sweep sends a timer-fired decision found stored and unsent (a crash) again.
    event_clock
        Event-time "now" of the expiry sweep and of lazy expiry (:class:`models.clock.EventClock`, fed each
        batch's event times by their ``partition``); default: one without a wall-clock bound.
    catalogue_version
        The version of ``catalogue`` (:func:`models.catalogue_swap.catalogue_version`), reported as
        :attr:`catalogue_version`; :meth:`set_catalogue` changes both between batches.
    """

    def __init__(
        self,
        store: EngineStore,
        policy=None,
        *,
        catalogue: Catalogue | None = None,
        learning=None,
        holdout_pct: float = 5.0,
        decision_cooldown_s: int = 1800,
        attribution_window_s: int = 86_400,
        recommend_k: int = 10,
        clock_ms: Callable[[], int] | None = None,
        max_attempts: int = 5,
        budget=None,
        conversions=None,
        event_clock: EventClock | None = None,
        triggers: list[Trigger] | None = None,
        catalogue_version: str | None = None,
        trigger_names: list[str] | None = None,
        resend_after_s: float = 30.0,
        sweep_chunk: int = SWEEP_CHUNK,
    ) -> None:
        self.store = store
        self.catalogue = catalogue or load_catalogue()
        self.catalogue_version = catalogue_version
        self._next_catalogue: tuple[Catalogue, str] | None = None  # set_catalogue's, for the next batch
        self._open_batch: BatchProgress | None = None  # the batch planned now, until it is committed whole
        self._timer_horizon: int | None = None  # the clock before the batch planned now (see process_batch)
        self._clock_committed: dict = {}  # the clock's partition watermarks as of the last batch committed whole
        self.policy = policy or RulePolicy(self.catalogue, holdout_pct=holdout_pct)
        self.learning = learning
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.max_attempts = max_attempts
        self.sweep_chunk = int(sweep_chunk)
        self.item_reads_missed = 0  # recommendation reads planning had to make itself (models.state.item_reads)
        self.budget = budget  # models.policy.budget.BudgetGate: blocks, reserves and settles budgeted offers
        self.conversions = conversions  # models.policy.attribution.OutcomeStats (treatment vs holdout)
        # "now" in event time for the expiry sweep and lazy expiry: one event (or a few) cannot move it
        self.clock = event_clock or EventClock(wall_ms=self.clock_ms)
        # {(topic, partition): next offset} the models have learnt up to (kept by the caller, e.g. the worker's
        # batch handler), and those of the snapshot the models were restored from: snapshots carry them
        self.learned_offsets: dict[tuple[str, int], int] = {}
        self.restored_offsets: dict[tuple[str, int], int] = {}
        self._started = False  # start() ran
        # timer-fired decisions committed by this process and not yet marked sent: the sweep does not send them again
        self.inflight: set[str] = set()
        self._trigger_names = trigger_names
        self._cart_cooldown_ms = decision_cooldown_s * 1000
        if triggers is None and trigger_names is not None:
            triggers = build_triggers(self.catalogue, trigger_names or None, self._cart_cooldown_ms)
        contribution = self._contribution_settings()
        if contribution is not None:
            learning.items_via_commit = True  # item statistics are written in the users' commits
        self.planner = Planner(
            catalogue=self.catalogue, policy=self.policy, learning=learning, budget=budget, conversions=conversions,
            triggers=triggers or [CartTrigger(cooldown_ms=self._cart_cooldown_ms)], window_ms=attribution_window_s * 1000,
            recommend_k=recommend_k, clock_ms=self.clock_ms, event_clock=self.clock, contribution=contribution,
            resend_after_ms=int(resend_after_s * 1000))
        self._warn_validity(self.catalogue)
        # what decisions teach travels in the users' commits and is read back from the store (see learn): the
        # policy's posteriors, and the conversion counts behind the conversion and uplift gauges
        self.shares_policy = self.planner.shares_policy
        self.shares_outcomes = self.planner.shares_outcomes

    def _contribution_settings(self) -> dict | None:
        """With an engine store that applies contributions and an item store they can be applied to (both in one
        Redis), item statistics are learnt in the users' atomic commits (:mod:`models.learning.contrib`): exact
        across crashes, redeliveries and batch timing, and removable by ``promo forget``. Otherwise (offline,
        tests) the learning core counts them per batch."""
        if self.learning is None or not self.store.applies_contributions:
            return None
        header = self.learning.store.contribution_header()  # what the apply script reads from every payload
        if header is None:
            return None
        return {"header": header, "width": int(self.learning.window_width), "window_ms": int(self.learning.window_ms)}

    @classmethod
    def from_settings(cls, settings, store: EngineStore, learning=None, budget_store=None,
                      metrics: MetricsSink = NULL, catalogue: Catalogue | None = None,
                      catalogue_version: str | None = None) -> "Engine":
        """The production engine: the policy ``settings.policy`` (Thompson sampling with pacing, or the rules),
        budgets in ``budget_store``; ``catalogue`` (of ``catalogue_version``) or else ``settings.catalogue_path``'s."""
        from models.policy.attribution import OutcomeStats
        from models.policy.thompson import ThompsonPolicy
        from models.policy.budget import BudgetGate
        from models.policy.pacing import PacingController

        catalogue = catalogue or load_catalogue(settings.catalogue_path)
        pacing = PacingController(catalogue)
        if settings.policy == "rules":
            policy = RulePolicy(catalogue, holdout_pct=settings.holdout_pct)
        else:
            policy = ThompsonPolicy(catalogue, holdout_pct=settings.holdout_pct, pacing=pacing, defer_exposure=True)
        gate = None
        if budget_store is not None:
            gate = BudgetGate(catalogue, budget_store, window_ms=settings.attribution_window_s * 1000,
                              pacing=pacing, metrics=metrics)
        return cls(
            store,
            policy,
            catalogue=catalogue,
            learning=learning,
            holdout_pct=settings.holdout_pct,
            decision_cooldown_s=settings.decision_cooldown_s,
            attribution_window_s=settings.attribution_window_s,
            recommend_k=settings.recommend_k,
            budget=gate,
            conversions=OutcomeStats(metrics),
            # every partition of the events topic holds the clock until it shows where it is (or is idle)
            event_clock=EventClock(range(settings.partitions), idle_ms=int(settings.clock_idle_s * 1000),
                                   max_future_skew_ms=settings.max_future_skew_s * 1000),
            catalogue_version=catalogue_version,
            trigger_names=settings.trigger_names,
            resend_after_s=settings.timer_resend_after_s,
        )

    def set_catalogue(self, catalogue: Catalogue, version: str) -> bool:
        """Use ``catalogue`` (of ``version``) from now on if no batch is being planned, else from the next batch:
        one batch plans, reserves and commits with one catalogue whole, also across its retries. Returns whether
        it is in use already. What changes and what carries over (policy state, pacing, budgets, offers already
        sent): :mod:`models.catalogue_swap`."""
        self._next_catalogue = (catalogue, version)
        if self._open_batch is None:
            self._take_catalogue()
        return self._next_catalogue is None

    @property
    def pending_catalogue_version(self) -> str | None:
        """The version :meth:`set_catalogue` gave that waits for the batch in progress to end, if any."""
        return self._next_catalogue[1] if self._next_catalogue is not None else None

    def _take_catalogue(self) -> None:
        if self._next_catalogue is None:
            return
        from models.catalogue_swap import rebuild

        catalogue, version = self._next_catalogue
        new = rebuild(catalogue, self.planner.catalogue, self.policy, self.budget)
        self.catalogue, self.policy, self.budget, self.catalogue_version = catalogue, new.policy, new.budget, version
        # the planner reads these at every use: the next plan sees the new catalogue whole
        self.planner.catalogue, self.planner.policy, self.planner.budget = new.accounting, new.policy, new.budget
        if self._trigger_names is not None:  # the triggers' offers, cooldowns and caps are the catalogue's
            self.planner.set_triggers(build_triggers(catalogue, self._trigger_names or None, self._cart_cooldown_ms))
        self._next_catalogue = None
        log.info("offer catalogue %s in use (%d offers, budgets %s)", version, len(catalogue) - 1,
                 catalogue.budgets() or "none")
        self._warn_validity(catalogue)

    def _warn_validity(self, catalogue: Catalogue) -> None:
        window_s = self.planner.window_ms // 1000
        longer = sorted(o for o, s in catalogue.offers.items() if s.kind != "none" and s.validity_s > window_s)
        if longer:
            log.warning("offer(s) %s are valid longer (validity_s) than the attribution window "
                        "(PROMO_ATTRIBUTION_WINDOW_S=%d s): their decisions say they expire when the window ends, "
                        "since a later redemption would be neither attributed nor charged to a budget; raise the "
                        "window or shorten the offers' validity", ", ".join(longer), window_s)

    @property
    def watermark_ms(self) -> int:
        """Event-time "now" of the expiry sweep: :attr:`clock`'s time (a low watermark over partitions, robust
        to outliers and bounded by wall clock + skew; :mod:`models.clock`)."""
        return self.clock.time_ms

    def observe_clock(self, events: list[Event]) -> int:
        """Feed the events' times to :attr:`clock` by their ``partition`` and advance it; returns its time."""
        observe = self.clock.observe
        for e in events:
            observe(e.partition, e.ts)
        return self.clock.advance()

    async def sync_clock(self) -> int:
        """Publish this worker's partition watermarks to the store and merge every worker's (so the clock is a low
        watermark over all partitions of the topic, not only this worker's), then advance it; returns its time.
        """
        # only what committed batches showed is published: a worker that dies in the middle of a batch must not
        # leave a clock past events that are not applied yet (the restarted worker's sweep would fire timers and
        # close windows ahead of them when they are redelivered)
        published = self.clock.state() if self._open_batch is None else self._clock_committed
        self.clock.merge(await self.store.sync_clock(published))
        if self._open_batch is not None:  # a batch retrying: its plans close windows by the clock they began with,
            return self.clock.time_ms     # so it moves at the next batch (else a re-plan could close differently
        return self.clock.advance()       # from a first plan whose budget settlements already landed)

    # ------------------------------------------------------------------------------------------
    # ------------------------------------------------------------------------------------------
    async def process_batch(self, events: list[Event], learn: bool = True,
                            progress: BatchProgress | None = None) -> BatchResult:
        """Apply a batch; see the module docstring for the guarantees.

        With ``learn=False`` the caller sends the decisions first, then calls :meth:`delivered` and
        :meth:`learn` (decision latency includes neither). With ``learn=True`` (offline: nothing is sent) both
        run here.

        ``progress``: pass the same :class:`BatchProgress` again after an exception to continue the batch where
        it stopped (what was committed is not planned again); ``events`` must be the same batch then.
        """
        if progress is None:
            progress = BatchProgress()
        result = progress.result
        if progress.pending is None:  # the batch's first attempt
            self._take_catalogue()  # one set meanwhile: from this batch on, never in the middle of one
            self._open_batch = progress
            # while this batch is planned and committed the sweep fires timers due by the clock before it only:
            # its events move the clock at once, and a timer must not fire ahead of a user's event not yet applied
            self._timer_horizon = self.clock.time_ms
            self.observe_clock(events)  # each event's ``partition`` (set by the worker; None offline: one stream)
            progress.pending = group_by_user(events)
        while progress.pending:
            if progress.refusals >= self.max_attempts:
                raise RuntimeError(
                    f"{len(progress.pending)} users' events could not be committed after {self.max_attempts} "
                    "attempts: another worker keeps changing the same users (rebalance storm?)"
                )
            await self._attempt(progress)
        if self._open_batch is progress:  # committed whole; a retry after an exception keeps it open
            self._open_batch = None
            self._timer_horizon = None
            self._clock_committed = self.clock.state()
        if learn:
            if not progress.released:
                await self._release_stale(result.to_send())
                progress.released = True
            await self.learn(result)
        return result

    async def _attempt(self, progress: BatchProgress) -> None:
        """Load, plan, reserve, settle and commit the pending users once; committed users move to the result."""
        pending = progress.pending
        ids = {u: [e.event_id for e in evs] for u, evs in pending.items()}
        triggers = {u: [e.event_id for e in evs if self.planner.may_trigger(e)] for u, evs in pending.items()}
        loads = await self.store.load(ids, triggers)
        for u, plan in progress.in_doubt.items():  # a commit of the failed pipeline that did land is ours
            if u in pending and plan.commit is not None and loads[u].token == plan.commit.token:
                self._accept(plan, progress.result)
                del pending[u]
        progress.in_doubt.clear()
        blocked = progress.blocked
        reads = await self._prefetch_items(pending, loads, triggers)
        plans = await self._plan_and_reserve(
            list(pending), lambda u: self.planner.plan_user(u, pending[u], loads[u], blocked.get(u), reads), blocked)
        if reads is not None and reads.misses:  # the fallback kept the result exact; say it cost a round trip
            self.item_reads_missed += reads.misses
            log.warning("%d item read(s) of recommendations were not prefetched: read synchronously (a bug in "
                        "models.learning.recommend.possible_seeds?)", reads.misses)
        to_commit = [p for p in plans if p.commit is not None]
        await self._settle_closing(to_commit)
        try:
            outcomes = await self.store.commit([p.commit for p in to_commit])
        except BaseException:
            progress.in_doubt = {p.user_id: p for p in to_commit}
            raise
        if any(p.commit.decisions for p, ok in zip(to_commit, outcomes) if ok is True):
            failpoints.hit("committed")
        refused_users = {p.user_id for p, ok in zip(to_commit, outcomes) if ok is False}
        failed = {p.user_id: ok for p, ok in zip(to_commit, outcomes) if isinstance(ok, BaseException)}
        for p in plans:
            if p.user_id not in refused_users and p.user_id not in failed:
                self._accept(p, progress.result)
        # A refused user was changed meanwhile by another worker (rebalance) or the expiry sweep; a failed commit
        # (its script answered an error) wrote nothing: plan both again. Either may still be ours: the Redis
        # client re-runs a whole pipeline after a dropped connection, and a commit that landed in the first run
        # is refused in the second; the next attempt recognises it by its token.
        progress.pending = {u: pending[u] for u in pending if u in refused_users or u in failed}
        progress.in_doubt = {p.user_id: p for p in to_commit if p.user_id in progress.pending}
        if refused_users:
            progress.refusals += 1
        if failed:
            raise next(iter(failed.values()))

    async def _plan_and_reserve(self, users: list[str], plan, blocked: dict[str, dict[str, str]]) -> list[UserPlan]:
        """``plan(user)`` for each user, and the budgets of their decisions reserved: a refused reservation (another
        decision took the rest of the budget) makes the user decide again with that offer in ``blocked``.

        After :data:`RESERVE_ROUNDS` refusals a user decides once more with every budgeted offer blocked, a plan
        that needs no reservation: every plan returned is reserved or reserves nothing, so no budgeted offer is
        ever committed and sent without its budget held."""
        plans = [plan(u) for u in users]
        if self.budget is None:
            return plans
        for last in [False] * (RESERVE_ROUNDS - 1) + [True]:
            refused = await self.budget.reserve_for(plans)
            if not refused:
                return plans
            for u, offers in refused.items():
                no = blocked.setdefault(u, {})
                no.update(offers)
                if last:
                    for oid in self.budget.budgets:
                        no.setdefault(oid, f"budget contended: {RESERVE_ROUNDS} reservations refused in this batch")
            plans = [plan(p.user_id) if p.user_id in refused else p for p in plans]
        unreserved = [p.user_id for p in plans if p.user_id in refused and p.requests]
        if unreserved:  # the gate's budgeted offers and its requests disagree: a bug, never a decision unreserved
            raise RuntimeError(f"{len(unreserved)} plan(s) still need a budget with every budgeted offer blocked")
        return plans

    async def _prefetch_items(self, pending: dict[str, list[Event]], loads: dict, triggers: dict[str, list[str]]):
        """What this batch's recommendations can read, fetched before planning (which then makes no Redis call:
        :mod:`models.state.item_reads`); None when no event may trigger."""
        if self.learning is None or not any(triggers.values()):
            return None
        seeds = [s for u, evs in pending.items() if triggers[u]
                 for s in self.planner.recommendation_seeds(loads[u], evs)]
        return await self.learning.prefetch_items(seeds, self.planner.k)

    def _accept(self, plan: "UserPlan", result: BatchResult) -> None:
        """A user's plan is final (committed, or nothing to commit): into the batch's result."""
        plan.merge_into(result)
        self.inflight.update(d.trigger_event_id for d in plan.decisions if is_timer_trigger_id(d.trigger_event_id))
        if self.policy.defer_exposure and not self.shares_policy:
            for ctx, offer_id in plan.exposures:  # counted once the decision is final
                self.policy.expose(ctx, offer_id)

    async def _settle_closing(self, plans: list[UserPlan]) -> None:
        if self.budget is not None:
            await self.budget.settle_closing(plans)

    async def _release_stale(self, decisions: list[Decision]) -> None:
        if self.budget is not None:
            await self.budget.release_stale(decisions)

    async def learn(self, result: BatchResult) -> None:
        """After the commit: the commits' item contributions are applied, models learn, closed decisions teach
        the policy (their budgets were settled before the commit). With ``shares_policy`` the commits already
        taught it: the policy reads its posteriors back from the store instead (:meth:`load_policy`).

        Safe to call again after an exception: each stage is done once (``result.learnt``); the in-memory stage
        is marked done before it runs, so a failure inside it never makes the models learn a batch twice."""
        done = result.learnt
        if "contributions" not in done:
            if result.parked:
                await self.store.apply_contributions(result.parked)  # idempotent: applied fields are deleted
            done.add("contributions")
        if "models" not in done:
            done.add("models")
            self._learn_in_memory(result)
        if "shared" not in done:
            if self.shares_policy and (result.decisions or result.closed) or self.shares_outcomes and result.closed:
                await self.load_policy()
            done.add("shared")

    def _learn_in_memory(self, result: BatchResult) -> None:
        if self.learning is not None and result.new_events:
            self.learning.learn_batch(result.new_events, result.profiles, watermark=self.clock.time_ms)
        if self.conversions is not None and result.closed:
            self.conversions.update(result.closed)
        if self.shares_policy or not result.closed:
            return
        for c in result.closed:
            ctx = DecisionContext.from_dict(c.decision.ctx) if c.decision.ctx else None
            if ctx is not None:
                self.policy.learn_one(ctx, c.decision.offer_id, c.reward, converted=c.converted)

    async def start(self) -> None:
        """Before the first batch of a process (idempotent): adopt what every worker's commits taught (policy
        posteriors, conversion counts) and start the event-time clock from every partition's published watermark
        - not from a model snapshot's largest event time, which one event ahead of the stream would be. Each
        restored watermark counts as seen now, bounded by wall clock + skew, and they combine as a low
        watermark: one wrong entry cannot move the clock."""
        if self._started:
            return
        await self.load_policy()
        restored = await self.store.sync_clock({})
        if restored:
            self.clock.merge(restored, restored=True)
        self._started = True

    async def load_policy(self) -> None:
        """Read what every worker's commits taught from the store: the policy's posteriors (``shares_policy``) and
        the conversion counts (``shares_outcomes``; their gauges are reported to the conversions' metrics sink)."""
        if self.shares_policy or self.shares_outcomes:
            self.take_shared_state(await self.store.policy_state())

    def take_shared_state(self, state: dict) -> None:
        """Adopt the store's shared hash (``policy_state``): posteriors and conversion counts, where shared."""
        if self.shares_policy:
            self.policy.load_state(state)
        if self.shares_outcomes:
            self.conversions.load_state(state)
            self.conversions.report_ratios()

    async def sweep(self, now_ms: int | None = None, user_ids: list[str] | None = None,
                    owned: set[int] | None = None, between: Callable[[], Awaitable] | None = None) -> BatchResult:
        """The expiry sweep at event time ``now_ms`` (default: :attr:`watermark_ms`, the clock), for ``user_ids``
        (default: the users the store lists as due): close the attribution windows that expired (reward 0, the
        policy learns), fire the timers that are due (``owned``: of these partitions only; None: all) and settle
        timer-fired decisions (drop the delivered, send again what a crash left unsent).

        The result's decisions (new and re-sent) are the caller's to send, then :meth:`delivered`; budgets of the
        new ones are reserved before their commit, as in a batch. The users are swept :attr:`sweep_chunk` at a time;
        ``between()`` is awaited before each chunk after the first (default: one turn of the event loop)."""
        now_ms = self.watermark_ms if now_ms is None else now_ms
        if self._timer_horizon is not None:  # a batch is being planned: no timer fires past the clock before it
            now_ms = min(now_ms, self._timer_horizon)
        result = BatchResult()
        users = list(user_ids) if user_ids is not None else await self.store.due_users(now_ms)
        blocked: dict[str, dict[str, str]] = {}
        try:
            for start in range(0, len(users), self.sweep_chunk):
                if start:  # the batches waiting in the loop go first (see SWEEP_CHUNK)
                    await (between() if between is not None else asyncio.sleep(0))
                chunk = users[start:start + self.sweep_chunk]
                for _attempt in range(self.max_attempts):
                    if not chunk:
                        break
                    chunk = await self._sweep_once(chunk, now_ms, owned, blocked, result)
        finally:  # what closed is counted even when a commit failed; the rest stays due for the next sweep
            await self.learn(result)
        return result

    async def _sweep_once(self, users: list[str], now_ms: int, owned, blocked: dict,
                          result: BatchResult) -> list[str]:
        """One pass of :meth:`sweep` over ``users``; returns those to plan again (their commit was refused)."""
        loads = await self.store.load({u: [] for u in users}, {})
        profiles = {u: self.planner.profile_of(loads[u]) for u in users}  # read once here; planning reads its own
        fired = {u: list(prof.fired) for u, prof in profiles.items() if prof.fired}
        if fired:  # the stored decisions of timer-fired ones: delivered yet?
            stored = await self.store.load({u: [] for u in fired}, fired)
            for u in fired:
                loads[u].stored = stored[u].stored
        reads = await self._prefetch_due(profiles)

        def plan(u: str):
            return self.planner.plan_user(u, [], loads[u], blocked.get(u), reads, sweep_ms=now_ms, owned=owned,
                                          inflight=self.inflight)

        plans = await self._plan_and_reserve(users, plan, blocked)
        # listed as due with nothing to commit (an entry of an older version, a timer of another worker's
        # partition, a decision still being sent): correct the entry
        await self.store.reindex([(p.user_id, self.planner.next_due(p), loads[p.user_id].version)
                                  for p in plans if p.commit is None])
        to_commit = [p for p in plans if p.commit is not None]
        await self._settle_closing(to_commit)
        outcomes = await self.store.commit([p.commit for p in to_commit])
        if any(p.commit.decisions for p, ok in zip(to_commit, outcomes) if ok is True):
            failpoints.hit("timer_committed")
        retry = {p.user_id for p, ok in zip(to_commit, outcomes) if ok is not True}
        for p in plans:
            if p.user_id not in retry:
                self._accept(p, result)
        failed = [ok for ok in outcomes if isinstance(ok, BaseException)]
        if failed:
            raise failed[0]
        return sorted(retry)

    async def _prefetch_due(self, profiles: dict[str, Profile]):
        """The item reads of the timers the sweep may fire for these users' ``profiles`` (:meth:`_prefetch_items`
        for a batch)."""
        if self.learning is None or not self.planner.timer_triggers:
            return None
        seeds = [s for prof in profiles.values() if prof.timers for s in self.planner.due_seeds(prof)]
        return await self.learning.prefetch_items(seeds, self.planner.k) if seeds else None

    async def delivered(self, result: BatchResult) -> None:
        """The batch's decisions (new and re-sent) reached the decisions topic: free what their ids still hold on
        campaigns other than their offer (:meth:`models.policy.budget.BudgetGate.release_stale`), then
        :meth:`mark_sent`. In this order: a worker killed in between leaves them unmarked, so the redelivered
        batch re-sends them and releases again (idempotent); released after the marks, a kill in between would
        leave the budget held until the attribution window lapses. Safe to call again after an exception."""
        decisions = result.to_send()
        if decisions:
            await self._release_stale(decisions)
            await self.mark_sent(decisions)

    async def mark_sent(self, decisions: list[Decision]) -> None:
        """Record that these decisions reached the decisions topic (a redelivery will not re-send them)."""
        await self.store.mark_sent([(d.user_id, d.trigger_event_id) for d in decisions])
        self.inflight.difference_update(d.trigger_event_id for d in decisions)


