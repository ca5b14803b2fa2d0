"""The learning core facade: batches, decision points without leaks, decisions, snapshots (also in Redis)."""

from __future__ import annotations

import math
import uuid

import pytest

from models.checks import events as synthetic_events
from models.events import Event
from models.state.item_memory import MemoryItemStore
from models.state.item_redis import RedisItemStore
from models.learning.core import LearningCore
from models.learning.snapshot import load_snapshot, save_snapshot, snapshot_key
from models.profile import Profile

T0 = 1_700_000_000_000
MIN = 60_000


def feed(core: LearningCore, events, profiles=None, batch=40):
    profiles = {} if profiles is None else profiles
    for k in range(0, len(events), batch):
        b = events[k:k + batch]
        touched = {}
        for e in b:
            p = profiles.setdefault(e.user_id, Profile())
            p.apply(e)
            touched[e.user_id] = p
        core.learn_batch(b, touched)
    return profiles


def test_co_viewed_items_are_recommended_and_cold_users_get_popular_items():
    core = LearningCore(MemoryItemStore())
    evs = []
    for u in range(6):  # everyone who views a also views b; c is popular on its own
        evs += [Event(f"a{u}", "view", f"u{u}", "a", T0 + u * MIN), Event(f"b{u}", "view", f"u{u}", "b", T0 + u * MIN + 1),
                Event(f"c{u}", "view", f"v{u}", "c", T0 + u * MIN + 2), Event(f"d{u}", "view", f"w{u}", "c", T0 + u * MIN + 3)]
    feed(core, evs)
    viewer = Profile()
    viewer.apply(Event("x", "view", "new", "a", T0 + 10 * MIN))
    assert core.recommend(viewer, 2)[0] == "b"
    assert core.recommend(Profile(), 1) == ["c"]
    assert core.recommend(viewer, 0) == []


def test_no_decision_point_when_the_batch_ends_with_a_purchase():
    core = LearningCore(MemoryItemStore(), horizon_h=1.0, decision_points="batch", sample_gap_ms=0)
    feed(core, [Event("1", "view", "u", "i", T0), Event("2", "purchase", "u", "i", T0 + 1, price=1.0)])
    assert core.purchase_model.n_observed == 0  # the profile after the batch contains the purchase: no point
    feed(core, [Event("3", "view", "u", "i", T0 + 2)])
    feed(core, [Event("4", "purchase", "u", "i", T0 + 3, price=1.0)])
    assert (core.purchase_model.n_observed, core.purchase_model.n_positive) == (1, 1)


def test_milestone_decision_points():
    core = LearningCore(MemoryItemStore(), sample_gap_ms=0)
    profiles = {}
    ts = T0
    for k in range(9):  # one event per batch: points at the 2nd, 4th and 8th event of the session
        ts += MIN
        feed(core, [Event(f"e{k}", "view", "u", f"i{k}", ts)], profiles)
    assert core.purchase_model.n_observed == 3
    feed(core, [Event("c", "cart", "u", "i1", ts + MIN, price=2.0)], profiles)  # a cart is always a point
    assert core.purchase_model.n_observed == 4


def test_sample_gap_limits_points_per_user():
    core = LearningCore(MemoryItemStore(), decision_points="batch", sample_gap_ms=10 * MIN)
    profiles = {}
    for k in range(10):
        feed(core, [Event(f"e{k}", "view", "u", "i", T0 + k * MIN)], profiles)
    assert core.purchase_model.n_observed == 1


def test_labels_resolve_and_quality_reports():
    core = LearningCore(MemoryItemStore(), horizon_h=0.5)
    feed(core, synthetic_events(600))
    q = core.quality()
    assert q["labels"] > 0 and q["positives"] > 0
    assert q["labels"] + q["pending"] + q["dropped"] == core.purchase_model.n_observed
    assert 0.0 <= q["auc"] <= 1.0 and q["logloss"] > 0


def test_decisions_for_unseen_users_and_items():
    core = LearningCore(MemoryItemStore())
    stranger = Profile()
    stranger.apply(Event("x", "view", "nobody", "never-seen", T0, category="nowhere", context={"device": "tv"}))
    assert core.recommend(stranger, 3) == []
    p = core.propensity(stranger, T0, context={"device": "tv", "n": 3, "bad": float("nan")})
    assert 0.0 <= p <= 1.0
    assert core.segment(stranger) in range(core.n_segments)
    assert all(math.isnan(core.quality()[k]) for k in ("auc", "logloss"))


def test_snapshot_restores_models_and_offsets_exactly():
    evs = synthetic_events(400)
    core = LearningCore(MemoryItemStore())
    profiles = feed(core, evs[:250])
    blob = core.snapshot({("promo.events", 3): 250})
    other = LearningCore(MemoryItemStore())
    assert other.restore(blob) == {("promo.events", 3): 250}
    copies = {u: Profile.from_redis(p.to_redis()) for u, p in profiles.items()}
    feed(core, evs[250:], profiles)
    feed(other, evs[250:], copies)
    probe = profiles["u1"]
    assert other.recommend(probe, 5) == core.recommend(probe, 5)
    assert other.propensity(probe, T0) == core.propensity(probe, T0)
    assert other.quality() == core.quality()


def test_a_restored_snapshot_takes_the_running_cores_user_bound():
    """PROMO_MODEL_MAX_USERS lowered across a restart: the restored windows keep the most recently seen users
    within the new bound, and the waiting decision points obey it from the next one on."""
    evs = synthetic_events(600, n_users=60)
    core = LearningCore(MemoryItemStore(), max_users=5000, max_pending=5000)
    feed(core, evs)  # batches of 40: the last batch's users were seen last
    held = len(core.windows.slot)
    last_batch = {e.user_id for e in evs[-40:]}
    assert held > 40 and len(core.purchase_model.queue) > 12 and len(last_batch) > 10
    small = LearningCore(MemoryItemStore(), max_users=10, max_pending=12)
    small.restore(core.snapshot({}))
    assert small.windows.capacity == 10 and len(small.windows.slot) == 10 and set(small.windows.slot) <= last_batch
    for u, s in small.windows.slot.items():  # each kept window is the one the user had
        assert (small.windows.data[s] == core.windows.data[core.windows.slot[u]]).all()
    assert small.purchase_model.max_pending == 12
    later = synthetic_events(80, seed=8, n_users=60, t0=evs[-1].ts + 60 * MIN)
    observed = small.purchase_model.n_observed
    feed(small, later, batch=5)
    assert small.purchase_model.n_observed > observed  # new points came, and the bound held
    assert len(small.purchase_model.queue) <= 12 and len(small.windows.slot) <= 10
    # and a restore into a larger bound keeps every user
    big = LearningCore(MemoryItemStore(), max_users=20_000, max_pending=20_000)
    big.restore(core.snapshot({}))
    assert big.windows.capacity == 20_000 and len(big.windows.slot) == held


def test_bad_snapshots_are_refused_with_a_clear_message():
    core = LearningCore(MemoryItemStore())
    with pytest.raises(ValueError, match="cannot be read"):
        core.restore(b"not a pickle")
    import pickle

    with pytest.raises(ValueError, match="version"):
        core.restore(pickle.dumps({"version": 999}))


def test_snapshot_lives_in_one_redis_key(redis_client):
    prefix = "tl" + uuid.uuid4().hex[:8]
    store = RedisItemStore(redis_client, prefix)
    core = LearningCore(store)
    try:
        profiles = feed(core, synthetic_events(200))
        assert load_snapshot(redis_client, core, prefix) is None
        size = save_snapshot(redis_client, core, {0: 200}, prefix)
        assert size == redis_client.strlen(snapshot_key(prefix)) > 0
        fresh = LearningCore(RedisItemStore(redis_client, prefix))
        assert load_snapshot(redis_client, fresh, prefix) == {0: 200}
        probe = profiles["u2"]
        assert fresh.recommend(probe, 5) == core.recommend(probe, 5)  # same Redis state, same windows
        assert fresh.propensity(probe, T0) == core.propensity(probe, T0)
    finally:
        for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
            redis_client.delete(key)


def _with_victim(n: int = 400):
    """Synthetic events with the busiest user renamed to an id no other string contains."""
    from collections import Counter
    from dataclasses import replace

    evs = synthetic_events(n)
    busiest = Counter(e.user_id for e in evs).most_common(1)[0][0]
    return [replace(e, user_id="forget-me-4711") if e.user_id == busiest else e for e in evs]


def test_forgotten_users_leave_every_in_memory_structure_and_the_next_snapshot():
    core = LearningCore(MemoryItemStore(), decision_points="batch")  # windows in use: items not via commits
    evs = _with_victim()
    feed(core, evs[:300])
    held = core.held_users()
    assert "forget-me-4711" in held and "forget-me-4711" in core.windows.slot
    assert b"forget-me-4711" in core.snapshot({})
    assert core.forget_users(["forget-me-4711", "never-seen"]) == 1
    assert core.held_users() == held - {"forget-me-4711"}
    assert b"forget-me-4711" not in core.snapshot({})
    assert len(core.purchase_model) == sum(1 for pt in core.purchase_model.queue if pt.open)  # the open count stays true
    assert core.forget_users(["forget-me-4711"]) == 0
    feed(core, [e for e in evs[300:] if e.user_id != "forget-me-4711"])  # learning goes on as before
    assert "forget-me-4711" not in core.held_users()


def test_the_stored_snapshot_is_scrubbed_in_place(redis_client):
    from models.learning.snapshot import scrub_snapshot

    prefix = "tl" + uuid.uuid4().hex[:8]
    core = LearningCore(RedisItemStore(redis_client, prefix), decision_points="batch")
    try:
        feed(core, _with_victim(200))
        assert scrub_snapshot(redis_client, ["forget-me-4711"], prefix) == 0  # no snapshot yet
        save_snapshot(redis_client, core, {("promo.events", 0): 200}, prefix)
        assert scrub_snapshot(redis_client, ["forget-me-4711"], prefix) == 1
        assert b"forget-me-4711" not in redis_client.get(snapshot_key(prefix))
        assert scrub_snapshot(redis_client, ["forget-me-4711"], prefix) == 0
        fresh = LearningCore(RedisItemStore(redis_client, prefix))
        assert load_snapshot(redis_client, fresh, prefix) == {("promo.events", 0): 200}
        assert fresh.held_users() == core.held_users() - {"forget-me-4711"}
    finally:
        for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
            redis_client.delete(key)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="horizon_h"):
        LearningCore(horizon_h=0)
    with pytest.raises(ValueError, match="decision_points"):
        LearningCore(decision_points="sometimes")


def _classes_of(module) -> list[type]:
    return [obj for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__]


def _learnt_core() -> tuple[LearningCore, dict]:
    core = LearningCore(horizon_h=1.0, decision_points="batch")
    # each user keeps to four items
    evs = [Event(f"e{i}", "cart" if i % 5 == 0 else "purchase" if i % 17 == 0 else "view", f"u{i % 7}",
                 f"i{i % 7 + i // 7 % 4}", 60_000 * i, price=1.0 + i % 3, category=f"c{i % 4}") for i in range(200)]
    profiles = feed(core, evs, batch=20)
    # points open, labelled and scored: the snapshot holds each kind
    assert len(core.purchase_model) and core.purchase_model.n_positive and core.purchase_model.n_scored
    return core, profiles


def _snapshot_in_layout(monkeypatch, core: LearningCore, layout: dict[type, tuple[str, str]]) -> bytes:
    """``core``'s snapshot pickled as an earlier code layout wrote it: ``layout`` maps a class to the module and
    name it had then (a module that no longer exists is stood up for the pickling only)."""
    import sys
    import types

    qualnames = {cls: cls.__qualname__ for cls in layout}  # a type's slot: monkeypatch cannot undo it
    with monkeypatch.context() as m:
        try:
            for cls, (module, name) in layout.items():
                if module not in sys.modules:
                    m.setitem(sys.modules, module, types.ModuleType(module))
                m.setattr(sys.modules[module], name, cls, raising=False)
                m.setattr(cls, "__module__", module)
                cls.__qualname__ = name
            return core.snapshot({("promo.events", 0): 200})
        finally:
            for cls, qualname in qualnames.items():
                cls.__qualname__ = qualname


def _assert_restores_as(core: LearningCore, profiles: dict, legacy: bytes) -> None:
    from models.learning.delayed_labels import DecisionPoint
    from models.profile_features import CategoryStats

    fresh = LearningCore(horizon_h=1.0)
    assert fresh.restore(legacy) == {("promo.events", 0): 200}
    probe = Profile(recent_items=["i1", "i2"])
    assert fresh.recommend(probe, 5) == core.recommend(probe, 5)
    assert fresh.propensity(profiles["u1"], 12_000_000) == core.propensity(profiles["u1"], 12_000_000)
    assert fresh.quality() == pytest.approx(core.quality(), nan_ok=True)
    assert type(fresh.stats) is CategoryStats and fresh.stats.__dict__ == core.stats.__dict__
    assert type(fresh.item_conv) is type(core.item_conv) and fresh.item_conv.__dict__ == core.item_conv.__dict__
    assert {type(pt) for pt in fresh.purchase_model.queue} == {DecisionPoint}
    # the restored models go on learning as the ones that were saved
    more = [Event(f"m{i}", "purchase" if i % 3 == 0 else "cart", f"u{i % 7}", f"i{i % 7 + i // 7 % 4}",
                  12_000_000 + 60_000 * i, price=2.0) for i in range(60)]
    for c in (core, fresh):
        ps = {u: Profile(**{k: v for k, v in vars(p).items()}) for u, p in profiles.items()}
        for e in more:
            ps[e.user_id].apply(e)
        c.learn_batch(more, ps)
    assert fresh.propensity(profiles["u2"], 16_000_000) == core.propensity(profiles["u2"], 16_000_000)
    assert fresh.quality() == pytest.approx(core.quality(), nan_ok=True)


def test_a_snapshot_written_before_the_package_move_still_loads(monkeypatch):
    """Snapshots in Redis name the classes' modules: those written when the models lived in ``models.similarity``,
    ``models.propensity``, ... must restore after the move into ``models.learning`` (an upgrade keeps its models)."""
    import sys

    import models.learning.conversion as conversion
    import models.learning.delayed_labels as delayed
    import models.learning.propensity as prop
    import models.learning.rolling_logloss as rolling
    import models.learning.segments as seg
    import models.learning.similarity as sim
    from models.learning.snapshot import MOVED_MODULES
    from models.profile_features import CategoryStats

    core, profiles = _learnt_core()
    layout = {cls: (old, cls.__name__) for old, mod in (("models.similarity", sim), ("models.segments", seg))
              for cls in _classes_of(mod)}
    for mod in (prop, delayed, rolling, conversion):  # one module then
        layout.update({cls: ("models.propensity", cls.__name__) for cls in _classes_of(mod)})
    # under their earlier names: the conversion rates were ConversionStats, a decision point _Point
    layout[conversion.ConversionRates] = ("models.propensity", "ConversionStats")
    layout[delayed.DecisionPoint] = ("models.propensity", "_Point")
    layout[CategoryStats] = ("models.profile", "CategoryStats")
    assert {old for old, _ in layout.values()} <= MOVED_MODULES.keys()
    legacy = _snapshot_in_layout(monkeypatch, core, layout)
    assert b"models.similarity" in legacy and b"models.learning.similarity" not in legacy
    assert b"ConversionStats" in legacy and b"ConversionRates" not in legacy and b"_Point" in legacy
    assert "models.similarity" not in sys.modules
    _assert_restores_as(core, profiles, legacy)


def test_a_snapshot_written_before_the_propensity_split_still_loads(monkeypatch):
    """Snapshots written while the propensity models, the delayed-label learner, the conversion rates and the rolling
    log loss shared ``models.learning.propensity`` (and the category prices lived in ``models.profile``) restore
    with each class in its own module now."""
    import models.learning.conversion as conversion
    import models.learning.delayed_labels as delayed
    import models.learning.propensity as prop
    import models.learning.rolling_logloss as rolling
    from models.profile_features import CategoryStats

    core, profiles = _learnt_core()
    layout = {cls: ("models.learning.propensity", cls.__name__)
              for mod in (prop, delayed, rolling, conversion) for cls in _classes_of(mod)}
    layout[delayed.DecisionPoint] = ("models.learning.propensity", "_Point")
    layout[CategoryStats] = ("models.profile", "CategoryStats")
    legacy = _snapshot_in_layout(monkeypatch, core, layout)
    for path in (b"models.learning.delayed_labels", b"models.learning.conversion", b"models.learning.rolling_logloss",
                 b"models.profile_features", b"DecisionPoint"):
        assert path not in legacy
    for name in (b"DelayedLabelLearner", b"_Point", b"ConversionRates", b"RollingLogLoss", b"CategoryStats"):
        assert name in legacy
    _assert_restores_as(core, profiles, legacy)


def test_an_event_stamped_years_ahead_does_not_close_every_later_decision_point_as_negative():
    """The learning core closed purchase labels by the latest event time it had seen: one valid event stamped now
    in a replay of 2019 (or a partition far ahead of a lagging one) put every later decision point past its horizon
    the moment it was made, and a purchase a minute later labelled nothing. Under the engine the labels close by
    its event-time clock, which one event cannot move."""
    import asyncio

    from models.engine import Engine
    from models.policy.catalogue import parse_catalogue
    from models.state.engine_memory import MemoryStore

    t0 = 1_570_000_000_000  # October 2019
    core = LearningCore(MemoryItemStore(), horizon_h=1.0, sample_gap_ms=0)
    cat = parse_catalogue("offers:\n  - {offer_id: c5, kind: coupon, value: 5}\n")
    eng = Engine(MemoryStore(), catalogue=cat, holdout_pct=0.0, learning=core, clock_ms=lambda: 1_760_000_000_000,
                 decision_cooldown_s=0)
    run = asyncio.run
    run(eng.process_batch([Event(f"w{k}", "view", f"w{k}", "i1", t0 + k) for k in range(10)]))
    run(eng.process_batch([Event("o", "view", "other", "j", 1_760_000_000_000)]))  # valid: not in the future
    run(eng.process_batch([Event("c", "cart", "u", "a", t0 + MIN, price=5.0)]))  # a decision point
    run(eng.process_batch([Event("p", "purchase", "u", "a", t0 + 2 * MIN, price=5.0)]))  # bought a minute later
    assert core.purchase_model.n_positive == 1


@pytest.mark.parametrize("arrangement", ["capped", "reordered"])
def test_a_purchase_labels_a_point_the_same_whether_or_not_an_advance_left_it_open(arrangement):
    """A point the clock put past its horizon is negative. The worker closes at most labels_per_batch points per
    batch, oldest queued first, so such a point may still be open when a late purchase arrives: it must stay
    negative, or its label would depend on the cap and on the order points were queued in."""
    from models.learning.delayed_labels import DelayedLabelLearner

    def positives(points, cap):
        learner = DelayedLabelLearner(horizon_ms=10)
        for user, ts in points:
            learner.observe(user, ts, {"carts": 1.0})
        learner.advance(500, max_points=cap)
        learner.purchase("b", 5)  # within b's horizon in event time, after the clock passed it
        learner.advance(10_000)
        return learner.n_positive

    if arrangement == "capped":
        points = [("a", 0), ("c", 0), ("b", 0)]
        assert positives(points, cap=2) == positives(points, cap=None) == 0
    else:
        assert positives([("a", 1000), ("b", 0)], None) == positives([("b", 0), ("a", 1000)], None) == 0


@pytest.mark.parametrize("later", ["remove_from_cart", "purchase_delivered_first"])
def test_no_decision_point_whose_profile_holds_a_later_event(later):
    """A decision point's features are the profile after the batch, so the point is placed only where that profile
    is the profile at the point's event: not at a cart followed by its removal (the features said the cart was
    empty), nor at a view stamped before a purchase delivered ahead of it (the features held the purchase, the label
    said no purchase followed)."""
    t0 = 1_570_000_000_000
    core = LearningCore(MemoryItemStore(), horizon_h=1.0, sample_gap_ms=0, decision_points="batch")
    if later == "remove_from_cart":
        batch = [Event("c", "cart", "u", "a", t0, price=50.0), Event("r", "remove_from_cart", "u", "a", t0 + MIN)]
    else:
        batch = [Event("p", "purchase", "u", "a", t0 + 2 * MIN, price=5.0), Event("v", "view", "u", "b", t0 + MIN)]
    prof = Profile()
    for e in batch:
        prof.apply(e)
    core.learn_batch(batch, {"u": prof})
    assert core.purchase_model.n_observed == 0
