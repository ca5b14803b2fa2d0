"""The batch engine: de-duplicate, fold events into profiles, decide on triggers, commit atomically per user.

One call of :meth:`Engine.process_batch` handles a batch of valid events (any users, partition order kept per
user) in three round trips to the store, whatever the batch size: load, commit, and (by the caller, after the
decisions were delivered) :meth:`Engine.mark_sent`.

Crash safety: the commit of a user (event-id markers, profile, decisions) is one atomic step. A batch that Kafka
redelivers after a crash finds its markers: its events count as duplicates, nothing is applied twice, and the
decisions their triggers produced are returned again (same ``decision_id``) unless already marked as sent.

Examples
--------
>>> import asyncio
>>> from models.events import Event
>>> from models.state.engine_memory import MemoryStore
>>> engine = Engine(MemoryStore(), clock_ms=lambda: 1_700_000_000_000)
>>> batch = [Event("e1", "view", "u1", "i1", 1_000, price=30.0), Event("e2", "cart", "u1", "i1", 2_000, price=30.0),
...          Event("e2", "cart", "u1", "i1", 2_000, price=30.0)]
>>> res = asyncio.run(engine.process_batch(batch))
>>> res.applied, res.duplicates, len(res.decisions)
({'view': 1, 'cart': 1}, 1, 1)
>>> res.decisions[0].trigger_event_id, res.decisions[0].items
('e2', ['i1'])
>>> again = asyncio.run(engine.process_batch(batch))  # redelivered before the decision was marked sent
>>> again.applied, again.duplicates, [d.decision_id for d in again.resend] == [res.decisions[0].decision_id]
({}, 3, True)
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from models.policy.attribution import Closed, OpenDecision, close_on_purchase, expire, orders_from_events
from models.policy.catalogue import Catalogue, load_catalogue
from models.clock import EventClock
from models.decision import Decision, decision_id_for
from models.events import Event
from models.metrics import NULL, MetricsSink
from models.policy.base import DecisionContext
from models.policy.rules import RulePolicy
from models.learning.contrib import Contribution
from models.profile import EVENT_WEIGHTS, Profile
from models import failpoints
from models.state.engine_store import EngineStore, UserCommit, parked_field
from models.triggers.base import Trigger
from models.triggers.cart import CartTrigger

OPEN_FIELD = "open"  # the user's open decisions (attribution windows), kept beside the profile fields

DAY_MS = 86_400_000


@dataclass
class BatchResult:
    applied: dict[str, int] = field(default_factory=dict)  # valid new events by type
    duplicates: int = 0
    decisions: list[Decision] = field(default_factory=list)  # new decisions, to send
    resend: list[Decision] = field(default_factory=list)  # stored decisions of redelivered triggers, not yet sent
    new_events: list[Event] = field(default_factory=list)
    profiles: dict[str, Profile] = field(default_factory=dict)  # users' profiles after the batch
    closed: list[Closed] = field(default_factory=list)  # decisions whose attribution window closed
    parked: list[tuple[str, str]] = field(default_factory=list)  # (user, record field): contributions to apply
    learnt: set[str] = field(default_factory=set)  # stages of Engine.learn done (a retried learn skips them)

    def to_send(self) -> list[Decision]:
        return self.decisions + self.resend

    def merge(self, other: "BatchResult") -> None:
        for k, v in other.applied.items():
            self.applied[k] = self.applied.get(k, 0) + v
        self.duplicates += other.duplicates
        self.decisions += other.decisions
        self.resend += other.resend
        self.new_events += other.new_events
        self.profiles.update(other.profiles)
        self.closed += other.closed
        self.parked += other.parked


def _group(events: list[Event]) -> dict[str, list[Event]]:
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    return by_user


@dataclass
class BatchProgress:
    """How far :meth:`Engine.process_batch` got with one batch.

    The caller passes the same object again after a transient error (Redis down, full or busy) and the batch
    continues where it stopped: users whose commit landed stay in :attr:`result` and are not planned again
    (so their events count once as applied, never as duplicates of the batch's own first attempt); users whose
    commit failed are planned again. When a whole commit pipeline fails (the connection dropped while it ran),
    whether each user's commit landed is unknown: the next attempt reads each user's commit token and accepts a
    plan whose token is the stored one (:attr:`in_doubt`).
    """

    result: BatchResult = field(default_factory=BatchResult)
    pending: dict[str, list[Event]] | None = None  # users still to commit, with their events (None: not started)
    blocked: dict[str, dict[str, str]] = field(default_factory=dict)  # offers refused by budgets, per user
    in_doubt: dict[str, "_UserPlan"] = field(default_factory=dict)  # plans whose commit may have landed
    refusals: int = 0  # attempts in which another writer changed a user first (bounded by max_attempts)
    released: bool = False  # stale reservations of the batch's decisions released

    def remaining(self) -> list[Event]:
        """The events of users not committed yet, per user in their order."""
        return [e for evs in (self.pending or {}).values() for e in evs]


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
        with ``decision_cooldown_s``.
    event_clock
        Event-time "now" of the expiry sweep and of lazy expiry (:class:`models.clock.EventClock`, fed each
        batch's event times by their ``partition``); default: one without a wall-clock bound.
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
    ) -> None:
        self.store = store
        self.catalogue = catalogue or load_catalogue()
        self.policy = policy or RulePolicy(self.catalogue, holdout_pct=holdout_pct)
        self.learning = learning
        self.triggers: list[Trigger] = triggers or [CartTrigger(decision_cooldown_s * 1000)]
        self.window_ms = attribution_window_s * 1000
        self.k = recommend_k
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.max_attempts = max_attempts
        self.budget = budget  # models.policy.budget.BudgetGate: blocks, reserves and settles budgeted offers
        self.conversions = conversions  # models.policy.attribution.OutcomeStats (treatment vs holdout)
        # "now" in event time for the expiry sweep and lazy expiry: one event (or a few) cannot move it
        self.clock = event_clock or EventClock(wall_ms=self.clock_ms)
        # {(topic, partition): next offset} the models have learnt up to (kept by the caller, e.g. the worker's
        # batch handler), and those of the snapshot the models were restored from: snapshots carry them
        self.learned_offsets: dict[tuple[str, int], int] = {}
        self.restored_offsets: dict[tuple[str, int], int] = {}
        self._contrib = self._contribution_settings()
        # commit tokens: unique per engine instance and commit, so a commit in doubt is recognised as ours
        self._instance = uuid.uuid4().hex[:12]
        self._commits = itertools.count(1)
        self._started = False  # start() ran
        # what decisions teach travels in the users' commits and is read back from the store (see learn): the
        # policy's posteriors, and the conversion counts behind the conversion and uplift gauges
        self.shares_policy = self.policy.shares_state
        self.shares_outcomes = conversions is not None
        if self._contrib is not None:
            learning.items_via_commit = True  # item statistics are written in the users' commits

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
                      metrics: MetricsSink = NULL) -> "Engine":
        """The production engine: the policy ``settings.policy`` (Thompson sampling with pacing, or the rules),
        budgets in ``budget_store``."""
        from models.policy.attribution import OutcomeStats
        from models.policy.thompson import ThompsonPolicy
        from models.policy.budget import BudgetGate
        from models.policy.pacing import PacingController

        catalogue = load_catalogue(settings.catalogue_path)
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
        )

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
        self.clock.merge(await self.store.sync_clock(self.clock.state()))
        return self.clock.advance()

    # ------------------------------------------------------------------------------------------
    def is_trigger(self, e: Event, prof: Profile) -> bool:
        """Whether a configured trigger fires at ``e``, just applied to the user's ``prof``."""
        return any(t.fires(e, prof) for t in self.triggers)

    def may_trigger(self, e: Event) -> bool:
        """Whether ``e`` could fire a decision (its stored decision is loaded with the batch)."""
        return any(t.may_fire(e) for t in self.triggers)

    def context(self, e: Event, prof: Profile, blocked: dict[str, str] | None = None) -> DecisionContext:
        day_start = e.ts - e.ts % DAY_MS
        learning = self.learning
        ctx = DecisionContext(
            user_id=e.user_id,
            now_ms=e.ts,
            cart_value=prof.cart_value,
            cart_items=list(prof.cart),
            cart_categories=prof.cart_categories,
            is_new=prof.is_new,
            n_purchases=prof.n_orders,
            segment=learning.segment(prof) if learning is not None else None,
            churn_risk=float(prof.churn_risk or 0.0),
            propensity=(
                learning.propensity(prof, e.ts) if learning is not None
                else (prof.counts.get("purchase", 0) + 1) / (prof.n_events + 10)
            ),
            offers_today=prof.offers_since(day_start),
            last_offer_ms=prof.last_offer_ts(),
            offer_counts_today={k: sum(1 for t in v if t >= day_start) for k, v in prof.offer_history.items()},
            offer_counts_total={k: len(v) for k, v in prof.offer_history.items()},
        )
        if learning is not None:
            ctx.features = learning.features(prof, e.ts, e.context or None)
        block = dict(self.budget.blocked(ctx)) if self.budget is not None else {}
        if blocked:
            block.update(blocked)
        ctx.blocked = block
        return ctx

    def decide(self, e: Event, prof: Profile, blocked: dict[str, str] | None = None) -> tuple[Decision, DecisionContext]:
        did = decision_id_for(e.event_id)
        ctx = self.context(e, prof, blocked)
        choice = self.policy.choose(ctx, random.Random(did))
        offer = choice.offer
        if offer.kind != "none" and offer.expires_at is None:
            offer.expires_at = e.ts + self.window_ms
        if self.learning is not None:
            items = self.learning.recommend(prof, self.k, e.ts)
        else:
            items = list(reversed(prof.recent_items))[: self.k]
        return Decision(
            decision_id=did,
            user_id=e.user_id,
            ts=self.clock_ms(),
            trigger_event_id=e.event_id,
            offer=offer,
            items=items,
            propensity=choice.propensity,
            scores=choice.scores,
            group=choice.group,
            model_version=choice.model_version,
            reasons=choice.reasons + [f"p_buy={ctx.propensity:.3f} (purchase propensity, "
                                      f"{'online model' if self.learning is not None else 'frequency'})"],
        ), ctx

    # ------------------------------------------------------------------------------------------
    def _plan_user(self, uid: str, evs: list[Event], load, blocked: dict[str, str] | None = None) -> _UserPlan:
        raw = dict(load.profile)
        open_raw = raw.pop(OPEN_FIELD, None)
        prof = Profile.from_dict(raw)
        if isinstance(open_raw, (str, bytes)):  # written by an earlier version: JSON text
            open_raw = json.loads(open_raw)
        open_ = [OpenDecision.from_dict(d) for d in open_raw] if open_raw else []
        plan = _UserPlan(uid, prof, had_open=bool(open_))
        cs = self._contrib
        contrib = Contribution(cs["header"]["hl"], cs["header"]["phl"]) if cs is not None else None
        done: set[str] = set()
        stored_json: list[tuple[str, bytes]] = []
        # the whole order, at its first line (lines of one order share order_id, else ts): orders_from_events
        # groups them in first-seen order, the same order as their first lines
        purchases = [e for e in evs if e.type == "purchase" and e.event_id not in load.seen]
        first_lines: dict[str, str] = {}
        for e in purchases:
            first_lines.setdefault(e.order_id or f"ts:{e.ts}", e.event_id)
        orders = dict(zip(first_lines.values(), orders_from_events(purchases)))
        for e in evs:
            if e.event_id in load.seen or e.event_id in done:
                plan.duplicates += 1
                stored = load.stored.get(e.event_id)
                if stored is not None and not stored[1]:
                    d = Decision.from_json(stored[0])
                    if all(x.decision_id != d.decision_id for x in plan.resend):
                        plan.resend.append(d)
                continue
            done.add(e.event_id)
            if open_:
                # at the event's time, but never past the clock: an event ahead of the stream (a device with a wrong
                # clock) closes no window early, its user's included. The clock is fixed during a batch (re-plans
                # close the same), and what it closes here the sweep could close now anyway: same outcome
                closed, open_ = expire(open_, min(e.ts, self.clock.time_ms))
                plan.closed += closed
            prof.apply(e)
            plan.new_events.append(e)
            if contrib is not None:
                contrib.add_event(prof.win, e.item_id, e.ts, EVENT_WEIGHTS.get(e.type, 0.0), cs["width"],
                                  cs["window_ms"])
            order = orders.get(e.event_id)
            if order is not None and open_:
                closed, open_ = close_on_purchase(self.catalogue, open_, order)
                plan.closed += closed
            if self.is_trigger(e, prof):
                d, ctx = self.decide(e, prof, blocked)
                prof.mark_decision(e.ts, d.offer.offer_id)
                plan.decisions.append(d)
                plan.exposures.append((ctx, d.offer.offer_id))
                stored_json.append((e.event_id, d.to_json()))
                if self.budget is not None:
                    req = self.budget.request(d.decision_id, d.offer.offer_id, prof.cart_value, e.ts)
                    if req is not None:
                        plan.requests.append(req)
                open_.append(OpenDecision(d.decision_id, uid, d.offer.offer_id, d.group, ts=e.ts,
                                          expires_ms=e.ts + self.window_ms, cart_value=prof.cart_value,
                                          propensity=d.propensity, ctx=ctx.to_dict()))
        plan.open = open_
        if plan.new_events or plan.closed:
            plan.commit = self._user_commit(plan, load.version, [e.event_id for e in plan.new_events], stored_json)
            if contrib:
                plan.commit.contrib = contrib.to_json(cs["header"])
        return plan

    def _user_commit(self, plan: _UserPlan, version: str, event_ids: list[str], decisions) -> UserCommit:
        """The atomic write of a user: profile fields with the open decisions beside them, markers, decisions,
        and what the decisions made and closed teach (``shares_policy``: posterior updates; ``shares_outcomes``:
        conversion counts)."""
        fields = plan.profile.to_dict()  # plain values: the store encodes the whole document once
        fields[OPEN_FIELD] = [d.to_dict() for d in plan.open]
        commit = UserCommit(plan.user_id, fields, event_ids, decisions, version=version,
                            open_until=min((d.expires_ms for d in plan.open), default=None), had_open=plan.had_open,
                            token=f"{self._instance}:{next(self._commits)}")
        if self.shares_policy:
            pol = self.policy
            ups = [pol.exposure_update(ctx, offer_id) for ctx, offer_id in plan.exposures]
            for c in plan.closed:
                if c.decision.ctx:
                    ups.append(pol.outcome_update(DecisionContext.from_dict(c.decision.ctx), c.decision.offer_id,
                                                  c.reward, converted=c.converted))
                    commit.counts["n"] = commit.counts.get("n", 0) + 1
            commit.policy = [u for u in ups if u is not None]
        if self.shares_outcomes and plan.closed:
            commit.counts.update(self.conversions.counts(plan.closed))
        return commit

    async def _reserve(self, plans: list[_UserPlan]) -> dict[str, dict[str, str]]:
        """Reserve the budgets the batch's decisions need; users whose reservation was refused, with why."""
        reqs = [(p, r) for p in plans for r in p.requests]
        if not reqs:
            return {}
        oks = await self.budget.reserve([r for _, r in reqs])
        failpoints.hit("reserved")
        refused: dict[str, dict[str, str]] = {}
        for (p, r), ok in zip(reqs, oks):
            if not ok:
                refused.setdefault(p.user_id, {})[r.offer_id] = "budget taken meanwhile by another decision"
        return refused

    async def process_batch(self, events: list[Event], learn: bool = True,
                            progress: BatchProgress | None = None) -> BatchResult:
        """Apply a batch; see the module docstring for the guarantees.

        With ``learn=False`` the models do not learn yet: the caller sends the decisions first and then
        calls :meth:`learn` (decision latency does not include learning).

        ``progress``: pass the same :class:`BatchProgress` again after an exception to continue the batch where
        it stopped (what was committed is not planned again); ``events`` must be the same batch then.
        """
        if progress is None:
            progress = BatchProgress()
        result = progress.result
        if progress.pending is None:  # the batch's first attempt
            self.observe_clock(events)  # each event's ``partition`` (set by the worker; None offline: one stream)
            progress.pending = _group(events)
        while progress.pending:
            if progress.refusals >= self.max_attempts:
                raise RuntimeError(
                    f"{len(progress.pending)} users' events could not be committed after {self.max_attempts} "
                    "attempts: another worker keeps changing the same users (rebalance storm?)"
                )
            await self._attempt(progress)
        if not progress.released:
            # re-sent decisions too: a worker killed between their commit and this line left the stale reservation
            await self._release_stale_reservations(result.decisions + result.resend)
            progress.released = True
        if learn:
            await self.learn(result)
        return result

    async def _attempt(self, progress: BatchProgress) -> None:
        """Load, plan, reserve, settle and commit the pending users once; committed users move to the result."""
        pending = progress.pending
        ids = {u: [e.event_id for e in evs] for u, evs in pending.items()}
        triggers = {u: [e.event_id for e in evs if self.may_trigger(e)] for u, evs in pending.items()}
        loads = await self.store.load(ids, triggers)
        for u, plan in progress.in_doubt.items():  # a commit of the failed pipeline that did land is ours
            if u in pending and plan.commit is not None and loads[u].token == plan.commit.token:
                self._accept(plan, progress.result)
                del pending[u]
        progress.in_doubt.clear()
        blocked = progress.blocked
        plans = [self._plan_user(u, evs, loads[u], blocked.get(u)) for u, evs in pending.items()]
        if self.budget is not None:
            for _ in range(3):  # a refused reservation: decide again without that offer
                refused = await self._reserve(plans)
                if not refused:
                    break
                for u, offers in refused.items():
                    blocked.setdefault(u, {}).update(offers)
                plans = [self._plan_user(p.user_id, pending[p.user_id], loads[p.user_id], blocked.get(p.user_id))
                         if p.user_id in refused else p for p in plans]
        to_commit = [p for p in plans if p.commit is not None]
        await self._settle(to_commit)
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

    def _accept(self, plan: "_UserPlan", result: BatchResult) -> None:
        """A user's plan is final (committed, or nothing to commit): into the batch's result."""
        plan.merge_into(result)
        if self.policy.defer_exposure and not self.shares_policy:
            for ctx, offer_id in plan.exposures:  # counted once the decision is final
                self.policy.expose(ctx, offer_id)

    async def _settle(self, plans: list["_UserPlan"]) -> None:
        """Settle the budgets of the decisions these commits close, BEFORE the commits (as reservations are made
        before them): a worker killed after a commit that closed a redeemed decision would otherwise lose the
        charge (the reservation would lapse uncharged). Settling is keyed by decision id, so a commit that is
        refused and planned again, or a redelivered batch, settles nothing twice; what closes is a function of
        the user's events, so a re-plan settles the same amount."""
        if self.budget is None:
            return
        closing = [(c.decision.offer_id, c.decision.decision_id, c.cost) for p in plans for c in p.closed]
        if closing:
            await self.budget.settle(closing)

    async def _release_stale_reservations(self, decisions: list[Decision]) -> None:
        """Free what a decision id holds on campaigns other than its committed offer.

        A worker that crashed after reserving but before committing left a reservation; the redelivered trigger
        is decided again (same decision id) and the policy, having learnt meanwhile, may pick another offer.
        Settling the other campaigns at cost 0 returns that budget at once (a no-op where nothing is held). It runs
        for re-sent decisions too (a worker killed after such a commit, before this release, is covered when the
        batch is redelivered); after ``mark_sent`` a redelivered trigger is not re-sent and its reservations lapse
        with the attribution window (:meth:`models.policy.budget.BudgetGate.sweep`).
        """
        if self.budget is None or not decisions:
            return
        budgeted = list(self.budget.budgets)
        stale = [(o, d.decision_id, 0.0) for d in decisions for o in budgeted if o != d.offer.offer_id]
        if stale:
            await self.budget.settle(stale)

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
            self.learning.learn_batch(result.new_events, result.profiles)
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

    async def sweep(self, now_ms: int | None = None, user_ids: list[str] | None = None) -> BatchResult:
        """Close attribution windows that expired by event time ``now_ms`` (default: :attr:`watermark_ms`, the
        clock) for ``user_ids`` (users whose open decisions the store lists as due). Reward 0, the policy learns."""
        now_ms = self.watermark_ms if now_ms is None else now_ms
        result = BatchResult()
        users = list(user_ids) if user_ids is not None else await self.store.due_users(now_ms)
        for _attempt in range(self.max_attempts):
            if not users:
                break
            loads = await self.store.load({u: [] for u in users}, {})
            plans, stale = [], []
            for u in users:
                plan = self._plan_user(u, [], loads[u])
                closed, still = expire(plan.open, now_ms)
                if closed:
                    plan.closed, plan.open = closed, still
                    plan.commit = self._user_commit(plan, loads[u].version, [], [])
                else:  # listed as due but nothing expires (an entry of an older version): correct it
                    stale.append((u, min((d.expires_ms for d in still), default=None), loads[u].version))
                plans.append(plan)
            await self.store.reindex(stale)
            to_commit = [p for p in plans if p.commit is not None]
            await self._settle(to_commit)
            outcomes = await self.store.commit([p.commit for p in to_commit])
            retry = {p.user_id for p, ok in zip(to_commit, outcomes) if ok is not True}
            for p in to_commit:
                if p.user_id not in retry:
                    result.closed += p.closed
            failed = [ok for ok in outcomes if isinstance(ok, BaseException)]
            if failed:  # what closed is counted; the rest stays due for the next sweep
                await self.learn(result)
                raise failed[0]
            users = sorted(retry)
        await self.learn(result)
        return result

    async def mark_sent(self, decisions: list[Decision]) -> None:
        """Record that these decisions reached the decisions topic (a redelivery will not re-send them)."""
        await self.store.mark_sent([(d.user_id, d.trigger_event_id) for d in decisions])


@dataclass
class _UserPlan:
    user_id: str
    profile: Profile
    duplicates: int = 0
    new_events: list[Event] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    resend: list[Decision] = field(default_factory=list)
    commit: UserCommit | None = None
    had_open: bool = False  # the user had open decisions before the batch (the store's index lists them)
    open: list = field(default_factory=list)  # OpenDecision, after the batch
    closed: list = field(default_factory=list)  # Closed
    requests: list = field(default_factory=list)  # budget ReserveRequest
    exposures: list = field(default_factory=list)  # (DecisionContext, offer id) of the decisions, once committed

    def merge_into(self, r: BatchResult) -> None:
        r.duplicates += self.duplicates
        r.decisions += self.decisions
        r.resend += self.resend
        r.new_events += self.new_events
        r.profiles[self.user_id] = self.profile
        r.closed += self.closed
        if self.commit is not None and self.commit.contrib:
            r.parked.append((self.user_id, parked_field(self.commit.version)))
        for e in self.new_events:
            r.applied[e.type] = r.applied.get(e.type, 0) + 1
