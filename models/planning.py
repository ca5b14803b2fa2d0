"""Planning one user's part of a batch: de-duplicate, fold the events into the profile, close attribution windows
(expiry, purchases), arm and fire timers, decide at triggers, and build the user's atomic commit (:class:`Planner`).

Planning reads the store's answer for the user (:class:`models.state.engine_store.UserLoad`) and writes nothing:
the engine reserves budgets and commits what it planned, and plans again a user whose commit was refused.
"""

from __future__ import annotations

import itertools
import random
import uuid
from typing import Callable

from models import jsoncodec
from models.batch import UserPlan
from models.clock import EventClock
from models.decision import Decision, decision_id_for
from models.events import Event
from models.learning.contrib import Contribution
from models.learning.recommend import possible_seeds
from models.policy.attribution import OpenDecision, close_on_purchase, expire, order_key, orders_from_events
from models.policy.base import DecisionContext, Policy
from models.policy.ledger import ledger_record
from models.policy.catalogue import Catalogue
from models.profile import EVENT_WEIGHTS, Profile
from models.state.engine_store import UserCommit
from models.state.item_store import ItemReads
from models.triggers.base import DISARM, Trigger, timer_trigger_id

OPEN_FIELD = "open"  # the user's open decisions (attribution windows), kept beside the profile fields

DAY_MS = 86_400_000


def _profile(doc: dict) -> Profile:
    """The profile of a stored document, without the open decisions beside it (:data:`OPEN_FIELD`)."""
    if OPEN_FIELD in doc:
        doc = {k: v for k, v in doc.items() if k != OPEN_FIELD}
    return Profile.from_dict(doc)


def basket_value(prof: Profile, e: Event, trigger: str) -> float:
    """The basket an offer decided at ``trigger`` is weighed against (``DecisionContext.cart_value``): the cart's
    value; at another moment with an empty cart (after an order, a return, browsing) the order the offer aims at
    is still to come, so the user's average order, else the price of the item at hand.

    >>> p = Profile(spend=90.0, n_orders=3)
    >>> basket_value(p, Event("e1", "view", "u1", "i1", 0, price=12.0), "cart"), basket_value(p, Event("e1", "view", "u1", "i1", 0, price=12.0), "retention")
    (0.0, 30.0)
    >>> basket_value(Profile(last_price=12.0), Event("t", "timer", "u1", "i1", 0), "browse_abandonment")
    12.0
    """
    value = prof.cart_value
    if value > 0 or trigger == "cart":
        return value
    if prof.n_orders > 0 and prof.spend > 0:
        return prof.spend / prof.n_orders
    return float(e.price or prof.last_price or 0.0)


class Planner:
    """Plans users' parts of batches for an :class:`models.engine.Engine` (which owns the collaborators).

    Parameters
    ----------
    catalogue, policy, learning, budget, conversions
        The engine's offer catalogue, policy, learning core (or None), budget gate (or None) and outcome stats
        (or None).
    triggers
        The moments to decide at (:mod:`models.triggers`), in the order they are asked: the first event trigger
        that fires at an event decides.
    window_ms
        Attribution window of a decision, event time.
    recommend_k
        Items recommended per decision.
    clock_ms
        Wall clock (a decision's ``ts``).
    event_clock
        The engine's event-time clock: lazy expiry never closes a window past it.
    contribution
        With item statistics learnt in the users' commits: the payload header and the user window's width and
        span (:meth:`models.engine.Engine._contribution_settings`); None otherwise.
    ledger_size
        Closed decisions kept per user for ``promo ledger export`` (:mod:`models.policy.ledger`); 0 keeps none.
    resend_after_ms
        Wall-clock age after which the sweep sends a timer-fired decision found stored and unsent again (a crash
        between its commit and its send); younger ones may still be on their way.
    """

    def __init__(self, *, catalogue: Catalogue, policy: Policy, learning, budget, conversions,
                 triggers: list[Trigger], window_ms: int, recommend_k: int, clock_ms: Callable[[], int],
                 event_clock: EventClock, contribution: dict | None, ledger_size: int = 50,
                 resend_after_ms: int = 30_000) -> None:
        self.catalogue = catalogue
        self.policy = policy
        self.learning = learning
        self.budget = budget
        self.conversions = conversions
        self.set_triggers(triggers)
        self.window_ms = window_ms
        self.k = recommend_k
        self.clock_ms = clock_ms
        self.clock = event_clock
        self._contrib = contribution
        self.ledger_size = ledger_size
        self.resend_after_ms = resend_after_ms
        # what decisions teach travels in the users' commits (see user_commit)
        self.shares_policy = policy.shares_state
        self.shares_outcomes = conversions is not None
        # commit tokens: unique per engine instance and commit, so a commit in doubt is recognised as ours
        self._instance = uuid.uuid4().hex[:12]
        self._commits = itertools.count(1)

    def set_triggers(self, triggers: list[Trigger]) -> None:
        """Decide at ``triggers`` from the next plan on (a catalogue swap rebuilds them)."""
        self.triggers = list(triggers)
        self.by_name = {t.name: t for t in self.triggers}
        self.event_triggers = [t for t in self.triggers if not t.timer]
        self.timer_triggers = [t for t in self.triggers if t.timer]

    def firing(self, e: Event, prof: Profile) -> Trigger | None:
        """The first configured event trigger that fires at ``e``, just applied to the user's ``prof``."""
        for t in self.event_triggers:
            if t.fires(e, prof):
                return t
        return None

    def is_trigger(self, e: Event, prof: Profile) -> bool:
        """Whether a configured trigger fires at ``e``, just applied to the user's ``prof``."""
        return self.firing(e, prof) is not None

    def may_trigger(self, e: Event) -> bool:
        """Whether ``e`` could fire a decision (its stored decision is loaded with the batch)."""
        return any(t.may_fire(e) for t in self.event_triggers)

    def context(self, e: Event, prof: Profile, blocked: dict[str, str] | None = None,
                trigger: str = "cart") -> DecisionContext:
        day_start = e.ts - e.ts % DAY_MS
        learning = self.learning
        ctx = DecisionContext(
            trigger=trigger,
            user_id=e.user_id,
            now_ms=e.ts,
            cart_value=basket_value(prof, e, trigger),
            cart_items=list(prof.cart),
            cart_categories=prof.cart_categories,
            is_new=prof.is_new,
            n_purchases=prof.n_orders,
            segment=learning.segment(prof) if learning is not None else None,
            churn_risk=float(prof.churn_risk or 0.0),
            propensity=(
                learning.propensity(prof, e.ts, e.context or None) if learning is not None
                else (prof.counts.get("purchase", 0) + 1) / (prof.n_events + 10)
            ),
            offers_today=prof.offers_since(day_start),
            last_offer_ms=prof.last_offer_ts(),
            offer_counts_today={k: sum(1 for t in v if t >= day_start) for k, v in prof.offer_history.items()},
            offer_counts_total=prof.offers_total(),
        )
        if learning is not None:
            ctx.features = learning.features(prof, e.ts, e.context or None)
        block = dict(self.budget.blocked(ctx)) if self.budget is not None else {}
        if blocked:
            block.update(blocked)
        ctx.blocked = block
        return ctx

    def recommendation_seeds(self, load, evs: list[Event]) -> list[str]:
        """The items that seed the recommendations of the user's decisions in this batch (from the loaded profile
        and the events, as :meth:`plan_user` will fold them): what the engine fetches before planning."""
        prof = self.profile_of(load)
        # an armed timer fires before whichever new event comes after it is due: every step may decide then
        timers = bool(prof.timers) and bool(self.timer_triggers)
        steps, done = [], set()
        for e in evs:
            if e.event_id not in load.seen and e.event_id not in done:
                done.add(e.event_id)
                steps.append((e.item_id, timers or self.may_trigger(e)))
        seeds = possible_seeds(prof.recent_items, steps, **self.learning.recommend_options)
        if timers:  # before the first new event
            seeds += self.due_seeds(prof)
        return seeds

    @staticmethod
    def profile_of(load) -> Profile:
        """The profile a store load holds (without the open decisions beside it), to read: it shares the load's
        containers, so only a plan, which takes its own (:meth:`UserLoad.take_profile`), may change them."""
        return _profile(load.profile)

    def due_seeds(self, prof: Profile) -> list[str]:
        """The items that seed the recommendations of a decision made on ``prof`` as it is (a timer's)."""
        n = self.learning.recommend_options.get("n_seeds", 5)
        return prof.recent_items[-n:] if n > 0 else []

    def decide(self, e: Event, prof: Profile, blocked: dict[str, str] | None = None,
               reads: ItemReads | None = None, trigger: str = "cart") -> tuple[Decision, DecisionContext]:
        did = decision_id_for(e.event_id)
        ctx = self.context(e, prof, blocked, trigger)
        choice = self.policy.choose(ctx, random.Random(did))
        offer = choice.offer
        # an offer is never said to be valid past its attribution window: a redemption after it would not be
        # attributed, and its budget is held that long only (Engine warns of such a catalogue)
        if offer.kind != "none" and (offer.expires_at is None or offer.expires_at > e.ts + self.window_ms):
            offer.expires_at = e.ts + self.window_ms
        if self.learning is not None:
            items = self.learning.recommend(prof, self.k, e.ts, reads)
        else:
            items = list(reversed(prof.recent_items))[: self.k]
        if prof.cart:  # the offer is for this cart: items already in it are no recommendation (no extra read)
            items = [i for i in items if i not in prof.cart]
        if trigger == "post_purchase":  # what goes with the item bought, not the item again
            items = [i for i in items if i != e.item_id]
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
            trigger=trigger,
        ), ctx

    def plan_user(self, uid: str, evs: list[Event], load, blocked: dict[str, str] | None = None,
                  reads: ItemReads | None = None, *, sweep_ms: int | None = None, owned=None,
                  inflight: frozenset | set = frozenset()) -> UserPlan:
        """The user's plan for ``evs``: fold, close, arm timers and fire the due ones, decide at triggers, the
        commit. ``reads``: the batch's prefetched item reads (:mod:`models.state.item_reads`), else
        recommendations read the item store.

        With ``sweep_ms`` (the expiry sweep, no events): also fire the timers due by then and close the windows
        that expired by then, and settle the user's timer-fired decisions (``load.stored`` holds them): drop those
        marked sent, send again those a crash left unsent unless ``inflight`` (this process is sending them).
        ``owned``: the partitions whose timers this worker fires (None: all)."""
        doc = load.take_profile()  # this plan's own: a plan made again from the same load starts afresh
        open_raw = doc.get(OPEN_FIELD)
        prof = _profile(doc)
        if isinstance(open_raw, (str, bytes)):  # written by an earlier version: JSON text
            open_raw = jsoncodec.loads(open_raw)
        open_ = [OpenDecision.from_dict(d) for d in open_raw] if open_raw else []
        plan = UserPlan(uid, prof, had_open=bool(open_ or prof.timers or prof.fired), open=open_)
        cs = self._contrib
        contrib = (Contribution(cs["header"]["half_life_ms"], cs["header"]["pop_half_life_ms"])
                   if cs is not None else None)
        done: set[str] = set()
        stored_json: list[tuple[str, bytes]] = []
        # the whole order, at its first line (lines of one order share order_id, else ts): orders_from_events
        # groups them in first-seen order, the same order as their first lines
        # (each line once, its first copy: a line delivered twice in one batch is a duplicate, as the fold below
        # counts it)
        lines: dict[str, Event] = {}
        for e in evs:
            if e.type == "purchase" and e.event_id not in load.seen:
                lines.setdefault(e.event_id, e)
        purchases = list(lines.values())
        first_lines: dict[str, str] = {}
        for e in purchases:
            first_lines.setdefault(order_key(e.order_id, e.ts), e.event_id)
        orders = dict(zip(first_lines.values(), orders_from_events(purchases)))
        timers = self.timer_triggers
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
            if plan.open:
                # at the event's time, but never past the clock: an event ahead of the stream (a device with a wrong
                # clock) closes no window early, its user's included. The clock is fixed during a batch (re-plans
                # close the same), and what it closes here the sweep could close now anyway: same outcome
                closed, plan.open = expire(plan.open, min(e.ts, self.clock.time_ms))
                plan.closed += closed
            if prof.timers:  # a timer due by now fired before this event, whether or not the sweep came first
                self._fire_due(plan, prof, e.ts, None, blocked, reads, stored_json)
            prof.apply(e)
            plan.new_events.append(e)
            if contrib is not None:
                contrib.add_event(prof.item_window, e.item_id, e.ts, EVENT_WEIGHTS.get(e.type, 0.0), cs["width"],
                                  cs["window_ms"])
            order = orders.get(e.event_id)
            if order is not None and plan.open:
                closed, plan.open = close_on_purchase(self.catalogue, plan.open, order)
                plan.closed += closed
            for t in timers:
                due = t.arm(e, prof)
                if due == DISARM:
                    prof.timers.pop(t.name, None)
                elif due is not None:
                    prof.timers[t.name] = [due, e.event_id, e.item_id, e.partition]
            trigger = self.firing(e, prof)
            if trigger is not None:
                self._decide_at(plan, e, prof, trigger, blocked, reads, stored_json)
        if sweep_ms is not None:
            self._settle_fired(plan, prof, load.stored, owned, inflight)  # before firing: not the ones fired now
            self._fire_due(plan, prof, sweep_ms, owned, blocked, reads, stored_json)
            closed, plan.open = expire(plan.open, sweep_ms)
            plan.closed += closed
        if plan.new_events or plan.closed or plan.changed:
            plan.commit = self.user_commit(plan, load.version, [e.event_id for e in plan.new_events], stored_json)
            if contrib:
                plan.commit.contrib = contrib.to_json(cs["header"])
        return plan

    def _decide_at(self, plan: UserPlan, e: Event, prof: Profile, trigger: Trigger, blocked, reads,
                   stored_json: list) -> None:
        """Decide at ``e`` for ``trigger``: the decision, its budget request and its open attribution window."""
        not_here = trigger.blocked(self.catalogue.offer_ids)
        if not_here:
            blocked = {**not_here, **(blocked or {})}
        d, ctx = self.decide(e, prof, blocked, reads, trigger.name)
        prof.mark_decision(e.ts, d.offer.offer_id, trigger.name)
        plan.decisions.append(d)
        plan.exposures.append((ctx, d.offer.offer_id))
        stored_json.append((e.event_id, d.to_json()))
        if self.budget is not None:
            req = self.budget.request(d.decision_id, d.offer.offer_id, ctx.cart_value, e.ts)
            if req is not None:
                plan.requests.append(req)
        plan.open.append(OpenDecision(d.decision_id, plan.user_id, d.offer.offer_id, d.group, ts=e.ts,
                                      expires_ms=e.ts + self.window_ms, cart_value=ctx.cart_value,
                                      propensity=d.propensity, ctx=ctx.to_dict(),
                                      after_order=order_key(e.order_id, e.ts) if e.type == "purchase" else None))

    def _fire_due(self, plan: UserPlan, prof: Profile, now_ms: int, owned, blocked, reads, stored_json) -> None:
        """Fire the user's timers due by event time ``now_ms`` (of ``owned`` partitions, None: all), earliest first.
        A fired timer decides at its due time, under the trigger id of the event that armed it, and leaves a
        record in ``prof.fired`` until the sweep sees its decision delivered. A timer whose trigger is off now, or
        that no longer applies (the cart emptied, the trigger's cooldown or cap), is dropped."""
        for name, (due, anchor, item, part) in sorted(prof.timers.items(), key=lambda kv: (kv[1][0], kv[0])):
            if due > now_ms or (owned is not None and part is not None and part not in owned):
                continue
            del prof.timers[name]
            plan.changed = True
            trigger = self.by_name.get(name)
            if trigger is None or not trigger.still_applies(prof) or not trigger.allows(prof, due):
                plan.timers_dropped.append(name)
                continue
            tid = timer_trigger_id(name, anchor)
            self._decide_at(plan, Event(tid, "timer", plan.user_id, item, due, partition=part), prof, trigger,
                            blocked, reads, stored_json)
            prof.fired[tid] = [due, part]

    def _settle_fired(self, plan: UserPlan, prof: Profile, stored: dict, owned, inflight) -> None:
        """The sweep's look at the user's timer-fired decisions: a delivered one (or one whose stored decision is
        gone) leaves ``prof.fired``; an undelivered one is sent again if a crash left it so: not while this process
        sends it (``inflight``), nor before :attr:`resend_after_ms` of wall-clock time since it was decided (a
        batch may be between its commit and its send, or another worker, during a rebalance)."""
        for tid, (_due, part) in list(prof.fired.items()):
            if owned is not None and part is not None and part not in owned:
                continue
            got = stored.get(tid)
            if got is None or got[1]:
                del prof.fired[tid]
                plan.changed = True
            elif tid not in inflight:
                d = Decision.from_json(got[0])
                if self.clock_ms() - d.ts >= self.resend_after_ms:
                    plan.resend.append(d)

    @staticmethod
    def next_due(plan: UserPlan) -> int | None:
        """The event time the sweep next has something to do for the user: a window to close, a timer to fire,
        a timer-fired decision to settle (None: nothing; the user leaves the sweep's index)."""
        prof = plan.profile
        dues = [d.expires_ms for d in plan.open]
        dues += [t[0] for t in prof.timers.values()]
        dues += [f[0] for f in prof.fired.values()]
        return min(dues, default=None)

    def user_commit(self, plan: UserPlan, version: str, event_ids: list[str], decisions) -> UserCommit:
        """The atomic write of a user: profile fields with the open decisions beside them, markers, decisions,
        and what the decisions made and closed teach (``shares_policy``: posterior updates; ``shares_outcomes``:
        conversion counts)."""
        fields = plan.profile.to_dict()  # plain values: the store encodes the whole document once
        fields[OPEN_FIELD] = [d.to_dict() for d in plan.open]
        commit = UserCommit(plan.user_id, fields, event_ids, decisions, version=version,
                            open_until=self.next_due(plan), had_open=plan.had_open,
                            token=f"{self._instance}:{next(self._commits)}")
        # kept beside each decision for ``promo explain``, and the closings for ``promo ledger export``: no read
        # or round trip of their own, they travel in the same atomic call
        commit.contexts = {d.trigger_event_id: jsoncodec.dumps_str(ctx.to_dict())
                           for d, (ctx, _) in zip(plan.decisions, plan.exposures)}
        if plan.closed and self.ledger_size:
            now = self.clock_ms()
            commit.ledger = [jsoncodec.dumps_str(ledger_record(c, now)) for c in plan.closed]
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
