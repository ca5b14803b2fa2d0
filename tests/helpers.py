"""Test helpers shared by fixtures and tests: polling with deadlines, a worker subprocess handle, metrics
parsing, raw Kafka produce/consume. Fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from stream.metrics import parse_exposition, sample_sum
from stream.procs import free_port  # noqa: F401  (the tests import it from here)
from stream.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Return ``pred()``'s first truthy value; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")


def http_get(url: str, timeout: float = 2.0, attempts: int = 1) -> tuple[int, str]:
    """GET -> (status, body); status 0 when nothing answered (``attempts`` tries of ``timeout`` seconds)."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            if attempt == attempts - 1:
                return 0, str(e)
    return 0, "unreachable"


parse_metrics = parse_exposition  # Prometheus text -> {(name, frozenset(labels.items())): value}
metric = sample_sum  # sum of the samples of a name whose labels include the given ones


class WorkerProcess:
    """A ``promo worker`` child process with its own log file."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"], env=env, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.base_url = f"http://127.0.0.1:{settings.web_port}"
        self.metrics_url = self.base_url + "/metrics"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ready_status(self) -> int:
        return http_get(self.base_url + "/readyz")[0]

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return self.ready_status() == 200

        try:
            wait_until(ready, timeout, "worker /readyz == 200", interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- worker log ---\n{self.log_tail()}") from None

    def metrics(self) -> dict:
        status, text = http_get(self.metrics_url, timeout=5.0, attempts=4)  # a busy worker may answer late
        assert status == 200, f"/metrics answered {status}: {text[:200]}"
        return parse_metrics(text)

    def kill(self) -> None:
        """``kill -9``: no shutdown hooks, no offset commit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        from stream.procs import stop_process

        stop_process(self.proc, timeout)
        self._log.close()


@contextlib.contextmanager
def private_stack(tmp_path: Path, name: str, **settings):
    """An embedded stack of a test's own, on free ports under ``tmp_path`` (for tests that kill or restart the
    broker or Redis, which the session stack must survive), with its own prefixes, group and web port; stopped on
    exit. ``settings``: overrides (``durable``, ``redis_retry_s``, ...)."""
    import uuid

    from stream import stack as st

    tag = name + uuid.uuid4().hex[:8]
    s = Settings(
        _env_file=None, state_dir=tmp_path / "stack", kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0", topic_prefix=tag, redis_prefix=tag, app_id=f"promo-{tag}",
        web_port=free_port(), **settings,
    )
    st.up(s)
    try:
        yield s
    finally:
        st.down(s)


# --- Kafka helpers --------------------------------------------------------------------------------
def produce_raw(settings: Settings, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Send (key, value) records as they are (invalid ones included), in order, and wait for the acks."""
    from aiokafka import AIOKafkaProducer

    async def go():
        p = AIOKafkaProducer(linger_ms=5, max_request_size=4 * 1024 * 1024, **settings.kafka_client_kwargs())
        await p.start()
        try:
            futs = [await p.send(topic, value, key=key) for key, value in records]
            await asyncio.gather(*futs)
        finally:
            await p.stop()

    asyncio.run(go())


def consume_all(settings: Settings, topic: str, done, timeout: float = 60.0) -> list:
    """Read ``topic`` from the beginning (no group) until ``done(messages)`` is true or ``timeout``."""
    from aiokafka import AIOKafkaConsumer

    async def go():
        c = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **settings.kafka_client_kwargs())
        await c.start()
        msgs: list = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not done(msgs):
                batch = await c.getmany(timeout_ms=200)
                for _tp, ms in batch.items():
                    msgs.extend(ms)
        finally:
            await c.stop()
        return msgs

    return asyncio.run(go())


def event_bytes(e: dict) -> bytes:
    return json.dumps(e, separators=(",", ":")).encode()


def choosing(offer_id: str):
    """A Thompson policy class that always chooses ``offer_id`` when it is eligible, else ``none`` (a test that
    needs that offer's budget reserved); otherwise the production policy."""
    from models.policy.thompson import ThompsonPolicy

    class Choosing(ThompsonPolicy):
        def choice_distribution(self, ctx, eligible, rng):
            probs, scores = super().choice_distribution(ctx, eligible, rng)
            probs[:] = [1.0 if s.offer_id == offer_id else 0.0 for s in eligible]
            if not probs.any():
                probs[0] = 1.0  # eligible[0] is none
            return probs, scores

    return Choosing


def refusing_first_reservation():
    """An in-memory budget store whose first reservation call is refused as a whole (another worker took the
    budget after this one last read it); ``refusals`` counts it. Later calls reserve as usual."""
    from models.state.budget_memory import MemoryBudgetStore
    from models.state.budget_store import ReserveResult

    class RefusesFirst(MemoryBudgetStore):
        def __init__(self) -> None:
            super().__init__()
            self.refusals = 0

        async def reserve(self, reqs):
            if not self.refusals and reqs:
                self.refusals = 1
                return [ReserveResult(False, 0.0) for _ in reqs]
            return await super().reserve(reqs)

    return RefusesFirst()
