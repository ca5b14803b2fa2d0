"""Seeded promotion simulator with a known true response per trigger, segment and offer.

Users arrive over a campaign period; each visit is a *trigger*, a moment the engine decides an offer (issue 14). A
user buys with the true probability ``P(buy | trigger, segment, offer)``, some hours later (delayed reward through
the attribution window). The same user stream and the same uniform draws (common random numbers) are replayed for
every policy, so their realised incremental margins are directly comparable:

    incremental = [buy under the chosen offer] * (margin - cost) - [buy under none] * margin

Every policy runs under the same constraints: eligibility, the offers each trigger may give, per-user caps,
campaign budgets (reserved in a :class:`models.state.budget_memory.MemoryBudgetStore`, settled when the window
closes) and pacing. After every decision and every settlement the simulator checks that no budget, no cap and no
trigger's offer list is broken.

The world below is this simulator's assumption, not a measurement of any shop: plausible shapes chosen so that the
triggers differ the way the engine must cope with, and fixed so that runs compare.

Triggers. A visit's trigger is drawn per visit (:data:`TRIGGER_SHARES`): most are add-to-carts (``cart``), then
``browse_abandonment`` (views, no cart, then idle), ``cart_abandonment`` (a cart not bought) and ``post_purchase``
(right after an order). A returning user whose absence lasted at least :data:`RETENTION_ABSENCE_DAYS` and whose churn
risk is at least :data:`RETENTION_CHURN` is a ``retention`` visit instead. What the decision weighs
follows the engine: the cart at ``cart`` and ``cart_abandonment``; at the others (no cart: the user has not carted,
or just bought, or just came back) the user's usual order (``models.planning.basket_value``), here the trigger's
typical basket for the segment without the visit's own draw; what the user buys, if they buy, is the visit's *basket*, drawn per
trigger around the segment's median (:data:`TRIGGER_BASKETS`).

Response (:data:`RESPONSE`: trigger -> segment -> ``(P(buy | none), {offer: uplift})``):

* ``cart``: as before triggers (:data:`SEGMENTS`);
* ``browse_abandonment``: about 0.3 of the cart's base rate (no cart yet), small uplifts; a gift helps new users;
* ``cart_abandonment``: about 0.6 of the cart's base rate, price-sensitive (discount uplifts about 1.5 times the
  cart's), larger baskets;
* ``post_purchase``: about a fifth of the cart's base rate (a next order within the window), a next-order coupon
  helps the price-sensitive and new segments, hardly the others; smaller baskets;
* ``retention``: a third to a half of the cart's base rate; only the retention offer (``winback_10``) may be given,
  and it pays where churners are price-sensitive or buy large baskets, not for the loyal segment.

Which offers a trigger may give is the catalogue's ``triggers:`` section (:data:`SIM_CATALOGUE`, read into
:data:`TRIGGER_OFFERS`); the simulator applies it as the engine does (``models.triggers.base.Trigger.blocked``),
by putting the other offers into ``ctx.blocked`` before ``policy.choose`` (``none`` is always allowed). Every context
carries its ``trigger``. The policy's ``propensity`` is the true no-offer rate at the visit's trigger (the learning
core's estimate, made perfect).

Run: ``.venv/bin/python tests/sim/promo_sim.py --users 50000 --seed 1`` (JSON on stdout, progress on stderr;
``--policy-option temper=6`` sets the learned policy's settings, ``--no-singles`` skips the single offers). Per
policy, ``by_trigger`` reports each trigger's decisions, incremental margin (realised and expected) and ``share`` of
the policy's realised incremental margin (None when that is not positive: a share of a loss or of nothing is no
share).
``expected_ratio_vs_oracle_curve`` gives the learned policy's expected incremental margin as a share of the
oracle's per tenth of the visits (``by_tenth``) and per half: how much of the shortfall is the cost of learning,
early in the campaign, and how much remains once the policy has learnt.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.policy.attribution import AttributionTracker, OpenDecision, Purchase  # noqa: E402
from models.policy.thompson import ThompsonPolicy  # noqa: E402
from models.state.budget_memory import MemoryBudgetStore
from models.state.budget_store import ReserveRequest  # noqa: E402
from models.policy.catalogue import NONE_ID, Catalogue, parse_catalogue  # noqa: E402
from models.decision import decision_id_for  # noqa: E402
from models.policy.pacing import PacingController  # noqa: E402
from models.policy.base import DecisionContext, PolicyChoice
from models.policy.eligibility import filter_offers, holdout  # noqa: E402
from models.triggers import build_triggers  # noqa: E402

DAY = 86_400_000
HOUR = 3_600_000
START = 1_700_000_000_000 - 1_700_000_000_000 % DAY
DAYS = 30

SIM_CATALOGUE = f"""
version: 1
margin_rate: 0.3
offer_validity_s: 86400
caps: {{max_offers_per_day: 1, min_gap_s: 43200}}
offers:
  - offer_id: coupon_5
    kind: coupon
    value: 5
    min_spend: 30
    prior_uplift: 0.03              # the marketer's guess, the same for every offer
    caps: {{per_user_total: 2, cooldown_s: 172800}}
    budget: 20000
    period: {{start: {START}, end: {START + DAYS * DAY}}}
  - offer_id: pct_10
    kind: percent_off
    prior_uplift: 0.03
    value: 10
    max_discount: 10
    eligibility: {{churn_risk: [0.0, 0.9]}}
    caps: {{per_user_per_day: 1, per_user_total: 2}}
    budget: 4000
    period: {{start: {START}, end: {START + DAYS * DAY}}}
  - offer_id: spend100_save15
    kind: threshold
    prior_uplift: 0.03
    value: 15
    min_spend: 100
    eligibility: {{min_cart_value: 60}}
    caps: {{per_user_total: 2}}
    budget: 20000
    period: {{start: {START}, end: {START + DAYS * DAY}}}
  - offer_id: gift_tote
    kind: gift
    prior_uplift: 0.03
    value: 12
    gift_cost: 4
    eligibility: {{customer: new}}
    caps: {{per_user_total: 1}}
    budget: 20000
    period: {{start: {START}, end: {START + DAYS * DAY}}}
  - offer_id: winback_10            # the retention offer: given only at the retention trigger
    kind: coupon
    prior_uplift: 0.03
    value: 10
    min_spend: 40
    eligibility: {{customer: returning}}
    caps: {{per_user_total: 1}}
    budget: 4000
    period: {{start: {START}, end: {START + DAYS * DAY}}}
triggers:                          # the offers each trigger may give ('none' always may)
  cart: {{offers: [coupon_5, pct_10, spend100_save15, gift_tote]}}
  browse_abandonment: {{offers: [coupon_5, gift_tote]}}
  cart_abandonment: {{offers: [coupon_5, pct_10, spend100_save15]}}
  post_purchase: {{offers: [coupon_5]}}
  retention: {{offers: [winback_10]}}
"""

TRIGGER_OFFERS: dict[str, tuple[str, ...]] = {
    name: spec.offers for name, spec in parse_catalogue(SIM_CATALOGUE, "sim.yaml").triggers.items()}
"""Trigger -> the offers it may give (``none`` always may): the catalogue's ``triggers:`` section."""

TRIGGERS: tuple[str, ...] = tuple(TRIGGER_OFFERS)
TRIGGERS_BY_NAME = {t.name: t for t in build_triggers(parse_catalogue(SIM_CATALOGUE, "sim.yaml"), list(TRIGGERS))}

# segment: (share, P(buy | none), {offer: uplift}, median cart value, P(new)) at the cart
SEGMENTS = {
    0: (0.30, 0.30, {"coupon_5": 0.02, "pct_10": 0.03, "spend100_save15": 0.02, "gift_tote": 0.01}, 40.0, 0.05),
    1: (0.30, 0.05, {"coupon_5": 0.08, "pct_10": 0.12, "spend100_save15": 0.04, "gift_tote": 0.02}, 60.0, 0.10),
    2: (0.20, 0.10, {"coupon_5": 0.03, "pct_10": 0.05, "spend100_save15": 0.10, "gift_tote": 0.02}, 120.0, 0.05),
    3: (0.20, 0.04, {"coupon_5": 0.05, "pct_10": 0.04, "spend100_save15": 0.02, "gift_tote": 0.07}, 50.0, 0.90),
}

# trigger -> segment -> (P(buy | none), {offer: uplift}); an offer not named adds nothing (the module docstring
# says what each trigger's numbers mean)
RESPONSE: dict[str, dict[int, tuple[float, dict[str, float]]]] = {
    "cart": {s: (base, lift) for s, (_, base, lift, _, _) in SEGMENTS.items()},
    "browse_abandonment": {
        0: (0.080, {"coupon_5": 0.020, "gift_tote": 0.005}),
        1: (0.015, {"coupon_5": 0.050, "gift_tote": 0.010}),
        2: (0.030, {"coupon_5": 0.015, "gift_tote": 0.005}),
        3: (0.012, {"coupon_5": 0.030, "gift_tote": 0.040}),
    },
    "cart_abandonment": {
        0: (0.180, {"coupon_5": 0.030, "pct_10": 0.045, "spend100_save15": 0.030}),
        1: (0.030, {"coupon_5": 0.120, "pct_10": 0.180, "spend100_save15": 0.060}),
        2: (0.060, {"coupon_5": 0.045, "pct_10": 0.075, "spend100_save15": 0.150}),
        3: (0.024, {"coupon_5": 0.075, "pct_10": 0.060, "spend100_save15": 0.030}),
    },
    "post_purchase": {
        0: (0.050, {"coupon_5": 0.005}),
        1: (0.010, {"coupon_5": 0.040}),
        2: (0.020, {"coupon_5": 0.005}),
        3: (0.010, {"coupon_5": 0.030}),
    },
    "retention": {
        0: (0.100, {"winback_10": 0.030}),
        1: (0.020, {"winback_10": 0.100}),
        2: (0.040, {"winback_10": 0.040}),
        3: (0.020, {"winback_10": 0.060}),
    },
}

# trigger -> (median basket as a multiple of the segment's median cart, sigma of its log); whether the decision
# sees the basket as its cart (True) or an empty cart (False), as the engine's profile has it then
TRIGGER_BASKETS: dict[str, tuple[float, float, bool]] = {
    "cart": (1.0, 0.5, True),
    "browse_abandonment": (0.8, 0.6, False),  # what was viewed
    "cart_abandonment": (1.1, 0.5, True),  # larger carts are left more often
    "post_purchase": (0.7, 0.5, False),  # a next, smaller order
    "retention": (1.0, 0.5, False),
}

TRIGGER_SHARES: dict[str, float] = {"cart": 0.62, "browse_abandonment": 0.18, "cart_abandonment": 0.12,
                                    "post_purchase": 0.08}
"""Shares of the visits that are not a retention return (those are decided by :data:`RETENTION_ABSENCE_DAYS` and
:data:`RETENTION_CHURN`)."""

RETENTION_ABSENCE_DAYS = 6.0  # a return after this long an absence ...
RETENTION_CHURN = 0.6  # ... by a user whose churn risk is at least this is a retention visit


def true_p(segment: int, offer_id: str, trigger: str = "cart") -> float:
    """``P(buy | trigger, segment, offer)``: the no-offer rate plus the offer's uplift there."""
    base, lift = RESPONSE[trigger][segment]
    return base + (lift.get(offer_id, 0.0) if offer_id != NONE_ID else 0.0)


def trigger_blocked(catalogue: Catalogue, trigger: str) -> dict[str, str]:
    """The offers ``trigger`` may not give, with the reason: what the engine puts into ``ctx.blocked`` (the
    engine's own :meth:`models.triggers.base.Trigger.blocked`); ``none`` is never blocked."""
    return TRIGGERS_BY_NAME[trigger].blocked(catalogue.offer_ids)


@dataclass(slots=True)
class Visit:
    ts: int
    user_id: str
    segment: int
    is_new: bool
    churn: float
    trigger: str
    cart: float  # the basket the decision weighs: the cart, or at triggers without one the user's usual order
    has_cart: bool  # whether the user has a cart then (cart and cart_abandonment)
    basket: float  # what the user buys without an offer, if they buy
    u: float  # common random number: buys under offer a iff u < P(buy | trigger, segment, a)
    delay_ms: int


def make_visits(n_users: int, seed: int) -> list[Visit]:
    """The user stream: one visit per user, a quarter come back 2-10 days later; each visit has a trigger."""
    rnd = random.Random(seed)
    shares = [SEGMENTS[s][0] for s in sorted(SEGMENTS)]
    drawn_triggers, trigger_weights = list(TRIGGER_SHARES), list(TRIGGER_SHARES.values())
    visits = []
    for i in range(n_users):
        s = rnd.choices(range(len(shares)), shares)[0]
        _, _, _, median, p_new = SEGMENTS[s]
        is_new = rnd.random() < p_new
        churn = rnd.random()
        uid = f"sim-{seed}-{i}"
        ts = START + int(rnd.random() * (DAYS - 1) * DAY)
        n = 2 if rnd.random() < 0.25 else 1
        absence_days = 0.0
        for _ in range(n):
            if absence_days >= RETENTION_ABSENCE_DAYS and churn >= RETENTION_CHURN:
                trigger = "retention"
            else:
                trigger = rnd.choices(drawn_triggers, trigger_weights)[0]
            factor, sigma, cart_seen = TRIGGER_BASKETS[trigger]
            basket = round(median * factor * math.exp(rnd.gauss(0.0, sigma)), 2)
            # after an order the user is a customer: no longer new
            new_now = is_new and trigger != "post_purchase"
            # without a cart the engine weighs the user's average order (models.planning.basket_value): here the
            # trigger's typical basket for the segment, without this visit's draw
            seen = basket if cart_seen else round(median * factor, 2)
            visits.append(Visit(ts, uid, s, new_now, churn, trigger, seen, cart_seen, basket,
                                rnd.random(), int(rnd.uniform(0.5, 12) * HOUR)))
            absence_days = rnd.uniform(2, 10)
            ts += int(absence_days * DAY)
            is_new = False
    visits.sort(key=lambda v: (v.ts, v.user_id))
    return visits


class OraclePolicy:
    """Knows the true response and each visit's basket; picks the best true incremental margin (with the same
    pacing prices). Without the visits it takes the cart for the basket."""

    model_version = "oracle"

    def __init__(self, catalogue: Catalogue, holdout_pct: float, pacing=None, visits: Iterable[Visit] = ()):
        self.catalogue, self.holdout_pct, self.pacing = catalogue, holdout_pct, pacing
        self.basket_of = {(v.user_id, v.ts): v.basket for v in visits}

    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice:
        none = self.catalogue[NONE_ID]
        if holdout(ctx.user_id, self.holdout_pct):
            return PolicyChoice(none.to_offer(ctx.now_ms), 1.0, {}, "holdout", [], self.model_version)
        eligible, reasons = filter_offers(self.catalogue, ctx)
        basket = self.basket_of.get((ctx.user_id, ctx.now_ms), ctx.cart_value)
        p0 = true_p(ctx.segment, NONE_ID, ctx.trigger)
        best, best_s = none, 0.0
        for s in eligible[1:]:
            lam = self.pacing.price(s.offer_id) if self.pacing else 0.0
            b = s.basket(basket)
            sc = (true_p(ctx.segment, s.offer_id, ctx.trigger) * (s.margin(b) - (1 + lam) * s.cost(b))
                  - p0 * s.margin(basket))
            if sc > best_s:
                best, best_s = s, sc
        return PolicyChoice(best.to_offer(ctx.now_ms), 1.0, {}, "treatment", reasons, self.model_version)

    def learn_one(self, ctx, offer_id, reward, converted=None):
        return None


class FixedPolicy:
    """Always the same offer when it is allowed, else none."""

    def __init__(self, catalogue: Catalogue, offer_id: str, holdout_pct: float):
        self.catalogue, self.offer_id, self.holdout_pct = catalogue, offer_id, holdout_pct
        self.model_version = f"always:{offer_id}"

    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice:
        none = self.catalogue[NONE_ID]
        if holdout(ctx.user_id, self.holdout_pct):
            return PolicyChoice(none.to_offer(ctx.now_ms), 1.0, {}, "holdout", [], self.model_version)
        eligible, _ = filter_offers(self.catalogue, ctx)
        spec = next((s for s in eligible if s.offer_id == self.offer_id), none)
        return PolicyChoice(spec.to_offer(ctx.now_ms), 1.0, {}, "treatment", [], self.model_version)

    def learn_one(self, ctx, offer_id, reward, converted=None):
        return None


class ConstraintViolation(AssertionError):
    pass


@dataclass
class RunResult:
    name: str
    incremental: float = 0.0
    expected_incremental: float = 0.0
    decisions: int = 0
    offers: dict = field(default_factory=dict)
    holdout: int = 0
    checks: int = 0
    max_budget_use: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # expected incremental margin per tenth of the visits
    by_segment: dict = field(default_factory=dict)  # segment -> expected incremental margin
    # trigger -> {decisions, incremental_margin, expected_incremental_margin, share of the realised incremental}
    by_trigger: dict = field(default_factory=dict)
    seconds: float = 0.0


def run_policy(name: str, make_policy, visits: list[Visit], holdout_pct: float = 5.0,
               window_ms: int = DAY, pacing_every: int = 50, progress=None) -> RunResult:
    """Replay the visits through one policy with budgets, caps, pacing and delayed attribution."""
    t0 = time.perf_counter()
    cat = parse_catalogue(SIM_CATALOGUE, "sim.yaml")
    pacing = PacingController(cat)
    policy = make_policy(cat, pacing)
    store = MemoryBudgetStore()
    budgets = cat.budgets()
    tracker = AttributionTracker(cat, window_ms)
    res = RunResult(name)
    history: dict[str, list[tuple[int, str]]] = {}  # user -> [(ts, offer)] of offers given
    ctx_of: dict[str, DecisionContext] = {}
    purchases: list[tuple[int, int, Purchase]] = []
    seq = 0
    spent = {o: 0.0 for o in budgets}
    blocked_at = {t: trigger_blocked(cat, t) for t in TRIGGERS}
    by_trigger: dict[str, list] = {}  # trigger -> [decisions, realised incremental, expected incremental]

    # each campaign's spend as last read: the store changes only by reserving and settling, after each of which
    # check_budgets reads every campaign, so the next decision's budget blocks need no reads of their own
    spent_now = {o: 0.0 for o in budgets}

    def check_budgets():
        for o, b in budgets.items():
            s = spent_now[o] = store.spend_one(o).spent
            if s > b + 1e-9:
                raise ConstraintViolation(f"{name}: budget of {o} exceeded: {s} > {b}")
            res.max_budget_use[o] = max(res.max_budget_use.get(o, 0.0), s / b)
        res.checks += 1

    def learn(closed):
        for c in closed:
            d = c.decision
            ctx = ctx_of.pop(d.decision_id)
            policy.learn_one(ctx, d.offer_id, c.reward, c.converted)
            if d.offer_id in budgets:
                store.settle_one(d.offer_id, d.decision_id, c.cost)
        if closed:
            check_budgets()

    for k, v in enumerate(visits):
        now = v.ts
        while purchases and purchases[0][0] <= now:
            _, _, p = heapq.heappop(purchases)
            learn(tracker.on_purchase(p))
        learn(tracker.sweep(now))
        if k % pacing_every == 0:
            spent = {o: store.spend_one(o).committed for o in budgets}
            pacing.update(now, spent)
        hist = history.get(v.user_id, [])
        day0 = now - now % DAY
        ctx = DecisionContext(
            user_id=v.user_id, now_ms=now, cart_value=v.cart, cart_items=["i"] if v.has_cart else [],
            cart_categories=["c"] if v.has_cart else [], is_new=v.is_new, n_purchases=0 if v.is_new else 1,
            segment=v.segment, churn_risk=v.churn, propensity=true_p(v.segment, NONE_ID, v.trigger),
            offers_today=sum(1 for t, _ in hist if t >= day0), last_offer_ms={o: t for t, o in hist},
            offer_counts_today={o: sum(1 for t, x in hist if x == o and t >= day0) for _, o in hist},
            offer_counts_total={o: sum(1 for _, x in hist if x == o) for _, o in hist}, trigger=v.trigger,
        )
        for o, b in budgets.items():
            if b - spent_now[o] < cat[o].max_cost(v.cart):
                ctx.blocked[o] = "budget exhausted"
        ctx.blocked.update(blocked_at[v.trigger])  # as the engine: the trigger's reason wins over the budget's
        did = decision_id_for(f"{v.user_id}|{now}")
        choice = policy.choose(ctx, random.Random(did))
        oid = choice.offer.offer_id
        if oid in budgets:
            ok = store.reserve_one(ReserveRequest(oid, did, cat[oid].max_cost(v.cart), budgets[oid],
                                                  now + window_ms + HOUR, now + 7 * DAY)).ok
            if not ok:
                raise ConstraintViolation(f"{name}: reservation refused although the offer was not blocked")
        check_budgets()
        _check_caps(cat, hist, now, oid, name)
        if oid != NONE_ID and oid not in TRIGGER_OFFERS[v.trigger]:
            raise ConstraintViolation(f"{name}: {oid} given at trigger {v.trigger}, which may not give it")
        if choice.group == "holdout" and oid != NONE_ID:
            raise ConstraintViolation(f"{name}: holdout user {v.user_id} got offer {oid}")
        if not 0.0 < choice.propensity <= 1.0:
            raise ConstraintViolation(f"{name}: propensity {choice.propensity} outside (0, 1]")
        if oid != NONE_ID:
            history.setdefault(v.user_id, []).append((now, oid))
        # outcome under the chosen offer, common random numbers; the user buys the visit's basket (topped up to the
        # offer's minimum spend)
        spec = cat[oid]
        p_buy = true_p(v.segment, oid, v.trigger)
        p_none = true_p(v.segment, NONE_ID, v.trigger)
        basket = spec.basket(v.basket)
        gain = spec.margin(basket) - spec.cost(basket)
        none_margin = spec.margin(v.basket) if oid != NONE_ID else cat.none_margin(v.basket)
        inc = (v.u < p_buy) * gain - (v.u < p_none) * none_margin
        exp_inc = p_buy * gain - p_none * none_margin
        res.incremental += inc
        res.expected_incremental += exp_inc
        per_trigger = by_trigger.setdefault(v.trigger, [0, 0.0, 0.0])
        per_trigger[0] += 1
        per_trigger[1] += inc
        per_trigger[2] += exp_inc
        tenth = k * 10 // len(visits)
        if len(res.curve) <= tenth:
            res.curve.append(0.0)
        res.curve[tenth] += exp_inc
        res.by_segment[v.segment] = res.by_segment.get(v.segment, 0.0) + exp_inc
        res.decisions += 1
        res.offers[oid] = res.offers.get(oid, 0) + 1
        res.holdout += choice.group == "holdout"
        ctx_of[did] = ctx
        tracker.open(OpenDecision(did, v.user_id, oid, choice.group, now, now + window_ms, v.cart, choice.propensity))
        if v.u < p_buy:
            seq += 1
            heapq.heappush(purchases, (now + v.delay_ms, seq, Purchase(
                v.user_id, now + v.delay_ms, basket, did if oid != NONE_ID else None)))
        if progress and k % 10_000 == 0:
            progress(f"{name}: {k}/{len(visits)} visits")
    end = visits[-1].ts + 2 * window_ms
    while purchases:
        _, _, p = heapq.heappop(purchases)
        learn(tracker.on_purchase(p))
    learn(tracker.sweep(end))
    total = res.incremental
    res.incremental = round(res.incremental, 2)
    res.expected_incremental = round(res.expected_incremental, 2)
    res.max_budget_use = {o: round(x, 4) for o, x in res.max_budget_use.items()}
    res.curve = [round(x, 2) for x in res.curve]
    res.by_segment = {k: round(x, 2) for k, x in sorted(res.by_segment.items())}
    res.by_trigger = _trigger_report(by_trigger, total)
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def _trigger_report(by_trigger: dict[str, list], total: float) -> dict[str, dict]:
    """Per trigger (in :data:`TRIGGERS` order): decisions, realised and expected incremental margin, and ``share``
    of the policy's realised incremental margin ``total``.

    A share is only a share of a positive total: with a total of zero or a loss, every share is None (dividing by
    a loss would turn the triggers that earned into negative shares). Shares of a positive total sum to 1; a
    trigger that lost margin has a negative share, and the others then sum to more than 1.

    >>> _trigger_report({"cart": [3, 30.0, 28.0], "retention": [1, -10.0, -9.0]}, 20.0)["retention"]
    {'decisions': 1, 'incremental_margin': -10.0, 'expected_incremental_margin': -9.0, 'share': -0.5}
    >>> _trigger_report({"cart": [3, 0.0, 0.0]}, 0.0)["cart"]["share"] is None
    True
    """
    return {t: {"decisions": n, "incremental_margin": round(inc, 2), "expected_incremental_margin": round(exp, 2),
                "share": round(inc / total, 4) if total > 0 else None}
            for t, (n, inc, exp) in sorted(by_trigger.items(), key=lambda kv: TRIGGERS.index(kv[0]))}


def _check_caps(cat: Catalogue, hist: list[tuple[int, str]], now: int, oid: str, name: str) -> None:
    """Independent check of the caps from the raw history (not through the policy's filter)."""
    if oid == NONE_ID:
        return
    day0 = now - now % DAY
    g = cat.caps
    today = [o for t, o in hist if t >= day0]
    if g.max_offers_per_day is not None and len(today) + 1 > g.max_offers_per_day:
        raise ConstraintViolation(f"{name}: {len(today) + 1} offers in a day > {g.max_offers_per_day}")
    if hist and now - max(t for t, _ in hist) < g.min_gap_s * 1000:
        raise ConstraintViolation(f"{name}: offers closer than {g.min_gap_s}s")
    c = cat[oid].caps
    mine = [t for t, o in hist if o == oid]
    if c.per_user_total is not None and len(mine) + 1 > c.per_user_total:
        raise ConstraintViolation(f"{name}: {oid} given more than {c.per_user_total} times")
    if c.per_user_per_day is not None and sum(t >= day0 for t in mine) + 1 > c.per_user_per_day:
        raise ConstraintViolation(f"{name}: {oid} more than {c.per_user_per_day}/day")
    if mine and c.cooldown_s and now - max(mine) < c.cooldown_s * 1000:
        raise ConstraintViolation(f"{name}: {oid} within its cooldown")


def curve_ratios(learned: list[float], oracle: list[float]) -> dict:
    """The learned policy's expected incremental margin as a share of the oracle's, per tenth of the visits and per
    half: where in the campaign the shortfall lies (learning early on, or a lasting gap). None where the oracle
    earned nothing to compare with.

    >>> curve_ratios([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 4.0])
    {'by_tenth': [0.5, 1.0, 0.75, 1.0], 'first_half': 0.75, 'second_half': 0.875}
    >>> curve_ratios([1.0, 1.0], [0.0, 2.0])["by_tenth"]
    [None, 0.5]
    """
    def share(num: float, den: float) -> float | None:
        return round(num / den, 4) if den > 0 else None

    half = len(oracle) // 2
    return {"by_tenth": [share(x, o) for x, o in zip(learned, oracle)],
            "first_half": share(sum(learned[:half]), sum(oracle[:half])),
            "second_half": share(sum(learned[half:]), sum(oracle[half:]))}


def simulate(n_users: int = 50_000, seed: int = 1, holdout_pct: float = 5.0, progress=None,
             singles: bool = True, policy_options: dict | None = None) -> dict:
    """Run the learned policy, the oracle, every single offer and always-none on one user stream.

    ``policy_options``: keyword arguments of :class:`models.policy.thompson.ThompsonPolicy` for the learned policy
    (e.g. ``{"temper": 6.0}``), to compare its settings on the same visits; reported as ``policy_options``."""
    visits = make_visits(n_users, seed)
    options = dict(policy_options or {})
    runs = {
        "learned": run_policy("learned",
                              lambda c, p: ThompsonPolicy(c, holdout_pct=holdout_pct, pacing=p, **options),
                              visits, holdout_pct, progress=progress),
        "oracle": run_policy("oracle", lambda c, p: OraclePolicy(c, holdout_pct, pacing=p, visits=visits), visits,
                             holdout_pct, progress=progress),
        "always:none": run_policy("always:none", lambda c, p: FixedPolicy(c, NONE_ID, holdout_pct), visits,
                                  holdout_pct, progress=progress),
    }
    if singles:
        cat = parse_catalogue(SIM_CATALOGUE, "sim.yaml")
        for o in cat.offer_ids[1:]:
            runs[f"always:{o}"] = run_policy(f"always:{o}", lambda c, p, o=o: FixedPolicy(c, o, holdout_pct),
                                             visits, holdout_pct, progress=progress)
    singles_inc = {k: r.incremental for k, r in runs.items() if k.startswith("always:") and k != "always:none"}
    best_single = max(singles_inc, key=singles_inc.get) if singles_inc else None
    learned, oracle = runs["learned"], runs["oracle"]
    return {
        "users": n_users,
        "visits": len(visits),
        "visits_by_trigger": {t: sum(v.trigger == t for v in visits) for t in TRIGGERS},
        "seed": seed,
        "policy_options": options,
        "ratio_vs_oracle": round(learned.incremental / oracle.incremental, 4),
        "expected_ratio_vs_oracle": round(learned.expected_incremental / oracle.expected_incremental, 4),
        # the same ratio per tenth of the visits and per half (expected margins: the noise of realised sales out)
        "expected_ratio_vs_oracle_curve": curve_ratios(learned.curve, oracle.curve),
        "best_single": best_single,
        "ratio_vs_best_single": round(learned.incremental / singles_inc[best_single], 4) if best_single else None,
        "holdout_share": round(learned.holdout / learned.decisions, 4),
        "runs": {k: vars(r) for k, r in runs.items()},
    }


NUMERIC_POLICY_OPTIONS = ("floor", "n_draws", "prior_strength", "temper")
"""The :class:`ThompsonPolicy` settings ``--policy-option`` may set."""


def policy_options(pairs: list[str]) -> dict:
    """``["temper=6", "floor=0.01"]`` -> ``{"temper": 6.0, "floor": 0.01}`` (``n_draws`` an int).

    >>> policy_options(["temper=6", "n_draws=32"])
    {'temper': 6.0, 'n_draws': 32}
    >>> policy_options(["tempr=6"])
    Traceback (most recent call last):
    ...
    ValueError: --policy-option tempr=6: unknown setting 'tempr' (one of floor, n_draws, prior_strength, temper)
    """
    out: dict = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in NUMERIC_POLICY_OPTIONS:
            raise ValueError(f"--policy-option {pair}: unknown setting {name!r} (one of "
                             f"{', '.join(NUMERIC_POLICY_OPTIONS)})")
        try:
            out[name] = int(value) if name == "n_draws" else float(value)
        except ValueError:
            raise ValueError(f"--policy-option {pair}: {value!r} is not a number") from None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--holdout-pct", type=float, default=5.0)
    ap.add_argument("--policy-option", action="append", default=[], metavar="NAME=NUMBER",
                    help="a numeric ThompsonPolicy setting for the learned policy, e.g. temper=6 (repeatable)")
    ap.add_argument("--no-singles", action="store_true", help="skip the single-offer runs (faster)")
    a = ap.parse_args()
    try:
        options = policy_options(a.policy_option)
    except ValueError as exc:
        ap.error(str(exc))
    out = simulate(a.users, a.seed, a.holdout_pct, progress=lambda m: print(m, file=sys.stderr, flush=True),
                   singles=not a.no_singles, policy_options=options)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
