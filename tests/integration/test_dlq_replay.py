"""``promo dlq replay`` through the real CLI on the embedded stack: events dead-lettered by a too-strict
PROMO_MAX_PRICE are applied exactly once after the fix, however often they are replayed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from stream.epoch import committed_offsets
from tests.helpers import ROOT, consume_all, event_bytes, metric, produce_raw, wait_until

pytestmark = pytest.mark.integration

MAX_PRICE = 100.0
N_OK, N_OVER = 12, 6  # events within the strict limit; distinct events over it (one more is sent twice)
DEADLINE_S = 180  # a shared 2-core machine: generous, never a sleep


def promo(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], env={**os.environ, **settings.to_env()},
                          cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def report_of(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def end_offsets(settings, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def go() -> dict[int, int]:
        c = AIOKafkaConsumer(group_id=None, **settings.kafka_client_kwargs())
        await c.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
            return {tp.partition: off for tp, off in (await c.end_offsets(tps)).items()}
        finally:
            await c.stop()

    return asyncio.run(go())


def handled(w) -> tuple[float, float, float]:
    """(applied, duplicates, dead-lettered) as one worker counted them."""
    m = w.metrics()
    return (metric(m, "promo_events_total"), metric(m, "promo_events_duplicate_total"),
            metric(m, "promo_events_invalid_total"))


def make_events() -> tuple[list, list, list]:
    now = int(time.time() * 1000)
    ev = [{"event_id": f"ok{i}", "type": "cart", "user_id": f"u{i % 4}", "item_id": f"i{i}", "ts": now,
           "price": 10.0} for i in range(N_OK)]
    over = [{"event_id": f"big{i}", "type": "cart", "user_id": f"u{i % 3}", "item_id": f"b{i}", "ts": now,
             "price": 500.0} for i in range(N_OVER)]
    bad = [(b"u-bad", b"{oops"), (b"u-bad", None)]  # bad_json, one of them a tombstone: not replayed
    return ev, over, bad


def test_replay_applies_dead_lettered_events_exactly_once(engine_settings, start_worker):
    s = engine_settings
    ok, over, bad = make_events()
    records = [(e["user_id"].encode(), event_bytes(e)) for e in ok + over + over[:1]] + bad
    w1 = start_worker(s.model_copy(update={"max_price": MAX_PRICE}))
    w1.wait_ready()
    produce_raw(s, s.topic_events, records)
    wait_until(lambda: handled(w1) == (N_OK, 0, N_OVER + 1 + len(bad)), DEADLINE_S, "every event handled")
    assert metric(w1.metrics(), "promo_events_invalid_total", reason="bad_value") == N_OVER + 1
    # the next worker must start after everything, or it would apply the over-limit events by itself
    wait_until(lambda: sum(asyncio.run(committed_offsets(s)).values()) == len(records), DEADLINE_S,
               "the strict worker's offsets committed")
    w1.stop()

    w2 = start_worker(s)  # the limit fixed: PROMO_MAX_PRICE back to its default
    w2.wait_ready()
    before = end_offsets(s, s.topic_events)
    dry = report_of(promo(s, "dlq", "replay", "--reason", "bad_value", "--reason", "bad_json", "--dry-run", "--json"))
    assert end_offsets(s, s.topic_events) == before, "--dry-run sent something"
    assert (dry["dry_run"], dry["read"], dry["matched"], dry["selected"], dry["sent"]) == (True, 9, 9, 7, 0)
    assert dry["skipped"] == {"not_a_dlq_record": 0, "tombstone": 1, "truncated": 0, "duplicate": 1}

    first = report_of(promo(s, "dlq", "replay", "--reason", "bad_value", "--json"))
    assert {k: first[k] for k in ("read", "matched", "unmatched", "selected", "sent", "failed", "dry_run")} == {
        "read": N_OVER + 1 + len(bad), "matched": N_OVER + 1, "unmatched": len(bad), "selected": N_OVER,
        "sent": N_OVER, "failed": 0, "dry_run": False}
    assert first["skipped"] == {"not_a_dlq_record": 0, "tombstone": 0, "truncated": 0, "duplicate": 1}
    assert first["by_reason"] == {"bad_value": N_OVER + 1}
    assert (first["topic"], first["target"]) == (s.topic_dlq, s.topic_events)
    wait_until(lambda: sum(handled(w2)) == N_OVER, DEADLINE_S, "the replayed events handled")
    assert handled(w2) == (N_OVER, 0, 0), "each dead-lettered event applied exactly once"

    second = report_of(promo(s, "dlq", "replay", "--reason", "bad_value", "--json"))
    assert second["sent"] == N_OVER and second["read"] == first["read"], "the DLQ did not grow"
    wait_until(lambda: sum(handled(w2)) == 2 * N_OVER, DEADLINE_S, "the second replay handled")
    assert handled(w2) == (N_OVER, N_OVER, 0), "a second replay is only duplicates"

    # every copy of an event went back with its original key, so to its original partition
    total = len(records) + 2 * N_OVER
    msgs = consume_all(s, s.topic_events, lambda m: len(m) >= total, timeout=DEADLINE_S)
    copies = Counter((m.key, m.partition, json.loads(m.value)["event_id"]) for m in msgs if m.value and
                     m.value.startswith(b'{"event_id":"big'))
    assert sorted(copies.values()) == [3] * (N_OVER - 1) + [4], copies
    assert all(key == f"u{int(eid[3:]) % 3}".encode() for key, _p, eid in copies)
    assert len({(key, p) for key, p, _e in copies}) == len({key for key, _p, _e in copies})

    later = report_of(promo(s, "dlq", "replay", "--since", "2099-01-01T00:00:00Z", "--dry-run", "--json"))
    assert (later["read"], later["selected"]) == (0, 0)
    wrong = promo(s, "dlq", "replay", "--reason", "bad_price")
    assert wrong.returncode == 2 and wrong.stdout == "" and wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith("promo: error: --reason 'bad_price': expected one of ")
