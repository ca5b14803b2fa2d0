"""Ordinary production faults on the real embedded stack (issue 11): nothing accepted is lost, health tells the truth.

Each test injects one fault into a running worker while it applies a replay of real REES46 events, and asserts:

* every valid event is applied exactly once: one de-duplication marker per event id, the profiles' event
  counts equal the replay's (Redis), and the worker counted each event once in ``promo_events_total``;
* no valid event lands in the dead-letter topic;
* ``/readyz`` is not 200 while the fault lasts and says which dependency failed, and 200 again after it;
* the retries are counted in ``promo_transient_errors_total{component,kind}``.

The faults here: Redis refusing writes (``maxmemory`` reached, noeviction) for 10 s mid-replay; the broker's
acknowledgement of a decision failing (``PROMO_FAILPOINT=decision_ack``); the broker killed and restarted empty.
Forget, lost Redis state and the event-time clock have their own test modules.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections import Counter

import pytest
import redis

from stream import stack as st
from stream.epoch import committed_offsets
from stream.settings import Settings
from stream.sources import read_events
from tests.helpers import DATA, consume_all, http_get, metric, private_stack, wait_until
from tests.integration.test_crash_safety import PacedProducer
from tests.redis_state import dump_state, profile_counts

pytestmark = pytest.mark.integration

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"


def log(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ReadyzRecorder(threading.Thread):
    """Polls ``/readyz`` every 50 ms (a probe period, not synchronisation) and keeps (status, body) in order."""

    def __init__(self, worker) -> None:
        super().__init__(daemon=True)
        self.worker, self.seen = worker, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.seen.append(http_get(self.worker.base_url + "/readyz", timeout=2.0))
            self._halt.wait(0.05)

    def stop(self) -> list[tuple[int, str]]:
        self._halt.set()
        self.join(5)
        return self.seen

    def statuses(self) -> list[int]:
        """The statuses with repeats collapsed: [200, 503, 200] for one outage."""
        s = [code for code, _ in self.seen]
        return [x for i, x in enumerate(s) if i == 0 or x != s[i - 1]]


def markers(r: redis.Redis, prefix: str) -> set[str]:
    return {k.decode().rsplit(":e:", 1)[1] for k in r.scan_iter(match=f"{prefix}:{{u:*}}:e:*", count=5000)}


def assert_applied_exactly_once(r: redis.Redis, settings: Settings, events: list[dict]) -> None:
    state = dump_state(r, settings.redis_prefix)
    want: dict[str, Counter] = {}
    for e in events:
        want.setdefault(e["user_id"], Counter())[e["type"]] += 1
    got = profile_counts(state)
    wrong = {u for u in set(want) | set(got) if want.get(u) != got.get(u)}
    assert not wrong, f"{len(wrong)} users' event counts differ from the replay, e.g. " \
        f"{[(u, want.get(u), got.get(u)) for u in sorted(wrong)[:3]]}"
    seen = {k.rsplit(":e:", 1)[1] for k in state if ":e:" in k}
    assert seen == {e["event_id"] for e in events}


def dlq_records(settings: Settings) -> list:
    return consume_all(settings, settings.topic_dlq, lambda msgs: False, timeout=3.0)


def test_redis_refusing_writes_for_ten_seconds_loses_and_dead_letters_nothing(engine_settings, start_worker,
                                                                             redis_client):
    """maxmemory reached mid-replay: every write answers OOM for 10 s; the worker retries, reports not ready."""
    n = 6000
    s = engine_settings.model_copy(update={"redis_retry_s": 0.1, "retry_max_s": 1.0})
    events = list(read_events(REES46, "rees46", limit=n))
    worker = start_worker(s)
    worker.wait_ready()
    ready = ReadyzRecorder(worker)
    ready.start()
    producer = PacedProducer(s, events, 150.0)  # 40 s: still running after the 10 s fault, however the worker lags
    producer.start()
    r = redis_client
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        wait_until(lambda: metric(worker.metrics(), "promo_events_total") >= n // 4, 60,
                   "a quarter of the events applied before Redis fills up")
        used = r.info("memory")["used_memory"]
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", used + 512 * 1024)
        full_at = time.monotonic()
        log(f"Redis full at {used + 512 * 1024} bytes with {producer.handed} events produced")
        wait_until(lambda: worker.ready_status() == 503, 10, "/readyz to answer 503 while Redis refuses writes")
        status, body = http_get(worker.base_url + "/readyz")
        assert status == 503 and '"redis": false' in body.replace('":false', '": false') and "maxmemory" in body, body
        wait_until(lambda: time.monotonic() - full_at >= 10, 15, "10 s of a full Redis")
        assert worker.proc.poll() is None, f"the worker exited while Redis was full:\n{worker.log_tail()}"
        assert producer.handed < n, "the replay ended while Redis was full: the fault was not mid-replay"
    finally:
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", policy)
    wait_until(lambda: worker.ready_status() == 200, 30, "/readyz back to 200 once Redis accepts writes")
    producer.join(120)
    assert producer.error is None and producer.report["sent"] == n, (producer.error, producer.report)
    wait_until(lambda: metric(worker.metrics(), "promo_events_total") >= n, 120, "every event to be applied")
    ready.stop()

    samples = worker.metrics()
    assert metric(samples, "promo_events_total") == n
    assert metric(samples, "promo_transient_errors_total", component="redis", kind="oom") > 0
    assert metric(samples, "promo_events_invalid_total") == 0
    assert_applied_exactly_once(r, s, events)
    assert dlq_records(s) == []
    assert ready.statuses()[0] == 200 and 503 in ready.statuses() and ready.statuses()[-1] == 200, ready.statuses()


def test_a_failing_decision_ack_is_sent_again_and_nothing_is_skipped(engine_settings, start_worker, redis_client):
    """The broker's ack of a decision fails 8 times in a row (failpoint): the batch is held, the record sent again."""
    n = 3000
    s = engine_settings.model_copy(update={"redis_retry_s": 0.2, "retry_max_s": 1.0})
    events = list(read_events(REES46, "rees46", limit=n))
    worker = start_worker(s, {"PROMO_FAILPOINT": "decision_ack:3*8"})
    worker.wait_ready()
    ready = ReadyzRecorder(worker)
    ready.start()
    producer = PacedProducer(s, events, None)
    producer.run()
    assert producer.error is None and producer.report["sent"] == n, (producer.error, producer.report)
    wait_until(lambda: metric(worker.metrics(), "promo_events_total") >= n, 120, "every event to be applied")
    ready.stop()

    samples = worker.metrics()
    assert metric(samples, "promo_events_total") == n
    # 8 acks failed; the failed records of one batch are retried together, so 1 to 8 retries (how many depends on
    # how the decisions fell into batches)
    assert 1 <= metric(samples, "promo_transient_errors_total", component="kafka") <= 8
    assert_applied_exactly_once(redis_client, s, events)
    assert dlq_records(s) == []
    stored = {k for k in redis_client.scan_iter(match=f"{s.redis_prefix}:{{u:*}}:d:*")}
    assert stored, "the replay made no decision: the failpoint was never reached"
    sent = consume_all(s, s.topic_decisions, lambda msgs: len(msgs) >= len(stored), timeout=30)
    import json

    assert {json.loads(m.value)["trigger_event_id"] for m in sent} == {k.decode().rsplit(":d:", 1)[1] for k in stored}
    assert 503 in ready.statuses() and ready.statuses()[-1] == 200, ready.statuses()
    assert any('"kafka": false' in body.replace('":false', '": false') for code, body in ready.seen if code == 503)


def test_an_unexpected_error_stops_the_worker_unacknowledged_and_the_next_worker_applies_the_batch(
        engine_settings, start_worker, redis_client):
    """A bug after the users' commits (failpoint ``bug``): the worker stops at once with one line and exit
    status 3, without acknowledging the batch (Faust would otherwise restart the agent with the batch's offsets
    committed and its decisions never sent); the next worker gets the batch again, finds it applied and sends
    its stored decisions. Nothing is dead-lettered."""
    import json

    n = 2000
    # one big batch: the whole replay is committed by the first worker, and none of its decisions is sent
    s = engine_settings.model_copy(update={"batch_max": n, "batch_within_s": 2.0})
    events = list(read_events(REES46, "rees46", limit=n))
    p = PacedProducer(s, events, None)
    p.run()
    assert p.error is None and p.report["sent"] == n, (p.error, p.report)
    first = start_worker(s, {"PROMO_FAILPOINT": "bug:1"})
    wait_until(lambda: first.proc.poll() is not None, 90, "the worker to stop at the failpoint")
    assert first.proc.returncode == 3, first.log_tail()
    last = first.log_tail(1)
    assert last.startswith("promo: error: worker stopped: RuntimeError: failpoint bug") and "\n" not in last, last
    assert markers(redis_client, s.redis_prefix), "the failpoint was reached before anything was committed"
    unsent = [k for k in redis_client.scan_iter(match=f"{s.redis_prefix}:{{u:*}}:d:*")
              if redis_client.hget(k, "sent") == b"0"]
    assert unsent, "no decision was committed and left unsent by the stopped worker: nothing to re-send"

    second = start_worker(s)
    wait_until(lambda: markers(redis_client, s.redis_prefix) >= {e["event_id"] for e in events}, 90,
               "the next worker to apply every event")
    assert_applied_exactly_once(redis_client, s, events)
    assert dlq_records(s) == []
    stored = {k.decode().rsplit(":d:", 1)[1] for k in redis_client.scan_iter(match=f"{s.redis_prefix}:{{u:*}}:d:*")}
    sent = consume_all(s, s.topic_decisions, lambda msgs: {json.loads(m.value)["trigger_event_id"] for m in msgs}
                       >= stored, timeout=60)
    assert {json.loads(m.value)["trigger_event_id"] for m in sent} == stored
    # counted once the batch is delivered and marked, a moment after its messages are on the topic
    wait_until(lambda: metric(second.metrics(), "promo_decisions_resent_total") >= len(unsent), 30,
               f"promo_decisions_resent_total to count the {len(unsent)} re-sent decisions")


@pytest.fixture
def own_stack(tmp_path):
    """A stack of this test's own (the session broker must not die)."""
    with private_stack(tmp_path, "brk", redis_retry_s=0.1, retry_max_s=1.0, session_timeout_s=3.0,
                       rebalance_timeout_s=3.0) as s:
        yield s


def test_the_log_guard_finds_a_partition_the_topic_no_longer_has_gone_without_waiting(engine_settings):
    """A memory-only broker restarted and a client's metadata request re-created the events topic with the
    broker's default partition count (Tansu: 4) before ``promo stack up`` could create it with the configured
    one: the worker's marks name partitions that do not exist. The guard's probe says so from the metadata;
    before, asking their offsets waited out the request timeout (40 s) with the guard's lock held, so no batch
    could run (the intermittent stall of the broker-restart test)."""
    from aiokafka import AIOKafkaProducer

    from stream.logguard import fetch_probes

    s = engine_settings
    assert s.partitions > 4

    async def probe():
        producer = AIOKafkaProducer(**s.kafka_client_kwargs())
        await producer.start()
        try:
            await producer.send_and_wait(s.topic_events, b"v0", key=b"k0", partition=0)
        finally:
            await producer.stop()
        return await fetch_probes(s.kafka_client_kwargs(), {(s.topic_events, 0): 0,
                                                            (s.topic_events, s.partitions + 3): 5})

    probes = asyncio.run(probe())
    assert probes[(s.topic_events, 0)].message == (b"k0", b"v0") and not probes[(s.topic_events, 0)].gone
    assert probes[(s.topic_events, s.partitions + 3)].gone


@pytest.mark.parametrize("n_after", [2000, 300])
def test_broker_killed_and_restarted_empty_skips_no_new_event(own_stack, start_worker, n_after):
    """The embedded broker is memory-only: after a kill -9 and a restart its logs are empty and start at offset 0
    again. Events produced after the restart must all be applied (none skipped because of offsets that belong to
    the old log), those before it stay applied once, and /readyz is 503 while the broker is down. With 300 events
    after the restart every partition's new log ends before the consumer's old position: no batch comes to show
    the replaced log, and the maintenance timer's check of idle partitions must find it."""
    s = own_stack.model_copy(update={"maintenance_interval_s": 2.0})
    events = list(read_events(REES46, "rees46", limit=2000 + n_after))
    before, after = events[:2000], events[2000:]
    r = redis.Redis.from_url(s.redis_url)
    worker = start_worker(s)
    worker.wait_ready()
    ready = ReadyzRecorder(worker)
    ready.start()
    p = PacedProducer(s, before, None)
    p.run()
    assert p.error is None and p.report["sent"] == len(before), (p.error, p.report)
    wait_until(lambda: metric(worker.metrics(), "promo_events_total") >= len(before), 60, "the first half applied")

    pid = int((s.state_dir.resolve() / "kafka.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    log("broker killed")
    wait_until(lambda: worker.ready_status() == 503, 15, "/readyz to answer 503 while the broker is down")
    status, body = http_get(worker.base_url + "/readyz")
    assert status == 503 and '"kafka": false' in body.replace('":false', '": false'), body
    report = st.up(s)  # a new, empty broker on the same port, topics created again
    assert report["kafka"]["state"] == "started", report
    log("broker restarted empty")

    p = PacedProducer(s, after, None)
    p.run()
    assert p.error is None and p.report["sent"] == len(after), (p.error, p.report)
    workers = [worker]

    def all_applied() -> bool:
        if workers[-1].proc.poll() is not None:  # stopped by its error policy: a fresh worker takes over
            log(f"worker exited {workers[-1].proc.returncode}: {workers[-1].log_tail(3)}")
            workers.append(start_worker(s))
            workers[-1].wait_ready()
        return markers(r, s.redis_prefix) >= {e["event_id"] for e in events}

    try:
        wait_until(all_applied, 120, "every event produced after the restart to be applied")
    except AssertionError as e:  # say where the group stands on the new log
        committed = asyncio.run(committed_offsets(s))
        msgs = consume_all(s, s.topic_events, lambda m: len(m) >= len(after), timeout=20)
        ends = Counter(m.partition for m in msgs)
        raise AssertionError(f"{e}; committed {sorted(committed.items())}; log ends {sorted(ends.items())}") from e
    wait_until(lambda: workers[-1].ready_status() == 200, 30, "/readyz back to 200 with the broker back")
    ready.stop()
    for w in workers[:-1]:  # a worker that stopped did so with one line and a non-zero exit
        assert w.proc.returncode not in (0, None), w.log_tail()
        assert "promo: error: worker stopped:" in w.log_tail(5)
    assert_applied_exactly_once(r, s, events)
    assert dlq_records(s) == []
    assert 503 in ready.statuses(), ready.statuses()
    r.close()
