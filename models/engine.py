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
>>> from models.state import MemoryStore
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

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from models.catalogue import Catalogue, load_catalogue
from models.decision import Decision, decision_id_for
from models.events import Event
from models.policy import DecisionContext, RulePolicy
from models.profile import Profile
from models.state import EngineStore, UserCommit

DAY_MS = 86_400_000


@dataclass
class BatchResult:
    applied: dict[str, int] = field(default_factory=dict)  # valid new events by type
    duplicates: int = 0
    decisions: list[Decision] = field(default_factory=list)  # new decisions, to send
    resend: list[Decision] = field(default_factory=list)  # stored decisions of redelivered triggers, not yet sent
    new_events: list[Event] = field(default_factory=list)
    profiles: dict[str, Profile] = field(default_factory=dict)  # users' profiles after the batch

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


def _group(events: list[Event]) -> dict[str, list[Event]]:
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    return by_user


class Engine:
    """Turns batches of valid events into state updates and decisions.

    Parameters
    ----------
    store
        Where profiles, markers and decisions live (:class:`models.state.RedisStore` in production).
    policy
        Chooses the offer (``choose(ctx, rng) -> PolicyChoice``); default a :class:`models.policy.RulePolicy`
        over ``catalogue``.
    learning
        Optional learning core (``learn_batch``, ``recommend``, ``propensity``, ``segment``); without it items are
        the user's most recent ones and propensity is a frequency estimate.
    decision_cooldown_s
        Minimum event time between two decisions for one user; the first ``cart`` of a user always triggers.
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
    ) -> None:
        self.store = store
        self.catalogue = catalogue or load_catalogue()
        self.policy = policy or RulePolicy(self.catalogue, holdout_pct=holdout_pct)
        self.learning = learning
        self.cooldown_ms = decision_cooldown_s * 1000
        self.window_ms = attribution_window_s * 1000
        self.k = recommend_k
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.max_attempts = max_attempts

    @classmethod
    def from_settings(cls, settings, store: EngineStore, learning=None) -> "Engine":
        return cls(
            store,
            catalogue=load_catalogue(settings.catalogue_path),
            learning=learning,
            holdout_pct=settings.holdout_pct,
            decision_cooldown_s=settings.decision_cooldown_s,
            attribution_window_s=settings.attribution_window_s,
            recommend_k=settings.recommend_k,
        )

    # ------------------------------------------------------------------------------------------
    def is_trigger(self, e: Event, prof: Profile) -> bool:
        """A ``cart`` event, unless the user got a decision less than the cooldown ago (event time)."""
        return e.type == "cart" and (prof.n_decisions == 0 or e.ts - prof.last_decision_ts >= self.cooldown_ms)

    def context(self, e: Event, prof: Profile) -> DecisionContext:
        day_start = e.ts - e.ts % DAY_MS
        learning = self.learning
        return DecisionContext(
            user_id=e.user_id,
            now_ms=e.ts,
            cart_value=prof.cart_value,
            cart_items=list(prof.cart),
            cart_categories=prof.cart_categories,
            is_new=prof.is_new,
            n_purchases=prof.n_orders,
            segment=learning.segment(prof) if learning is not None else None,
            churn_risk=float(getattr(prof, "churn_risk", 0.0) or 0.0),
            propensity=(
                learning.propensity(prof, e.ts) if learning is not None
                else (prof.counts.get("purchase", 0) + 1) / (prof.n_events + 10)
            ),
            offers_today=prof.offers_since(day_start),
            last_offer_ms=prof.last_offer_ts(),
            offer_counts_today={k: sum(1 for t in v if t >= day_start) for k, v in prof.offer_history.items()},
            offer_counts_total={k: len(v) for k, v in prof.offer_history.items()},
        )

    def decide(self, e: Event, prof: Profile) -> Decision:
        did = decision_id_for(e.event_id)
        ctx = self.context(e, prof)
        choice = self.policy.choose(ctx, random.Random(did))
        offer = choice.offer
        if offer.kind != "none" and offer.expires_at is None:
            offer.expires_at = e.ts + self.window_ms
        if self.learning is not None:
            items = self.learning.recommend(prof, self.k)
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
            reasons=choice.reasons,
        )

    # ------------------------------------------------------------------------------------------
    def _plan_user(self, uid: str, evs: list[Event], load) -> _UserPlan:
        prof = Profile.from_redis(load.profile)
        plan = _UserPlan(uid, prof)
        done: set[str] = set()
        stored_json: list[tuple[str, bytes]] = []
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
            prof.apply(e)
            plan.new_events.append(e)
            if self.is_trigger(e, prof):
                d = self.decide(e, prof)
                prof.mark_decision(e.ts, d.offer.offer_id)
                plan.decisions.append(d)
                stored_json.append((e.event_id, d.to_json()))
        if plan.new_events:
            plan.commit = UserCommit(uid, prof.to_redis(), [e.event_id for e in plan.new_events], stored_json)
        return plan

    async def process_batch(self, events: list[Event]) -> BatchResult:
        """Apply a batch; see the module docstring for the guarantees."""
        result = BatchResult()
        pending = _group(events)
        for _attempt in range(self.max_attempts):
            ids = {u: [e.event_id for e in evs] for u, evs in pending.items()}
            triggers = {u: [e.event_id for e in evs if e.type == "cart"] for u, evs in pending.items()}
            loads = await self.store.load(ids, triggers)
            plans = [self._plan_user(u, evs, loads[u]) for u, evs in pending.items()]
            to_commit = [p for p in plans if p.commit is not None]
            oks = await self.store.commit([p.commit for p in to_commit])
            refused = {p.user_id for p, ok in zip(to_commit, oks) if not ok}
            for p in plans:
                if p.user_id not in refused:
                    p.merge_into(result)
            # a refused user was applied meanwhile by another worker (rebalance): re-plan from fresh state
            pending = {u: pending[u] for u in refused}
            if not pending:
                break
        else:
            raise RuntimeError(
                f"{len(pending)} users' events could not be committed after {self.max_attempts} attempts: "
                "another worker keeps applying the same events (rebalance storm?)"
            )
        if self.learning is not None and result.new_events:
            self.learning.learn_batch(result.new_events, result.profiles)
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

    def merge_into(self, r: BatchResult) -> None:
        r.duplicates += self.duplicates
        r.decisions += self.decisions
        r.resend += self.resend
        r.new_events += self.new_events
        r.profiles[self.user_id] = self.profile
        for e in self.new_events:
            r.applied[e.type] = r.applied.get(e.type, 0) + 1
