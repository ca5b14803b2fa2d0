"""``promo demo``: the embedded stack, one worker, a replay of the bundled REES46 sample, a live summary.

Everything the demo starts, it stops on Ctrl-C (a stack that was already running is left running). A stack it
starts has its Redis in memory (``durable`` off): the demo stops it at the end, and the next demo starts afresh.
With ``--once`` it exits by itself when the replay has been processed and prints the summary as JSON.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from stream import stack as st
from stream.errors import PromoError
from stream.procs import stop_process
from stream.metrics import parse_exposition, sample_sum
from stream.settings import Settings

SAMPLE = Path(__file__).resolve().parent / "data" / "rees46_sample.csv"


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as r:
        return parse_exposition(r.read().decode())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Quantile from cumulative ``(le, count)`` buckets, interpolated like PromQL's ``histogram_quantile``.

    >>> round(histogram_quantile(0.5, [(0.001, 0), (0.01, 10), (float("inf"), 10)]), 6)
    0.0055
    >>> histogram_quantile(0.5, []) is None
    True
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return prev_le


def summary(samples: dict) -> dict:
    buckets = [(float(dict(ls)["le"]), v) for (n, ls), v in samples.items()
               if n == "promo_decision_latency_seconds_bucket"]
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    kinds: dict[str, float] = {}
    triggers: dict[str, float] = {}
    for (n, ls), v in samples.items():
        if n == "promo_decisions_total":
            kind = dict(ls)["offer_kind"]
            kinds[kind] = kinds.get(kind, 0) + v
        elif n == "promo_trigger_decisions_total":
            trigger = dict(ls)["trigger"]
            triggers[trigger] = triggers.get(trigger, 0) + v
    return {
        "events": int(sample_sum(samples, "promo_events_total")),
        "duplicates": int(sample_sum(samples, "promo_events_duplicate_total")),
        "dlq": int(sample_sum(samples, "promo_events_invalid_total")),
        "decisions": int(sample_sum(samples, "promo_decisions_total")),
        "decisions_by_kind": {k: int(v) for k, v in sorted(kinds.items())},
        "decisions_by_trigger": {k: int(v) for k, v in sorted(triggers.items())},
        "holdout": int(sample_sum(samples, "promo_decisions_total", group="holdout")),
        "latency_p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
        "latency_p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


CLEAR_TO_EOL = "\x1b[K"  # ANSI: erase from the cursor to the end of the line


def replay_done(produced: dict, s: dict, replaying: bool) -> bool:
    """The replay thread finished and the worker has processed (applied, skipped as duplicate or dead-lettered)
    every event it sent.

    >>> replay_done({"sent": 10}, {"events": 8, "duplicates": 1, "dlq": 1}, replaying=False)
    True
    >>> replay_done({"sent": 10}, {"events": 8, "duplicates": 1, "dlq": 0}, replaying=False)
    False
    >>> replay_done({}, {"events": 0, "duplicates": 0, "dlq": 0}, replaying=True)
    False
    """
    if replaying or not produced or "error" in produced:
        return False
    return s["events"] + s["duplicates"] + s["dlq"] >= produced.get("sent", 0)


def _line(s: dict, eps: float) -> str:
    kinds = " ".join(f"{k}:{v}" for k, v in s["decisions_by_kind"].items()) or "-"
    lat = f"p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms" if s["latency_p50_ms"] is not None else "-"
    return (f"events {s['events']} ({eps:,.0f}/s) | decisions {s['decisions']} [{kinds}] | latency {lat} | "
            f"DLQ {s['dlq']} | duplicates {s['duplicates']}")


def run_demo(settings: Settings, rate: float = 200.0, file: Path | None = None, fmt: str = "rees46",
             once: bool = False) -> dict | None:
    from stream.produce import produce_file

    file = file or SAMPLE
    if not file.exists():
        raise PromoError(f"demo input {file} not found; pass --file FILE --format jsonl|rees46|taobao")
    out = sys.stderr
    was_running = st.status(settings)["ok"]
    print(f"[demo] starting the embedded stack (state in {settings.state_dir})", file=out)
    # a stack the demo starts, it stops at the end: its Redis in memory, so every demo begins on an empty state
    # (a durable one would keep the last demo's de-duplication markers, and replayed events would be duplicates)
    st.up(settings if was_running else settings.model_copy(update={"durable": False}))
    worker_log = settings.state_dir.resolve() / "worker.log"
    env = {**os.environ, **settings.to_env()}
    print(f"[demo] starting a worker; log: {worker_log}; metrics: http://{settings.web_host}:{settings.web_port}/metrics",
          file=out)
    with open(worker_log, "ab") as log:
        # its own session: a terminal's Ctrl-C reaches the demo only, which stops the worker with SIGTERM (a
        # worker interrupted at the same time would exit first, and the demo report that as a failure)
        worker = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{settings.web_port}"
    produced: dict = {}
    interrupted = False
    # SIGTERM (a supervisor, `timeout`, `kill`) stops the demo as Ctrl-C does: the worker and the stack it started
    # are stopped too, instead of being left running
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        deadline = time.monotonic() + 120
        while True:
            if worker.poll() is not None:
                raise PromoError(f"the worker exited with status {worker.returncode}; see {worker_log}")
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PromoError(f"the worker did not become ready within 120 s; see {worker_log}")
            time.sleep(0.2)
        print(f"[demo] worker ready; replaying {file.name} at {rate:g} events/s (Ctrl-C stops everything)", file=out)

        def replay():
            try:
                produced.update(produce_file(settings, file, fmt, rate=rate, progress=False))
            except Exception as exc:  # reported in the summary loop
                produced["error"] = str(exc)

        t = threading.Thread(target=replay, daemon=True)
        t.start()
        last_events, last_t = 0, time.monotonic()
        tty = out.isatty()
        done = False  # the replay was sent and processed (said once)
        while True:
            time.sleep(1.0)  # refresh period of the live summary
            if worker.poll() is not None:
                raise PromoError(f"the worker exited with status {worker.returncode}; see {worker_log}")
            try:
                s = summary(_scrape(base + "/metrics"))
            except OSError:  # the worker is busy (a scrape waits for its event loop): next refresh
                continue
            now = time.monotonic()
            eps = (s["events"] - last_events) / (now - last_t)
            last_events, last_t = s["events"], now
            # in place on a terminal: back to the line's start, and clear what a longer line left behind
            print(("\r" if tty else "") + _line(s, eps) + (CLEAR_TO_EOL if tty else ""), end="" if tty else "\n",
                  file=out, flush=True)
            if "error" in produced:
                raise PromoError(f"replay failed: {produced['error']}")
            if not done and replay_done(produced, s, t.is_alive()):
                done = True
                skipped = _skipped(produced)  # rows of the file that are no event: said, never dropped quietly
                if once:
                    print("", file=out)
                    if skipped:
                        print(f"[demo] {skipped}", file=out, flush=True)
                    return {"replay": produced, "summary": s}
                print(("\n" if tty else "") + f"[demo] replay done: {produced.get('sent', 0)} events sent, every one "
                      "processed; the worker keeps running (Ctrl-C stops everything)", file=out, flush=True)
                if skipped:
                    print(f"[demo] {skipped}", file=out, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\n[demo] stopping", file=out)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        stop_process(worker, 30.0)
        if not was_running:
            st.down(settings, warn=False)  # its own replay may still hold a connection
            print("[demo] stopped the worker and the embedded stack", file=out)
        elif interrupted:
            print("[demo] stopped the worker (the stack was already running and stays up)", file=out)


def _skipped(produced: dict) -> str | None:
    """What the replay left out of the file, in one line (None: nothing).

    >>> _skipped({"skipped": 1, "failed": 0, "errors": [{"line": 2, "error": "not a JSON object"}]})
    '1 unmappable row(s) of the file skipped (first: line 2: not a JSON object)'
    >>> _skipped({"skipped": 0, "failed": 0}) is None
    True
    """
    n, failed = produced.get("skipped", 0), produced.get("failed", 0)
    if not n and not failed:
        return None
    first = (produced.get("errors") or [{}])[0]
    where = f" (first: line {first['line']}: {first['error']})" if first else ""
    return (f"{n} unmappable row(s) of the file skipped{where}" if n else "") + \
        (f"{'; ' if n else ''}{failed} event(s) the broker did not take" if failed else "")
