"""One batch of raw messages, from bytes to decisions sent. No Faust import: the agent only adapts to this.

Order of effects for a batch (at-least-once, nothing lost, nothing applied twice):

1. decode + validate each message; invalid ones are dead-lettered (record with reason, raw bytes,
   topic/partition/offset) and counted;
2. the engine applies the valid ones (de-duplicated by event id, one atomic commit per user); while Redis
   is unreachable the batch is retried, the worker reports not-ready, and nothing is acknowledged;
3. decisions are sent, and every send (DLQ and decisions) is awaited before the batch returns;
4. the decisions are marked as sent. Only then does the caller acknowledge the batch's offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

from models import failpoints
from models.engine import Engine
from models.privacy import pseudonymise
from stream import metrics as m
from stream.dlq import classify, dlq_record, retriable
from stream.settings import Settings
from stream.validation import Limits, decode_event

log = logging.getLogger("promo.worker")

# send(topic, key, value, headers) -> awaitable that completes when the broker acknowledged the record
SendFn = Callable[[str, bytes | None, bytes, list | None], Awaitable[Awaitable]]


@dataclass(slots=True)
class RawMessage:
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    recv_ns: int  # time.perf_counter_ns() at receipt


class Health:
    """What ``/readyz`` reports besides the consumer's own state."""

    def __init__(self) -> None:
        self.redis_ok = True
        self.last_error: str | None = None


class BatchHandler:
    def __init__(self, settings: Settings, engine: Engine, send: SendFn, health: Health | None = None,
                 fetch=None) -> None:
        """``fetch(ranges) -> {(topic, partition): [message value, ...]}`` reads offsets ``[start, end)`` back
        (:func:`stream.relearn.fetch_ranges`); without it, learning lost with a previous worker is only reported."""
        self.settings = settings
        self.engine = engine
        self.send = send
        self.health = health or Health()
        self.limits = Limits.from_settings(settings)
        self.topic_dlq = settings.topic_dlq
        self.topic_decisions = settings.topic_decisions
        self.pseudonym_key = (
            settings.pseudonymise_key.get_secret_value().encode() if settings.pseudonymise_key else None
        )
        self._seen_partitions: set[tuple[str, int]] = set()
        self.fetch = fetch
        self.relearn_max = settings.relearn_max_events

    def _check_learning_gap(self, msgs: list[RawMessage]) -> dict[tuple[str, int], tuple[int, int]]:
        """At a partition's first batch: events between the restored model snapshot and where consumption
        resumes were applied to Redis by a previous worker, but the in-memory models never learnt them (they
        come back only as duplicates). Returns those offset ranges."""
        restored = self.engine.restored_offsets
        gaps: dict[tuple[str, int], tuple[int, int]] = {}
        for msg in msgs:
            tp = (msg.topic, msg.partition)
            if tp in self._seen_partitions:
                continue
            self._seen_partitions.add(tp)
            covered = restored.get(tp)
            if covered is not None and msg.offset > covered:
                start = max(covered, msg.offset - self.relearn_max)
                if start < msg.offset:
                    gaps[tp] = (start, msg.offset)
                reading = self.fetch is not None and self.engine.learning is not None and start < msg.offset
                log.warning(
                    "%s[%d]: the model snapshot covers offsets below %d and consumption resumes at %d: the models "
                    "did not learn %d events (their effects in Redis are complete; only in-memory learning since "
                    "the last snapshot is missing; PROMO_SNAPSHOT_INTERVAL_S bounds it)%s",
                    msg.topic, msg.partition, covered, msg.offset, msg.offset - covered,
                    (f"; reading back the newest {msg.offset - start} (PROMO_RELEARN_MAX_EVENTS="
                     f"{self.relearn_max})" if start > covered else "; reading them back") if reading else "",
                )
        return gaps

    async def _relearn(self, gaps: dict[tuple[str, int], tuple[int, int]], now_ms: int) -> None:
        """Read the gaps back and let the models learn what depends on events alone (never fatal)."""
        learning = self.engine.learning
        if not gaps or self.fetch is None or learning is None or not hasattr(learning, "relearn"):
            return
        t0 = time.perf_counter()
        try:
            got = await self.fetch(gaps)
            events, seen = [], set()
            for values in got.values():
                for raw in values:
                    try:
                        ev = decode_event(raw, self.limits, now_ms)
                    except Exception:
                        continue  # dead-lettered by the worker that consumed it
                    if ev.event_id in seen:
                        continue
                    seen.add(ev.event_id)
                    if self.pseudonym_key is not None:
                        ev.user_id = pseudonymise(ev.user_id, self.pseudonym_key)
                    events.append(ev)
            events.sort(key=lambda e: e.ts)  # stable: partition order within a millisecond
            learning.relearn(events)
            wanted = sum(end - start for start, end in gaps.values())
            log.info("models re-learnt %d events of %d partition(s) (%d offsets) lost with the previous worker, "
                     "in %.0f ms", len(events), len(gaps), wanted, (time.perf_counter() - t0) * 1000)
        except Exception as exc:
            log.warning("could not read back the events the models missed (%s: %s); continuing without them",
                        type(exc).__name__, exc)

    def _mark_learned(self, msgs: list[RawMessage]) -> None:
        learned = self.engine.learned_offsets
        for msg in msgs:
            tp = (msg.topic, msg.partition)
            if msg.offset >= learned.get(tp, 0):
                learned[tp] = msg.offset + 1

    async def _retry(self, what: str, fn):
        """Run ``fn()`` until it succeeds; infrastructure errors are retried, anything else raises."""
        attempt = 0
        while True:
            try:
                out = await fn()
                if not self.health.redis_ok:
                    log.info("Redis is reachable again; resuming")
                self.health.redis_ok = True
                return out
            except Exception as exc:
                if not retriable(exc):
                    raise
                attempt += 1
                m.REDIS_ERRORS.inc()
                self.health.redis_ok = False
                self.health.last_error = f"{type(exc).__name__}: {exc}"
                if attempt == 1 or attempt % 20 == 0:
                    log.error(
                        "%s failed (%s); retrying every %.1fs, batch not acknowledged. Check Redis at %s "
                        "(PROMO_REDIS_URL)", what, self.health.last_error, self.settings.redis_retry_s,
                        self.settings.redis_url_safe,
                    )
                await asyncio.sleep(self.settings.redis_retry_s)  # back-off while Redis is down

    async def handle(self, msgs: list[RawMessage]) -> None:
        t0 = time.perf_counter_ns()
        now_ms = time.time_ns() // 1_000_000
        gaps = self._check_learning_gap(msgs)
        if gaps:  # before this batch teaches anything: labels of pending points must not expire first
            await self._relearn(gaps, now_ms)
        valid = []
        clear_ids: dict[str, str] = {}  # pseudonym -> clear user id, for this batch's outgoing decisions only
        msg_by_event: dict[str, RawMessage] = {}
        recv_by_event: dict[str, int] = {}
        acks: list[Awaitable] = []
        invalid: Counter = Counter()
        first_bad = None
        for msg in msgs:
            try:
                ev = decode_event(msg.value, self.limits, now_ms, msg.recv_ns)
            except Exception as exc:  # every exception class maps to a DLQ reason (stream.dlq.classify)
                reason, error = classify(exc)
                invalid[reason] += 1
                if first_bad is None:
                    first_bad = f"{msg.topic}[{msg.partition}]@{msg.offset} {reason}: {error}"
                record = dlq_record(msg.value, reason, error, msg.topic, msg.partition, msg.offset)
                acks.append(await self.send(self.topic_dlq, msg.key, record, None))
                continue
            if self.pseudonym_key is not None:
                clear = ev.user_id
                ev.user_id = pseudonymise(clear, self.pseudonym_key)
                clear_ids[ev.user_id] = clear
            valid.append(ev)
            recv_by_event.setdefault(ev.event_id, msg.recv_ns)
            msg_by_event.setdefault(ev.event_id, msg)
        if invalid:
            for reason, n in invalid.items():
                m.EVENTS_INVALID.labels(reason=reason).inc(n)
            log.warning(
                "%d invalid message(s) sent to %s (%s); first: %s",
                sum(invalid.values()), self.topic_dlq, dict(invalid), first_bad,
            )

        try:
            result = await self._retry("applying a batch to Redis",
                                       lambda: self.engine.process_batch(valid, learn=False))
        except Exception as exc:  # a bug or an event the models cannot handle: isolate it, never stop the partition
            log.exception("batch of %d events failed (%s); retrying event by event", len(valid), exc)
            result, poison = await self._one_by_one(valid)
            for ev, exc in poison:
                msg = msg_by_event[ev.event_id]
                reason, error = classify(exc)
                m.EVENTS_INVALID.labels(reason=reason).inc()
                log.error("event %s (%s[%d]@%d) failed in the engine and was dead-lettered: %s",
                          ev.event_id, msg.topic, msg.partition, msg.offset, error)
                record = dlq_record(msg.value, reason, error, msg.topic, msg.partition, msg.offset)
                acks.append(await self.send(self.topic_dlq, msg.key, record, None))

        decisions = result.to_send()
        for d in result.decisions:
            d.latency_ms = round((time.perf_counter_ns() - recv_by_event.get(d.trigger_event_id, t0)) / 1e6, 3)
            acks.append(await self._send_decision(d, clear_ids))
        for d in result.resend:
            acks.append(await self._send_decision(d, clear_ids))
        if acks:
            await asyncio.gather(*acks)  # durable on the broker before the batch is acknowledged
        sent_ns = time.perf_counter_ns()
        if decisions:
            failpoints.hit("sent")
            await self._retry("marking decisions as sent", lambda: self.engine.mark_sent(decisions))
            failpoints.hit("marked")
        # the models learn after the decisions are out: learning is not on the decision's critical path.
        # A crash before this line loses only this batch's learning, never state or decisions.
        await self._retry("learning from a batch", lambda: self.engine.learn(result))
        self._mark_learned(msgs)
        if result.new_events:
            failpoints.hit("learnt")

        self._observe(msgs, result, recv_by_event, t0, sent_ns, now_ms)

    async def _send_decision(self, d, clear_ids: dict[str, str]):
        """Send with the shop's own user id (the engine keeps only the pseudonym when pseudonymising)."""
        if clear_ids and d.user_id in clear_ids:
            from dataclasses import replace

            d = replace(d, user_id=clear_ids[d.user_id])
        return await self.send(self.topic_decisions, d.user_id.encode(), d.to_json(), None)

    async def _one_by_one(self, events):
        from models.engine import BatchResult

        total, poison = BatchResult(), []
        for ev in events:
            try:
                r = await self._retry("applying an event to Redis",
                                      lambda ev=ev: self.engine.process_batch([ev], learn=False))
            except Exception as exc:
                poison.append((ev, exc))
                continue
            total.merge(r)
        return total, poison

    def _observe(self, msgs, result, recv_by_event, t0, sent_ns, now_ms) -> None:
        # metrics ---------------------------------------------------------------------------------
        for t, n in result.applied.items():
            m.EVENTS.labels(type=t).inc(n)
        if result.duplicates:
            m.EVENTS_DUPLICATE.inc(result.duplicates)
        for d in result.decisions:
            m.DECISIONS.labels(offer_kind=d.offer.kind, group=d.group).inc()
            m.OFFER_DECISIONS.labels(offer_id=d.offer.offer_id, group=d.group).inc()
            m.DECISION_LATENCY.observe((sent_ns - recv_by_event.get(d.trigger_event_id, t0)) / 1e9)
        if result.resend:
            m.DECISIONS_RESENT.inc(len(result.resend))
        m.BATCH_SIZE.observe(len(msgs))
        m.BATCH_SECONDS.observe((time.perf_counter_ns() - t0) / 1e9)
        if result.new_events:
            m.LAST_EVENT.set(time.time())
            m.EVENT_LAG.set(max(0.0, now_ms - result.new_events[-1].ts) / 1000.0)
