"""``promo dlq replay``: send dead-lettered events back to the events topic once a fix makes them valid.

Reads the whole dead-letter topic (``<prefix>.events.dlq``) with a plain consumer (no group, nothing committed:
:func:`stream.tail.open_topic`), from the beginning or from ``--since``, up to the end it had when the command
started (so records that dead-letter again during the replay are not read again), and sends the original bytes of
every selected record to the events topic with the record's Kafka key (a DLQ record keeps its original message's
key: the user id, so the event lands in the partition it was first sent to).

Replaying is safe to repeat: the engine de-duplicates by event id (Redis markers per user), so an event that was
already applied is counted as a duplicate (``promo_events_duplicate_total``), not applied twice - as long as its
marker lives (``PROMO_DEDUP_TTL_S``, 7 days by default, shorter than the DLQ's 30-day retention: use ``--since`` to
keep an old, already replayed record from being applied again). What is selected
(:class:`Selector`, pure logic):

* a record whose ``reason`` is one of ``--reason`` (every reason without it);
* not a tombstone (``raw`` null: nothing to send), not cut (``raw_truncated``: the original is lost);
* not a second copy of the same event within this replay (an event dead-lettered again by an earlier replay is in
  the topic twice): the same ``(user_id, event_id)`` when the raw value is a JSON object with a string
  ``event_id``, the engine's de-duplication identity; else the same raw bytes. Raw that is not a valid event is
  still sent (once): it dead-letters again, which is the honest outcome.

Records that are not DLQ records at all (not JSON, missing fields) are skipped and counted.

>>> sel = Selector(parse_reasons(["bad_value"]))
>>> rec = dlq_record(b'{"event_id":"e1","user_id":"u1"}', "bad_value", "price too high", "promo.events", 0, 7)
>>> sel.offer(rec), sel.offer(rec), sel.offer(b"{oops")
(b'{"event_id":"e1","user_id":"u1"}', None, None)
>>> sel.counts()["skipped"]
{'not_a_dlq_record': 1, 'tombstone': 0, 'truncated': 0, 'duplicate': 1}
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import sys
import time
from collections import Counter, deque
from typing import Iterable

from stream.dlq import DLQ_REASONS, dlq_record, raw_from_record  # noqa: F401 - dlq_record: the doctests
from stream.errors import PromoError
from stream.settings import Settings

NOT_A_DLQ_RECORD = "not_a_dlq_record"
TOMBSTONE = "tombstone"
TRUNCATED = "truncated"
DUPLICATE = "duplicate"
SKIP_REASONS = (NOT_A_DLQ_RECORD, TOMBSTONE, TRUNCATED, DUPLICATE)
"""Why a record read is not sent (the keys of the report's ``skipped``)."""

RECORD_FIELDS = ("reason", "error", "raw", "raw_encoding", "topic", "partition", "offset")
"""The fields every DLQ record has (``stream/schemas/dlq.v1.json``)."""

MAX_IN_FLIGHT = 1000  # unacknowledged sends held before waiting on the oldest ones (bounded memory)
MAX_REPORTED_ERRORS = 20


def parse_reasons(values: Iterable[str] | None) -> frozenset[str] | None:
    """``--reason`` values (repeatable, each a comma list) -> the set of DLQ reasons; ``None`` for every reason.

    Examples
    --------
    >>> sorted(parse_reasons(["bad_value", "wrong_type, bad_timestamp"]))
    ['bad_timestamp', 'bad_value', 'wrong_type']
    >>> parse_reasons([]) is None
    True
    >>> parse_reasons(["bad_price"])
    Traceback (most recent call last):
    ...
    stream.errors.PromoError: --reason 'bad_price': expected one of bad_json, not_object, oversized, missing_field, wrong_type, bad_value, unknown_type, bad_timestamp, internal_error
    """
    names = [n.strip() for v in (values or ()) for n in v.split(",") if n.strip()]
    for name in names:
        if name not in DLQ_REASONS:
            raise PromoError(f"--reason {name!r}: expected one of {', '.join(DLQ_REASONS)}")
    return frozenset(names) or None


def parse_record(value: bytes | None) -> dict | None:
    """The DLQ record a Kafka value holds, with its original bytes under ``"raw_bytes"``; ``None`` when the value
    is not a DLQ record (not a JSON object, a field of :data:`RECORD_FIELDS` missing, a ``raw`` that cannot be
    decoded).

    Examples
    --------
    >>> parse_record(dlq_record(b"\\xff", "bad_json", "not UTF-8", "t", 0, 1))["raw_bytes"]
    b'\\xff'
    >>> parse_record(dlq_record(None, "bad_json", "empty", "t", 0, 1))["raw_bytes"] is None
    True
    >>> r = json.loads(dlq_record(b"x", "bad_json", "e", "t", 0, 1))
    >>> [parse_record(v) for v in (None, b"{oops", b"[]", json.dumps({**r, "raw": 1}).encode(),
    ...                            json.dumps({k: v for k, v in r.items() if k != "offset"}).encode())]
    [None, None, None, None, None]
    """
    try:
        record = json.loads(value) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(f not in record for f in RECORD_FIELDS):
        return None
    raw = record["raw"]
    if not isinstance(record["reason"], str) or record["raw_encoding"] not in ("text", "base64") or not (
            raw is None or isinstance(raw, str)):
        return None
    try:
        record["raw_bytes"] = raw_from_record(record)
    except (binascii.Error, UnicodeEncodeError):  # corrupt base64, or a lone surrogate in the text
        return None
    return record


def identity(raw: bytes) -> tuple:
    """What makes two raw values the same event for the engine: ``("event", user_id, event_id)`` when ``raw``
    is a JSON object with a string ``event_id`` (the engine's de-duplication markers are per user), else the
    bytes themselves (a digest: bounded memory).

    >>> identity(b'{"event_id": "e1", "user_id": "u1", "price": 2e9}')
    ('event', 'u1', 'e1')
    >>> identity(b"{oops") == identity(b"{oops") != identity(b"{oops!")
    True
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("event_id"), str):
        user = doc.get("user_id")
        return ("event", user if isinstance(user, str) else None, doc["event_id"])
    return ("raw", hashlib.sha256(raw).digest())


class Selector:
    """Decides, record by record, what a replay sends, and counts why the rest is not sent.

    Counts: ``read`` (records offered), ``matched`` (DLQ records of a wanted reason, also ``by_reason``),
    ``unmatched`` (DLQ records of another reason), ``selected`` (sent or, with ``--dry-run``, would be),
    ``skipped`` (by :data:`SKIP_REASONS`). ``read = matched + unmatched + skipped[not_a_dlq_record]`` and
    ``matched = selected + skipped[tombstone] + skipped[truncated] + skipped[duplicate]``.
    """

    def __init__(self, reasons: frozenset[str] | None = None) -> None:
        self.reasons = reasons
        self.read = self.matched = self.unmatched = self.selected = 0
        self.skipped: Counter = Counter({why: 0 for why in SKIP_REASONS})
        self.by_reason: Counter = Counter({r: 0 for r in sorted(reasons or DLQ_REASONS)})
        self._seen: set[tuple] = set()

    def offer(self, value: bytes | None) -> bytes | None:
        """The raw bytes to send for one DLQ record's Kafka value, or ``None`` when it is not sent."""
        self.read += 1
        record = parse_record(value)
        if record is None:
            return self._skip(NOT_A_DLQ_RECORD)
        if self.reasons is not None and record["reason"] not in self.reasons:
            self.unmatched += 1
            return None
        self.matched += 1
        self.by_reason[record["reason"]] += 1
        raw = record["raw_bytes"]
        if raw is None:
            return self._skip(TOMBSTONE)
        if record.get("raw_truncated"):
            return self._skip(TRUNCATED)
        ident = identity(raw)
        if ident in self._seen:
            return self._skip(DUPLICATE)
        self._seen.add(ident)
        self.selected += 1
        return raw

    def _skip(self, why: str) -> None:
        self.skipped[why] += 1
        return None

    def counts(self) -> dict:
        """The counts as the report has them."""
        return {"read": self.read, "matched": self.matched, "unmatched": self.unmatched, "selected": self.selected,
                "skipped": dict(self.skipped), "by_reason": dict(self.by_reason)}


class _Sender:
    """Sends to one topic, keeps at most :data:`MAX_IN_FLIGHT` sends unacknowledged, counts acks and failures."""

    def __init__(self, producer, topic: str) -> None:
        self.producer, self.topic = producer, topic
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self._in_flight: deque[asyncio.Future] = deque()

    async def send(self, key: bytes | None, value: bytes) -> None:
        from aiokafka.errors import KafkaError

        headers = [("sent_at_ns", str(time.time_ns()).encode())]  # as promo produce: end-to-end latency
        try:
            self._in_flight.append(await self.producer.send(self.topic, value, key=key, headers=headers))
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:  # refused before sending (e.g. too large)
            self._fail(exc)
        if len(self._in_flight) > MAX_IN_FLIGHT:
            await self.settle(MAX_IN_FLIGHT // 2)

    async def settle(self, keep: int = 0) -> None:
        """Wait for the oldest sends until at most ``keep`` are unacknowledged."""
        from aiokafka.errors import KafkaError

        while len(self._in_flight) > keep:
            try:
                await self._in_flight.popleft()
                self.sent += 1
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}")


class _Progress:
    """A line on stderr about once a second, so a long replay shows it is moving (stdout is the report's)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = self.last = time.monotonic()

    def tick(self, sel: Selector, sender: _Sender | None) -> None:
        now = time.monotonic()
        if self.enabled and now >= self.last + 1.0:
            acked = f", {sender.sent:,} acknowledged" if sender is not None else " (dry run)"
            print(f"dlq replay: {sel.read:,} read, {sel.selected:,} selected{acked}", file=sys.stderr, flush=True)
            self.last = now


async def _pump(consumer, tps: list, since_ms: int | None, sel: Selector, sender: _Sender | None,
                prog: _Progress) -> None:
    """Offer every record read to ``sel`` and send what it selects (nothing without a ``sender``)."""
    from stream.tail import read_bounded

    async for msg in read_bounded(consumer, tps, since_ms):
        if since_ms is not None and msg.timestamp < since_ms:
            continue  # an earlier timestamp after the ListOffsets start: outside --since
        raw = sel.offer(msg.value)
        if raw is not None and sender is not None:
            await sender.send(msg.key, raw)  # the DLQ record's key is the original message's
        prog.tick(sel, sender)
    if sender is not None:
        await sender.settle(0)


async def replay(settings: Settings, reasons: frozenset[str] | None = None, *, since_ms: int | None = None,
                 dry_run: bool = False, progress: bool = True, timeout_s: float = 20.0) -> dict:
    """Replay the DLQ records of ``reasons`` (every reason when ``None``) to the events topic.

    Parameters
    ----------
    settings
        Connection and topic settings (``topic_dlq`` is read, ``topic_events`` written).
    reasons
        From :func:`parse_reasons`.
    since_ms
        Only records written at or after this time (epoch ms, :func:`stream.tail.parse_since`).
    dry_run
        Send nothing; the report's ``selected`` is what would be sent.
    progress
        A progress line on stderr about once a second.

    Returns
    -------
    dict
        ``{"read", "matched", "unmatched", "selected", "sent", "failed", "skipped", "by_reason", "dry_run",
        "topic", "target", "reasons", "since_ms", "send_errors", "elapsed_s"}`` (see :class:`Selector`);
        ``sent`` counts sends the broker acknowledged, ``failed`` those it did not.

    Raises
    ------
    PromoError
        Broker unreachable (naming PROMO_KAFKA_BOOTSTRAP) or a topic missing, before anything is sent.
    """
    from stream.produce import _quiet_kafka_logs, _start_producer, _stop_quietly
    from stream.tail import open_topic

    sel, prog, sender = Selector(reasons), _Progress(progress), None
    source, target = settings.topic_dlq, settings.topic_events
    with _quiet_kafka_logs():
        async with open_topic(settings, source, timeout_s) as (consumer, tps):
            if target not in await consumer.topics():
                raise PromoError(f"topic {target} does not exist on {settings.kafka_bootstrap}; create the topics "
                                 "(promo stack up) or check PROMO_TOPIC_PREFIX")
            if not dry_run:
                sender = _Sender(await _start_producer(settings, None), target)
            try:
                await _pump(consumer, tps, since_ms, sel, sender, prog)
            finally:
                if sender is not None:
                    await _stop_quietly(sender.producer)
    return {**sel.counts(), "sent": sender.sent if sender else 0, "failed": sender.failed if sender else 0,
            "dry_run": dry_run, "topic": source, "target": target,
            "reasons": sorted(reasons) if reasons else None, "since_ms": since_ms,
            "send_errors": sender.errors if sender else [], "elapsed_s": round(time.monotonic() - prog.t0, 3)}


def run_replay(settings: Settings, reasons: Iterable[str] | None = None, *, since: str | None = None,
               dry_run: bool = False, progress: bool = True) -> dict:
    """The CLI's entry: validates ``--reason`` and ``--since`` before connecting, then :func:`replay`."""
    from stream.tail import parse_since

    wanted = parse_reasons(reasons)
    since_ms = parse_since(since) if since is not None else None
    # the command reports an unreachable broker in its own one line; aiokafka would add its own on stderr
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return asyncio.run(replay(settings, wanted, since_ms=since_ms, dry_run=dry_run, progress=progress))
