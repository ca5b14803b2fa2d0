"""The Faust app: one agent on the events topic and three web views. Thin on purpose.

The agent takes batches (``stream.take_events``), hands raw messages to :class:`stream.handler.BatchHandler`
and returns; Faust acknowledges a batch's offsets only after that, so a crash redelivers it (and the engine's
event-id de-duplication makes the redelivery harmless).

An exception the handler lets out (:mod:`stream.faults`: not transient, not one event's fault) stops the worker
process at once (:func:`stop_worker`: one line on stderr, exit status :data:`EXIT_STOPPED`), before Faust could
acknowledge the batch in hand: Faust's ``take_events`` acknowledges a batch's events when the agent leaves it,
however it leaves it, and would otherwise restart the agent in-process with those events committed and lost.

Web (on ``PROMO_WEB_HOST:PROMO_WEB_PORT``): ``/metrics`` (Prometheus), ``/livez`` (process up), ``/readyz``
(200 when Redis and the broker answer, no batch step is retrying a transient error, partitions are assigned
and no rebalance is in progress; 503 otherwise, the body says which).

Lost Redis state (:mod:`stream.epoch`): the worker starts only in the epoch its start-up check found or wrote,
and stops (one line, exit 2) as soon as Redis holds another one: on every new connection of the engine's
clients, and at every maintenance period.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from typing import NoReturn

import faust
from prometheus_client import generate_latest

from models import failpoints
from models.engine import Engine
from models.state.engine_redis import RedisStore
from stream import forked, metrics as m
from stream.catalogue import report_version
from stream.epoch import EXIT_STATE_LOST, Epoch, EpochGuard, StateLostError, check_at_start
from stream.errors import PromoError
from stream.faults import Verdict, WorkerStop, classify_fault, describe
from stream.handler import BatchesFirst, BatchHandler, Outbox, RawMessage, observe_decisions
from stream.health import BrokerProbe, Health
from stream.http_views import register_http_views
from stream.logguard import LogGuard, fetch_probes, watch_broker_connections
from stream.lograte import quiet_kafka_client
from stream.settings import Settings

log = logging.getLogger("promo.worker")
VERSION = "0.1.0"

EXIT_STOPPED = 3
"""Exit status of a worker stopped by its error policy (a bug, lost state or log, too many dead letters)."""


def stop_worker(line: str, exc: BaseException | None = None, code: int = EXIT_STOPPED) -> NoReturn:
    """Stop this worker process now, without acknowledging anything more: ``line`` (what happened, what to do)
    as the CLI's one-line error on stderr, where the worker logs too, then exit ``code`` (:data:`EXIT_STOPPED`, or
    :data:`stream.epoch.EXIT_STATE_LOST` for lost Redis state). ``os._exit`` on purpose: a normal shutdown would
    let Faust acknowledge and commit the batch in hand, and this also runs inside Faust's timers and redis-py's
    connect callbacks, where an exception would be logged and retried; the group redelivers the batch instead."""
    if exc is not None and not isinstance(exc, (WorkerStop, StateLostError)):
        log.error("unexpected error in the worker (traceback for the developers):", exc_info=exc)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # a handler whose stream is closed or broken: the stop line below must still go out
            pass
    try:
        sys.stderr.write(f"promo: error: worker stopped: {line}\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def stop_line(exc: BaseException, where: str) -> str:
    """The one line for an exception that stops the worker."""
    if isinstance(exc, WorkerStop):
        return str(exc)
    return (f"{describe(exc)} while {where}; this is not a transient Redis or Kafka error nor one event's fault, "
            "so the batch was not acknowledged and the consumer group redelivers it; see the traceback above, "
            "fix the cause, restart the worker")


def learning_stop_line(exc: BaseException) -> str:
    """The one line for an error that stops the worker while a batch's learning ran behind the decisions."""
    if isinstance(exc, WorkerStop):
        return str(exc)
    return (f"{describe(exc)} while learning from a batch whose decisions were sent; this is not a transient "
            "Redis or Kafka error: its state and decisions are committed, and the restarted worker's models read "
            "it back from the log (stream.relearn); see the traceback above, fix the cause, restart the worker")


def _credentials(settings: Settings):
    proto = settings.kafka_security_protocol.upper()
    if proto == "PLAINTEXT":
        return None
    ssl_context = settings.kafka_client_kwargs().get("ssl_context")
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)


def set_fetch_max_wait(ms: int) -> None:
    """Make Faust's worker consumer wait at most ``ms`` for data per fetch.

    faust-streaming 0.15.3 passes a fixed ``fetch_max_wait_ms=1500`` to aiokafka
    (``AIOKafkaConsumerThread._create_worker_consumer``); the embedded broker answers a waiting fetch only
    when that time is up, so every event would wait up to 1.5 s. aiokafka reads the attribute when the
    consumer starts, so setting it on the fresh consumer is enough. Both versions are pinned.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    cls = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(cls._create_worker_consumer, "__promo_original__", cls._create_worker_consumer)

    def create_worker_consumer(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    create_worker_consumer.__promo_original__ = original  # type: ignore[attr-defined]
    cls._create_worker_consumer = create_worker_consumer


def base_app(settings: Settings) -> faust.App:
    """A Faust app with the engine's broker, consumer, producer and web settings and no agents.

    The worker and the benchmark's trivial reference agents (``load_tests/trivial_agents.py``) both start
    from this, so the comparison between them is fair.
    """
    set_fetch_max_wait(settings.fetch_max_wait_ms)
    # Faust makes a data directory even with in-memory tables (one level: the parent must exist); keep it beside
    # the stack's state, not in the working directory, where a checkout collected one per test worker
    faust_dirs = settings.state_dir / "faust"
    faust_dirs.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
        datadir=str(faust_dirs / "{conf.name}"),
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=False,  # `promo stack up` / ensure_topics create topics up front
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(1.0, settings.session_timeout_s / 5),
        broker_commit_interval=1.0,
        producer_acks=-1,
        producer_linger=0.0,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_in_thread=False,
    )


def make_app(settings: Settings, engine: Engine | None = None, epoch: Epoch | None = None) -> faust.App:
    """Build the worker's Faust app. ``engine`` defaults to the Redis-backed engine from ``settings``.

    ``epoch``: the one :func:`stream.epoch.check_at_start` returned; the app then stops the process when Redis
    holds another (``state["epoch_guard"]``, an :class:`stream.epoch.EpochGuard`; ``None`` without an epoch).
    """
    app = base_app(settings)
    health = Health()
    probe = BrokerProbe(settings)
    log_guard = LogGuard(lambda wanted: fetch_probes(settings.kafka_client_kwargs(), wanted),
                     load_marks=lambda: load_log_marks(settings, state["engine"]),
                     on_reset=lambda topic, partition: m.LOG_RESETS.inc())
    watch_broker_connections(log_guard.connection_lost)
    batches_first = BatchesFirst()  # the batch agent holds it while deciding; the maintenance timer's sweep waits

    async def on_recovered(component: str) -> None:
        """Redis answers again after failing: is it still the state this worker started in? (A restart breaks
        every connection and the epoch guard checks each new one; this catches what a reused connection hides.)"""
        if component == "redis" and epoch_guard is not None:
            await epoch_guard.verify()

    @app.on_partitions_assigned.connect
    async def on_assigned(app, assigned, **kwargs) -> None:  # verify every partition's log again
        log_guard.assigned()
    epoch_guard = (EpochGuard(settings, epoch, on_lost=lambda exc: stop_worker(str(exc), exc, EXIT_STATE_LOST))
                   if epoch is not None else None)
    if engine is None:
        engine = build_engine(settings, epoch_guard)
    m.BUILD_INFO.labels(version=VERSION, model_version=engine.policy.model_version).set(1)
    state: dict = {"engine": engine, "epoch_guard": epoch_guard, "health": health}
    events_topic = app.topic(settings.topic_events, key_type=bytes, value_type=bytes, internal=False)

    async def send(topic: str, key, value: bytes, headers):
        return await app.producer.send(topic, key, value, None, None, headers)

    @app.agent(events_topic, name="promo-events")
    async def process_events(stream):
        recv: dict[tuple[int, int], int] = {}  # (partition, offset) -> receipt time, popped per batch

        def stamp(value):
            ev = stream.current_event
            if ev is not None:
                recv[(ev.message.partition, ev.message.offset)] = time.perf_counter_ns()
            return value

        stream.add_processor(stamp)
        from stream.relearn import fetch_ranges

        await state["engine"].start()  # shared policy state and the clock, before the first decision
        handler = BatchHandler(settings, state["engine"], send, health,
                               fetch=lambda ranges: fetch_ranges(settings, ranges), guard=log_guard,
                               on_recovered=on_recovered,
                               save_marks=lambda fields: save_log_marks(settings, state["engine"], fields),
                               on_learning_failed=lambda exc: stop_worker(learning_stop_line(exc), exc),
                               batches_first=batches_first)
        try:
            async for batch in stream.take_events(settings.batch_max, within=settings.batch_within_s):
                msgs = [
                    RawMessage(
                        e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset,
                        recv.pop((e.message.partition, e.message.offset), None) or time.perf_counter_ns(),
                    )
                    for e in batch
                ]
                first = msgs[0]
                await run_to_completion(handler.handle(msgs), f"a batch of {len(msgs)} message(s) from "
                                        f"{first.topic}[{first.partition}]@{first.offset}", settings.shutdown_grace_s)
        finally:  # stopping: the last batch's learning, which runs behind its decisions, may still be running
            await finish_learning(handler, settings.shutdown_grace_s)

    def owned_partitions() -> set[int]:
        """The events topic's partitions this worker consumes (readiness; the sweep fires only their timers)."""
        try:
            return {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_events}
        except Exception:  # no consumer yet, or one being rebuilt (start-up, rebalance): nothing is assigned now
            return set()

    async def is_ready() -> tuple[bool, dict]:
        eng = state["engine"]
        try:
            redis_ok = bool(eng) and await asyncio.wait_for(eng.store.ping(), 1.0)
        except Exception:  # any failure of the probe (timeout, connection, auth) means "Redis not ready": 503
            redis_ok = False
        kafka_ok, kafka_error = await probe.check()
        assigned = owned_partitions()  # none while the consumer is missing or rebuilt: 503
        rebalancing = bool(app.rebalancing)
        errors = dict(health.failing)
        if not redis_ok:
            errors.setdefault("redis", f"no answer to PING at {settings.redis_url_safe}")
        if not kafka_ok:
            errors.setdefault("kafka", f"{kafka_error} (broker {settings.kafka_bootstrap})")
        ok = not errors and bool(assigned) and not rebalancing
        m.READY.set(1 if ok else 0)
        report_version(eng)
        m.ASSIGNED_PARTITIONS.set(len(assigned))
        for comp in ("redis", "kafka"):
            m.COMPONENT_UP.labels(component=comp).set(0 if comp in errors else 1)
        return ok, {
            "ready": ok, "redis": "redis" not in errors, "kafka": "kafka" not in errors, "errors": errors,
            "assigned_partitions": sorted(assigned), "rebalancing": rebalancing,
            "last_error": health.last_error,
            # the offer catalogue decided with (stream.catalogue), and one waiting for the batch in progress
            "catalogue_version": eng.catalogue_version, "catalogue_pending": eng.pending_catalogue_version,
        }

    maintenance_run = Maintenance(settings, engine, epoch_guard, send=send, owned=owned_partitions,
                                  batches_first=batches_first)
    report_version(engine)

    @app.task
    async def catalogue_on_sighup() -> None:
        """SIGHUP: publish this worker's PROMO_CATALOGUE_PATH as the catalogue of every worker (stream.catalogue)."""
        import signal

        reloads: set = set()  # the running reloads, referenced until done

        def on_sighup() -> None:
            task = asyncio.ensure_future(maintenance_run.catalogue.reload_file())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)

    @app.timer(interval=settings.maintenance_interval_s)
    async def maintenance() -> None:
        """The epoch check, expiry sweep, budgets, quality gauges and a model snapshot. A transient error skips
        this period (the next one tries again; every step is idempotent); lost Redis state and anything else
        stop the worker, as in the batch loop."""
        try:
            await maintenance_run.run()
            # a partition whose log was replaced while the consumer kept its old position gets no batch to check it
            await log_guard.check_idle([(settings.topic_events, p) for p in sorted(owned_partitions())],
                                       idle_s=2 * settings.maintenance_interval_s)
            if log_guard.dirty:
                log_guard.dirty = False
                await save_log_marks(settings, state["engine"], log_guard.encoded())
            maintenance_run.skipped = 0
        except StateLostError as exc:  # never "skipped": the next period would work on another state
            stop_worker(str(exc), exc, EXIT_STATE_LOST)
        except Exception as exc:  # every error gets the batch loop's verdict: transient skips a period, else stop
            fault = classify_fault(exc)
            if fault.verdict is not Verdict.RETRY:
                stop_worker(stop_line(exc, "running the maintenance timer (sweep, budgets, snapshot)"), exc)
            m.TRANSIENT_ERRORS.labels(component=fault.component or "redis", kind=fault.kind).inc()
            maintenance_run.skipped += 1
            if maintenance_run.skipped == 1 or maintenance_run.skipped % 20 == 0:  # a long outage: a few lines
                log.warning("maintenance skipped this period (%s, transient; %d period(s) in a row); next try in "
                            "%.0fs", describe(exc), maintenance_run.skipped, settings.maintenance_interval_s)

    forget_topic = app.topic(settings.topic_forget, key_type=bytes, value_type=bytes, internal=False)

    @app.agent(forget_topic, name="promo-forget")
    async def process_forget(stream):
        """``{"user_id": "..."}`` (or the bare id as text): delete the user's state, as ``promo forget`` does, and
        drop the user from this worker's in-memory models at once (other workers do at their next snapshot)."""
        import json

        import redis

        from stream.dlq import dlq_record
        from stream.forget import engine_user_id, forget_everything, keys_removed
        from stream.validation import has_control_character

        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        if epoch_guard is not None:  # a forget done on a Redis that lost the state would be undone by its restore
            epoch_guard.watch(client)
        # a forget waiting out Redis trouble shows on /readyz like a batch does: the same Health
        retry = BatchHandler(settings, state["engine"], send, health)._retry

        async def forget_one(raw: bytes | None, msg) -> None:
            try:
                text = raw.decode("utf-8")
                uid = text.strip()
                if text.lstrip().startswith("{"):
                    uid = json.loads(text)["user_id"]
                if not isinstance(uid, str) or not uid or len(uid) > settings.max_string_len:
                    raise ValueError(f"user_id must be a string of 1..{settings.max_string_len} characters")
                # as an event's user_id (stream.validation): a lone surrogate cannot name a Redis key (encoding it
                # failed and stopped the worker, on every restart), and ids carry no control characters
                uid.encode("utf-8")
                if has_control_character(uid):
                    raise ValueError("user_id contains a control character (U+0000-U+001F or U+007F); ids may not")
            except Exception as exc:  # the error names no id: json and codec messages carry positions only
                m.EVENTS_INVALID.labels(reason="bad_value").inc()
                log.warning("invalid forget request %s[%d]@%d: %s: %s", msg.topic, msg.partition, msg.offset,
                            type(exc).__name__, exc)
                outbox = Outbox(send)
                await outbox.put(settings.topic_dlq, msg.key, dlq_record(
                    raw, "bad_value", f"forget request: {type(exc).__name__}: {exc}", msg.topic, msg.partition,
                    msg.offset))
                await outbox.flush(retry)
                return
            uid = engine_user_id(settings, uid)

            async def attempt():
                try:
                    return await asyncio.to_thread(forget_everything, settings, client, uid)
                except PromoError as exc:  # the user's events kept arriving meanwhile: run it again
                    raise TimeoutError(str(exc)) from exc

            # a forget request is never dropped: transient Redis trouble is retried, anything else stops the worker
            removed, items = await retry(f"forgetting a user on request {msg.topic}[{msg.partition}]@{msg.offset}",
                                         attempt)
            learning = state["engine"].learning
            held = learning.forget_users([uid]) if learning is not None else 0
            m.raise_to(m.FORGOTTEN, items["forgotten_total"])
            log.info("forgot a user on request %s[%d]@%d: %s (%d keys removed, %d item counts and %d pairs reduced "
                     "in %d calls of at most %.1f ms, %s in this worker's models)", msg.topic, msg.partition,
                     msg.offset, "found" if items["counted"] else "nothing held", keys_removed(removed),
                     items["items"], items["pairs"], items["calls"], items["max_call_ms"],
                     "held" if held else "not")

        async for ev in stream.events():
            msg = ev.message
            await run_to_completion(forget_one(ev.value, msg), f"a forget request {msg.topic}[{msg.partition}]"
                                    f"@{msg.offset}", settings.shutdown_grace_s)

    @app.page("/metrics")
    async def metrics_view(web, request):
        await is_ready()  # refresh the readiness gauges on every scrape
        return web.bytes(generate_latest(m.REGISTRY), content_type="text/plain; version=0.0.4")

    @app.page("/livez")
    async def livez_view(web, request):
        return web.json({"live": True})

    @app.page("/readyz")
    async def readyz_view(web, request):
        ok, body = await is_ready()
        return web.json(body, status=200 if ok else 503)

    register_http_views(app, settings, state)  # /users/<id>, /decisions/<id>: only with PROMO_HTTP_VIEWS_TOKEN
    app.promo_state = state  # type: ignore[attr-defined]
    return app


async def run_to_completion(work, what: str, grace_s: float) -> None:
    """Await ``work`` (a batch, a forget request); every way out but success stops the worker before Faust
    acknowledges what was taken: Faust acknowledges an agent's events when it leaves them, however it leaves.

    On cancellation (SIGTERM, Ctrl-C) the work gets ``grace_s`` to finish: if it does, the normal shutdown
    acknowledges it; if not (say Redis is down and it is retrying), the process exits without acknowledging it.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done:
                log.warning("stopping with %s still in progress after %.0fs: it is not acknowledged, the consumer "
                            "group redelivers it", what, grace_s)
                logging.shutdown()
                os._exit(0)
        if not task.cancelled() and task.exception() is not None:
            stop_worker(stop_line(task.exception(), f"processing {what}"), task.exception())
        raise  # the work completed: let Faust shut down normally (it acknowledges it)
    except BaseException as exc:
        stop_worker(stop_line(exc, f"processing {what}"), exc)


async def finish_learning(handler: BatchHandler, grace_s: float) -> None:
    """On the way out: give the learning still running behind the last batch ``grace_s`` to end. If it does not
    (Redis down), nothing is lost but that batch's in-memory learning, which the restarted worker reads back
    (:mod:`stream.relearn`)."""
    try:
        await asyncio.wait_for(handler.drain(), grace_s)
    except asyncio.TimeoutError:
        log.warning("stopping before the last batch's learning ended (%.0fs); the restarted worker's models read it "
                    "back from the log", grace_s)
    except Exception as exc:  # the worker stops either way; the error is the learning's, reported here
        log.error("the last batch's learning failed while stopping (%s); the restarted worker's models read it back "
                  "from the log", describe(exc))


def log_marks_key(settings: Settings) -> str:
    """Redis hash of the last message each partition's worker processed (:mod:`stream.logguard`)."""
    return f"{settings.redis_prefix}:logmarks"


async def load_log_marks(settings: Settings, engine: Engine) -> dict:
    return LogGuard.decoded(await engine.store.r.hgetall(log_marks_key(settings)))


async def save_log_marks(settings: Settings, engine: Engine, fields: dict[str, str]) -> None:
    if fields:
        await engine.store.r.hset(log_marks_key(settings), mapping=fields)


def build_engine(settings: Settings, guard: EpochGuard | None = None) -> Engine:
    """The production engine: Redis state, Thompson policy with budgets and pacing, the learning core.

    With ``guard``, every Redis client of the engine checks the epoch on each new connection
    (:meth:`stream.epoch.EpochGuard.watch`)."""
    import redis

    from models.state.budget_redis import RedisBudgetStore
    from stream.catalogue import startup_catalogue

    def watched(client):
        return guard.watch(client) if guard is not None else client

    learning = None
    if settings.learning:
        from models.state.item_redis import RedisItemStore
        from models.state.item_store import SimilarityConfig
        from models.learning.core import WORKER_LABELS_PER_BATCH, LearningCore
        from models.learning.snapshot import load_snapshot

        item_store = RedisItemStore.from_url(settings.redis_url, prefix=settings.redis_prefix,
                                             config=SimilarityConfig(max_neighbours=settings.similarity_max_neighbours))
        watched(item_store.r)
        item_store.on_new_client = watched  # the asynchronous client of the batch's reads, made in the loop
        learning = LearningCore(item_store, horizon_h=settings.purchase_horizon_h, seed=settings.seed,
                                labels_per_batch=WORKER_LABELS_PER_BATCH, max_users=settings.model_max_users,
                                max_pending=settings.model_max_users)
    store = RedisStore.from_settings(settings)
    budget_store = RedisBudgetStore.from_settings(settings)
    watched(store.r)
    watched(budget_store.r)
    client = watched(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0))
    try:
        # the catalogue applied at runtime if any: a restarted worker decides as its peers do (stream.catalogue)
        cat = startup_catalogue(settings, client)
        engine = Engine.from_settings(settings, store, learning=learning, budget_store=budget_store,
                                      metrics=m.PrometheusSink(), catalogue=cat.catalogue,
                                      catalogue_version=cat.version)
        if learning is not None:
            offsets = load_snapshot(client, learning, settings.redis_prefix)
            if offsets is not None:
                engine.restored_offsets = {k: v for k, v in offsets.items() if isinstance(k, tuple)}
                log.info("learning core restored from its snapshot (covering %d partitions: %s)",
                         len(engine.restored_offsets),
                         ", ".join(f"{t}[{p}]<{o}" for (t, p), o in sorted(engine.restored_offsets.items())))
    finally:
        client.close()
    return engine


class Maintenance:
    """What the worker's maintenance timer does every ``PROMO_MAINTENANCE_INTERVAL_S``: the epoch check, parked
    contributions, shared counters, the event-time clock, the expiry sweep, budgets, the item cap, quality gauges,
    and every ``PROMO_SNAPSHOT_INTERVAL_S`` a model snapshot. Every step is idempotent: a period that fails
    (transient) is simply done again by the next."""

    def __init__(self, settings: Settings, engine: Engine, guard: EpochGuard | None = None, send=None,
                 owned=None, batches_first=None) -> None:
        self.settings, self.engine, self.guard = settings, engine, guard
        # how the sweep's decisions (timer-fired, re-sent) reach the decisions topic, and which partitions' timers
        # this worker fires (None: all, a worker alone on the topic)
        self.send, self.owned = send, owned
        # the batch handler's stream.handler.BatchesFirst: the sweep's chunks wait for a batch's decisions (None:
        # one turn of the loop between chunks)
        self.batches_first = batches_first
        self.last_snapshot = 0.0  # time.monotonic() of the last snapshot
        self.skipped = 0  # periods skipped in a row (transient errors)
        from stream.catalogue import CatalogueWatcher

        self.catalogue = CatalogueWatcher(settings, engine)  # the catalogue applied at runtime (stream.catalogue)

    async def run(self) -> None:
        """One period; with the epoch guard, first the epoch check (raises :class:`stream.epoch.StateLostError`
        before anything is written)."""
        engine, settings = self.engine, self.settings
        if self.guard is not None:
            await self.guard.verify()
        await self.catalogue.check()  # before the budget refresh below: a new gate reads its spend this period
        await engine.start()  # the shared policy state and clock, once (the agent may not have started yet)
        n = await engine.store.apply_parked()  # contributions a killed worker committed but did not apply
        if n:
            log.info("applied %d item-statistics contributions left parked by an earlier worker", n)
        # every forget path counts in one shared key: the cluster-wide total (max across workers, not sum)
        m.raise_to(m.FORGOTTEN, await engine.store.forgotten_total())
        m.raise_to(m.CONTRIBUTIONS_CAPPED, engine.store.contributions_capped)
        await engine.load_policy()  # what other workers' commits taught the policy, even without own decisions
        # the event-time clock over every worker's partitions; idle partitions stop holding it back (models.clock)
        now = await engine.sync_clock()
        if now:
            await self.sweep(now)
            if engine.budget is not None:
                await engine.budget.sweep(now)
                await engine.budget.refresh(now)
        if engine.learning is not None:
            if engine.learning.items_via_commit:  # the commits add items; the item cap is kept here
                await asyncio.to_thread(engine.learning.store.enforce_item_cap)
            q = engine.learning.quality()
            for name, auc, ll in (("propensity", "auc", "logloss"),
                                  ("propensity_baseline", "base_auc", "base_logloss")):
                if q.get(auc) == q.get(auc):  # not NaN
                    m.MODEL_AUC.labels(model=name).set(q[auc])
                if q.get(ll) == q.get(ll):
                    m.MODEL_LOGLOSS.labels(model=name).set(q[ll])
        if time.monotonic() - self.last_snapshot >= settings.snapshot_interval_s:
            self.last_snapshot = time.monotonic()
            await self.snapshot()

    async def sweep(self, now: int) -> None:
        """The expiry sweep (closed decisions are counted by the engine's OutcomeStats), and the decisions it made
        (timers) or found unsent (a crash): sent, acknowledged, then marked as sent. A failure leaves them stored
        and unsent: the next period sends them again, with the same ids."""
        t0 = time.perf_counter_ns()
        engine = self.engine
        between = self.batches_first.gap if self.batches_first is not None else None
        result = await engine.sweep(now, owned=self.owned() if self.owned is not None else None, between=between)
        decisions = result.to_send()
        if decisions:
            try:
                if self.send is None:
                    raise RuntimeError(f"{len(decisions)} decision(s) of the sweep and nothing to send them with "
                                       "(Maintenance built without send)")
                outbox = Outbox(self.send)
                for d in decisions:
                    d.latency_ms = round((time.perf_counter_ns() - t0) / 1e6, 3)  # the sweep's, no event's receipt
                    await outbox.put(self.settings.topic_decisions, d.user_id.encode(), d.to_json(),
                                     fault_point="decision_ack")

                async def once(what, fn, component):  # a failed ack fails this period; the next sends again
                    await fn()

                await outbox.flush(once)
                failpoints.hit("timer_sent")
                await engine.delivered(result)
            finally:  # not in flight any more: marked as sent, or the next sweep sends them again
                engine.inflight.difference_update(d.trigger_event_id for d in decisions)
        observe_decisions(result)
        m.SWEEP_SECONDS.observe((time.perf_counter_ns() - t0) / 1e9)

    async def snapshot(self) -> None:
        """The learning core's snapshot, without users whose profile is gone, with the offsets it covers; then
        those users are dropped from the in-memory models too.

        Which users' profiles are gone is checked where the snapshot is written (one pipelined ``EXISTS`` per held
        user, a second of client CPU for 100k users): by the forked child, off this event loop."""
        engine = self.engine
        learning = engine.learning
        if learning is None:
            return
        if self.batches_first is not None:  # the fork stops the loop for 10-20 ms: not while a batch is on its way
            await self.batches_first.gap()
        # the offsets the models have learnt up to: partitions not consumed since the restore keep theirs
        covered = {**engine.restored_offsets, **engine.learned_offsets}
        if forked.available():
            # serialised and written by a child forked here: it holds the models as they are at this line, with
            # the offsets above, while this process goes on deciding (pickling holds the GIL for its whole
            # length, so a thread would not free the loop: stream/forked.py)
            def render(gone: list[str]) -> bytes:  # in the child: its own copy of the models
                learning.forget_users(gone)
                return learning.snapshot(covered)

            gone = await forked.run_forked(
                lambda: _write_snapshot(self.settings, learning.held_users(), render, self.guard))
        else:
            from models.learning.snapshot import without_users

            blob = learning.snapshot(covered)  # serialised in the loop (nothing touches the models meanwhile)
            gone = await asyncio.to_thread(_write_snapshot, self.settings, learning.held_users(),
                                           lambda gone: without_users(blob, gone)[0], self.guard)
        m.MODEL_SNAPSHOTS.inc()
        dropped = learning.forget_users(gone) if gone else 0  # as the snapshot did: forgotten users stay gone
        if dropped:
            log.info("dropped %d users whose profile is gone (forgotten or expired) from the in-memory models, as "
                     "from the snapshot", dropped)


def _write_snapshot(settings: Settings, held: set[str], render, guard: EpochGuard | None = None) -> list[str]:
    """Write the model snapshot of the users ``held`` (``render(gone)``: its bytes without the users ``gone``)
    without the users whose profile is gone, forgotten while it is written included
    (:func:`models.learning.snapshot.save_snapshot_fenced`); returns the users it left out."""
    import redis

    from models.learning.snapshot import save_snapshot_fenced
    from models.state.engine_redis import user_profile_key

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
    if guard is not None:
        guard.watch(client)  # written on a connection that found the worker's epoch
    try:
        return save_snapshot_fenced(client, held, render, functools.partial(user_profile_key, settings.redis_prefix),
                                    settings.redis_prefix)[1]
    finally:
        client.close()


def _check_web_port(settings: Settings) -> None:
    """One line, before anything starts, when the web port is taken (another worker on this host?), instead of
    the traceback Faust's web server gives when it fails to bind after the worker has started."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in settings.web_host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            sock.bind((settings.web_host, settings.web_port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise PromoError(f"cannot bind the web port {settings.web_host}:{settings.web_port}: {exc.strerror}; "
                                 "check PROMO_WEB_HOST and PROMO_WEB_PORT") from None
            raise PromoError(f"web port {settings.web_port} on {settings.web_host} is taken (another worker on this "
                             "host?); give each worker its own PROMO_WEB_PORT") from None


def _preflight(settings: Settings) -> Epoch:
    """Fail fast with one line when the broker or Redis is not there; create topics up front; check the Redis
    state's epoch (:func:`stream.epoch.check_at_start`: :class:`stream.epoch.StateLostError` when it was lost)."""
    import redis

    from stream.topics import ensure_topics

    _check_web_port(settings)
    try:
        ensure_topics(settings, timeout_s=10.0)
    except Exception as exc:  # any failure to reach or create the topics (network, auth, timeout, a broker error)
        # at start-up, before anything is consumed: one line and a non-zero exit is the whole verdict
        raise PromoError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (PROMO_KAFKA_BOOTSTRAP): {type(exc).__name__} {exc}; "
            "start the embedded stack with `promo stack up`"
        ) from exc
    try:
        r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
        r.ping()
        r.close()
    except Exception as exc:  # any failure to reach Redis (connection, auth, timeout, bad URL), at start-up as above
        raise PromoError(
            f"cannot reach Redis at {settings.redis_url_safe} (PROMO_REDIS_URL): {exc}; "
            "start the embedded stack with `promo stack up`"
        ) from exc
    epoch = check_at_start(settings)
    asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run above closed the default loop
    return epoch


STOP_MARGIN_S = 3.0
"""On SIGTERM / Ctrl-C the whole stop takes at most ``PROMO_SHUTDOWN_GRACE_S`` plus this (the final commit and
leaving the group after the batch in progress), see :class:`BoundedStopWorker`."""


class BoundedStopWorker(faust.Worker):
    """Faust's worker with a bounded stop: the first SIGTERM / SIGINT starts a watchdog that ends the process
    ``stop_deadline_s`` later if Faust's shutdown has not by then.

    Faust waits up to 60 s for each service to stop, and the Kafka consumer's stop waits for its group coordinator,
    which retries a broker that is gone until then (seen: 62 s after ``promo stack down``). Ending the process
    early acknowledges nothing that was not: offsets are committed only by Faust's commit, so what was not
    committed is redelivered by the consumer group (and event-id de-duplication makes that harmless)."""

    stop_deadline_s: float = 8.0
    brokers: list[tuple[str, int]] = []
    """Bootstrap addresses: when none of them accepts a connection after the signal, nothing more can be
    committed, and the worker exits then instead of at the deadline (``promo stack down`` before the worker)."""

    def _schedule_shutdown(self, signal) -> None:  # mode.Worker: every stop signal comes through here
        if not getattr(self, "_promo_watchdog", None):
            import threading

            self._promo_watchdog = threading.Thread(target=self._watch_stop, args=(signal,), daemon=True,
                                                    name="promo-stop-watchdog")
            self._promo_watchdog.start()
        super()._schedule_shutdown(signal)

    def _broker_refuses(self) -> bool:
        import socket

        for host, port in self.brokers:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return False
            except ConnectionRefusedError:
                continue
            except OSError:  # a timeout or an unreachable host: not a clear "gone", keep waiting
                return False
        return bool(self.brokers)

    def _watch_stop(self, signal) -> None:
        deadline = time.monotonic() + self.stop_deadline_s
        refused = 0
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            refused = refused + 1 if self._broker_refuses() else 0
            if refused >= 2:  # twice, 0.5 s apart
                return self._exit_now(signal, f"the broker at {', '.join(f'{h}:{p}' for h, p in self.brokers)} "
                                              "refuses connections, so nothing more can be committed")
        failing = getattr(self.app, "promo_state", {}).get("health")
        failing = dict(failing.failing) if failing is not None else {}
        self._exit_now(signal, f"it did not stop within {self.stop_deadline_s:.0f}s ("
                       + ("; ".join(f"{k}: {v}" for k, v in sorted(failing.items())) if failing
                          else "the broker or Redis does not answer?") + ")")

    @staticmethod
    def _exit_now(signal, why: str) -> None:
        log.warning("stopping the worker after %s: %s; exiting now without committing anything more, the consumer "
                    "group redelivers what was not committed", getattr(signal, "name", signal), why)
        logging.shutdown()
        os._exit(0)


def run_worker(settings: Settings) -> None:
    """Run one worker in the foreground until SIGTERM / Ctrl-C."""
    from models import failpoints

    # start-up lines (the epoch check, the snapshot restore) in the format of Faust's worker, which replaces this
    # handler when it sets up logging
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="[%(asctime)s] [%(process)s] [%(levelname)s]: %(message)s")
    epoch = _preflight(settings)
    failpoints.arm(settings.failpoint)  # tests only (PROMO_FAILPOINT); unarmed in production
    app = make_app(settings, epoch=epoch)
    if settings.learning:
        from models.learning.core import tune_gc

        tune_gc()  # freeze start-up objects, collect young objects less often (bench core: ~+25 % events/s)
    quiet_kafka_client()  # the Kafka client's retry loops log one line per kind every 30 s, not every 100 ms
    worker = BoundedStopWorker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                               stdout=sys.stderr)
    worker.stop_deadline_s = settings.shutdown_grace_s + STOP_MARGIN_S
    worker.brokers = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]))
                      for h in settings.kafka_bootstrap.split(",")]
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        # a crash outside the batch loop (seen: aiokafka's fetcher after a broker restart, "KafkaError:
        # AssertionError()"): Faust shuts down and exits 1 after its traceback; end it with the one line every
        # other stop has. Nothing more was acknowledged, the group redelivers the rest.
        reason = getattr(worker, "crash_reason", None)
        if exc.code not in (0, None) and reason is not None:
            stop_worker(f"the Faust worker crashed outside the batch loop ({describe(reason)}); nothing more was "
                        "acknowledged and the consumer group redelivers the rest; restart the worker (see the "
                        "traceback above)", code=EXIT_STOPPED)
        raise
