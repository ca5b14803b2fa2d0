"""A user forgotten while the worker writes its model snapshot does not come back with that snapshot.

The worker's snapshot is taken from the models as they are when its writer starts (a forked child), and
``promo forget`` scrubs the snapshot stored *before* it. Without a fence, the snapshot written next holds the
forgotten user until the snapshot after it (and a worker restarted from it would hold the user again). These tests
inject the forget at each moment of the write, on the real Redis, with the real ``promo forget`` code
(:func:`stream.forget.forget_everything`), and check the stored snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from dataclasses import replace

import pytest

from models.checks import events as synthetic_events
from models.learning.core import LearningCore
from models.learning.snapshot import (ForgetsKeptLanding, forget_seq_key, load_snapshot, missing_keys,
                                      save_snapshot_fenced, snapshot_key, without_users)
from models.profile import Profile
from models.state.engine_redis import user_profile_key
from models.state.item_memory import MemoryItemStore
from stream.faults import Verdict, classify_fault
from stream.forget import forget_everything
from stream.settings import Settings

VICTIM = "forget-me-4711"  # an id no other id of the synthetic events contains


@pytest.fixture
def world(redis_client, redis_url):
    """A learning core holding users (the busiest one renamed to VICTIM), each with a profile in Redis."""
    prefix = "tsf" + uuid.uuid4().hex[:8]
    evs = synthetic_events(300)
    busiest = Counter(e.user_id for e in evs).most_common(1)[0][0]
    evs = [replace(e, user_id=VICTIM) if e.user_id == busiest else e for e in evs]
    core = LearningCore(MemoryItemStore(), decision_points="batch")
    for i in range(0, len(evs), 40):
        part = evs[i : i + 40]
        core.learn_batch(part, {e.user_id: Profile() for e in part})
    held = core.held_users()
    assert VICTIM in held and len(held) > 5
    for u in held:
        redis_client.hset(user_profile_key(prefix, u), "n", 1)
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=prefix)
    yield prefix, core, held, settings
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
        redis_client.delete(key)


def stored_users(redis_client, prefix: str, offsets=None) -> set[str]:
    fresh = LearningCore(MemoryItemStore(), decision_points="batch")
    assert load_snapshot(redis_client, fresh, prefix) == (offsets if offsets is not None else {0: 300})
    return fresh.held_users()


def core_render(core: LearningCore):
    """What the worker's forked child renders: its copy of the models, without the users left out."""
    def render(gone: list[str]) -> bytes:
        core.forget_users(gone)
        return core.snapshot({0: 300})
    return render


def test_a_forget_between_the_writers_check_and_its_write_makes_it_check_again(redis_client, world):
    """The forget deletes the user's keys and scrubs the stored snapshot after the writer checked the profiles and
    before it writes: the write fails on the forget sequence, the second check finds the profile gone, and the
    snapshot is written without the user."""
    prefix, core, held, settings = world
    calls = []

    def missing_then_forget(client, keys):
        gone = missing_keys(client, keys)
        calls.append(len(gone))
        if len(calls) == 1:  # the profiles were all there; now the user is forgotten, before the write
            forget_everything(settings, redis_client, VICTIM)
        return gone

    size, left_out = save_snapshot_fenced(redis_client, held, core_render(core),
                                          functools.partial(user_profile_key, prefix), prefix,
                                          missing=missing_then_forget)
    assert calls == [0, 1]  # checked twice: the first write was refused
    assert left_out == [VICTIM] and size == redis_client.strlen(snapshot_key(prefix))
    assert VICTIM.encode() not in redis_client.get(snapshot_key(prefix))
    assert stored_users(redis_client, prefix) == held - {VICTIM}
    assert redis_client.get(forget_seq_key(prefix)) == b"1"  # a count, no id


def test_a_forget_before_the_write_is_found_by_the_check(redis_client, world):
    """The user is forgotten after the snapshot's bytes were taken, before its writer starts (the worker's
    fallback without ``fork``): the forget's scrub found nothing to scrub (no snapshot stored yet), and the writer
    leaves out the user whose profile is gone."""
    prefix, core, held, settings = world
    blob = core.snapshot({0: 300})  # taken while the user was held
    removed, _ = forget_everything(settings, redis_client, VICTIM)
    assert removed["snapshot"] == 0
    _, left_out = save_snapshot_fenced(redis_client, held, lambda gone: without_users(blob, gone)[0],
                                       functools.partial(user_profile_key, prefix), prefix)
    assert left_out == [VICTIM]
    assert stored_users(redis_client, prefix) == held - {VICTIM}


def test_a_forget_after_the_write_scrubs_the_new_snapshot(redis_client, world):
    prefix, core, held, settings = world
    assert save_snapshot_fenced(redis_client, held, core_render(core),
                                functools.partial(user_profile_key, prefix), prefix)[1] == []
    assert VICTIM in stored_users(redis_client, prefix)
    removed, _ = forget_everything(settings, redis_client, VICTIM)
    assert removed["snapshot"] == 1
    assert stored_users(redis_client, prefix) == held - {VICTIM}


def test_forgets_landing_at_every_attempt_leave_the_stored_snapshot_alone_and_skip_the_period(redis_client,
                                                                                              world):
    prefix, core, held, _ = world
    redis_client.set(snapshot_key(prefix), b"the previous snapshot")

    def contended(client, keys):
        client.incr(forget_seq_key(prefix))  # a forget lands during every check
        return missing_keys(client, keys)

    with pytest.raises(ForgetsKeptLanding, match="was not written") as err:
        save_snapshot_fenced(redis_client, held, core_render(core), functools.partial(user_profile_key, prefix),
                             prefix, attempts=3, missing=contended)
    assert redis_client.get(forget_seq_key(prefix)) == b"3"
    assert redis_client.get(snapshot_key(prefix)) == b"the previous snapshot"
    # the maintenance timer skips the period (transient) instead of stopping the worker
    assert classify_fault(err.value).verdict is Verdict.RETRY


def test_the_workers_snapshot_leaves_out_and_then_drops_users_whose_profile_is_gone(engine_settings):
    """The worker's own path (``stream.app.Maintenance.snapshot``, forked child): a user forgotten by
    ``promo forget`` after the worker learnt from them is in neither the stored snapshot nor, after it, the
    worker's in-memory models; the profiles were checked in the child, not on the worker's event loop."""
    import redis

    from stream.app import Maintenance, build_engine
    from stream.evaluate import load_events
    from tests.integration.test_faults import REES46

    s = engine_settings
    engine = build_engine(s)
    events, _ = load_events(REES46, "rees46", limit=3000)
    client = redis.Redis.from_url(s.redis_url)

    async def learn_then_snapshot(forget) -> set[str]:
        await engine.start()
        for i in range(0, len(events), 200):
            await engine.process_batch(events[i:i + 200])  # learns in the call (nothing is sent)
        held = engine.learning.held_users()
        forget(held)
        await Maintenance(s, engine).snapshot()
        return held

    victims: list[str] = []

    def forget(held):
        victims.extend(sorted(held)[:3])
        for u in victims:
            forget_everything(s, client, u)

    held = asyncio.run(learn_then_snapshot(forget))
    assert len(held) > 10 and all(u in held for u in victims)
    stored = client.get(snapshot_key(s.redis_prefix))
    assert stored is not None and not any(u.encode() in stored for u in victims)
    assert not set(victims) & engine.learning.held_users()  # dropped in the worker after the snapshot
    fresh = LearningCore(MemoryItemStore(), decision_points="batch")
    load_snapshot(client, fresh, s.redis_prefix)
    assert fresh.held_users() == held - set(victims)
    client.close()
