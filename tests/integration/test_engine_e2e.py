"""End to end on the real embedded broker and Redis: events in, de-dup, DLQ, decisions, metrics, readiness.

Acceptance of the end-to-end engine issue: 2,000 valid events + 300 duplicates + 200 invalid ones ->
every valid event counted once in Redis, exactly 200 DLQ records with reasons, one decision per user's first
``cart`` event, each valid against its schema; ``/metrics`` agrees; ``/readyz`` follows Redis.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import redis

from stream.dlq import DLQ_REASONS, raw_from_record
from stream.sources import read_events
from tests.helpers import ROOT, consume_all, event_bytes, free_port, metric, produce_raw, wait_until

pytestmark = pytest.mark.integration

SCHEMAS = ROOT / "stream" / "schemas"
SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"
BIG = ROOT.parent / "shared" / "data" / "rees46_multicategory" / "2019-Oct_first17k.csv"


def real_events(n: int) -> list[dict]:
    """``n`` valid events from the bundled REES46 sample, topped up from the shared file."""
    out = list(read_events(SAMPLE, "rees46"))[:n]
    if len(out) < n:
        ids = {e["event_id"] for e in out}
        out += [e for e in read_events(BIG, "rees46", limit=4 * n) if e["event_id"] not in ids][: n - len(out)]
    assert len(out) == n
    return out


def invalid_messages(n: int, valid: dict) -> list[tuple[bytes, str]]:
    """``n`` invalid values, cycling through the kinds the issue lists, with the reason each must get."""
    kinds = [
        (lambda i: b'{"event_id": "x%d", "type": ' % i, "bad_json"),
        (lambda i: event_bytes({k: v for k, v in valid.items() if k != "user_id"} | {"event_id": f"m{i}"}),
         "missing_field"),
        (lambda i: event_bytes(valid | {"event_id": f"w{i}", "quantity": "two"}), "wrong_type"),
        (lambda i: event_bytes(valid | {"event_id": f"n{i}", "price": -1.5}), "bad_value"),
        (lambda i: event_bytes(valid | {"event_id": f"u{i}", "type": "teleport"}), "unknown_type"),
        (lambda i: event_bytes(valid | {"event_id": f"o{i}", "pad": "x" * 20_000}), "oversized"),
    ]
    return [(kinds[i % len(kinds)][0](i), kinds[i % len(kinds)][1]) for i in range(n)]


def redis_profiles(r: redis.Redis, prefix: str) -> dict[str, Counter]:
    """user id -> counts by type, read back from the profile hashes in Redis."""
    out = {}
    for key in r.scan_iter(match=f"{prefix}:{{u:*}}:p", count=1000):
        uid = key.decode()[len(prefix) + 4 : -3]
        counts = json.loads(r.hget(key, "v"))["counts"]  # the profile: one JSON document
        out[uid] = Counter({k: v for k, v in counts.items() if v})
    return out


def expected_profiles(events: list[dict]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for e in events:
        out.setdefault(e["user_id"], Counter())[e["type"]] += 1
    return out


def test_events_dedup_dlq_decisions_and_metrics(engine_settings, start_worker, redis_client):
    s = engine_settings.model_copy(update={"decision_cooldown_s": 10**9})  # exactly one decision per cart user
    valid = real_events(2000)
    rng = random.Random(2)
    bad = invalid_messages(200, valid[0])
    # valid events in order; each duplicate after its original; invalid ones anywhere
    seq = [(i, e["user_id"].encode(), event_bytes(e)) for i, e in enumerate(valid)]
    for i in rng.sample(range(len(valid)), 300):
        seq.append((i + rng.uniform(0.5, 200), valid[i]["user_id"].encode(), event_bytes(valid[i])))
    seq += [(rng.uniform(0, len(valid)), b"bad-%d" % i, raw) for i, (raw, _) in enumerate(bad)]
    seq.sort(key=lambda t: t[0])

    worker = start_worker(s)
    worker.wait_ready()
    produce_raw(s, s.topic_events, [(k, v) for _, k, v in seq])

    want = expected_profiles(valid)
    wait_until(lambda: redis_profiles(redis_client, s.redis_prefix) == want, 120, "Redis profiles == produced events")
    samples = wait_until(
        lambda: (ms := worker.metrics()) and metric(ms, "promo_events_duplicate_total") == 300
        and metric(ms, "promo_events_invalid_total") == 200 and ms,
        60, "duplicate and invalid counters to settle",
    )

    # every valid event counted once, by type -------------------------------------------------------
    by_type = Counter(e["type"] for e in valid)
    for t, n in by_type.items():
        assert metric(samples, "promo_events_total", type=t) == n, t
    assert metric(samples, "promo_events_total") == 2000
    markers = sum(1 for _ in redis_client.scan_iter(match=f"{s.redis_prefix}:{{u:*}}:e:*", count=1000))
    assert markers == 2000

    # exactly 200 DLQ records, each with the right reason and the original bytes ------------------------
    dlq = consume_all(s, s.topic_dlq, lambda ms: len(ms) >= 200)
    assert len(dlq) == 200
    dlq_schema = json.loads((SCHEMAS / "dlq.v1.json").read_text())
    expected_reason = {raw: reason for raw, reason in bad}
    for msg in dlq:
        rec = json.loads(msg.value)
        jsonschema.validate(rec, dlq_schema)
        assert rec["reason"] in DLQ_REASONS
        original = raw_from_record(rec) if not rec.get("raw_truncated") else None
        if original is not None:
            assert rec["reason"] == expected_reason[original]
        assert rec["topic"] == s.topic_events and rec["offset"] >= 0 and rec["error"]
    want_reasons = Counter(reason for _, reason in bad)
    assert Counter(json.loads(m.value)["reason"] for m in dlq) == want_reasons
    for reason, n in want_reasons.items():
        assert metric(samples, "promo_events_invalid_total", reason=reason) == n

    # one decision per user's first cart event, each valid against the schema -------------------------
    first_cart: dict[str, str] = {}
    for e in valid:
        if e["type"] == "cart":
            first_cart.setdefault(e["user_id"], e["event_id"])
    assert first_cart, "the sample must contain cart events"
    decisions = consume_all(s, s.topic_decisions, lambda ms: len(ms) >= len(first_cart))
    decision_schema = json.loads((SCHEMAS / "decision.v1.json").read_text())
    docs = [json.loads(m.value) for m in decisions]
    for d, m in zip(docs, decisions):
        jsonschema.validate(d, decision_schema)
        assert m.key.decode() == d["user_id"]
        assert 0 < d["propensity"] <= 1 and d["reasons"] and d["latency_ms"] > 0
    assert {d["user_id"]: d["trigger_event_id"] for d in docs} == first_cart
    assert len({d["decision_id"] for d in docs}) == len(docs) == len(first_cart)

    samples = worker.metrics()
    assert metric(samples, "promo_decisions_total") == len(first_cart)
    assert metric(samples, "promo_decision_latency_seconds_count") == len(first_cart)
    assert metric(samples, "promo_decision_latency_seconds_bucket", le="1.0") == len(first_cart)
    assert metric(samples, "promo_batch_size_count") > 0
    assert worker.ready_status() == 200


def _redis_server(port: int, workdir: Path) -> subprocess.Popen:
    """A redis-server as ``promo stack up`` starts one (append-only file in ``workdir``): stopped and started
    again, it comes back with its data, the epoch marker included (one restarted empty stops the worker:
    tests/integration/test_redis_state_lost.py)."""
    from stream.stack import APPENDFSYNC, redis_args, redis_binary

    return subprocess.Popen([str(redis_binary()), *redis_args(port, workdir, APPENDFSYNC)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_readyz_follows_redis_and_nothing_is_lost_while_it_is_down(engine_settings, start_worker, tmp_path):
    port = free_port()
    s = engine_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0", "redis_retry_s": 0.1})
    r = redis.Redis(port=port)
    server = _redis_server(port, tmp_path)
    try:
        wait_until(lambda: _ping(r), 10, "private redis-server to answer")
        worker = start_worker(s)
        worker.wait_ready()
        assert worker.ready_status() == 200

        server.terminate()
        server.wait(10)
        wait_until(lambda: worker.ready_status() == 503, 30, "/readyz to turn 503 with Redis stopped")
        # an event accepted while Redis is down is applied once Redis is back
        ev = real_events(1)[0]
        produce_raw(s, s.topic_events, [(ev["user_id"].encode(), event_bytes(ev))])
        wait_until(lambda: metric(worker.metrics(), "promo_redis_errors_total") > 0, 30, "a failed Redis attempt")
        assert worker.ready_status() == 503

        server = _redis_server(port, tmp_path)
        wait_until(lambda: worker.ready_status() == 200, 30, "/readyz back to 200 after Redis restarted")
        wait_until(lambda: metric(worker.metrics(), "promo_events_total") == 1, 30, "the event to be applied")
        assert r.exists(f"{s.redis_prefix}:{{u:{ev['user_id']}}}:e:{ev['event_id']}")
    finally:
        server.terminate()
        server.wait(10)
        r.close()


def _ping(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(engine_settings, start_worker, redis_client):
    import threading
    import time

    events = [e for e in read_events(BIG, "rees46", limit=6000)]
    s = engine_settings
    records = [(e["user_id"].encode(), event_bytes(e)) for e in events]
    produced, killed = threading.Event(), threading.Event()
    half = len(records) // 2

    def produce_slowly():  # ~2,000 events/s; the second half only once the first worker is killed, so the kill
        # lands mid-stream however slowly a loaded machine starts and runs the worker
        for i in range(0, len(records), 200):
            if i == half:
                killed.wait(300)
            produce_raw(s, s.topic_events, records[i : i + 200])
            time.sleep(0.1)  # pacing of the load generator, not synchronisation
        produced.set()

    w1 = start_worker(s)
    w1.wait_ready()
    t = threading.Thread(target=produce_slowly, daemon=True)
    t.start()
    wait_until(lambda: metric(w1.metrics(), "promo_events_total") >= 1500, 60, "first worker to apply 1,500 events")
    w1.kill()
    assert not produced.is_set(), "the producer finished before the kill: the kill was not mid-stream"
    killed.set()

    w2 = start_worker(s)
    w2.wait_ready()
    t.join(120)
    assert produced.is_set()
    want = expected_profiles(events)
    wait_until(lambda: redis_profiles(redis_client, s.redis_prefix) == want, 120,
               "every produced event applied exactly once after the restart")
    markers = sum(1 for _ in redis_client.scan_iter(match=f"{s.redis_prefix}:{{u:*}}:e:*", count=1000))
    assert markers == len({e["event_id"] for e in events})
