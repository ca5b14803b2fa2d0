"""Detect a broker that lost its log before an offset skips anything.

Kafka's contract is that a partition's log only grows at its end (retention trims its start). A memory-only
broker that restarts (the embedded Tansu), a disk replaced under a broker or an unclean leader election break it:
the partition starts over at offset 0, and a consumer group whose committed offset came from the old log would
start in the middle of the new one and silently skip its beginning.

The guard remembers, per partition, the last message the worker processed: its offset and a fingerprint of its
key and value (:class:`Mark`). They are kept in memory and written to Redis by the maintenance timer, so a
restarted worker knows them too. At the first batch of a partition after the worker starts, after every
rebalance, after a broker connection broke (:meth:`LogGuard.connection_lost`: a broker that comes back fast is
fetched from at the consumer's old position before any rebalance), and whenever offsets go backwards, it reads
the message at the remembered offset back from the broker (:data:`FetchFn`) and compares:

* the same message: the log is intact; carry on;
* gone because retention trimmed the log's start past it: intact as well (logged);
* the partition itself is gone (the topic was re-created with fewer partitions: a memory-only broker restarted and
  a client's metadata request created it with the broker's default count): nothing of it can be skipped, so its
  mark is dropped (logged) and the group moves to the partitions the topic has;
* a different message, or none because the log now ends before it: the log was **replaced**. If consumption
  starts at the new log's first offset, nothing of it is skipped: the worker logs it as an error, counts it in
  ``promo_log_resets_total`` and carries on (events applied before are de-duplicated by event id). Otherwise the
  group's committed offset belongs to the old log and would skip ``[first offset, committed)`` of the new one:
  :class:`stream.faults.WorkerStop`, naming the partition and what to do. The same when the consumer kept its
  position from the old log across a broker restart: a restarted worker resumes from the group's committed
  offsets instead, which the new broker does not have (it starts at the new log's beginning).

Examples
--------
>>> import asyncio
>>> log = {("t", 0): [(b"k", b"e1"), (b"k", b"e2"), (b"k", b"e3")]}
>>> async def fetch(wanted):
...     return {tp: Probe(0, len(log[tp]), log[tp][o] if o < len(log[tp]) else None) for tp, o in wanted.items()}
>>> guard = LogGuard(fetch)
>>> guard.processed("t", 0, 2, b"k", b"e3")          # the worker applied offset 2
>>> guard.assigned()                                  # a rebalance: verify before the next batch
>>> asyncio.run(guard.check({("t", 0): 3}))           # resumes at 3, offset 2 still holds e3
>>> log[("t", 0)] = [(b"k", b"n1")]                    # the broker restarted and took one new event
>>> guard.assigned()
>>> asyncio.run(guard.check({("t", 0): 0}))           # consuming the new log from its start: carry on
>>> guard.processed("t", 0, 0, b"k", b"n1")
>>> log[("t", 0)] = [(b"k", b"x1"), (b"k", b"x2"), (b"k", b"x3")]
>>> guard.assigned()
>>> asyncio.run(guard.check({("t", 0): 2}))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stream.faults.WorkerStop: the broker lost the log of t[0]: ...
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from stream.faults import WorkerStop

log = logging.getLogger("promo.worker")

TP = tuple[str, int]


def fingerprint(key: bytes | None, value: bytes | None) -> str:
    """16 hex digits identifying a message by its key and value.

    >>> fingerprint(b"u1", b'{"event_id":"e1"}')
    '5a79254eb06a216a'
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(b"k" + key if key is not None else b"-")
    h.update(b"\0")
    h.update(b"v" + value if value is not None else b"-")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Mark:
    """The last message the worker processed in a partition."""

    offset: int
    fingerprint: str

    def encode(self) -> str:
        return f"{self.offset}:{self.fingerprint}"

    @classmethod
    def decode(cls, text: str | bytes) -> "Mark":
        """Inverse of :meth:`encode`.

        >>> Mark.decode(b"12:00ff")
        Mark(offset=12, fingerprint='00ff')
        """
        if isinstance(text, bytes):
            text = text.decode()
        offset, _, fp = text.partition(":")
        return cls(int(offset), fp)


@dataclass(frozen=True, slots=True)
class Probe:
    """What the broker holds for one partition: its first offset, its end, and the message at the offset asked
    for (``(key, value)``, or None when the log does not hold that offset); ``gone`` when the topic has no such
    partition any more."""

    earliest: int
    end: int
    message: tuple[bytes | None, bytes | None] | None
    gone: bool = False


FetchFn = Callable[[dict[TP, int]], Awaitable[dict[TP, Probe]]]
"""``fetch({(topic, partition): offset}) -> {(topic, partition): Probe}``; reads the broker, commits nothing."""


class LogGuard:
    """Per-partition marks and the check described in the module docstring.

    Parameters
    ----------
    fetch
        Reads the message at an offset back from the broker (:func:`fetch_probes` in the worker).
    marks
        Marks a previous worker left, ``{(topic, partition): Mark}``; or ``load_marks``, an async callable
        that reads them (from Redis) at the first check.
    on_reset
        Called with ``(topic, partition)`` when a replaced log is consumed from its start (a metric).
    """

    def __init__(self, fetch: FetchFn, marks: dict[TP, Mark] | None = None,
                 on_reset: Callable[[str, int], None] | None = None,
                 load_marks: Callable[[], Awaitable[dict[TP, Mark]]] | None = None) -> None:
        self.fetch = fetch
        self.marks: dict[TP, Mark] = dict(marks or {})
        self._load_marks = load_marks
        self.on_reset = on_reset
        self._verified: set[TP] = set()
        self._next: dict[TP, int] = {}  # next offset expected per partition in the current assignment
        self.dirty = False  # marks changed since they were last saved
        self.urgent = False  # a replaced log was accepted: save the marks at the end of this batch
        self._reverify = threading.Event()  # set from the Kafka client's thread, read by check()
        self._unverified_since = time.monotonic()  # when the partitions last started to need a check
        self._lock = asyncio.Lock()  # check() and check_idle() judge and change the marks one at a time

    def assigned(self) -> None:
        """A rebalance happened: every partition is verified again at its next batch."""
        self._verified.clear()
        self._next.clear()
        self._unverified_since = time.monotonic()

    def connection_lost(self) -> None:
        """A broker connection broke: every partition is verified again at its next batch.

        Safe to call from any thread (the consumer's connections live in Faust's consumer thread). Without it, a
        broker that restarts with an empty log before the group notices is read from the consumer's old position
        on: the new log's beginning would be skipped, and no rebalance would tell the guard to look.
        """
        self._reverify.set()

    def needs_check(self, first: dict[TP, int]) -> dict[TP, int]:
        """The partitions of a batch (``{tp: its first offset}``) to verify before processing it."""
        out = {}
        for tp, offset in first.items():
            rewound = tp in self._next and offset < self._next[tp]
            if (tp not in self._verified or rewound) and tp in self.marks:
                out[tp] = offset
        return out

    async def _prepare(self) -> None:
        if self._load_marks is not None:
            loaded = await self._load_marks()
            self._load_marks = None
            self.marks = {**loaded, **self.marks}  # what this process saw itself is newer
        if self._reverify.is_set():
            self._reverify.clear()
            self.assigned()

    async def check(self, first: dict[TP, int]) -> None:
        """Verify the partitions of a batch that need it; raise :class:`WorkerStop` on a replaced log that the
        batch would consume from its middle."""
        async with self._lock:
            await self._prepare()
            todo = self.needs_check(first)
            if todo:
                probes = await self.fetch({tp: self.marks[tp].offset for tp in todo})
                for tp, offset in todo.items():
                    self._judge(tp, offset, self.marks[tp], probes[tp])
            self._verified.update(first)

    async def check_idle(self, assigned: list[TP], idle_s: float) -> None:
        """From the maintenance timer: verify the assigned partitions that still wait for their check ``idle_s``
        after a rebalance or a broken connection, because no batch came to trigger it. That is what a consumer
        that kept its position from a replaced log sees when the new log ends before that position: nothing
        arrives, and the events the new log holds would wait unseen until it grows past the old position, then
        be skipped. Such a partition is judged at the position after its mark (where the consumer stands):
        :class:`WorkerStop`, and a restarted worker starts from the new log's beginning. An intact log counts as
        verified."""
        async with self._lock:
            await self._prepare()
            if time.monotonic() - self._unverified_since < idle_s:
                return
            todo = [tp for tp in assigned if tp in self.marks and tp not in self._verified]
            if not todo:
                return
            probes = await self.fetch({tp: self.marks[tp].offset for tp in todo})
            for tp in todo:
                self._judge(tp, self.marks[tp].offset + 1, self.marks[tp], probes[tp])
                self._verified.add(tp)

    def _judge(self, tp: TP, first: int, mark: Mark, probe: Probe) -> None:
        topic, partition = tp
        if probe.gone:  # nothing can be skipped in a partition that does not exist; the group rebalances
            log.warning("%s[%d] no longer exists on the broker: the topic was re-created with fewer partitions (a "
                        "memory-only broker restarted and a client's metadata request created it with its default "
                        "count?). Its mark (offset %d) is dropped; the consumer group moves to the partitions the "
                        "topic has. Create the topics before any client reconnects, or disable auto-creation",
                        topic, partition, mark.offset)
            del self.marks[tp]
            self.urgent = True
            return
        if probe.message is not None and fingerprint(*probe.message) == mark.fingerprint:
            return  # the same log
        if probe.message is None and mark.offset < probe.earliest:
            log.info("%s[%d]: offset %d, the last one this engine processed, was removed by retention (the log "
                     "now starts at %d); nothing to compare", topic, partition, mark.offset, probe.earliest)
            return
        what = ("holds a different message" if probe.message is not None
                else f"no longer exists (the log ends at {probe.end})")
        if first <= probe.earliest:
            log.error("the broker lost the log of %s[%d]: offset %d, the last one this engine processed, %s. "
                      "Consuming the new log from its start (offset %d), so nothing of it is skipped; events "
                      "applied before are recognised by their event ids. Find out why the broker lost its data "
                      "(a memory-only broker restarted?)", topic, partition, mark.offset, what, first)
            if self.on_reset is not None:
                self.on_reset(topic, partition)
            del self.marks[tp]
            self.urgent = True  # the old mark must not survive in Redis: save as soon as the batch is done
            return
        raise WorkerStop(
            f"the broker lost the log of {topic}[{partition}]: offset {mark.offset}, the last one this engine "
            f"processed, {what}, and the consumer's position {first} belongs to the old log, so offsets "
            f"{probe.earliest}..{first - 1} of the new log would be skipped. Nothing was skipped or acknowledged. "
            f"A restarted worker resumes from the consumer group's committed offsets; if it stops with this error "
            f"again, those belong to the old log too: reset the group's offsets for {topic} to the earliest "
            f"(kafka-consumer-groups.sh --group <PROMO_APP_ID> --topic {topic} --reset-offsets --to-earliest "
            f"--execute) and restart the workers; events applied before are recognised by their event ids"
        )

    def processed(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        """Record the last message of a partition in a batch the worker has finished."""
        tp = (topic, partition)
        self.marks[tp] = Mark(offset, fingerprint(key, value))
        self._next[tp] = offset + 1
        self.dirty = True

    def encoded(self) -> dict[str, str]:
        """The marks as Redis hash fields (``<topic>:<partition>`` -> ``<offset>:<fingerprint>``)."""
        return {f"{t}:{p}": m.encode() for (t, p), m in self.marks.items()}

    @staticmethod
    def decoded(fields: dict) -> dict[TP, Mark]:
        """Inverse of :meth:`encoded` (fields as Redis returns them, bytes or text).

        >>> LogGuard.decoded({b"promo.events:3": b"41:ab"})
        {('promo.events', 3): Mark(offset=41, fingerprint='ab')}
        """
        out = {}
        for k, v in fields.items():
            k = k.decode() if isinstance(k, bytes) else k
            topic, _, partition = k.rpartition(":")
            out[(topic, int(partition))] = Mark.decode(v)
        return out


_CLOSE_WATCHERS: list[Callable[[], None]] = []


def watch_broker_connections(callback: Callable[[], None]) -> None:
    """Call ``callback()`` (from whichever thread owns the connection) whenever a Kafka connection of this process
    breaks or times out; idle drops and shutdowns do not count.

    aiokafka has no public hook for this; its client's ``_on_connection_closed`` is the callback every connection
    is given when it opens, so it is wrapped once, on the class, before any client connects. If aiokafka renames
    it, this raises at start-up (tested) instead of silently losing the check.
    """
    from aiokafka.client import AIOKafkaClient
    from aiokafka.conn import CloseReason

    original = AIOKafkaClient.__dict__.get("_on_connection_closed")
    if original is None:
        raise RuntimeError("aiokafka.client.AIOKafkaClient._on_connection_closed is gone: the worker cannot notice a "
                           "broker connection breaking; pin aiokafka to a version that has it")
    if not getattr(original, "promo_watched", False):
        broken = (CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT)

        def on_connection_closed(self, conn, reason):
            if reason in broken:
                for watcher in list(_CLOSE_WATCHERS):
                    watcher()
            return original(self, conn, reason)

        on_connection_closed.promo_watched = True  # type: ignore[attr-defined]
        AIOKafkaClient._on_connection_closed = on_connection_closed
    _CLOSE_WATCHERS.append(callback)


async def fetch_probes(kafka_kwargs: dict, wanted: dict[TP, int], timeout_s: float = 10.0) -> dict[TP, Probe]:
    """Read the message at ``wanted[tp]`` of each partition with a plain consumer (no group, nothing committed).

    A partition whose end (the fetch response's high watermark, which the embedded broker reports correctly,
    unlike ListOffsets) is at or before the offset holds no message there.
    """
    import asyncio
    import time

    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                **kafka_kwargs)
    await consumer.start()
    out: dict[TP, Probe] = {}
    try:
        # a partition the topic no longer has is gone (asking its offsets would wait out the request timeout, 40 s,
        # while the guard's lock holds every batch): fresh metadata of every topic first (a request naming no
        # topic creates none; the consumer's own cluster view holds only topics it was given, hence its client's)
        cluster = await consumer._client.fetch_all_metadata()
        tps = {}
        for (t, p), o in wanted.items():
            if p in (cluster.partitions_for_topic(t) or ()):
                tps[TopicPartition(t, p)] = o
            else:
                out[(t, p)] = Probe(0, 0, None, gone=True)
        if not tps:
            return out
        consumer.assign(list(tps))
        earliest = await consumer.beginning_offsets(list(tps))
        todo = {}
        for tp, o in tps.items():
            if o < earliest[tp]:
                out[(tp.topic, tp.partition)] = Probe(earliest[tp], -1, None)
            else:
                consumer.seek(tp, o)
                todo[tp] = o
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading offsets back from the broker took more than {timeout_s:.0f}s: "
                                   f"{sorted((tp.topic, tp.partition) for tp in todo)}")
            batch = await consumer.getmany(*todo, timeout_ms=200)
            for tp in list(todo):
                o = todo[tp]
                msgs = [m for m in batch.get(tp, []) if m.offset >= o]
                end = consumer.highwater(tp)
                if msgs:
                    m = msgs[0]
                    found = (m.key, m.value) if m.offset == o else None
                    out[(tp.topic, tp.partition)] = Probe(earliest[tp], end if end is not None else -1, found)
                    del todo[tp]
                elif end is not None and end <= o:
                    out[(tp.topic, tp.partition)] = Probe(earliest[tp], end, None)
                    del todo[tp]
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return out
