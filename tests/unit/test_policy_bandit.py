"""Thompson-sampling policy: exact propensities, floor, holdout, "none" when nothing pays, learning, snapshots, cells
per trigger."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from models.policy.thompson import ThompsonPolicy
from models.policy.catalogue import parse_catalogue
from models.policy.base import DecisionContext, Policy
from models.policy.eligibility import filter_offers

CAT = parse_catalogue(
    """
margin_rate: 0.3
offers:
  - {offer_id: cheap, kind: coupon, value: 2, prior_uplift: 0.02}
  - {offer_id: dear, kind: coupon, value: 25, prior_uplift: 0.02}
  - {offer_id: pct, kind: percent_off, value: 20, max_discount: 40, prior_uplift: 0.02}
""",
    "t.yaml",
)


def ctx(i: int = 0, seg: int = 1, cart: float = 100.0, q: float = 0.1, trigger: str = "cart") -> DecisionContext:
    return DecisionContext(f"u{i}", 1_000 + i, cart, ["x"], ["c"], False, 1, seg, 0.2, q, trigger=trigger)


def test_protocol_and_holdout():
    p = ThompsonPolicy(CAT, holdout_pct=100.0)
    assert isinstance(p, Policy)
    ch = p.choose(ctx(), random.Random(0))
    assert (ch.offer.kind, ch.group, ch.propensity) == ("none", "holdout", 1.0)


def test_propensity_is_the_exact_choice_probability():
    """With the state frozen, the empirical frequency of each offer matches the mean logged distribution."""
    p = ThompsonPolicy(CAT, holdout_pct=0.0, exposure_at_choice=False, temper=1.0)
    c = ctx()
    eligible, _ = filter_offers(CAT, c)
    n = 4000
    counts, mean_probs = Counter(), {s.offer_id: 0.0 for s in eligible}
    for seed in range(n):
        ch = p.choose(c, random.Random(seed))
        probs, _ = p.choice_distribution(c, eligible, random.Random(seed))
        assert ch.propensity == pytest.approx(probs[[s.offer_id for s in eligible].index(ch.offer.offer_id)])
        assert abs(sum(probs) - 1.0) < 1e-9 and min(probs) >= p.floor - 1e-12
        counts[ch.offer.offer_id] += 1
        for s, pr in zip(eligible, probs):
            mean_probs[s.offer_id] += pr / n
    for oid, m in mean_probs.items():
        assert abs(counts[oid] / n - m) < 4 * (m * (1 - m) / n) ** 0.5 + 1e-3, (oid, counts[oid] / n, m)
    # the untrained prior explores: more than one offer is chosen
    assert len(counts) >= 2


def test_same_seed_same_choice():
    p = ThompsonPolicy(CAT, holdout_pct=0.0, exposure_at_choice=False)
    a = p.choose(ctx(), random.Random("d1"))
    b = p.choose(ctx(), random.Random("d1"))
    assert (a.offer, a.propensity, a.scores) == (b.offer, b.propensity, b.scores)


def _train(p: ThompsonPolicy, lift: dict[str, float], n: int, seg: int = 1, q: float = 0.1, seed: int = 0,
           cart: float = 100.0, trigger: str = "cart"):
    rnd = random.Random(seed)
    for i in range(n):
        c = ctx(i, seg=seg, q=q, cart=cart, trigger=trigger)
        ch = p.choose(c, random.Random(rnd.random()))
        bought = rnd.random() < q * lift[ch.offer.offer_id]
        # the reward attribution gives a purchase with the offer: the basket's margin net of the offer's cost
        p.learn_one(c, ch.offer.offer_id, ThompsonPolicy.value(CAT[ch.offer.offer_id], c) if bought else 0.0)


def test_learns_the_offer_that_pays_and_none_when_nothing_pays():
    # segment 1: "cheap" doubles purchases (pays: 0.2*(30-2) - 0.1*30 = 2.6);
    # segment 2: small baskets of loyal buyers (q = 0.5) that no offer lifts: every discount is lost margin
    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    _train(p, {"none": 1.0, "cheap": 2.0, "dear": 2.2, "pct": 1.5}, 3000, seg=1)
    _train(p, {"none": 1.0, "cheap": 1.0, "dear": 1.0, "pct": 1.0}, 3000, seg=2, q=0.5, seed=1, cart=20.0)
    assert p.predict_buy(ctx(seg=1), "cheap") == pytest.approx(0.2, abs=0.03)
    picks1 = Counter(p.choose(ctx(10_000 + i, seg=1), random.Random(i)).offer.offer_id for i in range(300))
    picks2 = Counter(p.choose(ctx(20_000 + i, seg=2, q=0.5, cart=20.0), random.Random(i)).offer.offer_id for i in range(300))
    assert picks1.most_common(1)[0][0] == "cheap" and picks1["cheap"] > 250
    assert picks2.most_common(1)[0][0] == "none" and picks2["none"] > 250
    ch = p.choose(ctx(99, seg=2, q=0.5, cart=20.0), random.Random(3))
    assert ch.scores["none"] == 0.0 and all(v < 0 for k, v in ch.scores.items() if k != "none")
    assert ch.offer.kind == "none" and ch.reasons[-1].startswith("none: no offer is expected to pay")


def test_pacing_price_steers_away_from_an_offer():
    class Price:
        def __init__(self, lam):
            self.lam = lam

        def price(self, offer_id):
            return self.lam if offer_id == "cheap" else 0.0

    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    _train(p, {"none": 1.0, "cheap": 2.0, "dear": 1.0, "pct": 1.0}, 2000)
    free = Counter(p.choose(ctx(i), random.Random(i)).offer.offer_id for i in range(200))
    p.pacing = Price(20.0)
    priced = Counter(p.choose(ctx(i), random.Random(i)).offer.offer_id for i in range(200))
    assert free["cheap"] > 150 and priced["cheap"] < 10


def test_filtered_offers_are_never_chosen_and_reasons_explain():
    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    c = ctx()
    c.blocked = {"cheap": "budget exhausted", "pct": "budget exhausted"}
    seen = {p.choose(c, random.Random(i)).offer.offer_id for i in range(200)}
    assert seen <= {"none", "dear"}
    ch = p.choose(c, random.Random(1))
    assert "cheap: budget exhausted" in ch.reasons and "pct: budget exhausted" in ch.reasons
    assert ch.reasons[-1].startswith(f"{ch.offer.offer_id}: ")


def test_shared_state_roundtrip():
    """What the policy learnt, as the updates the engine commits, summed by a store and loaded back, is what it
    learnt itself (the worker's view of the policy is the store's hash)."""
    from models.state.engine_memory import MemoryStore

    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    store = MemoryStore()
    rng = random.Random(3)
    for i in range(200):
        ctx = DecisionContext(f"u{i}", 0, 80.0, [], [], i % 2 == 0, i % 4, i % 3, 0.3, 0.2)
        choice = p.choose(ctx, rng)
        store._apply_policy([u for u in (p.exposure_update(ctx, choice.offer.offer_id),
                                          p.outcome_update(ctx, choice.offer.offer_id, 1.0 if i % 5 else 0.0))
                             if u is not None], {"n": 1})
    q = ThompsonPolicy(CAT, holdout_pct=0.0)
    q.load_state(asyncio.run(store.policy_state()))
    assert q.n_learned == 200 and q.cells and all(a > 0 and b > 0 for a, b in q.cells.values())


def test_bad_context_values_do_not_crash():
    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    for q in (float("nan"), -1.0, 0.0, 5.0):
        ch = p.choose(ctx(q=q), random.Random(0))
        assert 0 < ch.propensity <= 1
        p.learn_one(ctx(q=q), ch.offer.offer_id, 1.0)
    p.learn_one(ctx(), "unknown-offer", 1.0)  # an offer removed from the catalogue: ignored


def test_learns_the_reward_not_conversions():
    """An offer that doubles purchases on paper but whose buyers only take the discount on small baskets (reward
    below the catalogue's) loses to "none": the policy learns what decisions earn, not how often they convert."""
    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    rnd = random.Random(4)
    for i in range(4000):
        c = ctx(i)
        oid = p.choose(c, random.Random(rnd.random())).offer.offer_id
        bought = rnd.random() < 0.1 * (2.0 if oid == "cheap" else 1.0)
        earned = 3.0 if oid == "cheap" else ThompsonPolicy.value(CAT[oid], c)  # cheap: baskets of 17, 2 off
        p.learn_one(c, oid, earned if bought else 0.0, converted=bought)
    picks = Counter(p.choose(ctx(50_000 + i), random.Random(i)).offer.offer_id for i in range(300))
    assert picks["none"] > 250, picks
    assert p.predict_reward(ctx(), "cheap") < p.predict_reward(ctx(), "none")


def test_shared_updates_teach_what_learn_one_teaches():
    """The exposure and outcome updates the engine commits, summed by a store and loaded back, give exactly the
    posteriors the policy builds learning in memory (negative and fractional rewards included)."""
    from models.state.engine_memory import MemoryStore

    shared = ThompsonPolicy(CAT, holdout_pct=0.0, defer_exposure=True)
    local = ThompsonPolicy(CAT, holdout_pct=0.0, defer_exposure=True)
    store = MemoryStore()
    rng = random.Random(8)
    for i in range(300):
        c = DecisionContext(f"u{i}", 0, 20.0 + i % 90, [], [], False, 1, i % 3, 0.3, 0.05 + (i % 7) / 20)
        oid = shared.choose(c, random.Random(i)).offer.offer_id
        reward = rng.choice([0.0, 0.0, 12.5, -3.0, 31.0])
        store._apply_policy([u for u in (shared.exposure_update(c, oid), shared.outcome_update(c, oid, reward))
                             if u is not None], {"n": 1})
        local.expose(c, oid)
        local.learn_one(c, oid, reward)
    shared.load_state(asyncio.run(store.policy_state()))
    assert shared.cells.keys() == local.cells.keys()
    for k, (a, b) in local.cells.items():
        assert shared.cells[k] == pytest.approx([a, b], rel=1e-9, abs=1e-9), k


def test_cart_cells_keep_their_store_keys_and_other_triggers_get_their_own():
    """A cart cell's field in the store's shared hash is exactly what it was before triggers existed, so the
    posteriors production already learnt stay valid; a cell of another trigger is its own and survives the store's
    round trip."""
    from models.state.engine_memory import MemoryStore

    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    default_cart, explicit_cart = ctx(seg=3), ctx(seg=3, trigger="cart")
    abandoned = ctx(seg=3, trigger="cart_abandonment")
    assert p.cell(default_cart) == p.cell(explicit_cart) == (3,)
    assert p.exposure_update(default_cart, "pct")[0] == '["pct",[3]]'
    assert p.outcome_update(explicit_cart, "pct", 5.0)[0] == '["pct",[3]]'
    assert p.exposure_update(abandoned, "pct")[0] == '["pct",[3,"cart_abandonment"]]'
    store = MemoryStore()
    store._apply_policy([p.outcome_update(default_cart, "pct", 10.0), p.outcome_update(abandoned, "pct", 30.0)],
                        {"n": 2})
    q = ThompsonPolicy(CAT, holdout_pct=0.0)
    q.load_state(asyncio.run(store.policy_state()))
    assert set(q.cells) == {("pct", (3,)), ("pct", (3, "cart_abandonment"))}
    assert q.predict_reward(abandoned, "pct") > q.predict_reward(default_cart, "pct")


def test_learns_each_trigger_on_its_own():
    """A percent-off pays at an abandoned cart (price-sensitive users) and not at an add-to-cart: with cells per
    trigger the policy learns both, where one cell would have mixed them."""
    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    # add-to-cart: nothing lifts purchases, every discount is lost margin
    _train(p, {"none": 1.0, "cheap": 1.0, "dear": 1.0, "pct": 1.0}, 3000, q=0.1, trigger="cart")
    # abandoned cart: pct lifts purchases six-fold, 0.3 * (30 - 20) - 0.05 * 30 = 1.5 > 0
    _train(p, {"none": 1.0, "cheap": 1.0, "dear": 1.0, "pct": 6.0}, 3000, q=0.05, seed=1, trigger="cart_abandonment")
    at_cart = Counter(p.choose(ctx(10_000 + i), random.Random(i)).offer.offer_id for i in range(300))
    abandoned = Counter(p.choose(ctx(20_000 + i, q=0.05, trigger="cart_abandonment"), random.Random(i)).offer.offer_id
                        for i in range(300))
    assert at_cart["none"] > 250, at_cart
    assert abandoned["pct"] > 250, abandoned



def test_loading_the_shared_hash_again_and_again_reads_what_it_holds_now():
    """The worker reads the whole shared hash after every batch that decided, and parses each field name once: every
    load still gives exactly what the hash holds then - a cell gone from it is gone, a value changed is taken, an
    offer no longer in the catalogue is left out - and the parsed names do not outgrow the hash."""
    def field(kind: str, offer: str, cell: list) -> bytes:
        return f"{kind}:{ThompsonPolicy.cell_field(offer, tuple(cell))}".encode()

    p = ThompsonPolicy(CAT, holdout_pct=0.0)
    big = {field(k, o, [s, t] if t else [s]): str(s + 0.5).encode()
           for k in "ab" for o in ("cheap", "dear", "gone") for s in range(30) for t in (None, "retention")}
    big[b"n"] = b"9"
    p.load_state(big)
    assert len(p.cells) == 2 * 30 * 2 and ("gone", (0,)) not in p.cells
    assert p.cells[("dear", (7, "retention"))] == [7.5, 7.5] and p.n_learned == 9
    small = {field("a", "cheap", [1]): b"2", field("b", "cheap", [1]): b"3", field("a", "pct", [1]): b"4"}
    for _ in range(2):  # the second load reads names the first one parsed
        p.load_state(small)
        assert p.cells == {("cheap", (1,)): [2.0, 3.0], ("pct", (1,)): [4.0, 0.0]} and p.n_learned == 0
    assert len(p._field_names) <= 2 * len(small) + 64  # the big hash's names were dropped
    fresh = ThompsonPolicy(CAT, holdout_pct=0.0)
    fresh.load_state(big)
    p.load_state(big)
    assert p.cells == fresh.cells
