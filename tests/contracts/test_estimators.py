"""Every learning model, item store and policy passes the checks of :mod:`models.checks` (River style)."""

from __future__ import annotations

import uuid

import pytest

from models import checks
from models.state.item_memory import MemoryItemStore
from models.state.item_redis import RedisItemStore
from models.state.item_store import SimilarityConfig
from models.learning.core import LearningCore
from models.profile import Profile
from models.learning.delayed_labels import DelayedLabelLearner
from models.learning.propensity import PurchasePropensity
from models.learning.segments import ProfileSegments
from models.policy.catalogue import load_catalogue
from models.policy.rules import RulePolicy
from models.policy.thompson import ThompsonPolicy

FACTORIES = {
    "LearningCore": lambda: LearningCore(MemoryItemStore(), horizon_h=0.5),
    "MemoryItemStore": lambda: MemoryItemStore(SimilarityConfig(max_neighbours=5, max_items=20)),
    "DelayedLabelLearner": lambda: DelayedLabelLearner(horizon_ms=600_000,
                                                       model=PurchasePropensity(feature_names=("n_events",))),
    "PurchasePropensity": lambda: PurchasePropensity(feature_names=("n_events", "session_carts")),
    "ProfileSegments": lambda: ProfileSegments(n_segments=3, seed=1),
    "Profile": Profile,
    # policies as the engine runs them (engine.Engine.from_settings): exposures counted when a decision is final
    "RulePolicy": lambda: RulePolicy(load_catalogue(), holdout_pct=10.0),
    "ThompsonPolicy": lambda: ThompsonPolicy(load_catalogue(), holdout_pct=10.0, defer_exposure=True),
}
CASES = [(kind, check.__name__) for kind in sorted(FACTORIES) for check in checks.yield_checks(FACTORIES[kind]())]
CHECKS = [c.__name__ for c in checks.yield_checks(MemoryItemStore())]


@pytest.mark.parametrize("kind,check", CASES)
def test_contract(kind, check):
    getattr(checks, check)(FACTORIES[kind]())


def test_a_policy_misreporting_its_propensity_fails_the_checks():
    """The policy checks can fail: a policy that halves the probability it reports is caught."""

    class HalfPropensity(ThompsonPolicy):
        def choose(self, ctx, rng):
            choice = super().choose(ctx, rng)
            choice.propensity *= 0.5
            return choice

    with pytest.raises(AssertionError, match="not the probability of the choice"):
        checks.check_propensity_is_the_choice_probability(HalfPropensity(load_catalogue(), defer_exposure=True))


@pytest.fixture
def redis_store(redis_client):  # the session's real redis-server
    prefix = "tc" + uuid.uuid4().hex[:8]
    store = RedisItemStore(redis_client, prefix, SimilarityConfig(max_neighbours=5, max_items=20))
    yield store
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
        redis_client.delete(key)


@pytest.mark.integration
@pytest.mark.parametrize("check", CHECKS)
def test_contract_redis_item_store(redis_store, check):
    getattr(checks, check)(redis_store)


@pytest.mark.integration
def test_redis_and_memory_stores_answer_alike(redis_store):
    """Same events through both stores: the same fingerprint (the stores share one semantics)."""
    mem = MemoryItemStore(redis_store.config)
    adapter = checks.adapter_for(mem)
    adapter.train(mem, checks.events())
    adapter.train(redis_store, checks.events())
    assert adapter.fingerprint(redis_store) == adapter.fingerprint(mem)


def test_checks_reject_a_broken_clone():
    """The suite can fail: a clone that shares learnt state is caught."""

    class LeakyStore(MemoryItemStore):
        def clone(self):
            return self

    with pytest.raises(AssertionError, match="clone"):
        checks.check_clone(LeakyStore())


def test_unknown_kind_is_an_error():
    with pytest.raises(TypeError, match="no contract adapter"):
        list(checks.yield_checks(object()))
