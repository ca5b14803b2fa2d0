"""Trivial Faust agents: the framework's own ceiling on this machine, for ``promo bench pipeline``.

Two agents, each run as its own process exactly like a worker (same broker settings as ``stream.app``), on
``<PROMO_TOPIC_PREFIX>.events``, one event at a time (no ``stream.take``):

``consume``
    counts events and does nothing else;
``passthrough``
    ``await topic.send(key, value)`` of every event to ``<prefix>.decisions`` (one await per event).

Run: ``PROMO_... python -m load_tests.trivial_agents consume|passthrough`` (configuration from ``PROMO_*``).
Web (on ``PROMO_WEB_HOST:PROMO_WEB_PORT``): ``/count`` -> ``{"count", "first_ns", "last_ns"}`` (events seen and
the wall-clock ``time.time_ns()`` of the first and of the last one) and ``/readyz`` (200 once partitions of the
events topic are assigned and no rebalance is running, 503 before).
"""

from __future__ import annotations

import sys
import time

import faust

from stream.settings import Settings

MODES = ("consume", "passthrough")


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
    else:
        @app.agent(events_topic, name="bench-passthrough")
        async def passthrough(stream):
            async for event in stream.events():
                await out_topic.send(key=event.key, value=event.value)
                progress.seen()

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
