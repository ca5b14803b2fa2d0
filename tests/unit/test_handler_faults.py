"""The batch loop's error policy without a broker (issue 11): each exception class gets its verdict.

Stores here fail the way Redis does (error replies per script, dropped connections after the fact); the
real-stack versions of these faults are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.exceptions as rex
from aiokafka.errors import KafkaTimeoutError, RecordTooLargeError

from models.engine import Engine
from models.state.engine_memory import MemoryStore
from stream.faults import WorkerStop
from tests.unit.test_handler import Sink, ev, handled, make, msg

OOM = rex.ResponseError("Error running script (call to f_1): @user_script: 9: -OOM command not allowed when used "
                        "memory > 'maxmemory'.")


class OomForUser(MemoryStore):
    """The commit of one user answers OOM ``n`` times (the others go through), as a full Redis does."""

    def __init__(self, user: str, n: int) -> None:
        super().__init__()
        self.user, self.n = user, n

    async def commit(self, commits):
        out = []
        for c in commits:
            if c.user_id == self.user and self.n:
                self.n -= 1
                out.append(OOM)
            else:
                out += await super().commit([c])
        return out


def test_a_commit_refused_by_a_full_redis_is_retried_and_the_rest_counts_once():
    store = OomForUser("u2", 2)
    s, h, sink = make(store)
    batch = [msg(ev("a1", "cart", user="u1"), 0), msg(ev("b1", "cart", user="u2"), 1, b"u2")]
    asyncio.run(handled(h, batch))
    assert sink.on(s.topic_dlq) == []
    assert sorted(d["trigger_event_id"] for d in sink.on(s.topic_decisions)) == ["a1", "b1"]
    assert not h.health.failing
    assert {(u, e) for u, e in store.seen} == {("u1", "a1"), ("u2", "b1")}


class DropsAfterCommit(MemoryStore):
    """The connection drops after the commits were applied: the caller cannot know they landed."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = False

    async def commit(self, commits):
        out = await super().commit(commits)
        if not self.dropped:
            self.dropped = True
            raise rex.ConnectionError("Connection reset by peer")
        return out


def test_a_commit_in_doubt_is_recognised_by_its_token_not_counted_as_a_duplicate():
    from stream import metrics as m

    s, h, sink = make(DropsAfterCommit())
    before = (m.EVENTS.labels(type="cart")._value.get(), m.EVENTS_DUPLICATE._value.get())
    asyncio.run(handled(h, [msg(ev("a1", "cart"), 0)]))
    after = (m.EVENTS.labels(type="cart")._value.get(), m.EVENTS_DUPLICATE._value.get())
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)  # applied once, not a duplicate of itself
    (d,) = sink.on(s.topic_decisions)
    assert d["trigger_event_id"] == "a1"


class PolicyStateFailsOnce(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def policy_state(self):
        if not self.failed:
            self.failed = True
            raise rex.TimeoutError("Timeout reading from socket")
        return await super().policy_state()


def test_a_learning_step_retried_after_a_redis_timeout_teaches_the_models_once():
    class CountingLearning:
        n = 0
        items_via_commit = False

        def learn_batch(self, events, profiles, watermark=None):
            self.n += len(events)

        recommend_options: dict = {}

        async def prefetch_items(self, seeds, k):
            return None

        def recommend(self, prof, k, now, reads=None):
            return []

        def propensity(self, prof, now, context=None):
            return 0.1

        def segment(self, prof):
            return 0

        def features(self, prof, now, context=None):
            return {}

    learning = CountingLearning()
    store = PolicyStateFailsOnce()
    s, h, sink = make(store)
    from models.policy.thompson import ThompsonPolicy
    from models.policy.catalogue import load_catalogue

    # the exploring policy reads what the commits taught back from the store after a batch with decisions
    h.engine = Engine(store, ThompsonPolicy(load_catalogue(), holdout_pct=0.0), holdout_pct=0.0, learning=learning)
    assert h.engine.shares_policy
    asyncio.run(handled(h, [msg(ev("a1", "cart"), 0), msg(ev("a2"), 1)]))
    assert store.failed and learning.n == 2


class BrokenEngineStore(MemoryStore):
    async def load(self, event_ids, triggers):
        raise KeyError("a bug that every event hits")


def test_when_every_event_fails_alone_the_worker_stops_instead_of_dead_lettering_the_traffic():
    s, h, sink = make(BrokenEngineStore(), dlq_max_consecutive=20, dlq_max_ratio=1.0)
    with pytest.raises(WorkerStop, match="in a row"):
        asyncio.run(handled(h, [msg(ev(f"e{i}", user=f"u{i}"), i) for i in range(25)]))
    assert sink.on(s.topic_dlq) == []


class FlakyPoison(MemoryStore):
    """Fails the batch with a bug-like error while Redis is, in fact, down: nothing is poison then."""

    def __init__(self) -> None:
        super().__init__()
        self.down = 3

    async def load(self, event_ids, triggers):
        if self.down:
            raise ValueError("cannot decode what Redis sent")  # not a transient class
        return await super().load(event_ids, triggers)

    async def ping(self):
        self.down = max(0, self.down - 1)
        return self.down == 0


def test_an_event_is_dead_lettered_only_if_it_fails_alone_against_a_healthy_store():
    s, h, sink = make(FlakyPoison())
    asyncio.run(handled(h, [msg(ev("a1", "cart"), 0)]))
    assert sink.on(s.topic_dlq) == [] and len(sink.on(s.topic_decisions)) == 1


class FailingAcks(Sink):
    """The broker's ack of the first ``n`` decision sends fails with a transient (or a permanent) error."""

    def __init__(self, n: int, exc=KafkaTimeoutError) -> None:
        super().__init__()
        self.n, self.exc, self.attempts = n, exc, []

    async def __call__(self, topic, key, value, headers):
        self.attempts.append(topic)
        fut = asyncio.get_running_loop().create_future()
        if topic.endswith("decisions") and self.n:
            self.n -= 1
            fut.set_exception(self.exc())
        else:
            self.sent.append((topic, key, value))
            fut.set_result(None)
        return fut


def test_a_failed_ack_sends_that_record_again_and_holds_the_batch_until_it_is_acknowledged():
    s, h, _ = make()
    sink = FailingAcks(2)
    h.send = sink
    asyncio.run(handled(h, [msg(b"{bad", 0), msg(ev("a1", "cart"), 1)]))
    assert [t for t in sink.attempts] == [s.topic_dlq, s.topic_decisions, s.topic_decisions, s.topic_decisions]
    assert len(sink.on(s.topic_decisions)) == 1 and len(sink.on(s.topic_dlq)) == 1
    assert not h.health.failing


def test_a_permanent_send_error_stops_the_batch_unacknowledged():
    s, h, _ = make()
    h.send = FailingAcks(1, RecordTooLargeError)
    with pytest.raises(RecordTooLargeError):
        asyncio.run(handled(h, [msg(ev("a1", "cart"), 0)]))
    assert h.engine.learned_offsets == {}  # the batch never finished


def test_readiness_names_the_failing_component_while_a_step_retries():
    s, h, _ = make()
    sink = FailingAcks(3)
    h.send = sink
    seen = []

    async def run():
        async def watch():
            while True:
                seen.append(dict(h.health.failing))
                await asyncio.sleep(0)

        w = asyncio.ensure_future(watch())
        await h.handle([msg(ev("a1", "cart"), 0)])
        w.cancel()

    asyncio.run(run())
    assert any("kafka" in f and "KafkaTimeoutError" in f["kafka"] for f in seen)
    assert h.health.failing == {}


def test_decisions_sent_after_retries_are_marked_sent_once():
    store = MemoryStore()
    s, h, _ = make(store)
    h.send = FailingAcks(1)
    asyncio.run(handled(h, [msg(ev("a1", "cart"), 0)]))
    assert [v[1] for v in store.decisions.values()] == [True]
    json.dumps(h.health.failing)


def test_a_decoder_that_fails_on_everything_stops_the_worker_instead_of_dead_lettering(monkeypatch):
    import stream.handler as handler

    def broken(*a, **kw):
        raise ZeroDivisionError("a bug in the decoder")

    s, h, sink = make(dlq_max_consecutive=5, dlq_max_ratio=1.0)
    monkeypatch.setattr(handler, "decode_event", broken)
    with pytest.raises(WorkerStop, match="in a row"):
        asyncio.run(handled(h, [msg(ev(f"e{i}"), i) for i in range(6)]))
    assert sink.on(s.topic_dlq) == []


def test_bad_input_is_dead_lettered_and_never_counts_against_the_limit():
    s, h, sink = make(dlq_max_consecutive=2, dlq_max_ratio=0.01)
    asyncio.run(handled(h, [msg(b"{not json", i) for i in range(50)]))
    assert len(sink.on(s.topic_dlq)) == 50
