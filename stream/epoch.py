"""Lost Redis state is detected: an epoch marker for the engine's Redis prefix.

Redis holds all of the engine's state (profiles, de-duplication markers, budgets and caps, open decisions, item
statistics, model snapshots); the broker holds how far the consumer group has read. When Redis comes back empty
(restarted without its append-only file, flushed, replaced behind the same URL) and the group's committed offsets
stay, nothing in the data says so: a worker would go on from those offsets on an empty state, and budgets, caps
and de-duplication would start again from zero. The marker makes it visible.

``<prefix>:epoch`` (:func:`epoch_key`) holds a small JSON document (:class:`Epoch`: a random id, when and why it
was written), without TTL. Only a worker's start-up check (:func:`check_at_start`) writes it, with ``SET NX``:

* marker present: the worker runs in that epoch (whatever the offsets);
* marker missing, no committed offset beyond 0 on the events topic for the worker's consumer group
  (``Settings.app_id``, Faust's group id): a fresh install, the worker writes a new marker;
* marker missing, committed offsets: the state was lost. ``PROMO_ON_STATE_LOSS=stop`` (the default):
  :class:`StateLostError`, one line, exit 2, nothing written; ``reinit``: an ERROR line,
  ``promo_state_reinitialised_total``, a new marker, and the worker runs on the empty state from the committed
  offsets.

While it runs, a worker compares the marker with the epoch it started in: :meth:`EpochGuard.verify` (one ``GET``;
the maintenance timer calls it every period, the batch loop whenever Redis answers again after an error) and
:meth:`EpochGuard.watch`, which checks every new connection of a client to Redis before its first command, so
nothing is written to a Redis that restarted empty under the worker. A marker missing or different stops the
worker whatever ``PROMO_ON_STATE_LOSS`` says: its in-memory models, caches and offsets belong to the old epoch,
and its restart applies the rules above.

Nothing else writes the marker: not ``promo stack up`` (it cannot know whether the group has read events; a
marker written on a Redis that restarted empty would hide the loss from the next worker), not ``promo forget``,
the demo or the benchmarks (their workers do). A store written by a version before the marker, whose group has
committed offsets, looks lost: ``PROMO_ON_STATE_LOSS=reinit`` for one start adopts it (``reinit`` deletes nothing,
it writes the marker).

Examples
--------
>>> e = Epoch.new("fresh", now_ms=1_700_000_000_000)
>>> Epoch.from_bytes(e.to_bytes()) == e
True
>>> start_action(None, committed_partitions=0, on_state_loss="stop")
<StartAction.CREATE: 'create'>
>>> start_action(None, committed_partitions=3, on_state_loss="stop")
<StartAction.REFUSE: 'refuse'>
>>> start_action(e, committed_partitions=3, on_state_loss="stop")
<StartAction.RUN: 'run'>
>>> runtime_problem(e, e.to_bytes()) is None
True
>>> runtime_problem(e, None)
'no longer holds the epoch marker'
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal, NoReturn

from stream.errors import PromoError
from stream.settings import Settings

log = logging.getLogger("promo.worker")

EXIT_STATE_LOST = 2
"""Exit status of a worker that stopped because the state was lost (the same as every ``promo: error``)."""

OnStateLoss = Literal["stop", "reinit"]


class StateLostError(PromoError):
    """The engine's Redis state is gone (the epoch marker is missing or changed). Fatal: the worker stops.

    Never retried and never dead-lettered: it is a property of the store, not of an event, and going on would
    apply events to an empty state.
    """


def epoch_key(prefix: str) -> str:
    """Where the marker of the engine's state under ``prefix`` lives.

    >>> epoch_key("promo")
    'promo:epoch'
    """
    return f"{prefix}:epoch"


@dataclass(frozen=True, slots=True)
class Epoch:
    """One life of the engine's Redis state: from the marker's writing until the state is lost."""

    id: str
    created_ms: int
    reason: str  # "fresh": the first start on an empty prefix; "reinit": written after a detected loss

    @classmethod
    def new(cls, reason: str, now_ms: int | None = None) -> "Epoch":
        return cls(uuid.uuid4().hex, time.time_ns() // 1_000_000 if now_ms is None else now_ms, reason)

    def to_bytes(self) -> bytes:
        return json.dumps({"id": self.id, "created_ms": self.created_ms, "reason": self.reason},
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> "Epoch":
        """Parse a marker; ``ValueError`` when it is not one the engine wrote.

        >>> Epoch.from_bytes(b'{"id":"ab","created_ms":0,"reason":"fresh"}').id
        'ab'
        >>> Epoch.from_bytes(b"1")
        Traceback (most recent call last):
        ...
        ValueError: not an epoch marker: b'1'
        """
        try:
            doc = json.loads(raw)
            return cls(str(doc["id"]), int(doc["created_ms"]), str(doc.get("reason", "")))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not an epoch marker: {raw[:80]!r}") from exc

    def describe(self) -> str:
        """``<id> (<reason>, created <UTC time>)`` for messages.

        >>> Epoch("0123456789abcdef", 0, "fresh").describe()
        '0123456789ab (fresh, created 1970-01-01T00:00:00Z)'
        """
        created = datetime.fromtimestamp(self.created_ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{self.id[:12]} ({self.reason}, created {created})"


class StartAction(enum.Enum):
    RUN = "run"  # the marker is there: run in its epoch
    CREATE = "create"  # a fresh install: write the first marker
    REINIT = "reinit"  # the state is lost and the operator asked to start over: write a new marker, loudly
    REFUSE = "refuse"  # the state is lost: stop


def start_action(marker: Epoch | None, committed_partitions: int, on_state_loss: OnStateLoss) -> StartAction:
    """What a starting worker does, from the marker it read and how many partitions of the events topic its
    group has committed an offset beyond 0 on (read only when the marker is missing).

    >>> start_action(None, 0, "reinit"), start_action(None, 12, "reinit")
    (<StartAction.CREATE: 'create'>, <StartAction.REINIT: 'reinit'>)
    """
    if marker is not None:
        return StartAction.RUN
    if committed_partitions == 0:
        return StartAction.CREATE
    return StartAction.REINIT if on_state_loss == "reinit" else StartAction.REFUSE


def runtime_problem(expected: Epoch, raw: bytes | str | None) -> str | None:
    """``None`` when the marker ``raw`` (a ``GET`` answer) is still ``expected``, else what happened to it.

    >>> e = Epoch("aaaa", 0, "fresh")
    >>> runtime_problem(e, Epoch("bbbb", 5, "reinit").to_bytes())
    'holds epoch bbbb (reinit, created 1970-01-01T00:00:00Z) instead of aaaa (fresh, created 1970-01-01T00:00:00Z)'
    >>> runtime_problem(e, b"garbage")
    "holds b'garbage' instead of the epoch marker"
    """
    if raw is None:
        return "no longer holds the epoch marker"
    try:
        found = Epoch.from_bytes(raw)
    except ValueError:
        return f"holds {raw[:80]!r} instead of the epoch marker"
    if found.id != expected.id:
        return f"holds epoch {found.describe()} instead of {expected.describe()}"
    return None


def redis_facts(info: dict) -> str:
    """What Redis's ``INFO`` says about how it lost its state (uptime, AOF, keys), for the error line.

    >>> redis_facts({"uptime_in_seconds": 12, "aof_enabled": 0, "db0": {"keys": 3}})
    'Redis up 12 s, AOF off, 3 keys'
    >>> redis_facts({})
    ''
    """
    facts = []
    if "uptime_in_seconds" in info:
        facts.append(f"Redis up {int(info['uptime_in_seconds'])} s")
    if "aof_enabled" in info:
        facts.append("AOF on" if int(info["aof_enabled"]) else "AOF off")
    if "uptime_in_seconds" in info:
        keys = sum(int(v.get("keys", 0)) for k, v in info.items() if k.startswith("db") and isinstance(v, dict))
        facts.append(f"{keys} keys")
    policy = str(info.get("maxmemory_policy", ""))
    if policy.startswith("allkeys"):
        facts.append(f"maxmemory-policy {policy} evicts keys without TTL such as the marker")
    return ", ".join(facts)


_WHAT_TO_DO = ("Restore Redis from its append-only file or a backup and start the worker again, or start over "
               "on the empty state deliberately with PROMO_ON_STATE_LOSS=reinit (budgets, caps and "
               "de-duplication begin again from zero)")


def start_message(settings: Settings, committed: dict[int, int], facts: str) -> str:
    """The one line of a worker that refuses to start on lost state."""
    return (
        f"Redis state lost: {settings.redis_url_safe} (PROMO_REDIS_URL) holds no epoch marker "
        f"{epoch_key(settings.redis_prefix)}" + (f" ({facts})" if facts else "")
        + f", but consumer group {settings.app_id} has committed offsets on {settings.topic_events} "
        f"({len(committed)} partitions, {sum(committed.values())} events read): the engine's state was lost "
        f"(Redis restarted without its append-only file, or was flushed or replaced) and going on would apply "
        f"the next events to an empty state. {_WHAT_TO_DO}"
    )


def runtime_message(settings: Settings, expected: Epoch, problem: str, facts: str) -> str:
    """The one line of a running worker that stops because the marker went away or changed."""
    return (
        f"Redis state lost while running: {settings.redis_url_safe} (PROMO_REDIS_URL) {problem} at "
        f"{epoch_key(settings.redis_prefix)}" + (f" ({facts})" if facts else "")
        + f": the state of epoch {expected.describe()}, which this worker started in, is gone, so it stops "
        f"before applying anything to another state. {_WHAT_TO_DO}"
    )


# --- start-up ---------------------------------------------------------------------------------------
async def committed_offsets(settings: Settings, timeout_s: float = 15.0) -> dict[int, int]:
    """``{partition: committed offset}`` of the worker's consumer group (``Settings.app_id``, Faust's group id)
    on the events topic, for partitions with an offset beyond 0. Joins no group (reads offsets only).

    aiokafka's admin ``list_consumer_group_offsets`` cannot decode the embedded broker's answer; a consumer's
    ``committed()`` can, and works on Apache Kafka alike.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> dict[int, int]:
        consumer = AIOKafkaConsumer(group_id=settings.app_id, enable_auto_commit=False,
                                    request_timeout_ms=int(timeout_s * 1000), **settings.kafka_client_kwargs())
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(settings.topic_events)
            if parts is None:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(settings.topic_events) or set()
            out: dict[int, int] = {}
            for p in sorted(parts):
                offset = await consumer.committed(TopicPartition(settings.topic_events, p))
                if offset:
                    out[p] = offset
            return out
        finally:
            await consumer.stop()

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except Exception as exc:  # any failure to read them (unreachable, timeout, an answer aiokafka cannot decode)
        # stops the start the same way: re-raised as one PromoError line with the cause chained, nothing swallowed
        raise PromoError(
            f"cannot read the committed offsets of consumer group {settings.app_id} on {settings.topic_events} from "
            f"Kafka at {settings.kafka_bootstrap}: {type(exc).__name__} {exc}; Redis at {settings.redis_url_safe} "
            f"has no epoch marker, and only those offsets tell a fresh install from lost state. Check the broker "
            f"and start again"
        ) from exc


def check_at_start(settings: Settings, client=None,
                   read_committed: Callable[[Settings], dict[int, int]] | None = None) -> Epoch:
    """The start-up check (sync; before the worker's event loop runs): the epoch to run in, written when this
    is a fresh install or ``PROMO_ON_STATE_LOSS=reinit`` starts over; :class:`StateLostError` when the state is
    lost. ``client``: a sync redis-py client (default: one on ``settings.redis_url``); ``read_committed``:
    how to read the group's committed offsets (default :func:`committed_offsets`).
    """
    import redis

    from stream import metrics as m

    own = client is None
    if own:
        kw: dict = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
        if settings.redis_ssl_ca_certs:
            kw["ssl_ca_certs"] = settings.redis_ssl_ca_certs
        client = redis.Redis.from_url(settings.redis_url, **kw)
    key = epoch_key(settings.redis_prefix)
    try:
        marker = read_epoch(settings, client)
        committed: dict[int, int] = {}
        if marker is None:
            committed = (read_committed or (lambda s: asyncio.run(committed_offsets(s))))(settings)
        action = start_action(marker, len(committed), settings.on_state_loss)
        if action is StartAction.RUN:
            assert marker is not None
            log.info("Redis state epoch %s at %s", marker.describe(), key)
        elif action is StartAction.REFUSE:
            raise StateLostError(start_message(settings, committed, _facts_sync(client)))
        else:
            reason = "fresh" if action is StartAction.CREATE else "reinit"
            if reason == "reinit":
                facts = _facts_sync(client)
            marker, written = _write_marker(settings, client, Epoch.new(reason))
            if reason == "fresh":
                log.info("new Redis state epoch %s at %s (no committed offsets on %s: a fresh install)",
                         marker.describe(), key, settings.topic_events)
            else:
                if written:
                    m.STATE_REINITIALISED.inc()
                log.error(
                    "Redis state lost and re-initialised as PROMO_ON_STATE_LOSS=reinit asks: %s had no epoch "
                    "marker %s%s while consumer group %s has committed offsets on %s (%d partitions); the worker "
                    "goes on from those offsets with what Redis holds now (restarted empty: budgets, caps and "
                    "de-duplication from zero) in the new epoch %s. Unset PROMO_ON_STATE_LOSS once this start "
                    "is done",
                    settings.redis_url_safe, key, f" ({facts})" if facts else "", settings.app_id,
                    settings.topic_events, len(committed), marker.describe(),
                )
        m.STATE_EPOCH_CREATED.set(marker.created_ms / 1000)
        return marker
    finally:
        if own:
            client.close()


def read_epoch(settings: Settings, client) -> Epoch | None:
    """The marker under ``settings.redis_prefix`` (sync client), ``None`` when there is none: for processes that
    must not work on a Redis without the engine's state and must not write the marker themselves (a ``promo
    forget`` on a Redis that lost its state deletes nothing, and the restore brings the user back)."""
    return _parse_stored(settings, client.get(epoch_key(settings.redis_prefix)))


def _parse_stored(settings: Settings, raw) -> Epoch | None:
    if raw is None:
        return None
    try:
        return Epoch.from_bytes(raw)
    except ValueError as exc:
        raise PromoError(
            f"{epoch_key(settings.redis_prefix)} in Redis at {settings.redis_url_safe} holds {raw[:80]!r}, not an "
            f"epoch marker the engine wrote: another program uses the key prefix {settings.redis_prefix} "
            f"(PROMO_REDIS_PREFIX); give the engine its own prefix or database"
        ) from exc


def _write_marker(settings: Settings, client, epoch: Epoch) -> tuple[Epoch, bool]:
    """SET NX: the marker written, or the one a worker starting at the same moment wrote first."""
    if client.set(epoch_key(settings.redis_prefix), epoch.to_bytes(), nx=True):
        return epoch, True
    raced = _parse_stored(settings, client.get(epoch_key(settings.redis_prefix)))
    if raced is None:  # written and gone in between: Redis is losing its state right now
        raise StateLostError(runtime_message(settings, epoch, "no longer holds the epoch marker", _facts_sync(client)))
    return raced, False


def _facts_sync(client) -> str:
    try:
        return redis_facts(client.info())
    except Exception:  # the facts only decorate the message
        return ""


# --- while running ----------------------------------------------------------------------------------
class EpochGuard:
    """Checks, while a worker runs, that Redis still holds the epoch the worker started in.

    ``on_lost`` runs with the :class:`StateLostError` before it is raised; the worker passes
    :func:`stream.app.stop_worker`, which exits at once (exit status :data:`EXIT_STATE_LOST`): the checks also run
    inside Faust's timers and redis-py's connect callbacks, where an exception would be logged and retried.

    >>> import asyncio
    >>> class FakeRedis:  # a GET that answers what Redis holds
    ...     def __init__(self, value): self.value = value
    ...     async def get(self, key): return self.value
    ...     async def info(self): return {"uptime_in_seconds": 3, "aof_enabled": 0}
    >>> e = Epoch("aaaa", 0, "fresh")
    >>> guard = EpochGuard(Settings(_env_file=None), e)
    >>> asyncio.run(guard.verify(FakeRedis(e.to_bytes())))  # unchanged: nothing happens
    >>> asyncio.run(guard.verify(FakeRedis(None)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stream.epoch.StateLostError: Redis state lost while running: redis://127.0.0.1:6379/0 (PROMO_REDIS_URL) no longer holds the epoch marker at promo:epoch (Redis up 3 s, AOF off, 0 keys): ...
    """

    def __init__(self, settings: Settings, epoch: Epoch,
                 on_lost: Callable[[StateLostError], None] | None = None) -> None:
        self.settings = settings
        self.epoch = epoch
        self.key = epoch_key(settings.redis_prefix)
        self.on_lost = on_lost
        self._client = None  # created on the first verify() without a client

    def _lost(self, problem: str, facts: str) -> NoReturn:
        exc = StateLostError(runtime_message(self.settings, self.epoch, problem, facts))
        if self.on_lost is not None:
            self.on_lost(exc)
        raise exc

    async def verify(self, client=None) -> None:
        """One ``GET`` of the marker on ``client`` (redis-py asyncio; default: the guard's own); raises
        :class:`StateLostError` (after ``on_lost``) when it is missing or another epoch's. Redis errors
        (connection refused, timeouts) propagate as they are: they are transient, retry."""
        if client is None:
            if self._client is None:
                import redis.asyncio as aioredis

                kw = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
                if self.settings.redis_ssl_ca_certs:
                    kw["ssl_ca_certs"] = self.settings.redis_ssl_ca_certs
                self._client = aioredis.Redis.from_url(self.settings.redis_url, **kw)
            client = self._client
        problem = runtime_problem(self.epoch, await client.get(self.key))
        if problem is not None:
            try:
                facts = redis_facts(await client.info())
            except Exception:  # INFO only adds facts to the message; the loss is reported with or without them
                facts = ""
            self._lost(problem, facts)

    def watch(self, client):
        """Check the marker on every new connection of ``client`` (a redis-py client, sync or asyncio) before
        its first command, and return ``client``.

        A Redis that restarted breaks every open connection, so the first command after it reconnects; the
        check runs there, on the new connection, before the command: nothing reaches a Redis that lost the
        state. One ``GET`` per connection made, nothing per command.
        """
        import redis.asyncio as aioredis

        pool = client.connection_pool
        callback = self._check_async if isinstance(client, aioredis.Redis) else self._check_sync
        make_connection = pool.make_connection

        def make_checked_connection():
            conn = make_connection()
            conn.register_connect_callback(callback)  # kept as a weak method: ``self`` lives in this closure
            return conn

        pool.make_connection = make_checked_connection
        for conn in [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]:
            conn.register_connect_callback(callback)
        return client

    def _check_sync(self, conn) -> None:
        conn.send_command("GET", self.key, check_health=False)
        problem = runtime_problem(self.epoch, conn.read_response())
        if problem is not None:
            facts = ""
            try:
                conn.send_command("INFO", check_health=False)
                facts = redis_facts(_parse_info(conn.read_response()))
            except Exception:  # INFO only adds facts to the message; the loss is reported with or without them
                pass
            conn.disconnect()  # the next checkout connects, and checks, again
            self._lost(problem, facts)

    async def _check_async(self, conn) -> None:
        await conn.send_command("GET", self.key, check_health=False)
        problem = runtime_problem(self.epoch, await conn.read_response())
        if problem is not None:
            facts = ""
            try:
                await conn.send_command("INFO", check_health=False)
                facts = redis_facts(_parse_info(await conn.read_response()))
            except Exception:  # any error of the INFO read (connection, parse): the facts only add detail to a
                pass           # loss that is reported below either way
            await conn.disconnect()
            self._lost(problem, facts)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _parse_info(raw) -> dict:
    from redis._parsers.helpers import parse_info

    return parse_info(raw.decode() if isinstance(raw, bytes) else raw)
