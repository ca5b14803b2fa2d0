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


def test_buffered_replies_read_without_a_timer_equal_redis_py_s_own_reads(redis_url, monkeypatch):
    """``redis_async`` returns a reply the C reader already holds without entering a timeout; every reply of a
    pipeline (values, nil, nested arrays, error replies in place, a value larger than one socket read so that
    its reply arrives in pieces) is what a plain redis-py client reads, in order, and an error reply is still
    raised by a single command. A paused Redis still times out (the read that needs the socket has its timer)."""
    from redis.exceptions import ResponseError, TimeoutError as RedisTimeout

    from models.state.redis_async import async_client

    import redis.asyncio.connection as rconn

    timers = []
    real_timeout = rconn.async_timeout
    monkeypatch.setattr(rconn, "async_timeout", lambda t: timers.append(t) or real_timeout(t))
    big = b"x" * (3 << 20)  # 3 MiB: several socket reads

    async def replies(r, key):  # each client on keys of its own: the same replies from the same state
        pipe = r.pipeline(transaction=False)
        pipe.set(key, "v").get(key).get(key + ":none").hset(key + ":h", mapping={"a": 1, "b": 2})
        pipe.hgetall(key + ":h").incr(key)  # an error reply (not an integer) in the middle
        pipe.set(key + ":big", big).get(key + ":big").zadd(key + ":z", {"m": 1.5}).zrange(key + ":z", 0, -1,
                                                                                             withscores=True)
        pipe.execute_command("EVAL", "return {1, {2, 'x'}, redis.status_reply('OK')}", 0)
        out = await pipe.execute(raise_on_error=False)
        return [type(x).__name__ + ":" + str(x) if isinstance(x, Exception) else x for x in out]

    async def go():
        fast, plain = async_client(redis_url, socket_timeout=1.0), aioredis.Redis.from_url(redis_url)
        key = "br" + uuid.uuid4().hex[:6]
        await fast.ping()
        await plain.ping()  # both connected: what follows counts the replies' timers only
        timers.clear()
        got = await replies(fast, key + "f")
        fast_timers = len(timers)
        want = await replies(plain, key + "p")
        plain_timers = len(timers) - fast_timers
        with pytest.raises(ResponseError):
            await fast.incr(key + "f")
        await plain.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        try:
            with pytest.raises(RedisTimeout):
                await fast.get(key + "f")
        finally:
            await plain.execute_command("CLIENT", "UNPAUSE")
        fresh = await fast.get(key + "f")  # the connection that timed out was dropped; a new one answers
        for k in (key + "f", key + "p"):
            await plain.delete(k, k + ":h", k + ":big", k + ":z")
        await fast.aclose()
        await plain.aclose()
        return got, want, fresh, fast_timers, plain_timers

    got, want, fresh, fast_timers, plain_timers = asyncio.run(go())
    assert plain_timers == 11 and fast_timers < plain_timers  # redis-py: a timer per reply
    assert got == want
    assert got[1] == b"v" and got[2] is None and got[7] == big and got[5].startswith("ResponseError:")
    assert fresh == b"v"


def test_a_decision_forgotten_between_commit_and_send_is_not_created_again_by_mark_sent(redis_url, redis_client):
    """``promo forget`` may run between a decision's commit and its ``mark_sent``: marking must not create the
    decision's hash again (no TTL, the user's id in its key) - nothing of the user is left in Redis."""
    from stream.forget import forget_everything
    from stream.settings import Settings

    prefix = "ms" + uuid.uuid4().hex[:6]

    async def step(fn):
        store = RedisStore(aioredis.Redis.from_url(redis_url), prefix=prefix)
        try:
            return await fn(store)
        finally:
            await store.close()

    assert asyncio.run(step(lambda s: s.commit([UserCommit("U", {"n": 1}, ["e1"], [("e1", b'{"d":1}')])]))) == [True]
    forget_everything(Settings(_env_file=None, redis_url=redis_url, redis_prefix=prefix), redis_client, "U")
    asyncio.run(step(lambda s: s.mark_sent([("U", "e1")])))
    assert list(redis_client.scan_iter(match=prefix + ":{u:U}:*")) == []


def test_the_ledger_and_the_contribution_record_live_as_long_as_the_profile(redis_url, redis_client):
    """A commit that adds neither contributions nor ledger records (a timer, a closing, a cart removal) keeps the
    user active: it renews the ledger's and the contribution record's TTL with the profile's, or they would
    expire first, and a later forget would find no record to subtract from the item statistics."""
    prefix = "lr" + uuid.uuid4().hex[:6]

    async def go():
        store = RedisStore(aioredis.Redis.from_url(redis_url), prefix=prefix, profile_ttl_s=1000)
        try:
            assert await store.commit([UserCommit("U", {"n": 1}, ["e1"], [], ledger=['{"closed":1}'],
                                                  contrib='{"i":[],"p":[],"q":[]}')]) == [True]
            tag = store.profile_key("U")[:-1]
            for suffix in ("l", "c"):  # as if most of their TTL had passed
                await store.r.expire(tag + suffix, 5)
            assert await store.commit([UserCommit("U", {"n": 2}, ["e2"], [], version="1")]) == [True]
            return [await store.r.ttl(tag + s) for s in ("p", "l", "c")]
        finally:
            await store.close()

    ttl_profile, ttl_ledger, ttl_record = asyncio.run(go())
    assert 990 <= ttl_profile <= 1000 and 990 <= ttl_ledger <= 1000 and 990 <= ttl_record <= 1000
