"""One batch of raw messages, from bytes to decisions sent. No Faust import: the agent only adapts to this.

Order of effects for a batch (at-least-once, nothing lost, nothing applied twice):

1. decode + validate each message; invalid ones are dead-lettered (record with reason, raw bytes,
   topic/partition/offset) and counted;
2. the engine applies the valid ones (de-duplicated by event id, one atomic commit per user);
3. decisions are sent, and every send (DLQ and decisions) is acknowledged by the broker before the batch returns;
4. what the decisions' ids still hold on other campaigns is released and the decisions are marked as sent
   (:meth:`models.engine.Engine.delivered`). Then the caller may acknowledge the batch's offsets;
5. item contributions are applied and the models taught (:meth:`models.engine.Engine.learn`) behind the
   decisions: with ``PROMO_LEARN_BEHIND`` (the default) in a task that runs while the next batch is taken and
   decided, at most one batch behind and in batch order (the next batch's learning waits for it: backpressure).
   Nothing of the batch's state depends on it: the commits hold its effects, a contribution not applied stays
   parked for the maintenance timer, and models that did not learn it (a crash meanwhile) read it back from the
   log at the restart (:mod:`stream.relearn`). A learning error that is not transient stops the worker.

Every exception has a verdict (:mod:`stream.faults`): a transient Redis or Kafka error is retried with back-off,
the step where it happened resumes (a batch whose commit failed half-way continues with the users not committed,
:class:`models.batch.BatchProgress`; a record whose ack failed is sent again), ``/readyz`` answers 503 meanwhile
(:class:`stream.health.Health`) and nothing is acknowledged. Any other exception while applying the batch is
pinned down by applying the events not yet committed one by one: an event that fails alone against a healthy
store is dead-lettered (``internal_error``), unless too many do (:class:`stream.faults.DlqLimit`). Anything else
propagates: the agent stops the worker process without acknowledging the batch, and the group redelivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

from models import failpoints
from models.batch import BatchProgress, BatchResult
from models.engine import Engine
from models.events import Event
from models.privacy import pseudonymise
from models.triggers.base import is_timer_trigger_id
from stream import metrics as m
from stream.dlq import INTERNAL_ERROR, classify, dlq_record
from stream.faults import Backoff, DlqLimit, Fault, Verdict, WorkerStop, classify_fault, describe
from stream.health import Health
from stream.logguard import LogGuard
from stream.settings import Settings
from stream.validation import Limits, decode_event

log = logging.getLogger("promo.worker")

# send(topic, key, value, headers) -> awaitable that completes when the broker acknowledged the record
SendFn = Callable[[str, bytes | None, bytes, list | None], Awaitable[Awaitable]]

__all__ = ["BatchesFirst", "BatchHandler", "Health", "Outbox", "RawMessage"]


class BatchesFirst:
    """Background work of the worker's event loop (the expiry sweep's chunks) runs in the gaps between batches.

    The handler holds :meth:`batch` from a batch's start until its decisions are sent; the sweep awaits
    :meth:`gap` before each chunk after the first. Without it, a chunk started while a batch is on its way runs
    its synchronous steps (parsing, planning, packing) between every two of the batch's round trips, and the
    decisions wait for all of them: with a chunk, only for the one the batch met on its arrival.

    ``max_wait_s`` bounds the wait, so a saturated worker still sweeps (at worst a chunk beside every batch).

    >>> import asyncio
    >>> first = BatchesFirst(max_wait_s=1.0)
    >>> async def demo():
    ...     order = []
    ...     async def a_batch():
    ...         with first.batch():
    ...             await asyncio.sleep(0.01)  # its round trips
    ...             order.append("decisions sent")
    ...     task = asyncio.ensure_future(a_batch())
    ...     await asyncio.sleep(0)  # the batch starts
    ...     await first.gap()
    ...     order.append("sweep chunk")
    ...     await task
    ...     return order
    >>> asyncio.run(demo())
    ['decisions sent', 'sweep chunk']
    """

    def __init__(self, max_wait_s: float = 0.25) -> None:
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {max_wait_s!r}")
        self.max_wait_s = float(max_wait_s)
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def batch(self):
        """Held by the handler while a batch is on its way to its decisions' send."""
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    async def gap(self) -> None:
        """Return once no batch is on its way (a batch ready to start goes first), or after ``max_wait_s``."""
        await asyncio.sleep(0)
        if self._idle.is_set():
            return
        try:
            await asyncio.wait_for(self._idle.wait(), self.max_wait_s)
        except asyncio.TimeoutError:
            pass  # batches back to back: this chunk goes beside the next one


@dataclass(slots=True)
class RawMessage:
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    recv_ns: int  # time.perf_counter_ns() at receipt


@dataclass(slots=True)
class _Record:
    topic: str
    key: bytes | None
    value: bytes
    fault_point: str | None = None  # a failpoint that may fail this record's ack (tests only)


class Outbox:
    """The records one batch sends (DLQ records, decisions): sent at once, every ack awaited by :meth:`flush`.

    A record whose send or ack fails with a transient Kafka error is sent again (only that record) after a
    back-off, through ``retry``; any other failure propagates. So a batch is acknowledged only when all its
    records are on the broker, and a failed ack never makes the agent drop or skip anything.
    """

    def __init__(self, send: SendFn) -> None:
        self.send = send
        self._inflight: list[tuple[_Record, Awaitable | BaseException]] = []

    async def put(self, topic: str, key: bytes | None, value: bytes, fault_point: str | None = None) -> None:
        rec = _Record(topic, key, value, fault_point)
        self._inflight.append((rec, await self._start(rec)))

    async def _start(self, rec: _Record) -> Awaitable | BaseException:
        try:
            fut = await self.send(rec.topic, rec.key, rec.value, None)
        except Exception as exc:  # the producer refused it at once (no metadata, closed, ...): decided in flush
            return exc
        if rec.fault_point is not None and failpoints.fault(rec.fault_point):
            from aiokafka.errors import KafkaTimeoutError

            return KafkaTimeoutError(f"failpoint {rec.fault_point} (PROMO_FAILPOINT): this ack fails")
        return fut

    async def _acks(self) -> list[tuple[_Record, BaseException]]:
        """Wait for every record in flight; the ones that failed, with their errors."""
        inflight, self._inflight = self._inflight, []
        futs = [f for _, f in inflight if not isinstance(f, BaseException)]
        results = iter(await asyncio.gather(*futs, return_exceptions=True))
        failed = []
        for rec, f in inflight:
            res = f if isinstance(f, BaseException) else next(results)
            if isinstance(res, BaseException):
                failed.append((rec, res))
        return failed

    async def flush(self, retry) -> None:
        """Return when every record is acknowledged; ``retry(what, fn, component)`` runs the re-sends."""

        async def attempt() -> None:
            failed = await self._acks()
            if failed:
                for rec, _ in failed:  # sent again now; the retry loop waits and calls attempt() again
                    self._inflight.append((rec, await self._start(rec)))
                raise failed[0][1]

        if self._inflight:
            await retry(f"sending {len(self._inflight)} record(s) to the broker", attempt, "kafka")


@dataclass(slots=True)
class _Decoded:
    """A batch after decoding: its valid events and what the later steps need to know about them."""

    valid: list[Event] = field(default_factory=list)
    clear_ids: dict[str, str] = field(default_factory=dict)  # pseudonym -> clear id, for outgoing decisions only
    # keyed by (user id as the engine sees it, event id), the engine's identity of an event: two users' events may
    # share an id (a shop's per-store counters), and a poison event must be dead-lettered as its own message
    msg_by_event: dict[tuple[str, str], RawMessage] = field(default_factory=dict)
    recv_by_event: dict[tuple[str, str], int] = field(default_factory=dict)  # receipt time, for decision latency
    decoder_failed: list[tuple[RawMessage, bytes]] = field(default_factory=list)  # DLQ records, after the limit


class BatchHandler:
    def __init__(self, settings: Settings, engine: Engine, send: SendFn, health: Health | None = None,
                 fetch=None, on_recovered=None, guard: LogGuard | None = None, save_marks=None,
                 on_learning_failed=None, batches_first: BatchesFirst | None = None) -> None:
        """``fetch(ranges) -> {(topic, partition): [message value, ...]}`` reads offsets ``[start, end)`` back
        (:func:`stream.relearn.fetch_ranges`); without it, learning lost with a previous worker is only reported.
        ``on_recovered(component)``: awaited when a component that was failing answers again (the worker checks
        that Redis still holds its state there); it may raise :class:`stream.faults.WorkerStop`.
        ``guard``: checks the broker's log before a partition is consumed (:mod:`stream.logguard`);
        ``save_marks(fields)`` persists its marks when a replaced log was accepted. ``on_learning_failed(exc)``:
        called when learning behind the decisions fails with an error that is not transient (the worker stops
        there); without it the error is raised by the next batch, before it is acknowledged. ``batches_first``: held
        from a batch's start until its decisions are sent, so the expiry sweep runs between batches
        (:class:`BatchesFirst`)."""
        self.settings = settings
        self.batches_first = batches_first or BatchesFirst()
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
        self.on_recovered = on_recovered
        self.guard = guard
        self.save_marks = save_marks
        self.relearn_max = settings.relearn_max_events
        self.dlq_limit = DlqLimit(settings.dlq_max_ratio, settings.dlq_window, settings.dlq_max_consecutive)
        self.learn_behind = settings.learn_behind
        self._learning: asyncio.Task | None = None  # the previous batch's learning, while it runs
        self.on_learning_failed = on_learning_failed

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
        if not gaps or self.fetch is None or learning is None:
            return
        t0 = time.perf_counter()
        try:
            got = await self.fetch(gaps)
            events, seen = [], set()
            for values in got.values():
                for raw in values:
                    try:
                        ev = decode_event(raw, self.limits, now_ms)
                    except Exception:  # any decoding or validation error: the event is invalid, and the worker
                        continue  # that consumed it dead-lettered it; relearning only re-teaches the models
                    if ev.event_id in seen:
                        continue
                    seen.add(ev.event_id)
                    if self.pseudonym_key is not None:
                        ev.user_id = pseudonymise(ev.user_id, self.pseudonym_key)
                    events.append(ev)
            events.sort(key=lambda e: e.ts)  # stable: partition order within a millisecond
            learning.relearn(events, watermark=self.engine.clock.time_ms)
            wanted = sum(end - start for start, end in gaps.values())
            log.info("models re-learnt %d events of %d partition(s) (%d offsets) lost with the previous worker, "
                     "in %.0f ms", len(events), len(gaps), wanted, (time.perf_counter() - t0) * 1000)
        except Exception as exc:  # any: re-learning only restores model quality, per-user state is exact without it
            log.warning("could not read back the events the models missed (%s: %s); continuing without them",
                        type(exc).__name__, exc)

    def _mark_learned(self, msgs: list[RawMessage]) -> None:
        learned = self.engine.learned_offsets
        for msg in msgs:
            tp = (msg.topic, msg.partition)
            if msg.offset >= learned.get(tp, 0):
                learned[tp] = msg.offset + 1

    async def _retry(self, what: str, fn, component: str = "redis"):
        """Run ``fn()`` until it succeeds. Transient errors (:func:`stream.faults.classify_fault`) are retried with
        back-off while ``/readyz`` answers 503 for the component; anything else raises. ``component`` is whom a
        transient error that names none (a bare timeout) is blamed on."""
        backoff = Backoff(self.settings.redis_retry_s, self.settings.retry_max_s)
        failing: set[str] = set()
        attempt = 0
        while True:
            try:
                out = await fn()
            except Exception as exc:  # each one classified: transient ones retried here, the rest re-raised
                fault = classify_fault(exc)
                if fault.verdict is not Verdict.RETRY:
                    raise
                attempt += 1
                failing.add(self._transient(what, fault, exc, attempt, component))
                await asyncio.sleep(backoff.next())
                continue
            await self._recovered(what, failing, attempt, backoff, component)
            return out

    async def _recovered(self, what: str, failing: set[str], attempt: int, backoff: Backoff, default: str) -> None:
        """The components that failed during ``what`` answer again: ``/readyz`` recovers each, and
        :attr:`on_recovered` checks it (the epoch guard reads its marker from Redis). A transient error of that
        check is retried as the step's own errors are, with the component failing meanwhile (it was a step of the
        batch in hand: stopping the worker for it would break the retry promise); anything else raises."""
        todo = sorted(failing)
        while todo:
            comp = todo[0]
            if self.health.recover(comp):
                log.info("%s answers again after %d failed attempt(s) at %s; resuming", comp, attempt, what)
                if self.on_recovered is not None:
                    try:
                        await self.on_recovered(comp)
                    except Exception as exc:  # classified as the step's own: transient retried, the rest raised
                        fault = classify_fault(exc)
                        if fault.verdict is not Verdict.RETRY:
                            raise
                        attempt += 1
                        blamed = self._transient(f"checking {comp} after {what}", fault, exc, attempt, default)
                        self.health.fail(comp, describe(exc))  # checked again once it answers
                        if blamed not in todo:
                            todo.append(blamed)
                        await asyncio.sleep(backoff.next())
                        continue
            todo.pop(0)

    def _transient(self, what: str, fault: Fault, exc: BaseException, attempt: int, default: str) -> str:
        comp = fault.component or default
        m.TRANSIENT_ERRORS.labels(component=comp, kind=fault.kind).inc()
        if comp == "redis":
            m.REDIS_ERRORS.inc()
        self.health.fail(comp, describe(exc))
        if attempt == 1 or attempt % 20 == 0:
            where = (f"check Redis at {self.settings.redis_url_safe} (PROMO_REDIS_URL)" if comp == "redis" else
                     f"check the broker at {self.settings.kafka_bootstrap} (PROMO_KAFKA_BOOTSTRAP)")
            log.error("%s failed (%s, transient: %s %s, attempt %d); retrying with back-off, /readyz answers 503 "
                      "and the batch is not acknowledged meanwhile; %s", what, describe(exc), comp, fault.kind,
                      attempt, where)
        return comp

    async def handle(self, msgs: list[RawMessage]) -> None:
        """One batch, in the order of effects of the module docstring; returns when it may be acknowledged."""
        t0 = time.perf_counter_ns()
        now_ms = time.time_ns() // 1_000_000
        with self.batches_first.batch():  # the expiry sweep's chunks wait for the decisions' send (BatchesFirst)
            await self._check_log(msgs)
            gaps = self._check_learning_gap(msgs)
            if gaps:  # before this batch teaches anything: labels of pending points must not expire first
                await self._relearn(gaps, now_ms)
            outbox = Outbox(self.send)
            batch = await self._decode(msgs, now_ms, outbox)
            result = await self._apply(batch, outbox)
            decided_ns = time.perf_counter_ns()
            if result.new_events and failpoints.fault("bug"):
                raise RuntimeError("failpoint bug (PROMO_FAILPOINT): an unexpected error after the users' commits")
            decisions = result.to_send()
            for d in result.decisions:
                received_ns = batch.recv_by_event.get((d.user_id, d.trigger_event_id), t0)
                d.latency_ms = round((time.perf_counter_ns() - received_ns) / 1e6, 3)
                await outbox.put(*self._decision_record(d, batch.clear_ids), fault_point="decision_ack")
            for d in result.resend:
                await outbox.put(*self._decision_record(d, batch.clear_ids), fault_point="decision_ack")
            await outbox.flush(self._retry)  # durable on the broker before the batch is acknowledged
            sent_ns = time.perf_counter_ns()
        if decisions:
            failpoints.hit("sent")
            await self._retry("releasing stale reservations and marking decisions as sent",
                              lambda: self.engine.delivered(result))
            failpoints.hit("marked")
        delivered_ns = time.perf_counter_ns()
        await self._mark_log(msgs)
        self._observe(msgs, result, batch.recv_by_event, t0, sent_ns, now_ms)
        for stage, a, b in (("decide", t0, decided_ns), ("send", decided_ns, sent_ns),
                            ("delivered", sent_ns, delivered_ns)):
            m.BATCH_STAGE_SECONDS.labels(stage=stage).observe((b - a) / 1e9)
        # the models learn after the decisions are out: learning is not on the decision's critical path
        await self.drain()  # the previous batch's, first: models learn batches in order, one at most behind
        if self.learn_behind:
            self._learning = asyncio.create_task(self._learn(result, msgs))
            self._learning.add_done_callback(self._learning_done)
        else:
            await self._learn(result, msgs)

    async def _learn(self, result: BatchResult, msgs: list[RawMessage]) -> None:
        """Item contributions applied, models taught. A crash before the end loses only this batch's learning,
        never state or decisions (the module docstring, step 5)."""
        t0 = time.perf_counter_ns()
        await self._retry("learning from a batch", lambda: self.engine.learn(result))
        self._mark_learned(msgs)
        if result.new_events:
            failpoints.hit("learnt")
        m.BATCH_STAGE_SECONDS.labels(stage="learn").observe((time.perf_counter_ns() - t0) / 1e9)

    async def drain(self) -> None:
        """Wait for the previous batch's learning (if it runs behind); its error, if any, is raised here."""
        task, self._learning = self._learning, None
        if task is not None:
            await task

    def _learning_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None or self.on_learning_failed is None:
            return
        if self._learning is task:  # reported here; drain() must not raise it again
            self._learning = None
        self.on_learning_failed(task.exception())

    async def _check_log(self, msgs: list[RawMessage]) -> None:
        """Before anything of a partition is applied: is it still the log this engine read? (:mod:`stream.logguard`)"""
        if self.guard is None:
            return
        first: dict[tuple[str, int], int] = {}
        for msg in msgs:
            first.setdefault((msg.topic, msg.partition), msg.offset)
        await self._retry("checking the broker's log", lambda: self.guard.check(first), "kafka")

    async def _mark_log(self, msgs: list[RawMessage]) -> None:
        """The batch is done: remember each partition's last message (saved at once after a replaced log)."""
        if self.guard is None:
            return
        last = {(msg.topic, msg.partition): msg for msg in msgs}  # a partition's messages come in order
        for msg in last.values():
            self.guard.processed(msg.topic, msg.partition, msg.offset, msg.key, msg.value)
        if self.guard.urgent and self.save_marks is not None:
            await self._retry("saving the log marks", lambda: self.save_marks(self.guard.encoded()))
            self.guard.urgent = False

    async def _decode(self, msgs: list[RawMessage], now_ms: int, outbox: Outbox) -> "_Decoded":
        """Decode and validate; invalid input goes to the DLQ at once (the decoder's own failures wait for the
        DLQ limit); valid events get their partition (the event-time clock) and, pseudonymising, the pseudonym."""
        batch = _Decoded()
        invalid: Counter = Counter()
        first_bad = None
        for msg in msgs:
            try:
                ev = decode_event(msg.value, self.limits, now_ms, msg.recv_ns)
                ev.partition = msg.partition  # the engine's event-time clock keeps a watermark per partition
            except Exception as exc:  # every exception class maps to a DLQ reason (stream.dlq.classify)
                reason, error = classify(exc)
                invalid[reason] += 1
                if first_bad is None:
                    first_bad = f"{msg.topic}[{msg.partition}]@{msg.offset} {reason}: {error}"
                record = dlq_record(msg.value, reason, error, msg.topic, msg.partition, msg.offset)
                if reason == INTERNAL_ERROR:  # the decoder failed, not the input: counts against the DLQ limit
                    batch.decoder_failed.append((msg, record))
                else:
                    await outbox.put(self.topic_dlq, msg.key, record)
                continue
            if self.pseudonym_key is not None:
                clear = ev.user_id
                ev.user_id = pseudonymise(clear, self.pseudonym_key)
                batch.clear_ids[ev.user_id] = clear
            batch.valid.append(ev)
            batch.recv_by_event.setdefault((ev.user_id, ev.event_id), msg.recv_ns)
            batch.msg_by_event.setdefault((ev.user_id, ev.event_id), msg)
        if invalid:
            for reason, n in invalid.items():
                m.EVENTS_INVALID.labels(reason=reason).inc(n)
            log.warning("%d invalid message(s) sent to %s (%s); first: %s", sum(invalid.values()), self.topic_dlq,
                        dict(invalid), first_bad)
        return batch

    async def _apply(self, batch: "_Decoded", outbox: Outbox) -> BatchResult:
        """The engine applies the valid events; transient errors are retried, anything else is pinned down event
        by event (:meth:`_isolate`) and the events that fail alone are dead-lettered, within the DLQ limit."""
        progress = BatchProgress()
        try:
            result = await self._retry("applying a batch to Redis",
                                       lambda: self.engine.process_batch(batch.valid, learn=False, progress=progress))
            poison: list[tuple[Event, BaseException]] = []
        except WorkerStop:
            raise
        except Exception as exc:  # not transient: find the event(s) it belongs to
            if progress.pending is None:  # failed before the engine took up any event: no event's fault
                log.error("applying a batch failed before any of its %d events was taken up (%s): not an event's "
                          "fault, so the worker stops without acknowledging the batch", len(batch.valid),
                          describe(exc))
                raise
            result, poison = await self._isolate(progress, exc)
        # raises WorkerStop before any of it is dead-lettered
        failed = len(batch.decoder_failed)
        self.dlq_limit.check(len(batch.valid) + failed, len(poison) + failed)
        for msg, record in batch.decoder_failed:
            await outbox.put(self.topic_dlq, msg.key, record)
        for ev, exc in poison:
            msg = batch.msg_by_event[(ev.user_id, ev.event_id)]
            reason, error = classify(exc)
            m.EVENTS_INVALID.labels(reason=reason).inc()
            log.error("event %s (%s[%d]@%d) fails in the engine when applied alone against a healthy store, so it "
                      "is dead-lettered: %s; after a fix, send it back from %s", ev.event_id, msg.topic,
                      msg.partition, msg.offset, error, self.topic_dlq)
            await outbox.put(self.topic_dlq, msg.key,
                             dlq_record(msg.value, reason, error, msg.topic, msg.partition, msg.offset))
        return result

    def _decision_record(self, d, clear_ids: dict[str, str]) -> tuple[str, bytes, bytes]:
        """Topic, key and value of a decision, with the shop's own user id (the engine keeps only the pseudonym
        when pseudonymising)."""
        # a timer-fired decision always carries the pseudonym: the sweep, which sends it when no event of the
        # user is at hand (and sends it again after a crash), has no clear id to give it
        if clear_ids and d.user_id in clear_ids and not is_timer_trigger_id(d.trigger_event_id):
            d = replace(d, user_id=clear_ids[d.user_id])
        return self.topic_decisions, d.user_id.encode(), d.to_json()

    async def _isolate(self, progress: BatchProgress, exc: BaseException
                       ) -> tuple[BatchResult, list[tuple[Event, BaseException]]]:
        """The batch failed with a non-transient error: apply the events not yet committed one at a time (in order
        per user). An event that fails alone while the store answers is poison; the rest are applied."""
        remaining = progress.remaining()
        log.error("applying a batch failed (%s); applying its %d events not yet committed one by one to find the "
                  "event(s) it belongs to", describe(exc), len(remaining), exc_info=exc)
        progress.pending = {}  # what was committed stays in the result; finish the batch's own bookkeeping
        result = await self._retry("finishing a batch", lambda: self.engine.process_batch([], learn=False,
                                                                                          progress=progress))
        poison: list[tuple[Event, BaseException]] = []
        for ev in remaining:
            sub = BatchProgress()
            backoff = Backoff(self.settings.redis_retry_s, self.settings.retry_max_s)
            healthy_before = False  # the store answered before this attempt
            while True:
                try:
                    r = await self._retry(f"applying event {ev.event_id} alone",
                                          lambda ev=ev, sub=sub: self.engine.process_batch([ev], learn=False,
                                                                                           progress=sub))
                except WorkerStop:
                    raise
                except Exception as exc1:  # deterministic only if the store answered throughout: see below
                    healthy_now = await self._store_answers()
                    if healthy_before and healthy_now:  # failed alone against a store that answered throughout
                        poison.append((ev, exc1))
                        break
                    if not healthy_now:  # not deterministic: the store failed meanwhile
                        self._transient(f"applying event {ev.event_id} alone",
                                        Fault(Verdict.RETRY, "redis", "connection"), exc1, 1, "redis")
                        await asyncio.sleep(backoff.next())
                    healthy_before = healthy_now
                    continue
                result.merge(r)
                break
        if self.health.recover("redis"):
            log.info("Redis answers again; resuming")
        return result, poison

    async def _store_answers(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.engine.store.ping(), 2.0))
        except Exception:  # a health probe: any failure to answer (timeout, connection, error reply) is "no"
            return False

    def _observe(self, msgs, result, recv_by_event, t0, sent_ns, now_ms) -> None:
        # metrics ---------------------------------------------------------------------------------
        for t, n in result.applied.items():
            m.EVENTS.labels(type=t).inc(n)
        if result.duplicates:
            m.EVENTS_DUPLICATE.inc(result.duplicates)
        observe_decisions(result)
        for d in result.decisions:
            m.DECISION_LATENCY.observe((sent_ns - recv_by_event.get((d.user_id, d.trigger_event_id), t0)) / 1e9)
        m.BATCH_SIZE.observe(len(msgs))
        m.BATCH_SECONDS.observe((time.perf_counter_ns() - t0) / 1e9)
        if result.new_events:
            m.LAST_EVENT.set(time.time())
            m.EVENT_LAG.set(max(0.0, now_ms - result.new_events[-1].ts) / 1000.0)


def observe_decisions(result: BatchResult) -> None:
    """The counters of what a batch or a sweep decided and sent: per offer kind, offer, trigger; re-sent; timers
    that fired nothing."""
    for d in result.decisions:
        m.DECISIONS.labels(offer_kind=d.offer.kind, group=d.group).inc()
        m.OFFER_DECISIONS.labels(offer_id=d.offer.offer_id, group=d.group).inc()
        m.TRIGGER_DECISIONS.labels(trigger=d.trigger, offer_kind=d.offer.kind).inc()
    if result.resend:
        m.DECISIONS_RESENT.inc(len(result.resend))
    for name in result.timers_dropped:
        m.TIMERS_DROPPED.labels(trigger=name).inc()
