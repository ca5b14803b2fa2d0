"""``PROMO_MODEL_MAX_USERS`` bounds the worker's in-memory models, a restart with a lower bound included, and the
worker allocates no per-user windows it does not use."""

from __future__ import annotations

import asyncio

import pytest
import redis

from models.learning.snapshot import save_snapshot
from stream.app import build_engine
from stream.evaluate import load_events
from tests.integration.test_faults import REES46

pytestmark = pytest.mark.integration


def learn(engine, events) -> None:
    async def run() -> None:
        await engine.start()
        for i in range(0, len(events), 200):
            await engine.process_batch(events[i:i + 200])

    asyncio.run(run())


def test_the_worker_models_keep_at_most_model_max_users_across_a_restart(engine_settings):
    events, _ = load_events(REES46, "rees46", limit=12_000)
    engine = build_engine(engine_settings)  # the default bound
    learning = engine.learning
    assert learning.windows.capacity == learning.purchase_model.max_pending == 200_000
    learn(engine, events[:8000])
    pending = len(learning.purchase_model.queue)
    assert pending > 1000, pending
    # the item statistics come with the users' commits: the in-memory windows (40 MB at 200,000 users) stay empty
    assert learning.items_via_commit and learning.windows.data.nbytes == 0
    save_snapshot(redis.Redis.from_url(engine_settings.redis_url), learning, {}, engine_settings.redis_prefix)

    restarted = build_engine(engine_settings.model_copy(update={"model_max_users": 1000}))
    bounded = restarted.learning
    assert bounded.n_events == learning.n_events  # the snapshot was read
    assert bounded.max_users == bounded.windows.capacity == bounded.purchase_model.max_pending == 1000
    observed = bounded.purchase_model.n_observed
    learn(restarted, events[8000:])
    assert bounded.purchase_model.n_observed > observed  # new decision points came ...
    assert len(bounded.purchase_model.queue) <= 1000  # ... and the oldest beyond the bound went
