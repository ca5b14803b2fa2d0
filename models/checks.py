"""Contract checks every learning model, item store and policy passes, in the style of ``river.checks``.

:func:`yield_checks` yields, for one object, check functions that each take the object and raise
``AssertionError`` with a message on failure. Objects are driven through an adapter for their kind
(:data:`ADAPTERS`): how to train one on a small deterministic event stream (:func:`events`), how to read a
**fingerprint** of its state (its answers to probe questions: predictions, neighbours, popular items, ...),
and what a valid answer looks like.

The contract:

* ``check_clone``: ``clone()`` gives an object of the same kind and parameters and no learnt state — trained
  like a fresh object, it answers like one, and cloning does not touch the original;
* ``check_reset``: after ``reset()`` / ``clear()`` the object answers like a fresh one;
* ``check_pickle``: a trained object survives ``pickle`` (answers the same, and keeps learning the same);
* ``check_determinism``: two objects built with the same parameters and seed, fed the same events, answer the
  same (no hidden global state, no unseeded randomness, no dependence on dict/set iteration of salted hashes);
* ``check_empty_and_unseen``: a fresh object answers questions about unseen users and items with valid,
  empty-ish answers (no exception), and a trained one answers about never-seen users and items the same way.

Policies (:class:`models.policy.base.Policy`) are trained on decision contexts drawn from the same events, with
rewards, and fingerprinted by their choices on probe contexts; they also pass:

* ``check_choices_are_valid``: every choice is an eligible, unblocked offer of the catalogue (``none`` included),
  with a probability in (0, 1], scores only for eligible offers, and holdout users get ``none``;
* ``check_propensity_is_the_choice_probability``: the ``propensity`` a policy reports is the probability of its
  choice, as off-policy evaluation needs it: over seeds, ``1{choice = k} / propensity`` averages 1 for each offer.

Choosing must not change what a policy learns next (fingerprints are read with :meth:`~Policy.choose`): policies
run here as the engine runs them, counting a decision's exposure when it is final (``defer_exposure``).

Examples
--------
>>> from models.state.item_memory import MemoryItemStore
>>> for check in yield_checks(MemoryItemStore()):
...     check(MemoryItemStore())
>>> [c.__name__ for c in yield_checks(MemoryItemStore())]
['check_clone', 'check_reset', 'check_pickle', 'check_determinism', 'check_empty_and_unseen']
"""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from models.events import Event
from models.state.item_memory import MemoryItemStore
from models.state.item_store import ItemStore
from models.learning.core import LearningCore
from models.profile import Profile
from models.learning.delayed_labels import DelayedLabelLearner
from models.learning.propensity import PurchasePropensity
from models.learning.segments import ProfileSegments
from models.policy.base import DecisionContext, Policy
from models.policy.eligibility import filter_offers, holdout

__all__ = ["events", "yield_checks", "ADAPTERS", "Adapter"]

_TYPES = ("view", "view", "view", "click", "cart", "purchase", "remove_from_cart")


def events(n: int = 300, seed: int = 7, n_users: int = 12, n_items: int = 25, t0: int = 1_700_000_000_000) -> list[Event]:
    """A small deterministic event stream (users browse a few items, some cart and buy), in time order.

    >>> len(events(50)), events(50) == events(50)
    (50, True)
    """
    rng = random.Random(seed)
    out = []
    ts = t0
    for i in range(n):
        ts += rng.randint(1, 90) * 1000
        u = f"u{rng.randrange(n_users)}"
        item = f"i{min(rng.randrange(n_items), rng.randrange(n_items))}"  # skewed popularity
        etype = rng.choice(_TYPES)
        out.append(Event(f"e{i}", etype, u, item, ts, price=float(5 + int(item[1:]) * 3), quantity=1,
                         category=f"c{int(item[1:]) % 4}", session_id=f"s{u}-{ts // 1_800_000}"))
    return out


def _batches(evs: list[Event], size: int = 40):
    for i in range(0, len(evs), size):
        yield evs[i : i + size]


def _profiles_after(evs: list[Event], profiles: dict[str, Profile]) -> dict[str, Profile]:
    touched = {}
    for e in evs:
        p = profiles.setdefault(e.user_id, Profile())
        p.apply(e)
        touched[e.user_id] = p
    return touched


def _round(x):
    """Fingerprints compare floats to 9 significant digits (Redis stores 17, Lua computes in doubles)."""
    if isinstance(x, float):
        return float(f"{x:.9g}") if math.isfinite(x) else repr(x)
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


@dataclass
class Adapter:
    """How the checks drive one kind of object."""

    kind: type
    train: Callable[[Any, list[Event]], None]
    fingerprint: Callable[[Any], Any]
    validate_unseen: Callable[[Any], None]
    reset: Callable[[Any], None] | None = None
    rebuild: Callable[[Any], Any] | None = None  # a new object with the same parameters (and seed)


# --- adapters ----------------------------------------------------------------------------------------------
_PROBE_ITEMS = ["i0", "i1", "i3", "i7", "never-seen-item"]
_NOW = 1_700_000_000_000 + 300 * 90_000


def _store_train(store: ItemStore, evs: list[Event]) -> None:
    core = LearningCore(store)  # the real path: kernel + aggregation + one apply per batch
    profiles: dict[str, Profile] = {}
    for b in _batches(evs):
        core.learn_batch(b, _profiles_after(b, profiles))


def _store_fp(store: ItemStore):
    return _round({
        "n_items": store.n_items(),
        "neighbours": store.neighbours(_PROBE_ITEMS, 10, _NOW),
        "popular": store.popular(10, _NOW),
        "counts": [store.item_count(i, _NOW) for i in _PROBE_ITEMS],
    })


def _store_unseen(store: ItemStore) -> None:
    got = store.neighbours(["never-seen-item"], 5, _NOW)
    assert got == {"never-seen-item": []}, f"neighbours of an unseen item must be [], got {got}"
    assert store.item_count("never-seen-item", _NOW) == 0.0
    assert store.pair_count("never-seen-item", "i0", _NOW) == 0.0
    pop = store.popular(5, _NOW)
    assert isinstance(pop, list) and all(isinstance(i, str) and s >= 0 for i, s in pop), pop


def _core_train(core: LearningCore, evs: list[Event]) -> None:
    profiles: dict[str, Profile] = {}
    for b in _batches(evs):
        core.learn_batch(b, _profiles_after(b, profiles))


def _probe_profiles() -> list[Profile]:
    p_new = Profile()
    p_one = Profile()
    p_one.apply(Event("x1", "view", "probe", "i1", _NOW - 1000, price=8.0, category="c1"))
    p_cart = Profile()
    for k, t in enumerate(("view", "cart", "view")):
        p_cart.apply(Event(f"x{k}", t, "probe2", f"i{k}", _NOW - 5000 + k, price=11.0, category="c0"))
    p_unseen = Profile()
    p_unseen.apply(Event("x9", "view", "probe3", "never-seen-item", _NOW - 10, category="never-seen-cat"))
    return [p_new, p_one, p_cart, p_unseen]


def _core_fp(core: LearningCore):
    probes = _probe_profiles()
    q = core.quality()
    return _round({
        "recommend": [core.recommend(p, 5, _NOW) for p in probes],
        "propensity": [core.propensity(p, _NOW) for p in probes],
        "segment": [core.segment(p, _NOW) for p in probes],
        "quality": {k: q[k] for k in sorted(q)},
    })


def _core_unseen(core: LearningCore) -> None:
    for p in _probe_profiles():
        recs = core.recommend(p, 5, _NOW)
        assert isinstance(recs, list) and len(recs) <= 5 and all(isinstance(i, str) for i in recs), recs
        assert not p.recent_items or p.recent_items[-1] not in recs, "the current item must not be recommended"
        pr = core.propensity(p, _NOW)
        assert 0.0 <= pr <= 1.0, f"propensity must be a probability, got {pr}"
        seg = core.segment(p, _NOW)
        assert isinstance(seg, int) and 0 <= seg < core.n_segments, f"segment out of range: {seg}"
    q = core.quality()
    for k in ("auc", "logloss", "base_auc", "base_logloss", "labels", "positives", "pending", "dropped"):
        assert k in q, f"quality() lacks {k!r}: {q}"


def _feature_stream(evs: list[Event]):
    """(features, label) pairs: a user's features at each event, label = a purchase later in the stream."""
    profiles: dict[str, Profile] = {}
    buys = {e.user_id for e in evs if e.type == "purchase"}
    for e in evs:
        p = profiles.setdefault(e.user_id, Profile())
        p.apply(e)
        yield p.features(e.ts), e.user_id in buys


def _prop_train(m: PurchasePropensity, evs: list[Event]) -> None:
    for x, y in _feature_stream(evs):
        m.learn_one(x, y)


def _prop_fp(m: PurchasePropensity):
    return _round([m.predict_proba(p.features(_NOW)) for p in _probe_profiles()])


def _prop_unseen(m: PurchasePropensity) -> None:
    for p in _probe_profiles():
        pr = m.predict_proba(p.features(_NOW))
        assert 0.0 <= pr <= 1.0, pr
    pr = m.predict_proba({})
    assert 0.0 <= pr <= 1.0, f"an empty feature dict must give a probability, got {pr}"


def _dl_train(d: DelayedLabelLearner, evs: list[Event]) -> None:
    profiles: dict[str, Profile] = {}
    for e in evs:
        p = profiles.setdefault(e.user_id, Profile())
        p.apply(e)
        if e.type == "purchase":
            d.purchase(e.user_id, e.ts)
        else:
            d.observe(e.user_id, e.ts, p.features(e.ts))
        d.advance(e.ts)


def _dl_fp(d: DelayedLabelLearner):
    q = d.quality()
    return _round({"n": [d.n_observed, d.n_labels, d.n_positive, len(d)], "q": q,
                   "p": [d.predict_proba(p.features(_NOW)) for p in _probe_profiles()]})


def _dl_unseen(d: DelayedLabelLearner) -> None:
    before = d.n_labels
    d2 = pickle.loads(pickle.dumps(d))
    d2.purchase("never-seen-user", _NOW)  # no pending point: nothing happens
    d2.advance(0)  # a watermark in the past: nothing happens
    assert d2.n_labels == before


def _seg_train(s: ProfileSegments, evs: list[Event]) -> None:
    for x, _ in _feature_stream(evs):
        s.learn_one(x)


def _seg_fp(s: ProfileSegments):
    return [s.predict_one(p.features(_NOW)) for p in _probe_profiles()]


def _seg_unseen(s: ProfileSegments) -> None:
    for p in _probe_profiles():
        seg = s.predict_one(p.features(_NOW))
        assert isinstance(seg, int) and 0 <= seg < s.n_segments, seg
    assert 0 <= s.predict_one({}) < s.n_segments


def _profile_train(p: Profile, evs: list[Event]) -> None:
    for e in evs:
        if e.user_id == "u1":
            p.apply(e)


def _profile_fp(p: Profile):
    return _round({"redis": p.to_redis(), "features": p.features(_NOW)})


def _profile_unseen(p: Profile) -> None:
    f = p.features(_NOW)
    assert all(isinstance(v, float) and math.isfinite(v) for v in f.values()), f
    again = Profile.from_redis(p.to_redis())
    assert again == p, "Redis round trip changed the profile"


ADAPTERS: list[Adapter] = [
    Adapter(LearningCore, _core_train, _core_fp, _core_unseen, reset=lambda c: c.reset(), rebuild=lambda c: c.clone()),
    Adapter(ItemStore, _store_train, _store_fp, _store_unseen, reset=lambda s: s.clear(), rebuild=lambda s: s.clone()),
    Adapter(DelayedLabelLearner, _dl_train, _dl_fp, _dl_unseen, reset=lambda d: d.reset(), rebuild=lambda d: d.clone()),
    Adapter(PurchasePropensity, _prop_train, _prop_fp, _prop_unseen, rebuild=lambda m: m.clone()),
    Adapter(ProfileSegments, _seg_train, _seg_fp, _seg_unseen, rebuild=lambda s: s.clone()),
    Adapter(Profile, _profile_train, _profile_fp, _profile_unseen, rebuild=lambda p: Profile()),
]


def _policy_contexts(evs: list[Event]) -> list[tuple[DecisionContext, float]]:
    """A decision context at every cart of ``evs`` (the user's profile then), with a reward: what the policy would
    have earned (a purchase by the user later in the stream)."""
    profiles: dict[str, Profile] = {}
    bought_after: dict[str, int] = {}
    for e in evs:
        if e.type == "purchase":
            bought_after[e.user_id] = e.ts
    out = []
    for e in evs:
        prof = profiles.setdefault(e.user_id, Profile())
        prof.apply(e)
        if e.type != "cart":
            continue
        ctx = DecisionContext(e.user_id, e.ts, prof.cart_value, list(prof.cart), prof.cart_categories, prof.is_new,
                              prof.n_orders, int(e.item_id[1:]) % 3, prof.churn_risk,
                              (prof.counts.get("purchase", 0) + 1) / (prof.n_events + 10))
        out.append((ctx, 4.0 if bought_after.get(e.user_id, 0) > e.ts else 0.0))
    return out


def _probe_contexts() -> list[DecisionContext]:
    return [DecisionContext(f"probe{i}", _NOW, 30.0 + 25 * i, ["i1"], ["c1"], i % 2 == 0, i % 3, i % 3, 0.1 * i,
                            0.05 + 0.04 * i) for i in range(6)]


def _policy_train(p: Policy, evs: list[Event]) -> None:
    for i, (ctx, reward) in enumerate(_policy_contexts(evs)):
        choice = p.choose(ctx, random.Random(i))
        p.expose(ctx, choice.offer.offer_id)
        assert p.learn_one(ctx, choice.offer.offer_id, reward if choice.offer.kind != "none" else reward / 2) is None


def _policy_fp(p: Policy):
    out = []
    for i, ctx in enumerate(_probe_contexts()):
        c = p.choose(ctx, random.Random(1000 + i))
        out.append((c.offer.offer_id, _round(c.propensity), c.group, _round(c.scores)))
    return out


def _policy_unseen(p: Policy) -> None:
    ctx = DecisionContext("never-seen-user", _NOW, 0.0, [], [], True, 0, None, 0.0, 0.0)
    c = p.choose(ctx, random.Random(0))
    assert 0.0 < c.propensity <= 1.0 and c.offer.offer_id in p.catalogue.offers, c


ADAPTERS.append(Adapter(Policy, _policy_train, _policy_fp, _policy_unseen, rebuild=lambda p: p.clone()))


def check_choices_are_valid(policy: Policy) -> None:
    _policy_train(policy, events())
    for i, (ctx, _) in enumerate(_policy_contexts(events(400, seed=11))):
        ctx.blocked = {oid: "blocked by the check" for oid in list(policy.catalogue.offers)[1::3] if oid != "none"}
        c = policy.choose(ctx, random.Random(i))
        eligible = {s.offer_id for s in filter_offers(policy.catalogue, ctx)[0]}
        assert c.offer.offer_id in eligible, f"{c.offer.offer_id} is not eligible for {ctx}: {eligible}"
        assert 0.0 < c.propensity <= 1.0, f"propensity {c.propensity} outside (0, 1]"
        assert set(c.scores) <= eligible, f"scores for ineligible offers: {set(c.scores) - eligible}"
        if holdout(ctx.user_id, policy.holdout_pct, policy.holdout_salt):
            assert c.group == "holdout" and c.offer.kind == "none", c
        else:
            assert c.group == "treatment", c


def check_propensity_is_the_choice_probability(policy: Policy, draws: int = 800) -> None:
    """Inverse propensity weighting, what off-policy evaluation does with logged decisions, must be unbiased:
    over seeds, the mean of ``1{choice = k} / propensity`` is 1 for every offer ``k`` the policy gives (a policy
    whose randomness has stages, as Thompson sampling's posterior draws, may report the probability given its
    draws: the identity holds all the same)."""
    _policy_train(policy, events())
    for ctx in _probe_contexts()[:3]:
        chosen: list[tuple[str, float]] = []
        for seed in range(draws):
            c = policy.choose(ctx, random.Random(seed))
            assert 0.0 < c.propensity <= 1.0, f"propensity {c.propensity} outside (0, 1]"
            chosen.append((c.offer.offer_id, c.propensity))
        for oid in {o for o, _ in chosen}:
            w = [1.0 / p if o == oid else 0.0 for o, p in chosen]
            mean = sum(w) / draws
            if sum(1 for o, _ in chosen if o == oid) < 0.1 * draws:
                continue  # too rare to estimate here
            sd = math.sqrt(max(sum(x * x for x in w) / draws - mean * mean, 0.0) / draws)
            assert abs(mean - 1.0) <= 4 * sd + 0.02, (  # slack: offers too rare to be drawn here carry the rest
                f"{oid}: mean of 1{{chosen}}/propensity is {mean:.3f} over {draws} seeds, not 1 (sd {sd:.3f}): "
                "the reported propensity is not the probability of the choice")


def adapter_for(obj) -> Adapter:
    for a in ADAPTERS:
        if isinstance(obj, a.kind):
            return a
    raise TypeError(f"no contract adapter for {type(obj).__name__}; add one to models.checks.ADAPTERS")


# --- the checks -----------------------------------------------------------------------------------------------
def check_clone(obj) -> None:
    a = adapter_for(obj)
    data = events()
    fresh_fp = a.fingerprint(a.rebuild(obj))
    a.train(obj, data[:150])
    trained_fp = a.fingerprint(obj)
    c = a.rebuild(obj)
    assert type(c) is type(obj) or isinstance(obj, ItemStore), f"clone of {type(obj).__name__} is {type(c).__name__}"
    assert a.fingerprint(c) == fresh_fp, "a clone must not carry learnt state"
    assert a.fingerprint(obj) == trained_fp, "cloning must not change the original"
    a.train(c, data)
    ref = a.rebuild(obj)
    a.train(ref, data)
    assert a.fingerprint(c) == a.fingerprint(ref), "a clone must learn like a fresh object"


def check_reset(obj) -> None:
    a = adapter_for(obj)
    if a.reset is None:
        return
    fresh_fp = a.fingerprint(a.rebuild(obj))
    a.train(obj, events())
    a.reset(obj)
    assert a.fingerprint(obj) == fresh_fp, "after reset/clear the object must answer like a fresh one"


def check_pickle(obj) -> None:
    a = adapter_for(obj)
    data = events()
    a.train(obj, data[:150])
    copy = pickle.loads(pickle.dumps(obj))
    assert a.fingerprint(copy) == a.fingerprint(obj), "a pickle round trip changed the answers"
    if isinstance(obj, ItemStore) and not isinstance(obj, MemoryItemStore):
        return  # an external store: the copy shares the state, so continued learning is not independent
    a.train(copy, data[150:])
    a.train(obj, data[150:])
    assert a.fingerprint(copy) == a.fingerprint(obj), "a pickled copy must keep learning the same way"


def check_determinism(obj) -> None:
    a = adapter_for(obj)
    data = events()
    x, y = a.rebuild(obj), a.rebuild(obj)
    a.train(x, data)
    a.train(y, data)
    assert a.fingerprint(x) == a.fingerprint(y), "same parameters, seed and events must give the same answers"


def check_empty_and_unseen(obj) -> None:
    a = adapter_for(obj)
    fresh = a.rebuild(obj)
    a.validate_unseen(fresh)
    a.train(fresh, events())
    a.validate_unseen(fresh)


def yield_checks(obj) -> Iterator[Callable[[Any], None]]:
    """The contract checks that apply to ``obj`` (each takes a FRESH object of the same kind)."""
    adapter_for(obj)
    yield check_clone
    yield check_reset
    yield check_pickle
    yield check_determinism
    yield check_empty_and_unseen
    if isinstance(obj, Policy):
        yield check_choices_are_valid
        yield check_propensity_is_the_choice_probability
