"""The Faust app: one agent on the events topic and three web views. Thin on purpose.

The agent takes batches (``stream.take_events``), hands raw messages to :class:`stream.handler.BatchHandler`
and returns; Faust acknowledges a batch's offsets only after that, so a crash redelivers it (and the engine's
event-id de-duplication makes the redelivery harmless).

Web (on ``PROMO_WEB_HOST:PROMO_WEB_PORT``): ``/metrics`` (Prometheus), ``/livez`` (process up),
``/readyz`` (Redis answers PING, partitions assigned, not rebalancing; 503 otherwise).

Lost Redis state (:mod:`stream.epoch`): the worker starts only in the epoch its start-up check found or wrote,
and stops (one line, exit 2) as soon as Redis holds another one: on every new connection of the engine's
clients, and at every maintenance period.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import faust
from prometheus_client import generate_latest

from models.engine import Engine
from models.state import RedisStore
from stream import metrics as m
from stream.epoch import Epoch, EpochGuard, StateLostError, check_at_start, stop_worker
from stream.errors import PromoError
from stream.handler import BatchHandler, Health, RawMessage
from stream.settings import Settings

log = logging.getLogger("promo.worker")
VERSION = "0.1.0"


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
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
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
    guard = EpochGuard(settings, epoch, on_lost=stop_worker) if epoch is not None else None
    if engine is None:
        engine = build_engine(settings, guard)
    m.BUILD_INFO.labels(version=VERSION, model_version=engine.policy.model_version).set(1)
    state: dict = {"engine": engine, "epoch_guard": guard}
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

        handler = BatchHandler(settings, state["engine"], send, health,
                               fetch=lambda ranges: fetch_ranges(settings, ranges))
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            msgs = [
                RawMessage(
                    e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset,
                    recv.pop((e.message.partition, e.message.offset), None) or time.perf_counter_ns(),
                )
                for e in batch
            ]
            await handler.handle(msgs)

    async def is_ready() -> tuple[bool, dict]:
        eng = state["engine"]
        try:
            redis_ok = bool(eng) and await asyncio.wait_for(eng.store.ping(), 1.0)
        except Exception:
            redis_ok = False
        try:
            assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_events]
        except Exception:
            assigned = []
        rebalancing = bool(app.rebalancing)
        ok = redis_ok and bool(assigned) and not rebalancing
        m.READY.set(1 if ok else 0)
        m.ASSIGNED_PARTITIONS.set(len(assigned))
        return ok, {
            "ready": ok, "redis": redis_ok, "assigned_partitions": sorted(tp.partition for tp in assigned),
            "rebalancing": rebalancing, "last_error": health.last_error,
        }

    @app.timer(interval=settings.maintenance_interval_s)
    async def maintenance() -> None:
        """The epoch check, expiry sweep, budgets, quality gauges and a model snapshot. Lost state stops the
        worker; any other failure is logged and tried again next period."""
        try:
            await run_maintenance(settings, state["engine"], state["epoch_guard"])
        except StateLostError as exc:  # never "skipped": the next period would work on another state
            stop_worker(exc)
        except Exception as exc:  # Redis down: the agent's retry loop reports it; try again next period
            log.warning("maintenance skipped: %s: %s", type(exc).__name__, exc)

    forget_topic = app.topic(settings.topic_forget, key_type=bytes, value_type=bytes, internal=False)

    @app.agent(forget_topic, name="promo-forget")
    async def process_forget(stream):
        """``{"user_id": "..."}`` (or the bare id as text): delete the user's state, as ``promo forget`` does."""
        import json

        import redis

        from stream.dlq import dlq_record
        from stream.forget import engine_user_id, forget_everything, keys_removed

        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0)
        if guard is not None:  # a forget done on a Redis that lost the state would be undone by its restore
            guard.watch(client)
        async for ev in stream.events():
            raw, msg = ev.value, ev.message
            try:
                text = raw.decode("utf-8")
                uid = text.strip()
                if text.lstrip().startswith("{"):
                    uid = json.loads(text)["user_id"]
                if not isinstance(uid, str) or not uid or len(uid) > settings.max_string_len:
                    raise ValueError("user_id must be a non-empty string")
            except Exception as exc:
                m.EVENTS_INVALID.labels(reason="bad_value").inc()
                log.warning("invalid forget request %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc)
                await (await send(settings.topic_dlq, msg.key, dlq_record(
                    raw, "bad_value", f"forget request: {exc}", msg.topic, msg.partition, msg.offset), None))
                continue
            removed, items = await asyncio.to_thread(forget_everything, settings, client, engine_user_id(settings, uid))
            m.FORGOTTEN.inc()
            log.info("forgot a user (%d keys removed, %d item counts and %d pairs reduced) on request %s[%d]@%d",
                     keys_removed(removed), items["items"], items["pairs"], msg.topic, msg.partition, msg.offset)

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

    app.promo_state = state  # type: ignore[attr-defined]
    return app


def build_engine(settings: Settings, guard: EpochGuard | None = None) -> Engine:
    """The production engine: Redis state, Thompson policy with budgets and pacing, the learning core.

    With ``guard``, every Redis client of the engine checks the epoch on each new connection
    (:meth:`stream.epoch.EpochGuard.watch`)."""
    import redis

    from models.budget import RedisBudgetStore

    def watched(client):
        return guard.watch(client) if guard is not None else client

    learning = None
    if settings.learning:
        from models.item_store import RedisItemStore, SimilarityConfig
        from models.learning import LearningCore, load_snapshot

        item_store = RedisItemStore.from_url(settings.redis_url, prefix=settings.redis_prefix,
                                             config=SimilarityConfig(max_neighbours=settings.similarity_max_neighbours))
        watched(item_store.r)
        learning = LearningCore(item_store, horizon_h=settings.purchase_horizon_h)
    store = RedisStore.from_settings(settings)
    budget_store = RedisBudgetStore.from_settings(settings)
    watched(store.r)
    watched(budget_store.r)
    engine = Engine.from_settings(settings, store, learning=learning, budget_store=budget_store, export_metrics=True)
    client = watched(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0))
    try:
        if learning is not None:
            offsets = load_snapshot(client, learning, settings.redis_prefix)
            if offsets is not None:
                engine.restored_offsets = {k: v for k, v in offsets.items() if isinstance(k, tuple)}
                engine.watermark_ms = max(engine.watermark_ms, learning.watermark)
                log.info("learning core restored from its snapshot (covering %d partitions: %s)",
                         len(engine.restored_offsets),
                         ", ".join(f"{t}[{p}]<{o}" for (t, p), o in sorted(engine.restored_offsets.items())))
        restore_policy(client, engine, settings)
    finally:
        client.close()
    return engine


def policy_snapshot_key(settings: Settings) -> str:
    """Where versions before the shared posteriors kept the policy (read once, to carry it over)."""
    return f"{settings.redis_prefix}:snapshot:policy"


def restore_policy(client, engine: Engine, settings: Settings) -> None:
    """The policy's posteriors and the conversion counts from the store's hash, which every worker's commits add
    to. A store written by an earlier version has only the policy snapshot: it is loaded, and its cells are
    written where the hash has none (HSETNX: a worker already sharing wins)."""
    if not (engine.shares_policy or engine.shares_outcomes):
        return
    key = engine.store.policy_key
    state = client.hgetall(key)
    if engine.shares_policy and not state:
        blob = client.get(policy_snapshot_key(settings))
        if blob and hasattr(engine.policy, "load_bytes"):
            engine.policy.load_bytes(blob)
            pipe = client.pipeline(transaction=False)
            for f, v in engine.policy.state_fields().items():
                pipe.hsetnx(key, f, v)
            if engine.policy.n_learned:
                pipe.hsetnx(key, "n", engine.policy.n_learned)
            pipe.execute()
            log.info("policy %s carried over from its snapshot into %s (%d cells)", engine.policy.model_version,
                     key, len(engine.policy.cells))
            state = client.hgetall(key)
    engine.take_shared_state(state)
    if state and engine.shares_policy:
        log.info("policy %s posteriors read from %s: %d cells, %d outcomes learnt", engine.policy.model_version,
                 key, len(engine.policy.cells), engine.policy.n_learned)


async def run_maintenance(settings: Settings, engine: Engine, guard: EpochGuard | None = None) -> None:
    """One maintenance period; with ``guard``, first the epoch check (raises :class:`stream.epoch.StateLostError`
    before anything is written)."""
    if guard is not None:
        await guard.verify()
    apply_parked = getattr(engine.store, "apply_parked", None)
    if apply_parked is not None:
        n = await apply_parked()  # contributions a killed worker committed but did not apply
        if n:
            log.info("applied %d item-statistics contributions left parked by an earlier worker", n)
    await engine.load_policy()  # what other workers' commits taught the policy, even without own decisions
    now = engine.watermark_ms
    if now:
        await engine.sweep(now)  # closed decisions are counted by the engine's ConversionStats
        if engine.budget is not None:
            await engine.budget.sweep(now)
            await engine.budget.refresh(now)
    if engine.learning is not None:
        cap = getattr(engine.learning.store, "enforce_item_cap", None)
        if cap is not None and engine.learning.items_via_commit:
            await asyncio.to_thread(cap)  # the commits add items; the cap is kept here
        q = engine.learning.quality()
        for name, auc, ll in (("propensity", "auc", "logloss"), ("propensity_baseline", "base_auc", "base_logloss")):
            if q.get(auc) == q.get(auc):  # not NaN
                m.MODEL_AUC.labels(model=name).set(q[auc])
            if q.get(ll) == q.get(ll):
                m.MODEL_LOGLOSS.labels(model=name).set(q[ll])
    if time.monotonic() - getattr(engine, "_last_snapshot", 0.0) < settings.snapshot_interval_s:
        return
    engine._last_snapshot = time.monotonic()  # type: ignore[attr-defined]
    # serialise in the loop (the models are not touched concurrently), write from a thread
    blobs: dict[str, bytes] = {}
    if engine.learning is not None:
        from models.learning import snapshot_key

        # the offsets the models have learnt up to: partitions not consumed since the restore keep theirs
        covered = {**engine.restored_offsets, **engine.learned_offsets}
        blobs[snapshot_key(settings.redis_prefix)] = engine.learning.snapshot(covered)
    if hasattr(engine.policy, "to_bytes") and not engine.shares_policy:
        blobs[policy_snapshot_key(settings)] = engine.policy.to_bytes()
    if blobs:
        await asyncio.to_thread(_write_snapshots, settings, blobs, guard)
        m.MODEL_SNAPSHOTS.inc()


def _write_snapshots(settings: Settings, blobs: dict[str, bytes], guard: EpochGuard | None = None) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0)
    if guard is not None:
        guard.watch(client)  # written on a connection that found the worker's epoch
    try:
        pipe = client.pipeline(transaction=False)
        for key, blob in blobs.items():
            pipe.set(key, blob)
        pipe.execute()
    finally:
        client.close()


def _preflight(settings: Settings) -> Epoch:
    """Fail fast with one line when the broker or Redis is not there; create topics up front; check the Redis
    state's epoch (:func:`stream.epoch.check_at_start`: :class:`stream.epoch.StateLostError` when it was lost)."""
    import redis

    from stream.topics import ensure_topics

    try:
        ensure_topics(settings, timeout_s=10.0)
    except Exception as exc:
        raise PromoError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (PROMO_KAFKA_BOOTSTRAP): {type(exc).__name__} {exc}; "
            "start the embedded stack with `promo stack up`"
        ) from exc
    try:
        r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
        r.ping()
        r.close()
    except Exception as exc:
        raise PromoError(
            f"cannot reach Redis at {settings.redis_url_safe} (PROMO_REDIS_URL): {exc}; "
            "start the embedded stack with `promo stack up`"
        ) from exc
    epoch = check_at_start(settings)
    asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run above closed the default loop
    return epoch


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
        from models.learning import tune_gc

        tune_gc()  # freeze start-up objects, collect young objects less often (bench core: ~+25 % events/s)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr)
    worker.execute_from_commandline()
