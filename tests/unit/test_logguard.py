"""The log guard's decisions (pure logic: the broker is a dict here; the real broker restart is in
``tests/integration/test_faults.py``)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stream.faults import WorkerStop
from stream.logguard import LogGuard, Probe, watch_broker_connections


def guard_over(log: dict) -> tuple[LogGuard, list]:
    probes: list = []

    async def fetch(wanted):
        probes.append(dict(wanted))
        return {tp: Probe(0, len(log[tp]), log[tp][o] if o < len(log[tp]) else None) for tp, o in wanted.items()}

    return LogGuard(fetch), probes


def test_a_broken_connection_makes_the_next_batch_verify_without_a_rebalance():
    tp = ("t", 0)
    log = {tp: [(b"k", b"e%d" % i) for i in range(5)]}
    guard, probes = guard_over(log)
    asyncio.run(guard.check({tp: 0}))
    guard.processed("t", 0, 4, b"k", b"e4")
    asyncio.run(guard.check({tp: 5}))
    assert probes == [], "a verified partition read in order is not probed"

    # the broker restarts empty and takes new events; the consumer fetches on from its old position 5
    log[tp] = [(b"k", b"n%d" % i) for i in range(8)]
    threading.Thread(target=guard.connection_lost).start()  # called from the consumer's thread
    with pytest.raises(WorkerStop, match=r"t\[0\].*position 5 belongs to the old log.*offsets 0\.\.4"):
        asyncio.run(guard.check({tp: 5}))
    assert probes == [{tp: 4}]


def test_a_broken_connection_to_a_broker_that_kept_its_log_costs_one_probe():
    tp = ("t", 0)
    log = {tp: [(b"k", b"e%d" % i) for i in range(5)]}
    guard, probes = guard_over(log)
    guard.processed("t", 0, 4, b"k", b"e4")
    asyncio.run(guard.check({tp: 5}))
    guard.connection_lost()
    asyncio.run(guard.check({tp: 5}))
    asyncio.run(guard.check({tp: 5}))
    assert probes == [{tp: 4}, {tp: 4}]  # once after the start, once after the broken connection


def test_watch_broker_connections_fires_on_broken_and_timed_out_connections_only():
    from aiokafka.client import AIOKafkaClient
    from aiokafka.conn import CloseReason

    calls: list = []
    watch_broker_connections(lambda: calls.append(1))
    watch_broker_connections(lambda: calls.append(2))  # the class is wrapped once, every watcher is told

    class Client:  # what aiokafka's own handler touches
        refreshed = 0

        def force_metadata_update(self):
            self.refreshed += 1

    c = Client()
    for reason in (CloseReason.IDLE_DROP, CloseReason.SHUTDOWN, CloseReason.CONNECTION_BROKEN,
                   CloseReason.CONNECTION_TIMEOUT):
        AIOKafkaClient._on_connection_closed(c, None, reason)
    assert calls.count(1) == 2 and calls.count(2) == 2
    assert c.refreshed == 2, "aiokafka's own handling still runs"


def test_watch_broker_connections_refuses_an_aiokafka_without_the_hook(monkeypatch):
    """Should aiokafka drop the method it wraps, the worker stops at start-up instead of losing the check."""
    from aiokafka.client import AIOKafkaClient

    monkeypatch.delattr(AIOKafkaClient, "_on_connection_closed")
    with pytest.raises(RuntimeError, match="_on_connection_closed is gone"):
        watch_broker_connections(lambda: None)


def test_an_idle_partition_is_checked_without_a_batch_when_the_new_log_ends_before_the_old_position():
    """The broker restarted empty and took fewer events than the consumer had read: the consumer, at its old
    position, gets no batch to trigger the check; the maintenance timer's check_idle finds the replaced log. An
    intact idle partition costs one probe, then none."""
    tp, quiet = ("t", 0), ("t", 1)
    log = {tp: [(b"k", b"e%d" % i) for i in range(9)], quiet: [(b"k", b"q0")]}
    guard, probes = guard_over(log)
    guard.processed("t", 0, 8, b"k", b"e8")
    guard.processed("t", 1, 0, b"k", b"q0")
    log[tp] = [(b"k", b"n%d" % i) for i in range(3)]  # restarted empty, 3 new events: ends before offset 9
    guard.connection_lost()
    asyncio.run(guard.check_idle([tp, quiet], idle_s=60.0))
    assert probes == [], "not before the partitions had time to show a batch"
    with pytest.raises(WorkerStop, match=r"t\[0\].*position 9 belongs to the old log"):
        asyncio.run(guard.check_idle([tp, quiet], idle_s=0.0))
    assert probes == [{tp: 8, quiet: 0}]
    del log[tp]
    guard, probes = guard_over(log)
    guard.processed("t", 1, 0, b"k", b"q0")
    guard.assigned()
    asyncio.run(guard.check_idle([quiet], idle_s=0.0))
    asyncio.run(guard.check_idle([quiet], idle_s=0.0))
    assert probes == [{quiet: 0}]


def test_a_partition_the_topic_no_longer_has_drops_its_mark_and_stops_nothing():
    """After a memory-only broker restarted, a client's metadata request re-created the topic with fewer
    partitions: a partition the worker still holds a mark for is gone. Nothing can be skipped there, so the guard
    drops its mark (saved at once) and the worker carries on until the group moves to the partitions there are."""
    kept, gone = ("t", 0), ("t", 7)

    async def fetch(wanted):
        return {tp: Probe(0, 0, None, gone=True) if tp == gone else Probe(0, 1, (b"k", b"e0"))
                for tp in wanted}

    guard = LogGuard(fetch)
    guard.processed("t", 0, 0, b"k", b"e0")
    guard.processed("t", 7, 41, b"k", b"x41")
    guard.connection_lost()
    asyncio.run(guard.check_idle([kept, gone], idle_s=0.0))
    assert set(guard.marks) == {kept} and guard.urgent
    assert "t:7" not in guard.encoded()
