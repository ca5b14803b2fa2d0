"""The budget store contract over the in-memory store and Redis (the session's real redis-server)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from models.state.budget_memory import MemoryBudgetStore
from models.state.budget_redis import RedisBudgetStore
from tests.contracts.mixins import BudgetStoreContract


class TestMemoryBudgetStore(BudgetStoreContract):
    @pytest.fixture
    def store(self):
        return MemoryBudgetStore()


@pytest.mark.integration
class TestRedisBudgetStore(BudgetStoreContract):
    """The same behaviour as the in-memory store, on the real redis-server."""

    @pytest.fixture
    def store(self, redis_url):
        import redis.asyncio as aioredis

        self.loop = asyncio.new_event_loop()
        client = aioredis.Redis.from_url(redis_url)
        st = RedisBudgetStore(client, prefix="t" + uuid.uuid4().hex[:10])
        yield st
        self.loop.run_until_complete(st.close())
        self.loop.close()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def test_keys_share_one_hash_tag(self, store):
        keys = store.keys("c5")
        assert all(k.startswith(f"{store.prefix}:{{b:c5}}") for k in keys) and len(set(keys)) == 4
