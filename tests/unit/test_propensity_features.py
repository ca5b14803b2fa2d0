"""Issue 13: the behaviour features of purchase propensity, on hand-built profiles, and no train/serve skew."""

from __future__ import annotations

import math

import pytest

from models.events import Event
from models.learning.behaviour_features import BEHAVIOUR_FEATURES, HOUR_MS, MAX_GAP_H, behaviour_values
from models.learning.conversion import ConversionRates
from models.learning.core import LearningCore
from models.learning.features import MODEL_FEATURE_NAMES
from models.profile import Profile

MIN = 60_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (24 * HOUR_MS)  # a midnight (UTC)


def features(p: Profile, now: int, cat_conv: ConversionRates | None = None) -> dict[str, float]:
    return dict(zip(BEHAVIOUR_FEATURES, behaviour_values(p, now, cat_conv or ConversionRates())))


def two_sessions() -> Profile:
    """Session 1: view + cart of a tv at midnight; session 2, 5 h later: views of shoes then a tv."""
    p = Profile()
    p.apply(Event("e1", "view", "u", "tv1", T0, category="tv", session_id="s1"))
    p.apply(Event("e2", "cart", "u", "tv1", T0 + MIN, category="tv", session_id="s1"))
    p.apply(Event("e3", "view", "u", "sh1", T0 + 5 * HOUR_MS, category="shoes", session_id="s2"))
    p.apply(Event("e4", "view", "u", "tv2", T0 + 5 * HOUR_MS + MIN, category="tv", session_id="s2"))
    return p


def test_per_session_rates_and_the_current_session():
    p = two_sessions()
    x = features(p, T0 + 5 * HOUR_MS + MIN)
    assert p.n_sessions == 2
    assert x["events_per_session"] == pytest.approx(math.log1p(4 / 2))
    assert x["carts_per_session"] == 0.5 and x["orders_per_session"] == 0.0
    assert x["session_cart_rate"] == 0.0  # no cart in the current session
    p.apply(Event("e5", "cart", "u", "tv2", T0 + 5 * HOUR_MS + 2 * MIN, category="tv", session_id="s2"))
    assert features(p, T0 + 5 * HOUR_MS + 2 * MIN)["session_cart_rate"] == pytest.approx(1 / 3)


def test_gap_since_the_previous_session_and_time_since_the_last_cart():
    p = two_sessions()
    now = T0 + 5 * HOUR_MS + MIN
    x = features(p, now)
    assert p.prev_session_gap_ms == 5 * HOUR_MS - MIN
    assert x["prev_session_gap_h"] == pytest.approx(math.log1p((5 * HOUR_MS - MIN) / HOUR_MS))
    assert x["since_last_cart_min"] == pytest.approx(math.log1p(5 * 60))  # the cart at T0 + 1 min
    fresh = Profile()
    fresh.apply(Event("e1", "view", "u", "i", T0))
    y = features(fresh, T0)
    assert y["since_last_cart_min"] == pytest.approx(math.log1p(60 * MAX_GAP_H))  # no cart yet: the cap
    assert y["prev_session_gap_h"] == pytest.approx(math.log1p(MAX_GAP_H))  # no previous session: the cap


def test_hour_of_day_is_on_a_circle():
    p = Profile()
    at = {h: features(p, T0 + h * HOUR_MS) for h in (0, 6, 12, 23)}
    assert (at[0]["hour_sin"], at[0]["hour_cos"]) == pytest.approx((0.0, 1.0))
    assert (at[6]["hour_sin"], at[6]["hour_cos"]) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert at[12]["hour_cos"] == pytest.approx(-1.0)
    # 23:00 is closer to midnight than noon is
    d = {h: math.dist((at[h]["hour_sin"], at[h]["hour_cos"]), (at[0]["hour_sin"], at[0]["hour_cos"])) for h in (12, 23)}
    assert d[23] < d[12]


def test_the_users_activity_in_the_current_category():
    p = two_sessions()  # tv: view 1 + cart 3 + view 1 (decayed over 5 h); shoes: view 1
    now = T0 + 5 * HOUR_MS + MIN
    x = features(p, now)
    tv, shoes = p.cat_aff["tv"][0], p.cat_aff["shoes"][0]
    assert x["category_affinity_share"] == pytest.approx(tv / (tv + shoes))
    assert x["category_affinity"] == pytest.approx(math.log1p(tv))  # scored at ``now``: no decay yet
    later = features(p, now + 3 * 24 * HOUR_MS)["category_affinity"]  # one half-life later
    assert later == pytest.approx(math.log1p(tv / 2))


def test_category_volume_and_buys_per_cart_come_from_the_shared_counts():
    rates = ConversionRates(a=1.0)
    for t in ["view"] * 6 + ["cart"] * 2 + ["purchase"] * 2:
        rates.update("tv", t)
    for t in ["view"] * 1 + ["cart"] * 4:
        rates.update("shoes", t)
    p = two_sessions()  # the latest event is in "tv"
    x = features(p, T0 + 5 * HOUR_MS + MIN, rates)
    assert x["category_share"] == pytest.approx(math.log((10 + 1) / (15 + 2 + 1)))
    g = (2 + 1) / (6 + 1)
    assert x["category_buy_per_cart"] == pytest.approx(math.log((2 + g) / (2 + 1)))
    assert rates.log_buy_per_cart("tv") > rates.log_buy_per_cart("shoes")


def test_old_conversion_counts_unpickle_without_cart_counts():
    import pickle

    rates = ConversionRates()
    rates.update("tv", "purchase")
    state = dict(rates.__dict__)
    del state["carts"], state["n_carts"]  # as pickled before carts were counted
    old = ConversionRates.__new__(ConversionRates)
    old.__setstate__(state)
    assert old.carts == {} and math.isfinite(old.log_buy_per_cart("tv"))
    assert pickle.loads(pickle.dumps(old)).n_carts == 0


def test_the_engine_learns_the_features_it_predicts_with():
    """No train/serve skew: at a decision point the engine's ``propensity`` (what the planner asks, with the
    event's context) is the prediction the learner recorded for that point, context features included."""
    core = LearningCore(horizon_h=0.01, decision_points="batch")  # a 36 s horizon
    for k in range(60):  # app users buy, web users do not: the context weights move off zero
        u, t, channel = f"w{k}", T0 + k * 100_000, "app" if k % 2 else "web"
        prof = Profile()
        view = Event(f"w{k}a", "view", u, "i1", t, category="tv", context={"channel": channel})
        prof.apply(view)
        core.learn_batch([view], {u: prof})
        if channel == "app":
            buy = Event(f"w{k}b", "purchase", u, "i1", t + 5_000, category="tv", context={"channel": channel})
            prof.apply(buy)
            core.learn_batch([buy], {u: prof})
    prof = Profile()
    e = Event("z", "cart", "z", "i1", T0 + 7_000_000, category="tv", context={"channel": "web", "basket": 3})
    prof.apply(e)
    served, without_context = core.propensity(prof, e.ts, e.context), core.propensity(prof, e.ts)
    core.learn_batch([e], {"z": prof})  # after the decision, as the engine learns
    point = core.purchase_model.queue[-1]
    assert point.user == "z" and point.extra == {"ctx_channel=web": 1.0, "ctx_basket": 3.0}
    assert served == point.preds[0]
    assert without_context != point.preds[0]  # without the context: what the planner asked before
    assert len(MODEL_FEATURE_NAMES) == len(point.values)


def test_the_features_learnt_at_a_decision_are_those_the_decision_was_served_with():
    """Through the engine: the features the planner served a cart decision with are the features its decision
    point learns with. The point's features were computed after the batch's events were counted (the item's and
    category's conversion and share, purchases per cart) and after the decision was recorded (n_decisions)."""
    import asyncio

    from models.engine import Engine
    from models.learning.features import MODEL_FEATURE_NAMES as NAMES
    from models.policy.catalogue import parse_catalogue
    from models.policy.thompson import ThompsonPolicy
    from models.state.engine_memory import MemoryStore
    from models.state.item_memory import MemoryItemStore

    cat = parse_catalogue("offers:\n  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5}\n")
    core = LearningCore(MemoryItemStore(), horizon_h=1.0, sample_gap_ms=0, keep_predictions=True)
    core.purchase_model.keep_features = True
    policy = ThompsonPolicy(cat, holdout_pct=0.0, floor=0.2)
    served = []
    choose = policy.choose
    policy.choose = lambda ctx, rng: (served.append(dict(ctx.features)), choose(ctx, rng))[1]
    eng = Engine(MemoryStore(), policy, catalogue=cat, holdout_pct=0.0, learning=core, clock_ms=lambda: T0,
                 decision_cooldown_s=0)
    asyncio.run(eng.process_batch([Event(f"w{k}", "view", f"w{k}", "i1", T0 + k, category="hats", price=5.0)
                                   for k in range(30)]))
    asyncio.run(eng.process_batch([Event("c1", "cart", "u", "i1", T0 + 60_000, price=5.0, category="hats")]))
    (features,) = served
    core.purchase_model.advance(T0 + 10 * 3_600_000)  # close the cart's point (its features are kept)
    ((values, _),) = core.purchase_model.kept_features
    assert {k: v for k, v in zip(NAMES, values) if abs(features[k] - v) > 1e-12} == {}
