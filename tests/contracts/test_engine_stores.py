"""The engine store contract over the in-memory store and Redis (the session's real redis-server)."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from models.state.engine_memory import MemoryStore
from models.state.engine_redis import RedisStore
from tests.contracts.mixins import EngineStoreContract


class TestMemoryStore(EngineStoreContract):
    def make_store(self):
        return MemoryStore()


@pytest.mark.integration
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
        attr = getattr(RedisStore, name)
        if not callable(attr):  # a declared capability (class attribute)
            return attr

        async def call(*args):
            store = RedisStore(aioredis.Redis.from_url(self.url), prefix=self.prefix, dedup_ttl_s=100,
                               profile_ttl_s=200, decision_ttl_s=300)
            try:
                return await getattr(store, name)(*args)
            finally:
                await store.close()
        return call
