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


def _script_calls(info: dict) -> dict[str, int]:
    return {k: v["calls"] for k, v in info.items() if k.startswith("cmdstat_script") or k == "cmdstat_evalsha"}


def test_script_calls_cost_no_extra_round_trip_and_survive_a_flushed_script_cache(redis_url):
    """The production clients (``models.state.redis_async``) load the scripts once per connection and queue
    ``EVALSHA``: a commit pipeline asks no ``SCRIPT EXISTS`` (redis-py's ``Script`` asks before every pipeline).
    After ``SCRIPT FLUSH`` the calls that answered ``NOSCRIPT`` run again once the scripts are loaded, each once."""
    from models.state.engine_redis import SCRIPTS
    from models.state.redis_async import async_client

    async def go():
        r = async_client(redis_url, SCRIPTS)
        admin = aioredis.Redis.from_url(redis_url)
        store = RedisStore(r, prefix="ts" + uuid.uuid4().hex[:6])
        await store.ping()  # the connection is made here, and loads the scripts
        before = _script_calls(await admin.info("commandstats"))
        outcomes = [await store.commit([UserCommit(f"u{i}", {"n": str(i)}, [f"e{i}"], [])]) for i in range(5)]
        after = _script_calls(await admin.info("commandstats"))
        await admin.script_flush()
        flushed = await store.commit([UserCommit(f"v{i}", {"n": str(i)}, [f"f{i}"], []) for i in range(3)])
        again = await store.commit([UserCommit("v0", {"n": "0"}, ["f0"], [])])  # a duplicate now: refused
        profiles = [await r.hget(store.profile_key(f"v{i}"), "v") for i in range(3)]
        await store.close()
        await admin.aclose()
        return before, after, outcomes, flushed, again, profiles

    before, after, outcomes, flushed, again, profiles = asyncio.run(go())
    assert outcomes == [[True]] * 5
    assert after.get("cmdstat_evalsha", 0) - before.get("cmdstat_evalsha", 0) == 5
    assert {k: v for k, v in after.items() if k != "cmdstat_evalsha"} == \
        {k: v for k, v in before.items() if k != "cmdstat_evalsha"}, "a SCRIPT command per pipeline"
    assert flushed == [True, True, True]
    assert profiles == [b'{"n":"0"}', b'{"n":"1"}', b'{"n":"2"}']
    assert again == [False]  # a marker exists: refused, not an error and not applied twice
