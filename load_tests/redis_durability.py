"""What the embedded Redis's AOF modes survive and what they cost, on the real redis-server of the stack.

``python -m load_tests.redis_durability --json`` runs, for each mode (``none``: no AOF, ``everysec``, ``always``;
the flags :func:`stream.stack.redis_args` gives ``promo stack up``), on a private redis-server in a temporary
directory (free port, stopped at the end):

1. **survival of a process kill**: a writer sends pipelines of ``SET`` (each key written once, in sequence) as
   fast as it can and records the highest key whose pipeline Redis acknowledged; after a pseudo-random time
   redis-server gets ``SIGKILL`` (no shutdown, no final fsync), is started again on the same directory and the
   acknowledged keys that are missing are counted. Repeated ``kills`` times. A process kill leaves the kernel's
   page cache in place, so this measures whether Redis wrote the AOF before it acknowledged, not whether it
   fsynced (an OS crash or power loss, which loses what was not fsynced, is not reproduced here). With
   ``--disk-pressure MB`` another thread writes and fsyncs that many megabytes to the same file system during
   each kill run, so Redis's once-a-second background fsync is slow (a busy disk);
2. **cost**: redis-server CPU time (``/proc/<pid>/stat``, user + system) per write and the client's writes per
   second, for ``seconds`` per workload: ``batch`` (pipelines of 500 ``HSET`` of 300-byte values, the shape of
   a worker's per-batch commit) and ``single`` (one ``SET`` per round trip, the worst case for ``always``: one
   fsync per write). Ratios to ``none`` of the same run are the figures to read on a shared machine.

Progress on stderr, one JSON object on stdout with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from load_tests.bench_pipeline import cpu_seconds, free_port
from stream.stack import redis_args, redis_binary

MODES = ("none", "everysec", "always")
VALUE = b"x" * 300


def _log(msg: str) -> None:
    print(f"[durability] {msg}", file=sys.stderr, flush=True)


class Server:
    """One redis-server child on a free port, data in ``directory``."""

    def __init__(self, directory: Path, mode: str) -> None:
        self.directory, self.mode, self.port = directory, mode, free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        cmd = [str(redis_binary()), *redis_args(self.port, self.directory, None if self.mode == "none" else self.mode)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server ({self.mode}) did not answer on port {self.port}")
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _disk_pressure(path: Path, mb: int, stop: threading.Event) -> None:
    """Write ``mb`` MB to ``path`` in 8 MB chunks, fsyncing each, until done or ``stop``; then delete it."""
    chunk = os.urandom(1 << 20) * 8
    try:
        with open(path, "wb") as f:
            for _ in range(max(1, mb // 8)):
                if stop.is_set():
                    break
                f.write(chunk)
                os.fsync(f.fileno())
    finally:
        path.unlink(missing_ok=True)


def survival(mode: str, work: Path, kills: int, seed: int, disk_pressure_mb: int = 0) -> dict:
    """Acknowledged writes missing after a SIGKILL and a restart on the same directory, per kill."""
    rng = random.Random(seed)
    runs = []
    for i in range(kills):
        directory = work / f"survival-{mode}-{i}"
        directory.mkdir()
        server = Server(directory, mode).start()
        pressure_stop = threading.Event()
        pressure = None
        if disk_pressure_mb:
            pressure = threading.Thread(target=_disk_pressure, daemon=True,
                                        args=(work / f"pressure-{i}", disk_pressure_mb, pressure_stop))
            pressure.start()
        acked = [0]  # keys 0 .. acked-1 were acknowledged
        stop = threading.Event()

        def write(client=server.client()):
            n = 0
            try:
                while not stop.is_set():
                    pipe = client.pipeline(transaction=False)
                    for k in range(n, n + 50):
                        pipe.set(f"k:{k}", VALUE)
                    pipe.execute()
                    n += 50
                    acked[0] = n
            except redis.RedisError:
                pass  # the kill: the pipeline in flight was not acknowledged

        t = threading.Thread(target=write, daemon=True)
        t.start()
        time.sleep(rng.uniform(1.0, 2.0))  # when to kill: a random moment of a steady write stream
        info = server.client().info("persistence")
        server.kill()
        stop.set()
        t.join(10)
        pressure_stop.set()
        if pressure is not None:
            pressure.join(60)
        n_acked = acked[0]
        server.start()  # same directory: replays the AOF if there is one
        client = server.client()
        present = sum(client.exists(*[f"k:{k}" for k in range(j, min(j + 1000, n_acked))])
                      for j in range(0, n_acked, 1000))
        client.close()
        server.stop()
        runs.append({"acknowledged": n_acked, "missing": n_acked - present,
                     "aof_delayed_fsync": info.get("aof_delayed_fsync")})
        _log(f"{mode}: kill {i + 1}/{kills}: {n_acked} acknowledged, {n_acked - present} missing after restart")
    return {"kills": runs, "acknowledged": sum(r["acknowledged"] for r in runs),
            "missing": sum(r["missing"] for r in runs)}


def cost(mode: str, work: Path, seconds: float) -> dict:
    directory = work / f"cost-{mode}"
    directory.mkdir()
    server = Server(directory, mode).start()
    assert server.proc is not None
    client = server.client()
    out = {}
    try:
        for workload in ("batch", "single"):
            n = 0
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                if workload == "batch":
                    pipe = client.pipeline(transaction=False)
                    for k in range(500):
                        pipe.hset(f"h:{n + k}", "v", VALUE)
                    pipe.execute()
                    n += 500
                else:
                    client.set(f"s:{n}", VALUE)
                    n += 1
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(server.proc.pid) - cpu0
            out[workload] = {"writes": n, "writes_per_s": round(n / wall), "redis_cpu_us_per_write": round(cpu / n * 1e6, 3)}
            _log(f"{mode}: {workload}: {n / wall:,.0f} writes/s, redis-server {cpu / n * 1e6:.2f} us CPU per write")
    finally:
        client.close()
        server.stop()
    return out


def run(kills: int = 5, seconds: float = 5.0, seed: int = 0, disk_pressure_mb: int = 0,
        modes: tuple[str, ...] = MODES) -> dict:
    work = Path(tempfile.mkdtemp(prefix="promo-durability-"))
    try:
        report: dict = {"redis_version": None, "kills": kills, "seconds": seconds,
                        "disk_pressure_mb": disk_pressure_mb, "modes": {}}
        for mode in modes:
            report["modes"][mode] = {"survival": survival(mode, work, kills, seed, disk_pressure_mb)}
            if seconds > 0:
                report["modes"][mode]["cost"] = cost(mode, work, seconds)
        base = report["modes"].get("none", {}).get("cost")
        for mode in modes if base else ():
            c = report["modes"][mode]["cost"]
            report["modes"][mode]["ratio_to_none"] = {
                w: {"writes_per_s": round(c[w]["writes_per_s"] / base[w]["writes_per_s"], 3),
                    "redis_cpu_per_write": round(c[w]["redis_cpu_us_per_write"] / base[w]["redis_cpu_us_per_write"], 3)}
                for w in c
            }
        report["redis_version"] = subprocess.run([str(redis_binary()), "--version"], capture_output=True,
                                                 text=True).stdout.split()[2].removeprefix("v=")
        report["loadavg"] = list(os.getloadavg())
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--disk-pressure", type=int, default=0, metavar="MB",
                    help="write and fsync this many MB beside Redis during each kill run (a busy disk)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = run(args.kills, args.seconds, args.seed, args.disk_pressure, tuple(args.modes.split(",")))
    print(json.dumps(report, separators=(",", ":")) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
