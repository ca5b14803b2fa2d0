"""The offer catalogue at runtime: one applied version in Redis that every worker converges on, without a restart.

Redis hash ``<PROMO_REDIS_PREFIX>:catalogue``: ``yaml`` (the file's bytes), ``version`` (sha256[:12] of them, as
``promo catalogue check`` prints), ``source`` (the path it was applied from) and ``applied_at_ms``.

* ``promo catalogue apply FILE`` (:func:`apply_file`) validates as ``check`` does and refuses an invalid file with
  ``file:line`` (exit 2, nothing written); a valid one is written in one transaction (a reader sees the old
  catalogue or the new one, whole).
* At start-up a worker decides with the applied catalogue when there is one (:func:`startup_catalogue`: a worker
  restarted after a change does not go back to its file), else with its ``PROMO_CATALOGUE_PATH``.
* Every maintenance period (:meth:`CatalogueWatcher.check`: one HGET of the version, asynchronous, with a timeout)
  a worker takes a new version into its engine between batches (:meth:`models.engine.Engine.set_catalogue`). An
  invalid stored one (written by hand, or using an offer kind this worker's code does not know) is refused: one
  log line with ``file:line``, ``promo_catalogue_reloads_total{result="refused"}``, the catalogue in use kept.
* SIGHUP (:meth:`CatalogueWatcher.reload_file`): the worker re-reads its own ``PROMO_CATALOGUE_PATH`` and, when
  valid, applies it to Redis as ``promo catalogue apply`` does, so every worker converges on it.

The version in use is in ``/readyz`` (``catalogue_version``) and ``promo_catalogue_info{version}``. Workers
converge within one maintenance period (``PROMO_MAINTENANCE_INTERVAL_S``) plus the batch each has in progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from models.catalogue_swap import catalogue_version
from models.policy.catalogue import Catalogue, CatalogueError, parse_catalogue
from stream import metrics as m
from stream.errors import PromoError
from stream.settings import Settings

log = logging.getLogger("promo.worker")

REDIS_TIMEOUT_S = 5.0
"""Most a maintenance period waits for the catalogue's Redis reads (a timeout skips the period, as for any step)."""


def catalogue_key(settings: Settings) -> str:
    """The Redis hash of the catalogue applied at runtime."""
    return f"{settings.redis_prefix}:catalogue"


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated catalogue with its version, where it came from and its bytes."""

    catalogue: Catalogue
    version: str
    source: str
    data: bytes

    def fields(self) -> dict[str, bytes | str | int]:
        """The Redis hash's fields for this catalogue, applied now."""
        return {"yaml": self.data, "version": self.version, "source": self.source,
                "applied_at_ms": time.time_ns() // 1_000_000}

    def report(self) -> dict:
        return {"version": self.version, "source": self.source,
                "offers": {oid: o.kind for oid, o in self.catalogue.offers.items()},
                "budgets": self.catalogue.budgets()}


def read_file(path: str | Path) -> Loaded:
    """Read and validate a catalogue file, once (the version is of the very bytes validated).

    Raises :class:`models.policy.catalogue.CatalogueError` (``<file>:<line>: ...``), as
    :func:`models.policy.catalogue.load_catalogue` does."""
    p = Path(path)
    try:
        data = p.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise CatalogueError(f"{p}:0: catalogue file not found (set PROMO_CATALOGUE_PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{p}:0: cannot read catalogue: {exc}") from None
    return Loaded(parse_catalogue(text, str(p)), catalogue_version(data), str(p), data)


def _text(value) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def parse_stored(fields: dict) -> Loaded:
    """The catalogue of the Redis hash's ``fields`` (as HGETALL answers them). Errors name the file it was applied
    from and the line, as ``promo catalogue check`` on that file would have."""
    fields = {_text(k): v for k, v in fields.items()}
    source = _text(fields.get("source")) or "<redis catalogue>"
    data = fields.get("yaml")
    if data is None:
        raise CatalogueError(f"{source}:0: the applied catalogue has no 'yaml' field")
    data = data if isinstance(data, bytes) else str(data).encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{source}:0: the applied catalogue is not UTF-8: {exc}") from None
    # the version of the bytes, not the stored field: one text has one version wherever it was written from
    return Loaded(parse_catalogue(text, source), catalogue_version(data), source, data)


def apply_file(settings: Settings, path: str | Path) -> dict:
    """``promo catalogue apply``: validate ``path`` and make it the catalogue of every worker.

    Raises :class:`stream.errors.PromoError` with ``file:line`` for an invalid file (nothing is written) and with
    the Redis URL when Redis does not answer."""
    import redis

    try:
        loaded = read_file(path)
    except CatalogueError as exc:
        raise PromoError(f"{exc} (nothing applied; the workers keep their catalogue)") from None
    key = catalogue_key(settings)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        pipe = client.pipeline(transaction=True)  # MULTI: the version replaced is exactly the one reported
        pipe.hget(key, "version")
        pipe.hset(key, mapping=loaded.fields())
        previous, _ = pipe.execute()
    except redis.RedisError as exc:
        raise PromoError(f"cannot apply the catalogue: Redis at {settings.redis_url_safe} (PROMO_REDIS_URL): "
                         f"{exc}") from None
    finally:
        client.close()
    previous = _text(previous)
    return {"ok": True, **loaded.report(), "previous_version": previous, "changed": previous != loaded.version}


def startup_catalogue(settings: Settings, client) -> Loaded:
    """The catalogue a starting worker decides with: the one applied to Redis if any (``client``: a synchronous
    client, used before the event loop runs), else ``PROMO_CATALOGUE_PATH``'s (its errors raise, as before)."""
    fields = client.hgetall(catalogue_key(settings))
    if fields:
        try:
            loaded = parse_stored(fields)
        except CatalogueError as exc:  # the maintenance check counts the refusal, once
            log.error("the offer catalogue applied to Redis is invalid: %s; starting with PROMO_CATALOGUE_PATH "
                      "(%s) instead", exc, settings.catalogue_path)
        else:
            log.info("offer catalogue %s, applied at runtime from %s (PROMO_CATALOGUE_PATH is not read while one "
                     "is applied: `promo catalogue apply` changes it)", loaded.version, loaded.source)
            return loaded
    return read_file(settings.catalogue_path)


_reported: list[str | None] = [None]


def report_version(engine) -> None:
    """Keep ``promo_catalogue_info`` on the engine's version in use (one series: the old one is removed)."""
    version = engine.catalogue_version or "unknown"
    if _reported[0] != version:
        m.CATALOGUE_INFO.clear()
        m.CATALOGUE_INFO.labels(version=version).set(1)
        _reported[0] = version


class CatalogueWatcher:
    """A worker's side: follow the applied catalogue (:meth:`check`, every maintenance period), and publish its
    own file on SIGHUP (:meth:`reload_file`)."""

    def __init__(self, settings: Settings, engine) -> None:
        self.settings, self.engine = settings, engine
        self.key = catalogue_key(settings)
        self.seen = engine.catalogue_version  # the stored version last looked at: each is taken or refused once

    @property
    def _redis(self):
        return getattr(self.engine.store, "r", None)  # the engine's asynchronous client (None: no Redis store)

    async def check(self) -> None:
        """Take a newly applied catalogue into the engine (between batches), or refuse an invalid one. A Redis
        error or timeout propagates: the maintenance period is skipped and the next one tries again."""
        r = self._redis
        if r is None:
            return
        stored = _text(await asyncio.wait_for(r.hget(self.key, "version"), REDIS_TIMEOUT_S))
        if stored is None or stored == self.seen:  # nothing applied (or it vanished): keep the one in use
            return
        fields = await asyncio.wait_for(r.hgetall(self.key), REDIS_TIMEOUT_S)
        if not fields:
            return
        self.seen = _text({_text(k): v for k, v in fields.items()}.get("version")) or stored
        self._take(fields, "applied to Redis")

    def _take(self, fields: dict, how: str) -> None:
        engine = self.engine
        try:
            loaded = parse_stored(fields)
        except CatalogueError as exc:
            m.CATALOGUE_RELOADS.labels(result="refused").inc()
            log.error("refused the offer catalogue %s as version %s: %s; still deciding with version %s", how,
                      self.seen, exc, engine.catalogue_version)
            return
        if loaded.version == engine.catalogue_version and engine.pending_catalogue_version is None:
            return
        now = engine.set_catalogue(loaded.catalogue, loaded.version)
        m.CATALOGUE_RELOADS.labels(result="applied").inc()
        log.info("offer catalogue %s (from %s) %s", loaded.version, loaded.source,
                 "in use" if now else "in use from the next batch (one batch decides with one catalogue)")
        report_version(engine)

    async def reload_file(self) -> None:
        """SIGHUP: re-read ``PROMO_CATALOGUE_PATH``; a valid one is applied to Redis (every worker takes it up at
        its next maintenance period) and taken here at once; an invalid one is refused with ``file:line``. Never
        raises: it runs beside the batches, and a failure here must not stop the worker."""
        path = self.settings.catalogue_path
        try:
            loaded = await asyncio.to_thread(read_file, path)  # file reads off the event loop
        except CatalogueError as exc:
            m.CATALOGUE_RELOADS.labels(result="refused").inc()
            log.error("SIGHUP: refused %s: %s; nothing applied, still deciding with version %s", path, exc,
                      self.engine.catalogue_version)
            return
        try:
            r = self._redis
            if r is not None:
                await asyncio.wait_for(r.hset(self.key, mapping=loaded.fields()), REDIS_TIMEOUT_S)
                log.info("SIGHUP: applied %s (version %s) to Redis: every worker takes it up within a maintenance "
                         "period", path, loaded.version)
            self.seen = loaded.version
            self._take({"yaml": loaded.data, "source": loaded.source}, f"re-read from {path} on SIGHUP")
        except Exception as exc:  # Redis down: say so; the operator sends SIGHUP again (or runs `catalogue apply`)
            from stream.faults import describe

            log.error("SIGHUP: could not apply %s to Redis (%s); nothing changed, send SIGHUP again once Redis "
                      "answers", path, describe(exc))
