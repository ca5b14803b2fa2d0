"""``promo produce``: replay event v1 dicts to the events topic, fast and keyed by ``user_id``.

:func:`produce_events` is the async core (also for load tests); :func:`produce_file` is the sync entry point
of the CLI on top of :mod:`stream.sources`.

How it sends: one aiokafka producer; messages are appended to one record batch per partition (partition =
the Kafka default murmur2 partitioner over the ``user_id`` key, the same one every Kafka client and Faust use)
and each full batch is handed over with ``send_batch`` without waiting for the broker; delivery futures are
awaited in chunks. Each message carries the header ``sent_at_ns`` (``time.time_ns()`` when it was appended) for
end-to-end latency. With ``rate`` the events follow a schedule (event *i* is due at ``start + i / rate``): the
producer sleeps only when it is ahead of the schedule, flushing what it holds first, so a late producer catches
up instead of drifting. Progress goes to stderr about once a second; stdout is left alone.

The topic must exist (``promo stack up`` creates all topics with ``PROMO_PARTITIONS`` partitions): the producer
refuses to auto-create it with the broker's default partition count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

from stream.settings import Settings
from stream.sources import read_events

LINGER_S = 0.005  # flush a partition's batch at the latest this long after its first message
MAX_BATCH_BYTES = 262_144
MAX_IN_FLIGHT = 64  # delivery futures held before waiting on the oldest ones
START_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_MS = 15_000  # a dead broker is reported after this long, not aiokafka's 40 s
MAX_REPORTED_ERRORS = 20


class _Errors(list):
    """A list that keeps the first ``cap`` items but counts all appends (bounded memory on a bad file)."""

    def __init__(self, cap: int = MAX_REPORTED_ERRORS) -> None:
        super().__init__()
        self.cap = cap
        self.total = 0

    def append(self, item: Any) -> None:  # noqa: D401 - list API
        self.total += 1
        if len(self) < self.cap:
            super().append(item)


class Pacer:
    """The send schedule for a target rate: how long to wait before event ``i``.

    >>> p = Pacer(rate=100.0, start=10.0)
    >>> p.wait_s(0, now=10.0), p.wait_s(50, now=10.2), p.wait_s(50, now=10.7)
    (0.0, 0.3, 0.0)
    >>> Pacer(rate=None, start=0.0).wait_s(10**6, now=0.0)
    0.0
    """

    def __init__(self, rate: float | None, start: float) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 events per second, got {rate}")
        self.interval = 1.0 / rate if rate else 0.0
        self.start = start

    def wait_s(self, i: int, now: float) -> float:
        if not self.interval:
            return 0.0
        return max(0.0, round(self.start + i * self.interval - now, 9))


class _PartitionerCache:
    """Kafka default partitioner (murmur2 of the key) with a bounded cache: keys (users) repeat."""

    def __init__(self, partitions: list[int], max_size: int = 1_000_000) -> None:
        from aiokafka.partitioner import DefaultPartitioner

        self.partitions = sorted(partitions)
        self._partitioner = DefaultPartitioner()
        self._cache: dict[bytes, int] = {}
        self._max = max_size

    def __call__(self, key: bytes) -> int:
        p = self._cache.get(key)
        if p is None:
            p = self._partitioner(key, self.partitions, self.partitions)
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key] = p
        return p


def _unreachable(settings: Settings, exc: BaseException) -> Exception:
    from aiokafka.errors import KafkaConnectionError

    from stream.cli import PromoError

    if isinstance(exc, KafkaConnectionError):
        detail = "no broker answered (connection refused or closed)"
    elif isinstance(exc, asyncio.TimeoutError):
        detail = f"no answer within {START_TIMEOUT_S:.0f} s"
    else:
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return PromoError(
        f"cannot reach Kafka at {settings.kafka_bootstrap} (PROMO_KAFKA_BOOTSTRAP): {detail}; "
        f"start it with `promo stack up`"
    )


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once: json.dumps with
# arguments builds a new encoder per call


def _encode(event: dict) -> bytes:
    text = _dumps(event)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogate from a jsonl line: replay it faithfully escaped
        return json.dumps(event, separators=(",", ":")).encode("ascii")


async def _start_producer(settings: Settings, producer_factory):
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    factory = producer_factory or AIOKafkaProducer
    producer = factory(
        **settings.kafka_client_kwargs(),
        acks="all",
        linger_ms=int(LINGER_S * 1000),
        max_batch_size=MAX_BATCH_BYTES,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    try:
        await asyncio.wait_for(producer.start(), START_TIMEOUT_S)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        await _stop_quietly(producer)
        raise _unreachable(settings, exc) from exc
    return producer


async def _stop_quietly(producer) -> None:
    try:
        await producer.stop()
    except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
        pass


async def _partitions_of(producer, settings: Settings, topic: str) -> list[int]:
    from aiokafka.errors import KafkaError

    from stream.cli import PromoError

    try:
        cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), START_TIMEOUT_S)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        raise _unreachable(settings, exc) from exc
    partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        raise PromoError(
            f"topic {topic} does not exist on {settings.kafka_bootstrap}; create the topics first "
            f"(`promo stack up` does, with PROMO_PARTITIONS={settings.partitions} partitions), "
            f"or set PROMO_TOPIC_PREFIX to the prefix in use"
        )
    return sorted(partitions)


async def produce_events(
    settings: Settings,
    events: Iterable[dict],
    rate: float | None = None,
    progress: bool = True,
    *,
    topic: str | None = None,
    producer_factory=None,
) -> dict:
    """Send ``events`` (event v1 dicts, in order) to the events topic, keyed by ``user_id``.

    Parameters
    ----------
    settings
        Connection and topic settings (``settings.kafka_client_kwargs()``, ``settings.topic_events``).
    events
        Any iterable of dicts; read lazily. A dict without a string ``user_id`` is sent without a key.
    rate
        Target events per second (a schedule, see :class:`Pacer`); ``None`` = as fast as possible.
    progress
        Write a progress line to stderr about once a second.
    topic
        Override the destination topic (default ``settings.topic_events``).
    producer_factory
        For tests: called like ``AIOKafkaProducer(**kwargs)``.

    Returns
    -------
    dict
        ``{"sent", "failed", "send_errors", "elapsed_s", "events_per_s", "topic", "partitions"}``; ``sent``
        counts messages acknowledged by the broker.

    Raises
    ------
    stream.cli.PromoError
        Broker unreachable or topic missing (before anything is sent).
    """
    from aiokafka.errors import KafkaError

    from stream.cli import PromoError
    from stream.faults import transient

    topic = topic or settings.topic_events
    pacer = Pacer(rate, 0.0)  # validates rate before connecting
    with _quiet_kafka_logs():
        producer = await _start_producer(settings, producer_factory)
        try:
            partition_of = _PartitionerCache(await _partitions_of(producer, settings, topic))
            sent = failed = queued = 0
            send_errors: list[str] = []
            in_flight: list[tuple[asyncio.Future, int]] = []
            builders: dict[int, Any] = {}
            first_append: dict[int, float] = {}

            def note(error: str) -> None:
                if len(send_errors) < MAX_REPORTED_ERRORS:
                    send_errors.append(error)

            async def settle(keep: int) -> None:
                nonlocal sent, failed
                while len(in_flight) > keep:
                    fut, n = in_flight.pop(0)
                    try:
                        await fut
                        sent += n
                    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                        if transient(exc):  # the broker is gone or not answering: stop, don't spin
                            raise _BrokerLost(exc) from exc
                        failed += n  # this batch was refused; carry on with the rest
                        note(f"{n} messages not delivered: {type(exc).__name__}: {exc}")

            async def ship(p: int) -> None:
                batch = builders.pop(p)
                first_append.pop(p, None)
                n = batch.record_count()
                if n:
                    try:
                        fut = await producer.send_batch(batch, topic, partition=p)
                    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                        raise _BrokerLost(exc) from exc
                    in_flight.append((fut, n))
                if len(in_flight) > MAX_IN_FLIGHT:
                    await settle(MAX_IN_FLIGHT // 2)

            async def ship_all() -> None:
                for p in list(builders):
                    await ship(p)

            t0 = time.monotonic()
            pacer.start = t0
            next_progress = t0 + 1.0
            loop_now = time.monotonic
            time_ns = time.time_ns
            n_partitions = len(partition_of.partitions)
            try:
                for i, event in enumerate(events):
                    now = loop_now()
                    wait = pacer.wait_s(i, now)
                    if wait > 0:
                        await ship_all()
                        await asyncio.sleep(wait)
                        now = loop_now()
                    user_id = event.get("user_id") if isinstance(event, dict) else None
                    key = user_id.encode("utf-8", "surrogatepass") if isinstance(user_id, str) else None
                    value = _encode(event)
                    p = partition_of(key) if key is not None else partition_of.partitions[i % n_partitions]
                    headers = [("sent_at_ns", str(time_ns()).encode())]
                    batch = builders.get(p)
                    if batch is None:
                        batch = builders[p] = producer.create_batch()
                        first_append[p] = now
                    if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                        await ship(p)
                        batch = builders[p] = producer.create_batch()
                        first_append[p] = now
                        if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                            builders.pop(p)
                            first_append.pop(p, None)
                            failed += 1
                            note(f"event {i + 1}: message of {len(value)} bytes is larger than the maximum batch "
                                 f"size {MAX_BATCH_BYTES} bytes; not sent")
                            continue
                    queued += 1
                    if first_append and now - min(first_append.values()) >= LINGER_S:
                        for q, t in list(first_append.items()):
                            if now - t >= LINGER_S:
                                await ship(q)
                    if progress and now >= next_progress:
                        elapsed = now - t0
                        print(
                            f"produce: {queued:,} queued, {sent:,} acknowledged, {queued / elapsed:,.0f} ev/s"
                            + (f", {failed:,} failed" if failed else ""),
                            file=sys.stderr, flush=True,
                        )
                        next_progress = now + 1.0
                await ship_all()
                await settle(0)
            except _BrokerLost as lost:
                exc = lost.__cause__ or lost
                detail = " ".join(str(exc).split())
                if detail in ("", type(exc).__name__):
                    detail = f"no answer within {REQUEST_TIMEOUT_MS / 1000:.0f} s"
                raise PromoError(
                    f"lost Kafka at {settings.kafka_bootstrap} (PROMO_KAFKA_BOOTSTRAP) after {sent:,} of {queued:,} "
                    f"events were acknowledged: {type(exc).__name__}: {detail}; no further events were sent. "
                    f"Once the broker is back, replay the same input: event ids are deterministic, so the engine "
                    f"ignores the events it already has"
                ) from None
            elapsed = time.monotonic() - t0
        finally:
            await _stop_quietly(producer)
    return {
        "sent": sent,
        "failed": failed,
        "send_errors": send_errors,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        "topic": topic,
        "partitions": len(partition_of.partitions),
    }


class _BrokerLost(Exception):
    """Internal: the broker stopped answering in the middle of a run."""


class _quiet_kafka_logs:
    """Silence aiokafka's per-retry log lines and 'Future exception was never retrieved' noise for one run:
    the producer reports failures itself, once, on one line."""

    def __enter__(self):
        self.log = logging.getLogger("aiokafka")
        self.level = self.log.level
        self.log.setLevel(logging.CRITICAL)
        loop = asyncio.get_running_loop()
        self.loop, self.handler = loop, loop.get_exception_handler()

        def handler(loop, context):
            exc = context.get("exception")
            if exc is not None and type(exc).__module__.startswith("aiokafka"):
                return
            if self.handler is not None:
                self.handler(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        return self

    def __exit__(self, *exc_info):
        self.log.setLevel(self.level)
        return False


def produce_file(
    settings: Settings, path: str | Path, fmt: str, rate: float | None = None, limit: int | None = None,
    *, progress: bool = True, producer_factory=None,
) -> dict:
    """Replay a file (``jsonl`` | ``rees46`` | ``taobao``) to the events topic; the report of ``promo produce``.

    Returns ``{"file", "format", "rows", "sent", "skipped", "failed", "errors", "errors_total", "elapsed_s",
    "events_per_s", "topic"}``: ``rows`` = source rows read (mappable or not), ``skipped`` = unmappable rows,
    ``errors`` = the first 20 of them as ``{"line", "error"}``, ``failed`` = events the broker did not take.
    """
    from stream.cli import PromoError
    from stream.sources import SourceError

    path = Path(path)
    if rate is not None and not rate > 0:
        raise PromoError(f"--rate must be > 0 events per second, got {rate}")
    if limit is not None and limit < 0:
        raise PromoError(f"--limit must be >= 0, got {limit}")
    if path.is_dir():
        raise PromoError(f"cannot read {path}: it is a directory, expected a {fmt} file")
    errors = _Errors()
    try:
        source = read_events(path, fmt, limit=limit, errors=errors)
    except FileNotFoundError:
        raise PromoError(f"cannot read {path}: no such file") from None
    except (OSError, SourceError) as exc:
        raise PromoError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None

    mapped = 0

    def counted():
        nonlocal mapped
        try:
            for event in source:
                mapped += 1
                yield event
        except (OSError, EOFError, zlib.error) as exc:  # a truncated .gz (EOFError) or a corrupt one (zlib.error)
            raise PromoError(f"cannot read {path} after {mapped + errors.total} rows "
                             f"({type(exc).__name__}: {exc}); the rows before were sent") from None

    result = asyncio.run(produce_events(settings, counted(), rate=rate, progress=progress,
                                        producer_factory=producer_factory))
    if errors.total and progress:
        first = errors[0]
        print(f"produce: {errors.total:,} unmappable rows skipped (first: line {first['line']}: {first['error']})",
              file=sys.stderr, flush=True)
    if result["failed"] and progress:
        print(f"produce: {result['failed']:,} events not delivered: {result['send_errors'][0]}",
              file=sys.stderr, flush=True)
    return {
        "file": str(path),
        "format": fmt,
        "rows": mapped + errors.total,
        "sent": result["sent"],
        "skipped": errors.total,
        "failed": result["failed"],
        "errors": list(errors),
        "errors_total": errors.total,
        "elapsed_s": result["elapsed_s"],
        "events_per_s": result["events_per_s"],
        "topic": result["topic"],
    }
