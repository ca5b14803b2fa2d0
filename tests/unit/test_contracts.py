"""Every learning model and store passes the contract suite of :mod:`models.learning.checks` (River style)."""

from __future__ import annotations

import uuid

import pytest

from models.learning import checks
from models.state.item_memory import MemoryItemStore
from models.state.item_redis import RedisItemStore
from models.state.item_store import SimilarityConfig
from models.learning.core import LearningCore
from models.profile import Profile
from models.learning.propensity import DelayedLabelLearner, PurchasePropensity
from models.learning.segments import ProfileSegments

FACTORIES = {
    "LearningCore": lambda: LearningCore(MemoryItemStore(), horizon_h=0.5),
    "MemoryItemStore": lambda: MemoryItemStore(SimilarityConfig(max_neighbours=5, max_items=20)),
    "DelayedLabelLearner": lambda: DelayedLabelLearner(horizon_ms=600_000,
                                                       model=PurchasePropensity(feature_names=("n_events",))),
    "PurchasePropensity": lambda: PurchasePropensity(feature_names=("n_events", "session_carts")),
    "ProfileSegments": lambda: ProfileSegments(n_segments=3, seed=1),
    "Profile": Profile,
}
CHECKS = [c.__name__ for c in checks.yield_checks(MemoryItemStore())]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_contract(kind, check):
    getattr(checks, check)(FACTORIES[kind]())


@pytest.fixture
def redis_store(redis_client):
    prefix = "tc" + uuid.uuid4().hex[:8]
    store = RedisItemStore(redis_client, prefix, SimilarityConfig(max_neighbours=5, max_items=20))
    yield store
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
        redis_client.delete(key)


@pytest.mark.parametrize("check", CHECKS)
def test_contract_redis_item_store(redis_store, check):
    getattr(checks, check)(redis_store)


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
