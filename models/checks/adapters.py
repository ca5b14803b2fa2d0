"""How the checks drive each kind of object: an :class:`Adapter` per kind (:data:`ADAPTERS`) says how to train one
on events, how to read a **fingerprint** of its state (its answers to probe questions: predictions, neighbours,
popular items, choices, ...), and what valid answers about unseen users and items look like.

>>> from models.state.item_memory import MemoryItemStore
>>> adapter_for(MemoryItemStore()).kind.__name__
'ItemStore'
"""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass
from typing import Any, Callable

from models.checks.data import (NOW, PROBE_ITEMS, batches, decision_contexts, feature_stream, probe_contexts,
                                probe_profiles, profiles_after, rounded)
from models.events import Event
from models.learning.core import LearningCore
from models.learning.delayed_labels import DelayedLabelLearner
from models.learning.propensity import PurchasePropensity
from models.learning.segments import ProfileSegments
from models.policy.base import DecisionContext, Policy
from models.profile import Profile
from models.state.item_store import ItemStore

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "train_policy"]


@dataclass
class Adapter:
    """How the checks drive one kind of object."""

    kind: type
    train: Callable[[Any, list[Event]], None]
    fingerprint: Callable[[Any], Any]
    validate_unseen: Callable[[Any], None]
    reset: Callable[[Any], None] | None = None
    rebuild: Callable[[Any], Any] | None = None  # a new object with the same parameters (and seed)


# --- item stores and the learning core: trained as the engine trains them ---------------------------------------
def _train_item_store(store: ItemStore, evs: list[Event]) -> None:
    _train_core(LearningCore(store), evs)  # the real path: kernel + aggregation + one apply per batch


def _fingerprint_item_store(store: ItemStore):
    return rounded({
        "n_items": store.n_items(),
        "neighbours": store.neighbours(PROBE_ITEMS, 10, NOW),
        "popular": store.popular(10, NOW),
        "counts": [store.item_count(i, NOW) for i in PROBE_ITEMS],
    })


def _validate_item_store_unseen(store: ItemStore) -> None:
    got = store.neighbours(["never-seen-item"], 5, NOW)
    assert got == {"never-seen-item": []}, f"neighbours of an unseen item must be [], got {got}"
    assert store.item_count("never-seen-item", NOW) == 0.0
    assert store.pair_count("never-seen-item", "i0", NOW) == 0.0
    popular = store.popular(5, NOW)
    assert isinstance(popular, list) and all(isinstance(i, str) and s >= 0 for i, s in popular), popular


def _train_core(core: LearningCore, evs: list[Event]) -> None:
    profiles: dict[str, Profile] = {}
    for batch in batches(evs):
        core.learn_batch(batch, profiles_after(batch, profiles))


def _fingerprint_core(core: LearningCore):
    probes = probe_profiles()
    quality = core.quality()
    return rounded({
        "recommend": [core.recommend(p, 5, NOW) for p in probes],
        "propensity": [core.propensity(p, NOW) for p in probes],
        "segment": [core.segment(p, NOW) for p in probes],
        "quality": {k: quality[k] for k in sorted(quality)},
    })


def _validate_core_unseen(core: LearningCore) -> None:
    for profile in probe_profiles():
        recs = core.recommend(profile, 5, NOW)
        assert isinstance(recs, list) and len(recs) <= 5 and all(isinstance(i, str) for i in recs), recs
        assert not profile.recent_items or profile.recent_items[-1] not in recs, \
            "the current item must not be recommended"
        propensity = core.propensity(profile, NOW)
        assert 0.0 <= propensity <= 1.0, f"propensity must be a probability, got {propensity}"
        segment = core.segment(profile, NOW)
        assert isinstance(segment, int) and 0 <= segment < core.n_segments, f"segment out of range: {segment}"
    quality = core.quality()
    for k in ("auc", "logloss", "base_auc", "base_logloss", "labels", "positives", "pending", "dropped"):
        assert k in quality, f"quality() lacks {k!r}: {quality}"


# --- the learning models on their own -------------------------------------------------------------------------
def _train_propensity(model: PurchasePropensity, evs: list[Event]) -> None:
    for features, label in feature_stream(evs):
        model.learn_one(features, label)


def _fingerprint_propensity(model: PurchasePropensity):
    return rounded([model.predict_proba(p.features(NOW)) for p in probe_profiles()])


def _validate_propensity_unseen(model: PurchasePropensity) -> None:
    for profile in probe_profiles():
        proba = model.predict_proba(profile.features(NOW))
        assert 0.0 <= proba <= 1.0, proba
    proba = model.predict_proba({})
    assert 0.0 <= proba <= 1.0, f"an empty feature dict must give a probability, got {proba}"


def _train_delayed_labels(learner: DelayedLabelLearner, evs: list[Event]) -> None:
    profiles: dict[str, Profile] = {}
    for event in evs:
        profile = profiles.setdefault(event.user_id, Profile())
        profile.apply(event)
        if event.type == "purchase":
            learner.purchase(event.user_id, event.ts)
        else:
            learner.observe(event.user_id, event.ts, profile.features(event.ts))
        learner.advance(event.ts)


def _fingerprint_delayed_labels(learner: DelayedLabelLearner):
    return rounded({"counts": [learner.n_observed, learner.n_labels, learner.n_positive, len(learner)],
                    "quality": learner.quality(),
                    "predictions": [learner.predict_proba(p.features(NOW)) for p in probe_profiles()]})


def _validate_delayed_labels_unseen(learner: DelayedLabelLearner) -> None:
    labels_before = learner.n_labels
    copy = pickle.loads(pickle.dumps(learner))
    copy.purchase("never-seen-user", NOW)  # no pending point: nothing happens
    copy.advance(0)  # a watermark in the past: nothing happens
    assert copy.n_labels == labels_before


def _train_segments(segments: ProfileSegments, evs: list[Event]) -> None:
    for features, _ in feature_stream(evs):
        segments.learn_one(features)


def _fingerprint_segments(segments: ProfileSegments):
    return [segments.predict_one(p.features(NOW)) for p in probe_profiles()]


def _validate_segments_unseen(segments: ProfileSegments) -> None:
    for profile in probe_profiles():
        segment = segments.predict_one(profile.features(NOW))
        assert isinstance(segment, int) and 0 <= segment < segments.n_segments, segment
    assert 0 <= segments.predict_one({}) < segments.n_segments


def _train_profile(profile: Profile, evs: list[Event]) -> None:
    for event in evs:
        if event.user_id == "u1":
            profile.apply(event)


def _fingerprint_profile(profile: Profile):
    return rounded({"redis": profile.to_redis(), "features": profile.features(NOW)})


def _validate_profile_unseen(profile: Profile) -> None:
    features = profile.features(NOW)
    assert all(isinstance(v, float) and math.isfinite(v) for v in features.values()), features
    again = Profile.from_redis(profile.to_redis())
    assert again == profile, "Redis round trip changed the profile"


# --- policies: choices on decision contexts, rewards learnt ---------------------------------------------------
def train_policy(policy: Policy, evs: list[Event]) -> None:
    """Choose at every cart of ``evs``, expose the choice, and learn its reward (half of it for ``none``)."""
    for i, (ctx, reward) in enumerate(decision_contexts(evs)):
        choice = policy.choose(ctx, random.Random(i))
        policy.expose(ctx, choice.offer.offer_id)
        learnt = reward if choice.offer.kind != "none" else reward / 2
        assert policy.learn_one(ctx, choice.offer.offer_id, learnt) is None


def _fingerprint_policy(policy: Policy):
    out = []
    for i, ctx in enumerate(probe_contexts()):
        choice = policy.choose(ctx, random.Random(1000 + i))
        out.append((choice.offer.offer_id, rounded(choice.propensity), choice.group, rounded(choice.scores)))
    return out


def _validate_policy_unseen(policy: Policy) -> None:
    ctx = DecisionContext("never-seen-user", NOW, 0.0, [], [], True, 0, None, 0.0, 0.0)
    choice = policy.choose(ctx, random.Random(0))
    assert 0.0 < choice.propensity <= 1.0 and choice.offer.offer_id in policy.catalogue.offers, choice


ADAPTERS: list[Adapter] = [
    Adapter(LearningCore, _train_core, _fingerprint_core, _validate_core_unseen,
            reset=lambda c: c.reset(), rebuild=lambda c: c.clone()),
    Adapter(ItemStore, _train_item_store, _fingerprint_item_store, _validate_item_store_unseen,
            reset=lambda s: s.clear(), rebuild=lambda s: s.clone()),
    Adapter(DelayedLabelLearner, _train_delayed_labels, _fingerprint_delayed_labels, _validate_delayed_labels_unseen,
            reset=lambda d: d.reset(), rebuild=lambda d: d.clone()),
    Adapter(PurchasePropensity, _train_propensity, _fingerprint_propensity, _validate_propensity_unseen,
            rebuild=lambda m: m.clone()),
    Adapter(ProfileSegments, _train_segments, _fingerprint_segments, _validate_segments_unseen,
            rebuild=lambda s: s.clone()),
    Adapter(Profile, _train_profile, _fingerprint_profile, _validate_profile_unseen, rebuild=lambda p: Profile()),
    Adapter(Policy, train_policy, _fingerprint_policy, _validate_policy_unseen, rebuild=lambda p: p.clone()),
]
"""One adapter per kind of object, the first whose ``kind`` the object is an instance of applies."""


def adapter_for(obj) -> Adapter:
    """The adapter of ``obj``'s kind; ``TypeError`` for a kind the checks do not know."""
    for adapter in ADAPTERS:
        if isinstance(obj, adapter.kind):
            return adapter
    raise TypeError(f"no contract adapter for {type(obj).__name__}; add one to models.checks.ADAPTERS")
