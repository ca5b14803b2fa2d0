"""Trivial Faust agents: the framework's own ceiling on this machine, for ``promo bench pipeline``.

Three agents, each run as its own process exactly like a worker (same broker settings as ``stream.app``), on
``<PROMO_TOPIC_PREFIX>.events``:

``consume``
    counts events and does nothing else (one event at a time);
``passthrough``
    ``await topic.send(key, value)`` of every event to ``<prefix>.decisions`` (one await per event);
``floor``
    the least a deciding agent does: batches as the worker takes them (``PROMO_BATCH_MAX``,
    ``PROMO_BATCH_WITHIN_S``), one JSON parse per event, ONE pipelined Redis round trip per batch (a counter per
    user and event type), and a minimal decision for every ``cart`` (``trigger_event_id``, ``ts``, ``latency_ms``
    from receipt to send, as the worker measures it). ``promo bench pipeline`` measures the engine's end-to-end
    latency against it in the same run: on the embedded broker the broker sets a floor no agent goes below.

Run: ``PROMO_... python -m load_tests.trivial_agents consume|passthrough|floor`` (configuration from ``PROMO_*``).
Web (on ``PROMO_WEB_HOST:PROMO_WEB_PORT``): ``/count`` -> ``{"count", "first_ns", "last_ns"}`` (events seen and
the wall-clock ``time.time_ns()`` of the first and of the last one), ``/readyz`` (200 once partitions of the
events topic are assigned and no rebalance is running, 503 before) and, for ``floor``, ``/metrics`` with
``promo_decisions_total``.
"""

from __future__ import annotations

import json
import sys
import time

import faust

from stream.settings import Settings

MODES = ("consume", "passthrough", "floor")


class Progress:
    """Events seen by an agent and when (wall clock, ns).

    >>> p = Progress()
    >>> p.to_dict()
    {'count': 0, 'first_ns': None, 'last_ns': None}
    >>> p.seen(); p.seen()
    >>> d = p.to_dict()
    >>> d["count"], d["first_ns"] <= d["last_ns"]
    (2, True)
    """

    __slots__ = ("count", "first_ns", "last_ns")

    def __init__(self) -> None:
        self.count = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def seen(self) -> None:
        now = time.time_ns()
        if self.first_ns is None:
            self.first_ns = now
        self.last_ns = now
        self.count += 1

    def to_dict(self) -> dict:
        return {"count": self.count, "first_ns": self.first_ns, "last_ns": self.last_ns}


def make_trivial_app(settings: Settings, mode: str) -> faust.App:
    """A Faust app with one trivial agent (``mode`` in :data:`MODES`) and the ``/count`` and ``/readyz`` pages.

    It starts from :func:`stream.app.base_app`, the worker's own Faust settings, so the comparison is fair.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    from stream.app import base_app

    app = base_app(settings)
    progress = Progress()
    events_topic = app.topic(settings.topic_events, key_type=bytes, value_type=bytes, internal=False)
    out_topic = app.topic(settings.topic_decisions, key_type=bytes, value_type=bytes, internal=False)

    if mode == "consume":
        @app.agent(events_topic, name="bench-consume")
        async def consume(stream):
            async for _value in stream:
                progress.seen()
    elif mode == "passthrough":
        @app.agent(events_topic, name="bench-passthrough")
        async def passthrough(stream):
            async for event in stream.events():
                await out_topic.send(key=event.key, value=event.value)
                progress.seen()
    else:
        decided = _floor_agent(app, settings, events_topic, out_topic, progress)

        @app.page("/metrics")
        async def metrics_view(web, request):
            return web.text(f"# TYPE promo_decisions_total counter\npromo_decisions_total {decided[0]}\n")

    @app.page("/count")
    async def count_view(web, request):
        return web.json(progress.to_dict())

    @app.page("/readyz")
    async def readyz_view(web, request):
        try:
            assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_events]
        except Exception:
            assigned = []
        ok = bool(assigned) and not app.rebalancing
        return web.json({"ready": ok, "assigned_partitions": sorted(tp.partition for tp in assigned)},
                        status=200 if ok else 503)

    return app


def _floor_agent(app: faust.App, settings: Settings, events_topic, out_topic, progress: Progress) -> list[int]:
    """The ``floor`` agent (module docstring); returns its decision counter (a one-element list)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    decided = [0]

    @app.agent(events_topic, name="bench-floor")
    async def floor(stream):
        received: dict[tuple[int, int], int] = {}

        def stamp(value):  # receipt time, as the worker stamps it
            ev = stream.current_event
            if ev is not None:
                received[(ev.message.partition, ev.message.offset)] = time.perf_counter_ns()
            return value

        stream.add_processor(stamp)
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            pipe = client.pipeline(transaction=False)
            carts = []
            for ev in batch:
                t = received.pop((ev.message.partition, ev.message.offset), None) or time.perf_counter_ns()
                progress.seen()
                try:
                    d = json.loads(ev.value)
                    user, kind, event_id = str(d["user_id"]), str(d["type"]), str(d["event_id"])
                except (ValueError, KeyError, TypeError):
                    continue
                pipe.hincrby(f"{settings.redis_prefix}:floor:{{u:{user}}}", kind, 1)
                if kind == "cart":
                    carts.append((ev.message.key, event_id, t))
            await pipe.execute()
            for key, event_id, t in carts:
                latency_ms = (time.perf_counter_ns() - t) / 1e6
                value = json.dumps({"trigger_event_id": event_id, "ts": time.time_ns() // 1_000_000,
                                    "latency_ms": round(latency_ms, 3)}).encode()
                await out_topic.send(key=key, value=value)
                decided[0] += 1

    return decided


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in MODES:
        print(f"usage: python -m load_tests.trivial_agents {'|'.join(MODES)}", file=sys.stderr)
        raise SystemExit(2)
    settings = Settings()
    app = make_trivial_app(settings, argv[0])
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
