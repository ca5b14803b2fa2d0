"""Lost Redis state is detected (issue 11, point 6): the epoch marker of stream/epoch.py on the real embedded stack.

* Redis restarted empty under a running worker mid-replay (its own stack, Redis in memory: ``durable=False``):
  ``/readyz`` answers 503 while Redis is down; when Redis is back (empty) the worker stops with one line and exit
  status 2 before writing anything to it; a new worker refuses to start (its group has committed offsets); one
  with ``PROMO_ON_STATE_LOSS=reinit`` starts, says so at ERROR, counts it in ``promo_state_reinitialised_total``
  and applies every event after the committed offsets; no valid event in the DLQ, no budget spent beyond its
  amount.
* A fresh install writes the marker; a second worker on the same prefix runs in the same epoch.
* The marker deleted under a running worker (no reconnection): the maintenance timer stops it.
* :meth:`stream.epoch.EpochGuard.watch`: a new connection of a sync or asyncio client checks the marker before
  its first command.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis

from stream import stack as st
from stream.epoch import EXIT_STATE_LOST, Epoch, EpochGuard, StateLostError, check_at_start, committed_offsets, epoch_key
from stream.settings import Settings
from stream.sources import read_events
from tests.helpers import ROOT, free_port, metric, private_stack, wait_until
from tests.integration.test_crash_safety import PacedProducer

pytestmark = pytest.mark.integration

SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"  # 2,000 events, 165 carts
BUDGET = 35  # three coupons of 10
CATALOGUE = f"""
version: 1
margin_rate: 0.25
caps: {{max_offers_per_day: 5}}
offers:
  - offer_id: c10
    kind: coupon
    value: 10
    prior_uplift: 0.5
    eligibility: {{min_cart_value: 1}}
    budget: {BUDGET}
"""


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def wait_exit(worker, timeout: float) -> int:
    wait_until(lambda: worker.proc.poll() is not None, timeout, "the worker to exit")
    return worker.proc.returncode


def campaign(r: redis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(f"{prefix}:{{b:c10}}").items()}


def end_offsets(settings: Settings, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def go() -> int:
        c = AIOKafkaConsumer(**settings.kafka_client_kwargs())
        await c.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
            return sum((await c.end_offsets(tps)).values())
        finally:
            await c.stop()

    return asyncio.run(go())


@pytest.fixture
def memory_stack(tmp_path):
    """Its own embedded stack with Redis in memory (``--no-durable``): a restart comes back empty."""
    catalogue = tmp_path / "offers.yaml"
    catalogue.write_text(CATALOGUE)
    with private_stack(tmp_path, "lost", durable=False, redis_retry_s=0.1, catalogue_path=catalogue,
                       holdout_pct=0.0, decision_cooldown_s=0) as s:
        yield s


def test_redis_restarted_empty_mid_replay_stops_the_worker_and_a_restart_refuses(memory_stack, start_worker):
    s = memory_stack
    events = list(read_events(SAMPLE, "rees46"))
    r = redis.Redis.from_url(s.redis_url, socket_timeout=2, socket_connect_timeout=1)

    w1 = start_worker(s)
    w1.wait_ready()
    epoch = Epoch.from_bytes(r.get(epoch_key(s.redis_prefix)))
    assert epoch.reason == "fresh"
    producer = PacedProducer(s, events, 200.0)
    producer.start()
    wait_until(lambda: metric(w1.metrics(), "promo_events_total") >= 600, 60, "600 events applied before the loss")
    before = campaign(r, s.redis_prefix)
    assert 0 < before.get("spent", 0) <= BUDGET * 10_000, before

    # Redis dies and comes back empty while events keep arriving --------------------------------------------
    pid = int((s.state_dir.resolve() / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # our child (stack.up spawned it in this process)
    handed_at_kill = producer.handed
    wait_until(lambda: w1.ready_status() == 503, 30, "/readyz to answer 503 while Redis is down")
    wait_until(lambda: producer.handed >= handed_at_kill + 200, 30, "200 more events produced while Redis is down")
    assert w1.proc.poll() is None and w1.ready_status() == 503
    report = st.up(s)
    assert report["redis"]["state"] == "started" and report["redis"]["durable"] is False, report
    assert producer.is_alive(), "the replay must still be running when Redis comes back"

    assert wait_exit(w1, 30) == EXIT_STATE_LOST
    log1 = w1.log_path.read_text(errors="replace")
    lost = lines_with(log1, "Redis state lost")
    assert len(lost) == 1, log1[-3000:]
    assert "while running" in lost[0] and s.redis_url in lost[0] and epoch.id[:12] in lost[0]
    assert "PROMO_ON_STATE_LOSS=reinit" in lost[0] and "append-only file" in lost[0]
    assert r.dbsize() == 0, f"the worker wrote to the Redis that lost the state: {sorted(r.keys())[:5]}"

    # a new worker refuses: its group has committed offsets and the marker is gone ----------------------------
    w2 = start_worker(s)
    assert wait_exit(w2, 60) == EXIT_STATE_LOST
    log2 = w2.log_path.read_text(errors="replace")
    lost = lines_with(log2, "Redis state lost")
    assert len(lost) == 1 and lost[0].startswith("promo: error: Redis state lost: "), log2[-3000:]
    assert s.app_id in lost[0] and s.topic_events in lost[0] and "PROMO_ON_STATE_LOSS=reinit" in lost[0]
    assert "Traceback" not in log2
    assert r.dbsize() == 0

    # starting over deliberately -------------------------------------------------------------------------------
    committed = asyncio.run(committed_offsets(s))
    assert committed, "the first worker committed offsets before the loss"
    w3 = start_worker(s.model_copy(update={"on_state_loss": "reinit"}))
    w3.wait_ready()
    reinit = Epoch.from_bytes(r.get(epoch_key(s.redis_prefix)))
    assert reinit.reason == "reinit" and reinit.id != epoch.id
    log3 = w3.log_path.read_text(errors="replace")
    loud = lines_with(log3, "re-initialised")
    assert len(loud) == 1 and "[ERROR]" in loud[0] and reinit.id[:12] in loud[0], log3[-3000:]
    assert metric(w3.metrics(), "promo_state_reinitialised_total") == 1
    assert metric(w3.metrics(), "promo_state_epoch_created_timestamp_seconds") == reinit.created_ms / 1000

    producer.join(120)
    assert producer.error is None and producer.report["sent"] == len(events), (producer.error, producer.report)
    resumed = len(events) - sum(committed.values())
    wait_until(lambda: metric(w3.metrics(), "promo_events_total") >= resumed, 120,
               f"the re-initialised worker to apply the {resumed} events after the committed offsets")
    samples = w3.metrics()
    assert metric(samples, "promo_events_total") == resumed
    assert metric(samples, "promo_events_invalid_total") == 0
    assert end_offsets(s, s.topic_dlq) == 0, "a valid event was dead-lettered"

    # budgets: never beyond the amount in either epoch (the old epoch's spend is gone with its state) --------
    after = campaign(r, s.redis_prefix)
    assert after.get("spent", 0) <= BUDGET * 10_000, after
    r.close()


def test_fresh_install_writes_the_marker_and_a_second_worker_runs_in_the_same_epoch(
        engine_settings, start_worker, redis_client):
    s = engine_settings
    assert redis_client.get(epoch_key(s.redis_prefix)) is None
    w1 = start_worker(s)
    w1.wait_ready()
    epoch = Epoch.from_bytes(redis_client.get(epoch_key(s.redis_prefix)))
    assert epoch.reason == "fresh"
    assert len(lines_with(w1.log_path.read_text(), f"new Redis state epoch {epoch.id[:12]}")) == 1

    w2 = start_worker(s.model_copy(update={"web_port": free_port()}))
    w2.wait_ready()
    assert Epoch.from_bytes(redis_client.get(epoch_key(s.redis_prefix))) == epoch
    log2 = w2.log_path.read_text()
    assert len(lines_with(log2, f"Redis state epoch {epoch.id[:12]}")) == 1 and "new Redis state epoch" not in log2
    for w in (w1, w2):
        assert metric(w.metrics(), "promo_state_epoch_created_timestamp_seconds") == epoch.created_ms / 1000
        assert metric(w.metrics(), "promo_state_reinitialised_total") == 0


def test_marker_deleted_under_a_running_worker_stops_it_at_the_next_maintenance(
        engine_settings, start_worker, redis_client):
    s = engine_settings.model_copy(update={"maintenance_interval_s": 0.5})
    w = start_worker(s)
    w.wait_ready()
    assert redis_client.delete(epoch_key(s.redis_prefix)) == 1  # no reconnection: only the periodic check sees it
    assert wait_exit(w, 30) == EXIT_STATE_LOST
    lost = lines_with(w.log_path.read_text(errors="replace"), "Redis state lost")
    assert len(lost) == 1 and "no longer holds the epoch marker" in lost[0], w.log_tail()


def test_a_watched_client_checks_the_marker_on_every_new_connection(engine_settings):
    import redis.asyncio as aioredis

    s = engine_settings
    epoch = check_at_start(s, read_committed=lambda settings: {})
    guard = EpochGuard(s, epoch)
    sync = guard.watch(redis.Redis.from_url(s.redis_url))
    probe = f"{s.redis_prefix}:probe"
    assert sync.set(probe, 1)  # same epoch: the first connection passed the check

    other = Epoch.new("reinit")
    sync.set(epoch_key(s.redis_prefix), other.to_bytes())  # another epoch, as after a restart and a reinit
    sync.delete(probe)
    sync.connection_pool.disconnect()  # what a Redis restart does to every open connection
    with pytest.raises(StateLostError, match=f"holds epoch {other.id[:12]}"):
        sync.set(probe, 2)
    with pytest.raises(StateLostError):  # the failed connection was not kept: the next command checks again
        sync.set(probe, 3)

    plain = redis.Redis.from_url(s.redis_url)

    async def run_async():
        client = guard.watch(aioredis.Redis.from_url(s.redis_url))
        try:
            with pytest.raises(StateLostError):
                await client.set(probe, 4)
            # the marker back: the same client works again on a new connection
            plain.set(epoch_key(s.redis_prefix), epoch.to_bytes())
            assert await client.set(probe, 5)
            await guard.verify(client)
        finally:
            await client.aclose()
            await guard.aclose()

    asyncio.run(run_async())
    assert plain.get(probe) == b"5", "nothing was written while the marker was another epoch's"
    plain.close()
    sync.close()
