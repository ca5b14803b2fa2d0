"""A batch's learning runs behind the decisions (``PROMO_LEARN_BEHIND``): the next batch is decided and sent while
it runs, batches are learnt in order and at most one behind, and a learning error that is not transient stops the
worker (``on_learning_failed``) or is raised by the next batch."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions as rex

from models.engine import Engine
from models.state.engine_memory import MemoryStore
from stream.handler import BatchHandler, Health
from stream.settings import Settings
from tests.unit.test_handler import Sink, ev, msg


class GatedEngine(Engine):
    """An engine whose learning waits for :attr:`gate`, and records the order of what happened."""

    def __init__(self, fail: BaseException | None = None, transient_failures: int = 0):
        super().__init__(MemoryStore(), holdout_pct=0.0)
        self.gate = asyncio.Event()
        self.log: list[str] = []
        self.fail = fail
        self.transient_failures = transient_failures

    async def process_batch(self, events, learn=True, progress=None):
        self.log.append("decide " + ",".join(e.event_id for e in events))
        return await super().process_batch(events, learn=learn, progress=progress)

    async def learn(self, result):
        await self.gate.wait()
        if self.transient_failures:
            self.transient_failures -= 1
            raise rex.ConnectionError("Redis went away")
        if self.fail is not None:
            raise self.fail
        self.log.append("learn " + ",".join(e.event_id for e in result.new_events))
        await super().learn(result)


def handler(engine, **kw) -> tuple[BatchHandler, Sink]:
    settings = Settings(_env_file=None, redis_retry_s=0.01, holdout_pct=0.0)
    sink = Sink()
    return BatchHandler(settings, engine, sink, Health(), **kw), sink


def test_the_next_batch_is_decided_and_sent_while_the_previous_one_learns_and_learning_keeps_batch_order():
    engine = GatedEngine()
    h, sink = handler(engine)

    async def run():
        await h.handle([msg(ev("a1", "cart"), 0)])
        second = asyncio.ensure_future(h.handle([msg(ev("b1", "cart", user="u2"), 1, b"u2")]))
        while len(sink.sent) < 2:  # both decisions are on the broker while the first batch's learning waits
            await asyncio.sleep(0)
        sent_before_learning = len(sink.sent)
        assert not second.done(), "the second batch waits for the first one's learning before its own"
        engine.gate.set()
        await second
        await h.drain()
        return sent_before_learning

    assert asyncio.run(run()) == 2
    assert engine.log == ["decide a1", "decide b1", "learn a1", "learn b1"]
    assert h.engine.learned_offsets == {("promo.events", 0): 2}


def test_without_learn_behind_the_batch_learns_before_it_returns():
    engine = GatedEngine()
    engine.gate.set()
    settings = Settings(_env_file=None, redis_retry_s=0.01, holdout_pct=0.0, learn_behind=False)
    h = BatchHandler(settings, engine, Sink(), Health())
    asyncio.run(h.handle([msg(ev("a1", "cart"), 0)]))
    assert engine.log == ["decide a1", "learn a1"]


def test_a_transient_error_while_learning_behind_is_retried_with_readyz_failing():
    engine = GatedEngine(transient_failures=2)
    h, _ = handler(engine)
    seen: list[dict] = []

    async def run():
        await h.handle([msg(ev("a1", "cart"), 0)])
        engine.gate.set()
        while h._learning is not None and not h._learning.done():
            seen.append(dict(h.health.failing))
            await asyncio.sleep(0.001)
        await h.drain()

    asyncio.run(run())
    assert any("redis" in f for f in seen) and h.health.failing == {}
    assert engine.log == ["decide a1", "learn a1"]


def test_a_learning_bug_stops_the_worker_through_the_callback():
    engine = GatedEngine(fail=KeyError("a bug in learning"))
    failed: list[BaseException] = []
    h, _ = handler(engine, on_learning_failed=failed.append)

    async def run():
        await h.handle([msg(ev("a1", "cart"), 0)])
        engine.gate.set()
        while not failed:
            await asyncio.sleep(0)
        await h.drain()  # reported once, through the callback

    asyncio.run(run())
    assert [type(e) for e in failed] == [KeyError]


def test_without_the_callback_the_next_batch_raises_the_learning_error_before_it_learns():
    engine = GatedEngine(fail=KeyError("a bug in learning"))
    h, _ = handler(engine)

    async def run():
        await h.handle([msg(ev("a1", "cart"), 0)])
        engine.gate.set()
        with pytest.raises(KeyError):
            await h.handle([msg(ev("b1"), 1)])

    asyncio.run(run())
