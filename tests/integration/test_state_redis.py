"""The engine store contract on a real redis-server, plus what only Redis has: TTLs and hash tags."""

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from models.state.engine_redis import RedisStore
from models.state.engine_store import UserCommit
from tests.store_contract import EngineStoreContract

pytestmark = pytest.mark.integration


class TestRedisStore(EngineStoreContract):
    @pytest.fixture(autouse=True)
    def _url(self, redis_url):
        self.url = redis_url

    def make_store(self):
        # a fresh client per call: each test's asyncio.run has its own event loop
        return _LoopSafe(self.url, "c" + uuid.uuid4().hex[:8])


class _LoopSafe:
    """A RedisStore whose client is created inside the running loop of each call."""

    def __init__(self, url, prefix):
        self.url, self.prefix = url, prefix

    def __getattr__(self, name):
        async def call(*args):
            store = RedisStore(aioredis.Redis.from_url(self.url), prefix=self.prefix, dedup_ttl_s=100,
                               profile_ttl_s=200, decision_ttl_s=300)
            try:
                return await getattr(store, name)(*args)
            finally:
                await store.close()
        return call


def test_keys_carry_the_user_hash_tag_and_ttls(redis_url):
    async def go():
        r = aioredis.Redis.from_url(redis_url)
        store = RedisStore(r, prefix="tt" + uuid.uuid4().hex[:6], dedup_ttl_s=100, profile_ttl_s=200, decision_ttl_s=300)
        await store.commit([UserCommit("u{1}", {"n": "1"}, ["e1"], [("e1", b"{}")])])
        keys = sorted([k.decode() async for k in r.scan_iter(match=store.prefix + ":*")])
        ttls = [await r.ttl(k) for k in keys]
        await store.close()
        return store.prefix, keys, ttls

    prefix, keys, ttls = asyncio.run(go())
    # the id is escaped (models.keys): its braces cannot end the hash tag early or make another user's pattern
    assert keys == [f"{prefix}:{{u:u%7B1%7D}}:d:e1", f"{prefix}:{{u:u%7B1%7D}}:e:e1", f"{prefix}:{{u:u%7B1%7D}}:p"]
    # Redis Cluster hashes the text between the first '{' and the next '}': one slot for all of a user's keys
    assert {k[k.index("{") + 1 : k.index("}", k.index("{"))] for k in keys} == {"u:u%7B1%7D"}
    assert 0 < ttls[0] <= 300 and 0 < ttls[1] <= 100 and 0 < ttls[2] <= 200


def test_the_policy_snapshot_of_an_earlier_version_is_carried_into_the_shared_hash_once(stack, redis_client):
    """Upgrading keeps what the policy learnt: a store with only the old policy snapshot seeds ``<prefix>:policy``
    from it; once the hash exists (commits add to it) it is what every worker reads, the snapshot is ignored."""
    from models.engine import Engine
    from stream.app import policy_snapshot_key, restore_policy

    settings = stack.model_copy(update={"redis_prefix": "pm" + uuid.uuid4().hex[:8]})

    def engine():
        store = RedisStore(aioredis.Redis.from_url(settings.redis_url), prefix=settings.redis_prefix)
        return Engine.from_settings(settings, store)

    old = engine().policy
    old.cells[("pct_10", (3,))] = [2.5, 4.0]
    old.cells[("none", (None,))] = [1.0, 1.5]
    old.n_learned = 7
    redis_client.set(policy_snapshot_key(settings), old.to_bytes())
    first = engine()
    restore_policy(redis_client, first, settings)
    assert first.policy.cells == old.cells and first.policy.n_learned == 7
    assert redis_client.hlen(f"{settings.redis_prefix}:policy") == 5  # a and b of two cells, and n

    old.cells[("pct_10", (3,))] = [99.0, 99.0]  # a stale snapshot: the hash wins
    redis_client.set(policy_snapshot_key(settings), old.to_bytes())
    second = engine()
    restore_policy(redis_client, second, settings)
    assert second.policy.cells == first.policy.cells
