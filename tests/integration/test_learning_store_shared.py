"""A worker starting (a LearningCore on the shared Redis item store) never wipes what others learnt."""

import uuid

import pytest
import redis

from models.state.item_redis import RedisItemStore
from models.state.item_store import ItemBatch
from models.learning.core import LearningCore

pytestmark = pytest.mark.integration


def test_new_learning_core_keeps_the_shared_item_store(redis_url):
    r = redis.Redis.from_url(redis_url)
    prefix = "ls" + uuid.uuid4().hex[:8]
    store = RedisItemStore(r, prefix)
    store.apply(ItemBatch(ts=0, items=["a", "b"], item_inc=[1.0, 1.0], pair_a=["a"], pair_b=["b"], pair_inc=[1.0]))
    before = sorted(r.scan_iter(match=f"{prefix}:sim:*"))
    assert before
    core = LearningCore(RedisItemStore(r, prefix))
    assert sorted(r.scan_iter(match=f"{prefix}:sim:*")) == before
    core.reset()  # an explicit reset still clears it
    assert list(r.scan_iter(match=f"{prefix}:sim:*")) == []
    r.close()
