"""Item statistics written in the users' commits (``models.learning.contrib``) on the real Redis: exact and removable.

The engine (RedisStore + RedisItemStore, as the worker builds it) replays the first 4,000 REES46 events:

* run A in file order, batches of 100;
* run B with the users' events interleaved differently (per-user order kept, as Kafka keeps it per partition),
  random batch sizes, a third of the batches delivered twice (a crash between commit and offset commit), and a
  fifth stopped after their commit (a crash before the parked contributions were applied: the next worker's
  ``apply_parked`` applies them);
* run C like A but without one user with history.

A and B leave the same item statistics and contribution records (floats within 1e-9 relative); after
``forget_user`` of that user, A's item counts, neighbour maps and popularity equal C's.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict

import pytest

from stream.evaluate import load_events
from tests.helpers import DATA
from tests.redis_state import compare_states, dump_state

pytestmark = pytest.mark.integration

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"
N = 4_000


@pytest.fixture(scope="module")
def events():
    evs, _ = load_events(REES46, "rees46", limit=N)
    return evs


def run(redis_url: str, prefix: str, batches, crash_after_commit=(), config=None) -> None:
    """Replay ``batches``; those whose index is in ``crash_after_commit`` stop after the commit (as a worker
    killed before applying its contributions), and what they parked is applied at the end by ``apply_parked``
    (the next worker's maintenance)."""
    import redis.asyncio as aioredis

    from models.engine import Engine
    from models.state.item_redis import RedisItemStore
    from models.state.item_store import SimilarityConfig
    from models.learning.core import LearningCore
    from models.state.engine_redis import RedisStore

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        # neighbour maps uncapped by default: evicting the smallest pair counts depends on arrival order
        store = RedisItemStore.from_url(redis_url, prefix=prefix,
                                        config=config or SimilarityConfig(max_neighbours=10_000))
        core = LearningCore(store, horizon_h=1.0)
        engine = Engine(RedisStore(client, prefix=prefix), learning=core, holdout_pct=0.0)
        assert core.items_via_commit
        store = engine.store
        for i, batch in enumerate(batches):
            result = await engine.process_batch(batch, learn=False)
            if i not in crash_after_commit:
                await engine.learn(result)
        if crash_after_commit:
            assert await client.scard(store.parked_key) > 0
            while await store.apply_parked(limit=50):
                pass
        assert await client.scard(store.parked_key) == 0
        await client.aclose()

    asyncio.run(go())


def item_state(redis_client, prefix: str, with_records: bool = True) -> dict:
    state = dump_state(redis_client, prefix)
    return {k: v for k, v in state.items() if k.startswith("sim:") or (with_records and k.endswith("}:c"))}


def chunks(evs, size):
    return [evs[i : i + size] for i in range(0, len(evs), size)]


def test_commit_order_and_redelivery_do_not_change_item_statistics(events, redis_url, redis_client):
    a, b = f"ica{uuid.uuid4().hex[:6]}", f"icb{uuid.uuid4().hex[:6]}"
    run(redis_url, a, chunks(events, 100))
    # B: users' events interleaved differently (each user's own order kept), random batches, redeliveries
    rng = random.Random(3)
    per_user = defaultdict(list)
    for e in events:
        per_user[e.user_id].append(e)
    queues = list(per_user.values())
    order = []
    while queues:
        q = rng.choice(queues)
        order.append(q.pop(0))
        if not q:
            queues.remove(q)
    batches, i = [], 0
    while i < len(order):
        size = rng.randint(1, 250)
        batches.append(order[i : i + size])
        if rng.random() < 0.33:
            batches.append(order[i : i + size])  # redelivered: every event a duplicate
        i += size
    assert [e.event_id for e in order] != [e.event_id for e in events]
    crashed = set(rng.sample(range(len(batches)), len(batches) // 5))
    run(redis_url, b, batches, crash_after_commit=crashed)
    sa, sb = item_state(redis_client, a), item_state(redis_client, b)
    kinds = Counter(k.split(":")[-1] if k.endswith((":nb", ":c", ":z", ":t")) else "n" for k in sa)
    assert kinds["nb"] > 500 and kinds["c"] > 500 and kinds["n"] > 1_000, kinds
    diff = compare_states(sa, sb, rel=1e-9)
    assert diff == [], "\n".join(diff[:40])


def test_forget_leaves_the_item_statistics_of_a_replay_without_the_user(events, redis_url, redis_client):
    from models.state.item_redis import RedisItemStore

    counts = Counter(e.user_id for e in events)
    uid = next(u for u, n in counts.most_common() if n >= 20)
    a, c = f"ifa{uuid.uuid4().hex[:6]}", f"ifc{uuid.uuid4().hex[:6]}"
    run(redis_url, a, chunks(events, 100))
    run(redis_url, c, chunks([e for e in events if e.user_id != uid], 100))
    before = item_state(redis_client, a, with_records=False)
    got = RedisItemStore(redis_client, prefix=a).forget_user(uid)
    assert got["items"] > 0 and got["pairs"] > 0 and got["popularity"] > 0, got
    assert not redis_client.exists(f"{a}:{{u:{uid}}}:c")
    sa, sc = item_state(redis_client, a, False), item_state(redis_client, c, False)
    assert compare_states(before, sc) != []  # the user did contribute
    # the index's "last updated" time of an item the user touched last is not a count: left out
    sa.pop("sim:idx"), sc.pop("sim:idx")
    diff = compare_states(sa, sc, rel=1e-9)
    assert diff == [], "\n".join(diff[:40])


def test_a_contribution_parked_in_the_earlier_payload_format_is_applied_alike(redis_url, redis_client):
    """Contributions parked by a worker of the previous version (short header keys: P, hl, phl, minsc, maxnb,
    maxpop) and left unapplied when it stopped are applied by the new script exactly as the new format is."""
    import json

    import redis.asyncio as aioredis

    from models.learning.contrib import Contribution
    from models.state.engine_redis import RedisStore
    from models.state.item_redis import RedisItemStore

    contrib = Contribution(half_life_ms=7 * 86_400_000, pop_half_life_ms=6 * 3_600_000)
    window: list = []
    for i, item in enumerate(["a", "b", "c", "a", "d"]):
        contrib.add_event(window, item, 1_700_000_000_000 + 60_000 * i, 1.0, width=8, window_ms=3_600_000)
    old_keys = {"prefix": "P", "half_life_ms": "hl", "pop_half_life_ms": "phl", "min_score": "minsc",
                "max_neighbours": "maxnb", "max_popular": "maxpop"}
    states = []
    for fmt in ("new", "old"):
        prefix = "pf" + uuid.uuid4().hex[:8]
        header = RedisItemStore(redis_client, prefix).contribution_header()
        if fmt == "old":
            header = {old_keys[k]: v for k, v in header.items()}
        payload = json.loads(contrib.to_json(header))
        assert ("P" in payload) == (fmt == "old")

        async def apply(prefix=prefix, payload=payload):
            store = RedisStore(aioredis.Redis.from_url(redis_url), prefix=prefix)
            record = f"{store.user_tag('u1')}:c"
            await store.r.hset(record, mapping={"w:1": json.dumps(payload), "parked": 1})
            await store.r.sadd(store.parked_key, record)
            applied = await store.apply_contributions([("u1", "w:1")])
            await store.close()
            return applied

        assert asyncio.run(apply()) == 1
        states.append(dump_state(redis_client, prefix))  # keys without the prefix: comparable
    assert states[0] and not compare_states(states[0], states[1])


def test_applied_contributions_keep_neighbour_maps_and_popularity_within_their_bounds(events, redis_url, redis_client):
    """The apply script checks a set's size only where an increment added a member (``lua/apply.lua``): every
    neighbour map still ends at most ``max_neighbours`` long, and the popularity set at most twice
    ``max_popular``."""
    from models.state.item_store import SimilarityConfig

    prefix = f"icn{uuid.uuid4().hex[:6]}"
    run(redis_url, prefix, chunks(events, 100), config=SimilarityConfig(max_neighbours=3, max_popular=5))
    sizes = [redis_client.zcard(k) for k in redis_client.scan_iter(match=f"{prefix}:sim:*:nb", count=1000)]
    assert len(sizes) > 500 and max(sizes) == 3, Counter(sizes)
    assert 5 <= redis_client.zcard(f"{prefix}:sim:{{pop}}:z") <= 10


def test_an_item_the_cap_pruned_and_a_pair_brought_back_is_under_the_cap_again(redis_url, redis_client):
    """The item cap prunes the least recently updated items by their index entry. A user whose window still holds
    a pruned item pairs it with the next item viewed, and the pair brings the item's keys back: they must be in
    the index again, or the cap never sees them and they stay for ever."""
    import redis.asyncio as aioredis

    from models.learning.contrib import Contribution
    from models.state.engine_redis import RedisStore
    from models.state.engine_store import UserCommit, parked_field
    from models.state.item_redis import RedisItemStore
    from models.state.item_store import SimilarityConfig

    prefix = "cap" + uuid.uuid4().hex[:8]
    items = RedisItemStore(redis_client, prefix, SimilarityConfig(max_items=1))
    t0 = 1_700_000_000_000
    windows: dict[str, list] = defaultdict(list)
    versions: dict[str, str] = defaultdict(str)

    async def view(user: str, item: str, ts: int) -> None:
        store = RedisStore(aioredis.Redis.from_url(redis_url), prefix=prefix)
        c = Contribution(7 * 86_400_000, 6 * 3_600_000)
        c.add_event(windows[user], item, ts, 1.0, width=8, window_ms=3_600_000)
        commit = UserCommit(user, {"n": 1}, [uuid.uuid4().hex], [], version=versions[user],
                            contrib=c.to_json(items.contribution_header()))
        assert await store.commit([commit]) == [True]
        assert await store.apply_contributions([(user, parked_field(versions[user]))]) == 1
        versions[user] = str(int(versions[user] or 0) + 1)
        await store.close()

    asyncio.run(view("a", "x", t0))
    asyncio.run(view("c", "z", t0 + 1_000))
    assert items.enforce_item_cap() == 1 and not redis_client.exists(items.item_key("x"))  # x pruned
    asyncio.run(view("a", "y", t0 + 2_000))  # a's window still holds x: the pair (y, x) brings x's keys back
    assert redis_client.exists(items.item_key("x"))
    indexed = {m.decode() for m in redis_client.zrange(items.idx_key, 0, -1)}
    assert {"x", "y", "z"} <= indexed
    items.enforce_item_cap()
    assert [it for it in "xyz" if redis_client.exists(items.item_key(it))] == ["y"]
