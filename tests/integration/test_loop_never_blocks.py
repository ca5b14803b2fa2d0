"""No Redis call blocks the worker's event loop (issue 15): the batch path talks to Redis only through asyncio
clients, and what must stay synchronous runs in threads. A slow or paused Redis then delays batches, never
``/livez`` or the consumer's heartbeats.

* On the real Redis, a whole REES46 replay through the production engine (``stream.app.build_engine``) makes no
  call on a synchronous client from the event loop's thread; the recommendations' item reads are fetched
  asynchronously before planning (``models/state/item_reads.py``).
* A worker whose Redis is paused (``CLIENT PAUSE``) while events arrive keeps answering ``/livez`` and applies
  every event once Redis answers again.
"""

from __future__ import annotations

import asyncio
import time
import traceback

import redis

from stream.app import build_engine
from stream.evaluate import load_events
from stream.sources import read_events
from tests.helpers import http_get, metric, wait_until
from tests.integration.test_crash_safety import PacedProducer
from tests.integration.test_faults import REES46, markers


def calls_from_the_loop(client: redis.Redis) -> list[str]:
    """Record (a short stack each) every connection ``client`` takes while an event loop runs in this thread:
    a synchronous command there blocks the loop for the whole round trip."""
    pool = client.connection_pool
    get_connection = pool.get_connection
    seen: list[str] = []

    def checked(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # a thread without a loop (asyncio.to_thread): allowed
        else:
            seen.append("".join(traceback.format_stack(limit=10)))
        return get_connection(*args, **kwargs)

    pool.get_connection = checked
    return seen


def test_the_batch_path_makes_no_synchronous_redis_call_in_the_event_loop(engine_settings):
    engine = build_engine(engine_settings)
    assert engine.learning is not None, "the production engine learns (PROMO_LEARNING)"
    seen = calls_from_the_loop(engine.learning.store.r)
    events, _ = load_events(REES46, "rees46", limit=8000)

    async def run() -> list:
        await engine.start()
        decisions = []
        for i in range(0, len(events), 200):
            result = await engine.process_batch(events[i:i + 200])
            await engine.mark_sent(result.decisions)
            decisions += result.decisions
        return decisions

    decisions = asyncio.run(run())
    assert sum(1 for d in decisions if d.items) > 20, "decisions with recommendations were made"
    assert seen == [], f"{len(seen)} synchronous Redis call(s) from the event loop, the first from:\n{seen[0]}"
    assert engine.item_reads_missed == 0


def test_livez_answers_while_redis_is_paused_and_every_event_is_applied_after(engine_settings, start_worker):
    s = engine_settings
    events = list(read_events(REES46, "rees46", limit=3000))
    before, during = events[:1500], events[1500:]
    r = redis.Redis.from_url(s.redis_url)
    worker = start_worker(s)
    worker.wait_ready()
    p = PacedProducer(s, before, None)
    p.run()
    assert p.error is None, p.error
    wait_until(lambda: metric(worker.metrics(), "promo_events_total") >= len(before), 60, "the first events applied")

    pause_s = 5.0
    producer = PacedProducer(s, during, 600.0)  # arrives while Redis is paused: batches wait on it
    r.execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
    paused_at = time.monotonic()
    producer.start()
    answers: list[tuple[float, int]] = []
    while time.monotonic() - paused_at < pause_s - 0.5:
        t0 = time.monotonic()
        status, _ = http_get(worker.base_url + "/livez", timeout=2.0)
        answers.append((round(time.monotonic() - t0, 3), status))
    producer.join(60)
    assert producer.error is None, producer.error
    assert answers and all(status == 200 for _, status in answers), answers
    wait_until(lambda: markers(r, s.redis_prefix) >= {e["event_id"] for e in events}, 90,
               "every event applied once Redis answers again")
    assert worker.proc.poll() is None, worker.log_tail()
    r.close()


def test_calls_from_the_loop_sees_a_synchronous_call_in_a_coroutine(redis_url):
    """The recorder itself: a sync call inside a coroutine is seen, one in a thread is not."""
    client = redis.Redis.from_url(redis_url)
    seen = calls_from_the_loop(client)

    async def both():
        await asyncio.to_thread(client.ping)
        client.ping()

    asyncio.run(both())
    assert len(seen) == 1 and "both" in seen[0]
    client.close()
