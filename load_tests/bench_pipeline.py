"""``promo bench pipeline``: the engine against the framework's own ceiling, on the embedded stack.

What runs (each consumer is its own process, one after the other, on one broker, same pre-produced events):

1. a private embedded stack (Tansu + redis-server) on free ports in a temporary state dir (never the user's
   9092/6379), stopped at the end, also on error, Ctrl-C or SIGTERM;
2. ``n_events`` real events (REES46 with prices and Taobao, interleaved, see :func:`real_events`) produced up
   front to one topic prefix per variant (own consumer group, own Redis key prefix);
3. throughput, events/s from the first event seen to the ``n_events``-th:
   (a) a trivial Faust consume-only agent, (b) a trivial pass-through agent (``await topic.send`` per event), both
   from :mod:`load_tests.trivial_agents`; (c) the full engine, ``promo worker`` as users run it;
   (d) two ``promo worker`` processes in one consumer group;
4. latency: the warm engine worker of (c) at a fixed offered rate ``rate`` for ``latency_s`` seconds (fresh
   events from the same stream; the producer hands over the events due every :data:`TICK_S`). Each event
   carries its send time in the header ``sent_at_ns``; a consumer on ``<prefix>.decisions`` maps every decision
   back to its trigger event: end-to-end latency = decision received - trigger sent (p50/p95/p99, ms). Also
   reported: the engine's own ``latency_ms`` field (receipt -> sent), a breakdown (trigger sent -> broker ack,
   -> decision made, decision made -> received) and the p50 per second of the run (a rising line = backlog);
5. the engine worker's memory: VmRSS / VmHWM from ``/proc/<pid>/status``;
6. CPU time per event (``/proc/<pid>/stat``) of every process involved (worker(s), broker, Redis, this one
   during the latency run) over each measured window: on a shared 2-core machine the ratios of these are
   steadier than the rates.

Counting: the trivial agents report ``/count``; the engine's count is ``promo_events_total`` +
``promo_events_duplicate_total`` + ``promo_events_invalid_total`` from its ``/metrics``. Every process is polled
every ``poll_s``; the rate is ``(n_events - c0) / (t_last - t0)`` where ``c0`` is the count at the first poll that
saw an event (time ``t0``) and ``t_last`` the wall-clock time the process reports for its last event
(``promo_last_event_timestamp_seconds`` for the engine), so start-up and group joins are excluded.

JSON report on stdout (by the CLI), progress on stderr.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from stream.errors import PromoError
from stream.procs import free_port
from stream.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SOURCES = {
    "rees46": (DATA / "rees46_multicategory" / "2019-Oct_first17k.csv", "rees46"),
    "taobao": (DATA / "taobao_time_slice" / "userbehavior_time_slice.csv", "taobao"),
}


# Latency run: the producer hands over the events due every TICK_S (one produce request per tick instead of one
# per event keeps the harness's own load on the 2-core machine small); the decisions consumer's fetch wait bounds
# the delay it adds to a measured latency (mean about half of it on the embedded broker).
TICK_S = 0.005
FETCH_WAIT_MS = 10


class BenchError(PromoError):
    """A benchmark step failed; the message says which and where its log is."""


def _log(msg: str) -> None:
    print(f"[bench pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list.

    >>> percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50), percentile(list(range(1, 101)), 99), percentile([7.0], 99)
    (3.0, 99, 7.0)
    """
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    k = max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))
    return s[int(k)]


# --- input --------------------------------------------------------------------------------------------
def _roundrobin(*its: Iterable) -> Iterator:
    iters = [iter(i) for i in its]
    while iters:
        alive = []
        for it in iters:
            try:
                yield next(it)
            except StopIteration:
                continue
            alive.append(it)
        iters = alive


def _ts_ms(ts) -> int:
    """Event v1 ``ts`` (epoch ms or RFC 3339 string) -> epoch ms.

    >>> _ts_ms(1511658000000), _ts_ms("2019-10-01T00:00:00Z")
    (1511658000000, 1569888000000)
    """
    if isinstance(ts, str):
        return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
    return int(ts)


def real_events(sources: tuple[str, ...] = ("rees46", "taobao"), start_ms: int | None = None) -> Iterator[dict]:
    """Endless event v1 dicts from the shared real data sets, interleaved row by row, looped for volume.

    Event times are rebased (``ts`` in epoch ms): every source starts at ``start_ms`` (default: 24 h before
    now), keeping its own gaps between events, so sources from different years interleave as one shop's
    traffic would. Loop ``L > 0`` replays the data ``L`` source-spans later, with user ids ``<user>~L`` and
    event ids ``<id>~L`` (fresh users and events: nothing is a duplicate; per-user order is kept).
    """
    from stream.sources import read_events

    for name in sources:
        path, _fmt = SOURCES[name]
        if not path.exists():
            raise BenchError(f"benchmark data {path} not found: the shared real data sets must be in {DATA}")
    start = int(time.time() * 1000) - 86_400_000 if start_ms is None else start_ms
    first: dict[str, int] = {}
    span: dict[str, int] = {}
    for loop in itertools.count():
        readers = [_tagged(n, read_events(SOURCES[n][0], SOURCES[n][1], errors=[])) for n in sources]
        for name, ev in _roundrobin(*readers):
            ts = _ts_ms(ev["ts"])
            first.setdefault(name, ts)
            if not loop:
                span[name] = max(span.get(name, 0), ts - first[name] + 1000)
            ev["ts"] = start + ts - first[name] + loop * span[name]
            if loop:
                ev["user_id"] = f"{ev['user_id']}~{loop}"
                ev["event_id"] = f"{ev['event_id']}~{loop}"
            yield ev


def _tagged(name: str, it: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for ev in it:
        yield name, ev


def encode(events: Iterable[dict]) -> list[tuple[bytes, bytes, str]]:
    """(key, value, event_id) records: key = user id, value = compact JSON."""
    return [
        (e["user_id"].encode(), json.dumps(e, separators=(",", ":")).encode(), e["event_id"]) for e in events
    ]


async def _produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes, str]]) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(linger_ms=5, max_batch_size=256 * 1024, **settings.kafka_client_kwargs())
    await p.start()
    try:
        futs = []
        for key, value, _eid in records:
            futs.append(await p.send(topic, value, key=key))
        await asyncio.gather(*futs)
    finally:
        await p.stop()


# --- processes ----------------------------------------------------------------------------------------
def http_get(url: str, timeout: float = 2.0, attempts: int = 5) -> tuple[int, str]:
    """GET with a few retries when the server does not answer in time (a busy worker's event loop)."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            if attempt == attempts - 1:
                return 0, str(e)
    return 0, "unreachable"


def proc_memory_mb(pid: int) -> dict:
    """``{"rss_mb", "hwm_mb"}`` (MiB) of a live process from ``/proc/<pid>/status``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key = "rss_mb" if line.startswith("VmRSS") else "hwm_mb"
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except OSError:
            pass
    return out


class Proc:
    """A benchmark child process (engine worker or trivial agent) with its own log file and web port."""

    def __init__(self, name: str, cmd: list[str], settings: Settings, log_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.base_url = f"http://127.0.0.1:{settings.web_port}"

    @classmethod
    def engine(cls, name: str, settings: Settings, log_dir: Path, module: str = "stream.cli") -> "Proc":
        return cls(name, [sys.executable, "-m", module, "worker"], settings, log_dir)

    @classmethod
    def trivial(cls, name: str, mode: str, settings: Settings, log_dir: Path) -> "Proc":
        return cls(name, [sys.executable, "-m", "load_tests.trivial_agents", mode], settings, log_dir)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited with code {self.proc.returncode}; see {self.log_path}: {self.log_tail()}"
            )

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/readyz`` answered 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            if http_get(self.base_url + "/readyz", 1.0)[0] == 200:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}: {self.log_tail()}")

    def progress(self) -> tuple[int, float | None]:
        """(events counted, wall-clock seconds of the last one or None)."""
        if "trivial_agents" in " ".join(self.proc.args):
            status, body = http_get(self.base_url + "/count")
            if status != 200:
                self.check_alive()
                raise BenchError(f"{self.name} /count answered {status}: {body[:200]}")
            d = json.loads(body)
            return d["count"], (d["last_ns"] / 1e9 if d["last_ns"] else None)
        m = self.metrics()
        count = sum(msum(m, n) for n in
                    ("promo_events_total", "promo_events_duplicate_total", "promo_events_invalid_total"))
        last = msum(m, "promo_last_event_timestamp_seconds")
        return int(count), (last or None)

    def metrics(self) -> dict:
        from stream.metrics import parse_exposition

        status, text = http_get(self.base_url + "/metrics")
        if status != 200:
            self.check_alive()
            raise BenchError(f"{self.name} /metrics answered {status}: {text[:200]}")
        return parse_exposition(text)

    def stop(self, timeout: float = 15.0) -> None:
        from stream.procs import stop_process

        stop_process(self.proc, timeout)
        self._log.close()


def msum(samples: dict, name: str) -> float:
    """Sum of the samples called ``name`` (all label values) in a :meth:`Proc.metrics` answer."""
    from stream.metrics import sample_sum

    return sample_sum(samples, name)


STAGES = ("decide", "send", "delivered", "learn")  # promo_batch_stage_seconds (stream/handler.py)


def stage_ms_per_batch(before: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds per batch of each stage between two :meth:`Proc.metrics` samples of one worker."""
    from stream.metrics import sample_sum

    out = {}
    for stage in STAGES:
        n = (sample_sum(after, "promo_batch_stage_seconds_count", stage=stage)
             - sample_sum(before, "promo_batch_stage_seconds_count", stage=stage))
        total = (sample_sum(after, "promo_batch_stage_seconds_sum", stage=stage)
                 - sample_sum(before, "promo_batch_stage_seconds_sum", stage=stage))
        out[stage] = round(total / n * 1e3, 3) if n else 0.0
    return out


def maintenance(before: dict, after: dict) -> dict:
    """What the worker's maintenance timer did between two :meth:`Proc.metrics` samples: its expiry sweeps (how many,
    their summed milliseconds: ``promo_sweep_duration_seconds``) and model snapshots (``promo_model_snapshots_total``;
    each forks a child that serialises the models beside the worker). Both run beside the worker's batches."""
    from stream.metrics import sample_sum

    def delta(name: str) -> float:
        return sample_sum(after, name) - sample_sum(before, name)

    return {"sweeps": int(delta("promo_sweep_duration_seconds_count")),
            "sweep_ms_sum": round(delta("promo_sweep_duration_seconds_sum") * 1e3, 1),
            "snapshots": int(delta("promo_model_snapshots_total"))}


def redis_counts(redis_url: str) -> dict[str, int]:
    """Redis's own counters: commands clients sent (a pipeline's commands each count) and script calls."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        stats, cmds = client.info("stats"), client.info("commandstats")
    finally:
        client.close()
    scripts = sum(int(cmds.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval", "fcall"))
    # Per command, scripts' inner commands included: which commands the Redis CPU goes to.
    by_command = {name.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
                  for name, v in cmds.items() if name.startswith("cmdstat_")}
    return {"commands": int(stats["total_commands_processed"]), "script_calls": scripts, "by_command": by_command}


def redis_per_event(before: dict, after: dict, n_events: int) -> dict:
    """Each counter's growth per event; ``by_command`` keeps only the commands that ran, busiest first."""
    out = {k: round((after[k] - before[k]) / n_events, 3) for k in ("commands", "script_calls")}
    rows = []
    for name, now in after.get("by_command", {}).items():
        was = before.get("by_command", {}).get(name, {"calls": 0, "usec": 0})
        calls, usec = now["calls"] - was["calls"], now["usec"] - was["usec"]
        if calls > 0:
            rows.append((name, {"calls": round(calls / n_events, 3), "usec": round(usec / n_events, 2)}))
    out["by_command"] = dict(sorted(rows, key=lambda r: -r[1]["usec"]))
    return out


def _check_applied(worker: Proc, samples: dict, n_events: int) -> None:
    """The benchmark's events are valid and fresh: if the engine rejected some, its rate means nothing."""
    invalid = int(msum(samples, "promo_events_invalid_total"))
    applied = int(msum(samples, "promo_events_total"))
    if invalid or applied < n_events:
        raise BenchError(
            f"{worker.name} applied {applied} of {n_events} valid benchmark events and dead-lettered {invalid}: "
            f"the engine is failing, not slow; see {worker.log_path}: {worker.log_tail(3)}"
        )


def measure_throughput(procs: list[Proc], n_events: int, poll_s: float, timeout: float,
                       others: dict[str, int] | None = None) -> dict:
    """Poll ``procs`` (which share one consumer group) until together they counted ``n_events``.

    Returns ``{"eps", "seconds", "counts", "cpu_us_per_event"}``; see the module docstring for the rate.
    ``cpu_us_per_event`` is the CPU time (user + system) each of ``procs`` and of ``others`` (e.g. the broker and
    Redis: name -> pid) used over the measured window, per event counted in it.
    """
    pids = {p.name: p.pid for p in procs} | (others or {})
    t_start = time.monotonic()
    t0 = c0 = None
    cpu0: dict[str, float] = {}
    next_log = time.monotonic() + 5.0
    while True:
        now_wall = time.time()
        snap = [p.progress() for p in procs]
        count = sum(c for c, _ in snap)
        if t0 is None and count > 0:
            t0, c0 = now_wall, count
            cpu0 = _cpu_snapshot(pids)
        if count >= n_events:
            t_last = max(t for _, t in snap if t is not None)
            cpu1 = _cpu_snapshot(pids)
            break
        if time.monotonic() - t_start > timeout:
            raise BenchError(
                f"{', '.join(p.name for p in procs)} counted only {count} of {n_events} events in {timeout:.0f}s; "
                f"see {procs[0].log_path}: {procs[0].log_tail()}"
            )
        if time.monotonic() >= next_log:
            _log(f"  {count}/{n_events} events")
            next_log += 5.0
        time.sleep(poll_s)
    if c0 >= n_events or t_last <= t0:
        raise BenchError(
            f"{n_events} events were all processed between two polls ({poll_s}s): too few events to measure a "
            "rate; use more --events"
        )
    counted = count - c0
    return {
        "eps": round((n_events - c0) / (t_last - t0), 1),
        "seconds": round(t_last - t0, 3),
        "counts": [c for c, _ in snap],
        "cpu_us_per_event": {k: round((cpu1[k] - cpu0[k]) / counted * 1e6, 1) for k in cpu1 if k in cpu0},
    }


# --- latency ------------------------------------------------------------------------------------------
async def _latency_run(
    settings: Settings, records: list[tuple[bytes, bytes, str]], rate: float, worker: Proc, poll_s: float,
    drain_timeout: float, others: dict[str, int] | None = None,
) -> dict:
    """Offer ``records`` at ``rate`` ev/s to the running ``worker``; decisions -> end-to-end latency.

    Also the CPU time per offered event of the worker, of ``others`` (name -> pid) and of this process
    (``bench``: the producer and the decisions consumer), over the offered period.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    m0 = await asyncio.to_thread(worker.metrics)
    decisions_before = msum(m0, "promo_decisions_total")
    events_before = (await asyncio.to_thread(worker.progress))[0]

    # The embedded broker answers a fetch only after fetch_max_wait_ms when it had no data at the time of the
    # request (new data does not wake it): keep the wait short so the measuring consumer adds little.
    consumer = AIOKafkaConsumer(group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=FETCH_WAIT_MS,
                                **settings.kafka_client_kwargs())
    await consumer.start()
    producer = AIOKafkaProducer(linger_ms=0, **settings.kafka_client_kwargs())
    await producer.start()
    sent_ns: dict[str, int] = {}
    latencies: list[float] = []
    engine_latencies: list[float] = []
    to_decided: list[float] = []  # trigger sent -> decision made (worker wall clock, ms resolution)
    decided_to_received: list[float] = []  # decision made -> decision received here
    by_second: dict[int, list[float]] = {}  # second of the run (send time) -> latencies
    acked: list[float] = []  # event handed to the producer -> acknowledged by the broker
    t_send0 = time.time_ns()
    stop = asyncio.Event()
    try:
        parts = consumer.partitions_for_topic(settings.topic_decisions) or set()
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - first metadata may lack the topic
            parts = consumer.partitions_for_topic(settings.topic_decisions) or set()
        consumer.assign([TopicPartition(settings.topic_decisions, p) for p in sorted(parts)])
        await consumer.getmany(timeout_ms=200)  # positioned; earlier decisions are ignored below

        async def consume() -> None:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time_ns()
                for msgs in batch.values():
                    for msg in msgs:
                        try:
                            d = json.loads(msg.value)
                            t = sent_ns.get(d.get("trigger_event_id"))
                        except (ValueError, AttributeError):
                            continue
                        if t is not None:
                            latencies.append((now - t) / 1e6)
                            by_second.setdefault(int((t - t_send0) / 1e9), []).append((now - t) / 1e6)
                            if isinstance(d.get("latency_ms"), (int, float)):
                                engine_latencies.append(float(d["latency_ms"]))
                            if isinstance(d.get("ts"), int):  # wall clock of the decision in the worker
                                to_decided.append(d["ts"] - t / 1e6)
                                decided_to_received.append(now / 1e6 - d["ts"])

        consumer_task = asyncio.create_task(consume())
        pids = {"engine": worker.pid, "bench": os.getpid()} | (others or {})
        cpu0 = _cpu_snapshot(pids)
        t_start = time.monotonic()
        t_send0 = time.time_ns()
        sent = 0
        futs = []
        n = len(records)
        tick = TICK_S
        while sent < n:
            due = min(n, int((time.monotonic() - t_start) * rate) + 1)
            while sent < due:
                key, value, eid = records[sent]
                ns = time.time_ns()
                sent_ns[eid] = ns
                fut = await producer.send(settings.topic_events, value, key=key,
                                          headers=[("sent_at_ns", str(ns).encode())])
                fut.add_done_callback(lambda _f, ns=ns: acked.append((time.time_ns() - ns) / 1e6))
                futs.append(fut)
                sent += 1
            if consumer_task.done():
                consumer_task.result()
            # events due within a tick go out together (one produce request), each stamped when handed over
            await asyncio.sleep(max(tick, t_start + sent / rate - time.monotonic()))
        send_seconds = time.monotonic() - t_start
        await asyncio.gather(*futs)
        cpu1 = _cpu_snapshot(pids)
        _log(f"  offered {sent} events in {send_seconds:.1f}s ({sent / send_seconds:.0f} ev/s); draining")

        # drain: the worker counted every event and every decision it made has arrived
        deadline = time.monotonic() + drain_timeout
        while True:
            count = (await asyncio.to_thread(worker.progress))[0] - events_before
            m = await asyncio.to_thread(worker.metrics)
            made = msum(m, "promo_decisions_total") - decisions_before
            if count >= n and len(latencies) >= made:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"latency run: worker counted {count}/{n} events, {len(latencies)}/{int(made)} decisions "
                    f"received after {drain_timeout:.0f}s; see {worker.log_path}: {worker.log_tail()}"
                )
            await asyncio.sleep(poll_s)
        stop.set()
        await consumer_task
    finally:
        stop.set()
        await producer.stop()
        await consumer.stop()
    if not latencies:
        raise BenchError(
            f"latency run: no decisions for {n} offered events (no trigger among them?); use a longer run"
        )
    return {
        "offered_rate": rate,
        "achieved_rate": round(sent / send_seconds, 1),
        "events": n,
        "decisions": len(latencies),
        "latency_ms": {q: round(percentile(latencies, v), 2)
                       for q, v in (("p50", 50), ("p95", 95), ("p99", 99))} | {"max": round(max(latencies), 2)},
        "engine_latency_ms": _quantiles(engine_latencies),
        "cpu_us_per_event": {k: round((cpu1[k] - cpu0[k]) / n * 1e6, 1) for k in cpu1 if k in cpu0},
        "latency_breakdown_ms": {"sent_to_acked": _quantiles(acked), "sent_to_decided": _quantiles(to_decided),
                                 "decided_to_received": _quantiles(decided_to_received)},
        # p50 of the decisions triggered in each second of the run: a rising line means the worker fell behind
        "latency_p50_by_second_ms": [round(percentile(by_second[k], 50), 1) for k in sorted(by_second)],
        "latency_max_by_second_ms": [round(max(by_second[k]), 1) for k in sorted(by_second)],
    }


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    return {q: round(percentile(values, v), 2) for q, v in (("p50", 50), ("p95", 95), ("p99", 99))}


# --- the benchmark ------------------------------------------------------------------------------------
def _variant(base: Settings, run_tag: str, name: str) -> Settings:
    tag = f"{run_tag}-{name}"
    return base.model_copy(update={
        "topic_prefix": tag, "redis_prefix": tag, "app_id": f"promo-{tag}", "web_port": free_port(),
    })


def run(
    settings: Settings,
    n_events: int = 20_000,
    rate: float = 1000.0,
    latency_s: float = 15.0,
    two_workers: bool = True,
    sources: tuple[str, ...] = ("rees46", "taobao"),
    poll_s: float = 0.1,
    own_stack: bool = True,
    keep_logs: bool = False,
    worker_module: str = "stream.cli",
) -> dict:
    """Run the pipeline benchmark; return the report (keys in ``ARCHITECTURE.md`` "Report keys").

    ``own_stack=False`` uses the broker and Redis of ``settings`` (must be running) instead of a private
    embedded stack; topic and Redis key prefixes are unique to the run either way. ``worker_module`` runs the
    engine as ``python -m <worker_module> worker`` (default: ``promo worker`` itself; another module lets an
    experiment A/B a patched worker in the same harness).
    """
    if n_events < 100:
        raise BenchError(f"--events must be at least 100 to measure a rate, got {n_events}")
    if rate <= 0 or latency_s <= 0:
        raise BenchError(f"--rate and --latency-s must be > 0, got {rate:g} and {latency_s:g}")
    n_latency = max(1, int(rate * latency_s))
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="promo-bench-"))
    procs: list[Proc] = []
    stack_settings = None
    infra: dict[str, int] = {}  # pids of the private stack, for CPU accounting
    prev_term = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):  # make SIGTERM unwind like Ctrl-C so the finally below cleans up
            raise KeyboardInterrupt(f"signal {signum}")
        prev_term = signal.signal(signal.SIGTERM, _on_term)
    ok = False
    loadavg = list(os.getloadavg())
    try:
        base = settings
        if own_stack:
            from stream import stack

            base = settings.model_copy(update={
                "state_dir": work / "stack",
                "kafka_bootstrap": f"127.0.0.1:{free_port()}",
                "redis_url": f"redis://127.0.0.1:{free_port()}/0",
                "durable": False,
                # the private stack is plaintext on loopback, whatever the user's connection settings say
                "kafka_security_protocol": "PLAINTEXT", "kafka_sasl_mechanism": None, "kafka_sasl_username": None,
                "kafka_sasl_password": None, "redis_ssl_ca_certs": None,
            })
            _log(f"starting a private embedded stack: broker {base.kafka_bootstrap}, Redis {base.redis_url}")
            stack_settings = base
            up = stack.up(base)
            infra = {"broker": up["kafka"]["pid"], "redis": up["redis"]["pid"]}
        from stream.topics import ensure_topics

        _log(f"reading {n_events} + {n_latency} real events from {', '.join(sources)}")
        stream_ = real_events(sources)
        records = encode(itertools.islice(stream_, n_events))
        lat_records = encode(itertools.islice(stream_, n_latency))

        run_tag = "bench" + uuid.uuid4().hex[:6]
        names = ["consume", "passthrough", "floor", "engine"] + (["engine2"] if two_workers else [])
        variants = {name: _variant(base, run_tag, name) for name in names}
        t = time.monotonic()
        for name, s in variants.items():
            ensure_topics(s)
            if name != "floor":  # the floor agent only runs the latency run
                asyncio.run(_produce(s, s.topic_events, records))
        _log(f"produced {n_events} events to {len(variants) - 1} topics in {time.monotonic() - t:.1f}s")

        timeout = 60.0 + n_events / 200.0
        report: dict = {}
        results: dict[str, dict] = {}
        memory: dict[str, dict] = {}

        for name, mode in (("consume", "consume"), ("passthrough", "passthrough")):
            s = variants[name]
            p = Proc.trivial(name, mode, s, work)
            procs.append(p)
            ready = p.wait_ready(90.0)
            _log(f"{name}: trivial agent ready in {ready:.1f}s; measuring")
            results[name] = measure_throughput([p], n_events, poll_s, timeout, infra)
            results[name]["ready_s"] = round(ready, 1)
            memory[name] = proc_memory_mb(p.pid)
            _log(f"{name}: {results[name]['eps']:.0f} ev/s")
            p.stop()
            procs.remove(p)

        # the floor before the engine: the embedded broker slows down as batches accumulate, so the engine, not
        # the floor, meets the slower broker (the ratio errs against the engine)
        s = variants["floor"]
        floor = Proc.trivial("floor", "floor", s, work)
        procs.append(floor)
        ready = floor.wait_ready(90.0)
        _log(f"floor: agent ready in {ready:.1f}s; latency: {n_latency} events at {rate:g} ev/s offered")
        floor_lat = asyncio.run(_latency_run(s, lat_records, rate, floor, poll_s, 60.0 + latency_s, infra))
        _log(f"floor: p50 {floor_lat['latency_ms']['p50']} ms, p99 {floor_lat['latency_ms']['p99']} ms "
             f"over {floor_lat['decisions']} decisions")
        floor.stop()
        procs.remove(floor)

        s = variants["engine"]
        engine = Proc.engine("engine", s, work, worker_module)
        procs.append(engine)
        ready = engine.wait_ready(90.0)
        _log(f"engine: worker ready in {ready:.1f}s; measuring")
        m0, r0 = engine.metrics(), redis_counts(base.redis_url)
        results["engine"] = measure_throughput([engine], n_events, poll_s, timeout, infra)
        results["engine"]["ready_s"] = round(ready, 1)
        m, r1 = engine.metrics(), redis_counts(base.redis_url)
        results["engine"]["stage_ms_per_batch"] = stage_ms_per_batch(m0, m)
        results["engine"]["redis_per_event"] = redis_per_event(r0, r1, n_events)
        _check_applied(engine, m, n_events)
        decisions = int(msum(m, "promo_decisions_total"))
        batches = msum(m, "promo_batch_size_count")
        if batches:
            results["engine"] |= {
                "batches": int(batches),
                "mean_batch_size": round(msum(m, "promo_batch_size_sum") / batches, 1),
                "mean_batch_ms": round(msum(m, "promo_batch_duration_seconds_sum") / batches * 1e3, 2),
            }
        _log(f"engine: {results['engine']['eps']:.0f} ev/s, {decisions} decisions")

        _log(f"latency: {n_latency} events at {rate:g} ev/s offered to the warm engine worker")
        lat = asyncio.run(_latency_run(s, lat_records, rate, engine, poll_s, 60.0 + latency_s, infra))
        m2, r2 = engine.metrics(), redis_counts(base.redis_url)
        lat["stage_ms_per_batch"] = stage_ms_per_batch(m, m2)
        lat["redis_per_event"] = redis_per_event(r1, r2, lat["events"])
        lat["maintenance"] = maintenance(m, m2)
        memory["engine"] = proc_memory_mb(engine.pid)
        _log(f"latency: p50 {lat['latency_ms']['p50']} ms, p99 {lat['latency_ms']['p99']} ms "
             f"over {lat['decisions']} decisions; engine RSS {memory['engine']['rss_mb']} MiB")
        engine.stop()
        procs.remove(engine)

        if two_workers:
            s = variants["engine2"]
            pair = [Proc.engine("engine2-a", s, work, worker_module),
                    Proc.engine("engine2-b", s.model_copy(update={"web_port": free_port()}), work, worker_module)]
            procs.extend(pair)
            ready = max(p.wait_ready(90.0) for p in pair)
            _log(f"engine x2: both workers ready in {ready:.1f}s; measuring")
            results["engine2"] = measure_throughput(pair, n_events, poll_s, timeout, infra)
            results["engine2"]["ready_s"] = round(ready, 1)
            samples = [p.metrics() for p in pair]
            for p, mm in zip(pair, samples):
                _check_applied(p, mm, int(msum(mm, "promo_events_total")))  # no event dead-lettered
            if sum(msum(mm, "promo_events_total") for mm in samples) < n_events:
                raise BenchError(f"the two workers applied fewer than {n_events} events; see {pair[0].log_path}")
            assigned = [int(msum(mm, "promo_assigned_partitions")) for mm in samples]
            results["engine2"]["assigned_partitions"] = assigned
            _log(f"engine x2: {results['engine2']['eps']:.0f} ev/s (events per worker "
                 f"{results['engine2']['counts']}, partitions {assigned})")
            for p in pair:
                p.stop()
                procs.remove(p)

        c, pt, e = (results[k]["eps"] for k in ("consume", "passthrough", "engine"))
        report = {
            "consume_only_eps": c,
            "passthrough_eps": pt,
            "engine_eps": e,
            "ratio_consume_only": round(e / c, 3),
            "ratio_passthrough": round(e / pt, 3),
            "offered_rate": rate,
            "latency_ms": lat["latency_ms"],
            "floor_latency_ms": floor_lat["latency_ms"],
            "ratio_latency_floor": round(lat["latency_ms"]["p99"] / floor_lat["latency_ms"]["p99"], 3),
            "rss_mb": memory["engine"]["rss_mb"],
            "rss_hwm_mb": memory["engine"].get("hwm_mb"),
        }
        if two_workers:
            report["engine_2_workers_eps"] = results["engine2"]["eps"]
            report["ratio_2_workers"] = round(results["engine2"]["eps"] / e, 3)
        report |= {
            "achieved_rate": lat["achieved_rate"],
            "engine_latency_ms": lat["engine_latency_ms"],
            "latency_breakdown_ms": lat["latency_breakdown_ms"],
            "latency_p50_by_second_ms": lat["latency_p50_by_second_ms"],
            "latency_max_by_second_ms": lat["latency_max_by_second_ms"],
            "latency_maintenance": lat["maintenance"],
            "latency_cpu_us_per_event": lat["cpu_us_per_event"],
            "latency_stage_ms_per_batch": lat["stage_ms_per_batch"],
            "latency_redis_per_event": lat["redis_per_event"],
            "floor": {"engine_latency_ms": floor_lat["engine_latency_ms"],
                      "latency_breakdown_ms": floor_lat["latency_breakdown_ms"],
                      "latency_p50_by_second_ms": floor_lat["latency_p50_by_second_ms"],
                      "latency_cpu_us_per_event": floor_lat["cpu_us_per_event"],
                      "achieved_rate": floor_lat["achieved_rate"], "decisions": floor_lat["decisions"]},
            "decisions": decisions,
            "latency_decisions": lat["decisions"],
            "events": n_events,
            "latency_events": lat["events"],
            "runs": results,
            "memory_mb": memory,
            "config": {
                "partitions": base.partitions, "batch_max": base.batch_max, "batch_within_s": base.batch_within_s,
                "sources": list(sources), "latency_s": latency_s, "poll_s": poll_s, "own_stack": own_stack,
                "worker": f"python -m {worker_module} worker",
                "cpus": os.cpu_count(), "loadavg_at_start": loadavg,
                # the private stack's addresses (never the user's URLs: they may hold a password)
                "stack": {"kafka_bootstrap": base.kafka_bootstrap, "redis_url": base.redis_url} if own_stack else None,
            },
            "seconds": round(time.monotonic() - started, 1),
        }
        ok = True
        return report
    finally:
        for p in procs:
            try:
                p.stop(timeout=10.0)
            except Exception as exc:  # cleanup must go on
                _log(f"could not stop {p.name}: {exc}")
        if stack_settings is not None:
            from stream import stack

            try:
                stack.down(stack_settings)
            except Exception as exc:
                _log(f"could not stop the private stack in {stack_settings.state_dir}: {exc}")
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
        if ok and not keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _log(f"logs kept in {work}")
