"""Seeded promotion simulator with a known true response per segment and offer.

Users arrive over a campaign period; each visit with a cart triggers a decision. A user buys with the true
probability ``P(buy | segment, offer)``, some hours later (delayed reward through the attribution window).
The same user stream and the same uniform draws (common random numbers) are replayed for every policy, so
their realised incremental margins are directly comparable:

    incremental = [buy under the chosen offer] * (margin - cost) - [buy under none] * margin

Every policy runs under the same constraints: eligibility, per-user caps, campaign budgets (reserved in a
:class:`models.state.budget_memory.MemoryBudgetStore`, settled when the window closes) and pacing. After every decision
and every settlement the simulator checks that no budget and no cap is exceeded.

Run: ``.venv/bin/python tests/sim/promo_sim.py --users 50000 --seed 1`` (JSON on stdout, progress on stderr).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
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
"""

# segment: (share, P(buy | none), {offer: uplift}, median cart value, P(new))
SEGMENTS = {
    0: (0.30, 0.30, {"coupon_5": 0.02, "pct_10": 0.03, "spend100_save15": 0.02, "gift_tote": 0.01}, 40.0, 0.05),
    1: (0.30, 0.05, {"coupon_5": 0.08, "pct_10": 0.12, "spend100_save15": 0.04, "gift_tote": 0.02}, 60.0, 0.10),
    2: (0.20, 0.10, {"coupon_5": 0.03, "pct_10": 0.05, "spend100_save15": 0.10, "gift_tote": 0.02}, 120.0, 0.05),
    3: (0.20, 0.04, {"coupon_5": 0.05, "pct_10": 0.04, "spend100_save15": 0.02, "gift_tote": 0.07}, 50.0, 0.90),
}


def true_p(segment: int, offer_id: str) -> float:
    _, base, lift, _, _ = SEGMENTS[segment]
    return base + (lift.get(offer_id, 0.0) if offer_id != NONE_ID else 0.0)


@dataclass(slots=True)
class Visit:
    ts: int
    user_id: str
    segment: int
    is_new: bool
    churn: float
    cart: float
    u: float  # common random number: buys under offer a iff u < P(buy | segment, a)
    delay_ms: int


def make_visits(n_users: int, seed: int) -> list[Visit]:
    """The user stream: one visit per user, a quarter come back 2-10 days later."""
    rnd = random.Random(seed)
    shares = [SEGMENTS[s][0] for s in sorted(SEGMENTS)]
    visits = []
    for i in range(n_users):
        s = rnd.choices(range(len(shares)), shares)[0]
        _, _, _, median, p_new = SEGMENTS[s]
        is_new = rnd.random() < p_new
        churn = rnd.random()
        uid = f"sim-{seed}-{i}"
        ts = START + int(rnd.random() * (DAYS - 1) * DAY)
        n = 2 if rnd.random() < 0.25 else 1
        for _ in range(n):
            cart = round(median * math.exp(rnd.gauss(0.0, 0.5)), 2)
            visits.append(Visit(ts, uid, s, is_new, churn, cart, rnd.random(), int(rnd.uniform(0.5, 12) * HOUR)))
            ts += int(rnd.uniform(2, 10) * DAY)
            is_new = False
    visits.sort(key=lambda v: (v.ts, v.user_id))
    return visits


class OraclePolicy:
    """Knows the true response; picks the best true incremental margin (with the same pacing prices)."""

    model_version = "oracle"

    def __init__(self, catalogue: Catalogue, holdout_pct: float, pacing=None):
        self.catalogue, self.holdout_pct, self.pacing = catalogue, holdout_pct, pacing

    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice:
        none = self.catalogue[NONE_ID]
        if holdout(ctx.user_id, self.holdout_pct):
            return PolicyChoice(none.to_offer(ctx.now_ms), 1.0, {}, "holdout", [], self.model_version)
        eligible, reasons = filter_offers(self.catalogue, ctx)
        p0 = true_p(ctx.segment, NONE_ID)
        best, best_s = none, 0.0
        for s in eligible[1:]:
            lam = self.pacing.price(s.offer_id) if self.pacing else 0.0
            b = s.basket(ctx.cart_value)
            sc = true_p(ctx.segment, s.offer_id) * (s.margin(b) - (1 + lam) * s.cost(b)) - p0 * s.margin(ctx.cart_value)
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

    def check_budgets():
        for o, b in budgets.items():
            s = store.spend_one(o).spent
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
            user_id=v.user_id, now_ms=now, cart_value=v.cart, cart_items=["i"], cart_categories=["c"],
            is_new=v.is_new, n_purchases=0 if v.is_new else 1, segment=v.segment, churn_risk=v.churn,
            propensity=true_p(v.segment, NONE_ID), offers_today=sum(1 for t, _ in hist if t >= day0),
            last_offer_ms={o: t for t, o in hist},
            offer_counts_today={o: sum(1 for t, x in hist if x == o and t >= day0) for _, o in hist},
            offer_counts_total={o: sum(1 for _, x in hist if x == o) for _, o in hist},
        )
        for o, b in budgets.items():
            left = b - store.spend_one(o).spent
            if left < cat[o].max_cost(v.cart):
                ctx.blocked[o] = "budget exhausted"
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
        if choice.group == "holdout" and oid != NONE_ID:
            raise ConstraintViolation(f"{name}: holdout user {v.user_id} got offer {oid}")
        if not 0.0 < choice.propensity <= 1.0:
            raise ConstraintViolation(f"{name}: propensity {choice.propensity} outside (0, 1]")
        if oid != NONE_ID:
            history.setdefault(v.user_id, []).append((now, oid))
        # outcome under the chosen offer, common random numbers
        spec = cat[oid]
        p_buy = true_p(v.segment, oid)
        basket = spec.basket(v.cart)
        gain = spec.margin(basket) - spec.cost(basket)
        none_margin = spec.margin(v.cart) if oid != NONE_ID else cat.none_margin(v.cart)
        res.incremental += (v.u < p_buy) * gain - (v.u < true_p(v.segment, NONE_ID)) * none_margin
        exp_inc = p_buy * gain - true_p(v.segment, NONE_ID) * none_margin
        res.expected_incremental += exp_inc
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
    res.incremental = round(res.incremental, 2)
    res.expected_incremental = round(res.expected_incremental, 2)
    res.max_budget_use = {o: round(x, 4) for o, x in res.max_budget_use.items()}
    res.curve = [round(x, 2) for x in res.curve]
    res.by_segment = {k: round(x, 2) for k, x in sorted(res.by_segment.items())}
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


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


def simulate(n_users: int = 50_000, seed: int = 1, holdout_pct: float = 5.0, progress=None,
             singles: bool = True) -> dict:
    """Run the learned policy, the oracle, every single offer and always-none on one user stream."""
    visits = make_visits(n_users, seed)
    runs = {
        "learned": run_policy("learned", lambda c, p: ThompsonPolicy(c, holdout_pct=holdout_pct, pacing=p),
                              visits, holdout_pct, progress=progress),
        "oracle": run_policy("oracle", lambda c, p: OraclePolicy(c, holdout_pct, pacing=p), visits, holdout_pct,
                             progress=progress),
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
        "seed": seed,
        "ratio_vs_oracle": round(learned.incremental / oracle.incremental, 4),
        "expected_ratio_vs_oracle": round(learned.expected_incremental / oracle.expected_incremental, 4),
        "best_single": best_single,
        "ratio_vs_best_single": round(learned.incremental / singles_inc[best_single], 4) if best_single else None,
        "holdout_share": round(learned.holdout / learned.decisions, 4),
        "runs": {k: vars(r) for k, r in runs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--holdout-pct", type=float, default=5.0)
    a = ap.parse_args()
    out = simulate(a.users, a.seed, a.holdout_pct, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
