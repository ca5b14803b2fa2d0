"""Redis killed mid-run and restarted from its AOF (issue 6, acceptance 2): no accepted event's effect is lost.

Its own embedded stack (``stream.stack.up`` with ``durable=True``: redis-server with ``appendonly yes`` and
``appendfsync always``, on free ports under ``tmp_path``; not the session stack, whose Redis must not die).
While a replay is in progress at a steady pace, redis-server gets ``SIGKILL`` (pid from
``<state_dir>/redis.pid``); the worker keeps retrying and ``/readyz`` answers 503; ``stream.stack.up`` is called
again and restarts only Redis, from the same AOF directory; ``/readyz`` returns to 200. At the end every
produced event is applied exactly once: profile counts equal the events, one de-duplication marker per event,
and every marker that existed just before the kill is still there after the restart (the AOF kept it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter

import pytest
import redis

from stream import stack as st
from stream.sources import read_events
from tests.helpers import DATA, metric, private_stack, wait_until
from tests.integration.test_crash_safety import PacedProducer
from tests.redis_state import dump_state, profile_counts

pytestmark = pytest.mark.integration

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"
N_EVENTS = 6000
PACE = 200.0  # events/s: 30 s of replay, the Redis outage in the middle however the worker lags


def log(msg: str) -> None:
    print(f"[aof {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@pytest.fixture
def durable_stack(tmp_path):
    with private_stack(tmp_path, "aof", durable=True, redis_retry_s=0.1) as s:
        yield s


def marker_keys(r: redis.Redis, prefix: str) -> set[bytes]:
    return set(r.scan_iter(match=f"{prefix}:{{u:*}}:e:*", count=5000))


def test_redis_sigkill_and_aof_restart_lose_no_accepted_event(durable_stack, start_worker):
    s = durable_stack
    pid_file = s.state_dir.resolve() / "redis.pid"
    events = list(read_events(REES46, "rees46", limit=N_EVENTS))
    assert len({e["event_id"] for e in events}) == N_EVENTS
    r = redis.Redis.from_url(s.redis_url, socket_timeout=2, socket_connect_timeout=1)
    assert r.config_get("appendonly") == {"appendonly": "yes"} and r.config_get("appendfsync")["appendfsync"] == "always"

    worker = start_worker(s)
    worker.wait_ready()
    statuses: list[int] = []
    stop = threading.Event()

    def poll_readyz():
        while not stop.is_set():
            statuses.append(worker.ready_status())
            stop.wait(0.05)  # probe period, not synchronisation

    poller = threading.Thread(target=poll_readyz, daemon=True)
    poller.start()
    producer = PacedProducer(s, events, PACE)
    producer.start()
    try:
        wait_until(lambda: metric(worker.metrics(), "promo_events_total") >= N_EVENTS // 4, 60,
                   "a quarter of the events applied before killing Redis")
        before = marker_keys(r, s.redis_prefix)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)  # our child (stack.up spawned it in this process): reap it
        except ChildProcessError:
            pass
        handed_at_kill = producer.handed
        log(f"redis-server {pid} killed with {len(before)} markers, {handed_at_kill} events produced")
        assert handed_at_kill < N_EVENTS, "the replay had finished before Redis was killed"

        wait_until(lambda: worker.ready_status() == 503, 30, "/readyz to answer 503 while Redis is down")
        errors_before = metric(worker.metrics(), "promo_redis_errors_total")
        wait_until(lambda: metric(worker.metrics(), "promo_redis_errors_total") > errors_before, 30,
                   "the worker to retry against the dead Redis")
        # keep Redis down while the replay goes on: events keep arriving that the worker cannot apply yet
        wait_until(lambda: producer.handed >= handed_at_kill + 1000 or producer.finished(), 30,
                   "1,000 more events produced while Redis is down")
        assert worker.ready_status() == 503
        assert worker.proc.poll() is None, f"the worker exited while Redis was down:\n{worker.log_tail()}"
        log(f"{producer.handed - handed_at_kill} events produced while Redis was down")

        report = st.up(s)  # restarts only what is down: Redis, from the same AOF directory
        assert report["redis"]["state"] == "started" and report["kafka"]["state"] == "already running", report
        after = marker_keys(r, s.redis_prefix)
        lost = before - after
        assert not lost, f"{len(lost)} markers written before the kill are gone after the AOF restart, e.g. " \
            f"{sorted(lost)[:3]}"
        wait_until(lambda: worker.ready_status() == 200, 30, "/readyz back to 200 after Redis restarted")
        log(f"Redis restarted with {len(after)} markers; worker ready again")

        producer.join(120)
        assert producer.error is None and producer.report["sent"] == N_EVENTS, (producer.error, producer.report)
        wait_until(lambda: len(marker_keys(r, s.redis_prefix)) >= N_EVENTS, 120, "every event to be applied")
    finally:
        stop.set()
        poller.join(5)

    # the worker went 200 -> 503 -> 200 -------------------------------------------------------------------------
    transitions = [x for i, x in enumerate(statuses) if i == 0 or x != statuses[i - 1]]
    assert transitions[0] == 200 and transitions[-1] == 200 and 503 in transitions, transitions

    # every produced event applied exactly once ---------------------------------------------------------------
    state = dump_state(r, s.redis_prefix)
    want: dict[str, Counter] = {}
    for e in events:
        want.setdefault(e["user_id"], Counter())[e["type"]] += 1
    assert profile_counts(state) == want
    markers = {k for k in state if ":e:" in k}
    assert len(markers) == N_EVENTS
    assert {k.rsplit(":e:", 1)[1] for k in markers} == {e["event_id"] for e in events}
    r.close()
