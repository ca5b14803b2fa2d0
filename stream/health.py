"""What ``/readyz`` reports: the batch loop's view of its dependencies, and a probe of the broker.

A worker is ready when Redis answers, the broker answers, no step of the batch loop is retrying a transient
error (:class:`Health`), partitions are assigned and no rebalance is in progress. ``/readyz`` says which
dependency is failing and why, so an operator (and a load balancer) can tell "Redis is full" from "the broker
is gone" without reading logs.

>>> h = Health()
>>> h.fail("redis", "OutOfMemoryError: command not allowed when used memory > 'maxmemory'")
>>> h.ok, h.redis_ok, h.kafka_ok
(False, False, True)
>>> h.recover("redis"), h.recover("redis"), h.ok
(True, False, True)
"""

from __future__ import annotations

import asyncio
import time

from stream.settings import Settings


class Health:
    """Components the batch loop is retrying against right now (``redis``, ``kafka``), with their last error."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}
        self.last_error: str | None = None

    def fail(self, component: str, error: str) -> None:
        self.failing[component] = error
        self.last_error = f"{component}: {error}"

    def recover(self, component: str) -> bool:
        """Mark ``component`` healthy; True if it was failing."""
        return self.failing.pop(component, None) is not None

    @property
    def ok(self) -> bool:
        return not self.failing

    @property
    def redis_ok(self) -> bool:
        return "redis" not in self.failing

    @property
    def kafka_ok(self) -> bool:
        return "kafka" not in self.failing


class BrokerProbe:
    """Asks the broker for cluster metadata (a real Kafka request, not an open port), at most once per ``ttl_s``.

    The consumer and producer of a worker retry a lost broker on their own and never tell the agent, so without
    this probe ``/readyz`` would answer 200 while the broker is gone.
    """

    def __init__(self, settings: Settings, ttl_s: float = 1.0, timeout_s: float = 1.0) -> None:
        self.settings = settings
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self._client = None
        self._checked = -1e9
        self._last: tuple[bool, str | None] = (False, "not probed yet")
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, str | None]:
        """``(answers, error)``; a cached answer when the last probe is younger than ``ttl_s``."""
        async with self._lock:
            if time.monotonic() - self._checked < self.ttl_s:
                return self._last
            try:
                await asyncio.wait_for(self._probe(), self.timeout_s)
                self._last = (True, None)
            except Exception as exc:  # any failure to answer is "down"; say why
                from stream.faults import describe

                self._last = (False, describe(exc) if str(exc) or not isinstance(exc, asyncio.TimeoutError)
                              else f"no answer within {self.timeout_s:.1f}s")
            self._checked = time.monotonic()
            return self._last

    async def _probe(self) -> None:
        from aiokafka.client import AIOKafkaClient

        if self._client is None:
            client = AIOKafkaClient(request_timeout_ms=int(self.timeout_s * 1000),
                                    **self.settings.kafka_client_kwargs())
            try:
                await client.bootstrap()
            except BaseException:
                await client.close()
                raise
            self._client = client
        await self._client.fetch_all_metadata()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
