"""What only the Redis engine store has: TTLs and hash tags (its contract is in tests/contracts/)."""

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from models.state.engine_redis import RedisStore
from models.state.engine_store import UserCommit

pytestmark = pytest.mark.integration


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
