"""``promo tail decisions|dlq|events``: read the engine's topics as an operator.

Reads one topic with a plain consumer (no group: nothing is committed, workers are not disturbed), every
partition, from the first record at or after ``--since`` (the broker's ``ListOffsets`` by time; the beginning
without it) to the end the topic had when the command started, or on for ever with ``--follow``. Records of
``--user`` only: every topic is keyed by the user id (a DLQ record keeps its original message's key), so the
filter is on the key. ``--limit N`` keeps the latest N matching records of the read, by time (then follows).

Each record is one line: a JSON object with ``--json`` (:func:`record_doc`), a readable summary otherwise
(:func:`record_line`). Records of a bounded read are printed in time order over partitions; followed records as
they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import re
import signal
import time
from datetime import datetime, timezone
from typing import Callable

from stream.errors import PromoError
from stream.settings import Settings

KINDS = ("decisions", "dlq", "events")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_since(text: str, now_ms: int | None = None) -> int:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``7d``) or an ISO 8601 time (UTC when
    it names no zone); returns epoch milliseconds.

    >>> parse_since("10m", now_ms=1_000_000_000)
    999400000
    >>> parse_since("2019-10-01T00:00:00Z")
    1569888000000
    >>> parse_since("2019-10-01 02:00")
    1569895200000
    >>> parse_since("100000d", now_ms=1_000_000_000), parse_since("1969-01-01")  # before 1970: the beginning
    (0, 0)
    >>> parse_since("yesterday")
    Traceback (most recent call last):
    ...
    stream.errors.PromoError: --since 'yesterday': expected a duration such as 90s, 10m, 2h, 7d or an ISO 8601 time such as 2026-12-01T08:00:00Z
    """
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    m = _DURATION.match(text.strip())
    if m:  # further back than 1970 is from the beginning (Kafka refuses a negative time)
        return max(0, now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000))
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise PromoError(f"--since {text!r}: expected a duration such as 90s, 10m, 2h, 7d or an ISO 8601 time such "
                         "as 2026-12-01T08:00:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return max(0, int(t.timestamp() * 1000))


def _value(raw: bytes | None):
    """A record's value as JSON when it is, else its text (or ``None`` for a tombstone)."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def record_doc(msg) -> dict:
    """One record as the ``--json`` line: where it is, when it was written, its key and its value (parsed)."""
    return {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset, "timestamp_ms": msg.timestamp,
            "key": None if msg.key is None else msg.key.decode("utf-8", "replace"), "value": _value(msg.value)}


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def record_line(kind: str, doc: dict) -> str:
    """A readable line for a record of ``kind`` (a :func:`record_doc`).

    >>> d = {"topic": "promo.decisions", "partition": 3, "offset": 7, "timestamp_ms": 1569888011000, "key": "u1",
    ...      "value": {"decision_id": "d1", "user_id": "u1", "offer": {"offer_id": "cart10", "kind": "percent_off"},
    ...                "items": ["i1", "i2"], "propensity": 0.8, "group": "treatment", "reasons": ["trigger:cart"]}}
    >>> record_line("decisions", d)
    '2019-10-01T00:00:11Z p3@7 user u1: cart10 (percent_off, treatment) p=0.8 items i1,i2 decision d1 [trigger:cart]'
    >>> record_line("dlq", {**d, "value": {"reason": "bad_json", "error": "line 1", "raw": "{oops"}})
    '2019-10-01T00:00:11Z p3@7 user u1: bad_json: line 1 | raw {oops'
    """
    v = doc["value"]
    when = datetime.fromtimestamp(doc["timestamp_ms"] / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = f"{when} p{doc['partition']}@{doc['offset']} user {doc['key']}: "
    if not isinstance(v, dict):
        return head + _clip(f"(not a JSON object) {v}", 200)
    if kind == "decisions":
        offer = v.get("offer") or {}
        return head + (f"{offer.get('offer_id')} ({offer.get('kind')}, {v.get('group')}) p={v.get('propensity')} "
                       f"items {','.join(map(str, v.get('items') or [])) or '-'} decision {v.get('decision_id')} "
                       f"[{' '.join(map(str, v.get('reasons') or []))}]")
    if kind == "dlq":
        return head + _clip(f"{v.get('reason')}: {v.get('error')} | raw {v.get('raw')}", 300)
    price = f" price {v['price']}" if v.get("price") is not None else ""
    return head + _clip(f"{v.get('type')} item {v.get('item_id')}{price} event {v.get('event_id')}", 300)


def topic_of(settings: Settings, kind: str) -> str:
    if kind not in KINDS:
        raise PromoError(f"unknown topic kind {kind!r}: expected one of {', '.join(KINDS)}")
    return {"decisions": settings.topic_decisions, "dlq": settings.topic_dlq, "events": settings.topic_events}[kind]


@contextlib.asynccontextmanager
async def open_topic(settings: Settings, topic: str, timeout_s: float = 20.0):
    """A started consumer without a group (nothing committed, workers undisturbed), assigned every partition of
    ``topic``; yields ``(consumer, partitions)`` and stops the consumer on exit.

    Raises
    ------
    PromoError
        The broker does not answer (the message names PROMO_KAFKA_BOOTSTRAP) or ``topic`` does not exist.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                request_timeout_ms=int(timeout_s * 1000), **settings.kafka_client_kwargs())
    try:
        await asyncio.wait_for(consumer.start(), timeout_s)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        await consumer.stop()
        raise PromoError(f"cannot reach the broker at {settings.kafka_bootstrap} ({type(exc).__name__}); start it "
                         "(promo stack up) or set PROMO_KAFKA_BOOTSTRAP") from None
    try:
        parts = consumer.partitions_for_topic(topic) if topic in await consumer.topics() else None
        if not parts:
            raise PromoError(f"topic {topic} does not exist on {settings.kafka_bootstrap}; create the topics "
                             "(promo stack up, or the compose kafka-init step) or check PROMO_TOPIC_PREFIX")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        yield consumer, tps
    finally:
        await consumer.stop()


async def read_bounded(consumer, tps: list, since_ms: int | None = None, stop: asyncio.Event | None = None):
    """Yield, per fetch and partition, every record from the first at or after ``since_ms`` (the beginning
    without it) up to the end each partition had when the read started; ends early when ``stop`` is set.

    Records are in offset order within a partition, not in time order over partitions. A ``since_ms`` read
    starts at the broker's ``ListOffsets`` answer; later records may still carry an earlier timestamp, so callers
    filter on ``msg.timestamp`` themselves. Afterwards the consumer's position is where the read stopped in each
    partition (a follow-on read skips nothing and repeats nothing).
    """
    ends = await consumer.end_offsets(tps)
    starts = await consumer.beginning_offsets(tps)
    if since_ms is not None:
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        starts = {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
    for tp in tps:
        consumer.seek(tp, starts[tp])
    # A partition is done once a record at or past its end arrived, and every record of that fetch is kept:
    # Tansu (the embedded broker) reports as the end the last record batch's base offset + 1, so the rest of
    # that batch lies "past" it.
    pending = {tp for tp in tps if starts[tp] < ends[tp]}
    while pending and not (stop is not None and stop.is_set()):
        batch = await consumer.getmany(*pending, timeout_ms=1000)
        for tp, msgs in batch.items():
            for msg in msgs:
                yield msg
            if msgs and msgs[-1].offset + 1 >= ends[tp]:
                pending.discard(tp)
        for tp in list(pending):  # a compacted or truncated tail: the position may pass the end silently
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)


async def tail(settings: Settings, kind: str, emit: Callable[[dict], None], *, user: str | None = None,
               since_ms: int | None = None, follow: bool = False, limit: int | None = None,
               stop: asyncio.Event | None = None, timeout_s: float = 20.0) -> int:
    """Read ``kind``'s topic and ``emit`` each matching record's :func:`record_doc`; returns how many.

    Without ``follow`` it returns at the ends the partitions had when it started; with it, when ``stop`` is set.
    """
    if limit is not None and limit < 1:
        raise PromoError(f"--limit must be at least 1, got {limit}")
    topic = topic_of(settings, kind)
    # SIGINT and SIGTERM end the read at the next poll, so the consumer leaves cleanly (installed here, not only
    # for --follow: a process started in the background inherits SIGINT ignored, and this makes Ctrl-C work)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    key = None if user is None else user.encode("utf-8", "surrogatepass")
    async with open_topic(settings, topic, timeout_s) as (consumer, tps):

        def wanted(msg) -> bool:
            return (key is None or msg.key == key) and (since_ms is None or msg.timestamp >= since_ms)

        # The bounded part: up to the ends seen at the start, in time order over partitions.
        kept: list = []  # with --limit a min-heap of the latest `limit` by (time, partition, offset)
        async for msg in read_bounded(consumer, tps, since_ms, stop):
            if wanted(msg):
                item = (msg.timestamp, msg.partition, msg.offset, msg)
                if not limit:
                    kept.append(item)
                elif len(kept) < limit:
                    heapq.heappush(kept, item)
                elif item[:3] > kept[0][:3]:
                    heapq.heapreplace(kept, item)
        n = 0
        for *_, msg in sorted(kept, key=lambda item: item[:3]):
            emit(record_doc(msg))
            n += 1
        if not follow:
            return n
        # on from where the bounded part stopped in each partition (nothing skipped, nothing twice)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                for msg in msgs:
                    if wanted(msg):
                        emit(record_doc(msg))
                        n += 1
        return n


def run_tail(settings: Settings, kind: str, *, as_json: bool, user: str | None, since: str | None, follow: bool,
             limit: int | None, out=None) -> int:
    """The CLI's entry: prints each record as it is emitted (flushed, so a pipe sees it at once)."""
    import sys

    out = out or sys.stdout
    # the command reports a broker it cannot reach in its own one line; aiokafka's connection errors would add
    # theirs (and a traceback-like "Unclosed" warning) on stderr
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    since_ms = parse_since(since) if since is not None else None
    topic_of(settings, kind)  # an unknown kind fails before connecting

    def emit(doc: dict) -> None:
        line = json.dumps(doc, separators=(",", ":"), default=str) if as_json else record_line(kind, doc)
        print(line, file=out, flush=True)

    return asyncio.run(tail(settings, kind, emit, user=user, since_ms=since_ms, follow=follow, limit=limit))
