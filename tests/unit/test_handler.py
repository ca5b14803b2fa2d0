"""The batch handler without a broker: DLQ routing, decisions, retry on Redis errors, poison isolation."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from models.engine import Engine
from models.state.engine_memory import MemoryStore
from stream.handler import BatchHandler, Health, RawMessage
from stream.settings import Settings

NOW = int(time.time() * 1000)


def msg(value: bytes | None, offset: int, key: bytes = b"u1") -> RawMessage:
    return RawMessage(key, value, "promo.events", 0, offset, time.perf_counter_ns())


def ev(eid: str, typ: str = "view", user: str = "u1", price: float = 10.0) -> bytes:
    return json.dumps({"event_id": eid, "type": typ, "user_id": user, "item_id": "i1", "ts": NOW,
                       "price": price}).encode()


class Sink:
    def __init__(self):
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def __call__(self, topic, key, value, headers):
        self.sent.append((topic, key, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def on(self, topic):
        return [json.loads(v) for t, _, v in self.sent if t == topic]


async def handled(h: BatchHandler, msgs) -> None:
    """One batch, its learning included (it runs behind the decisions: :meth:`BatchHandler.drain`)."""
    await h.handle(msgs)
    await h.drain()


def make(store=None, **kw):
    settings = Settings(_env_file=None, redis_retry_s=0.01, holdout_pct=0.0, **kw)
    sink = Sink()
    engine = Engine(store or MemoryStore(), holdout_pct=0.0)
    return settings, BatchHandler(settings, engine, sink, Health()), sink


def test_invalid_messages_go_to_the_dlq_valid_ones_decide():
    s, h, sink = make()
    asyncio.run(handled(h, [msg(ev("e1"), 0), msg(b"{nope", 1), msg(ev("e2", "cart"), 2), msg(None, 3)]))
    dlq = sink.on(s.topic_dlq)
    assert [(d["reason"], d["offset"]) for d in dlq] == [("bad_json", 1), ("bad_json", 3)]
    decisions = sink.on(s.topic_decisions)
    assert len(decisions) == 1 and decisions[0]["trigger_event_id"] == "e2" and decisions[0]["latency_ms"] > 0


def test_redelivered_batch_sends_no_second_decision():
    s, h, sink = make()
    batch = [msg(ev("e1", "cart"), 0)]
    asyncio.run(handled(h, batch))
    asyncio.run(handled(h, batch))
    assert len(sink.on(s.topic_decisions)) == 1


class FlakyStore(MemoryStore):
    """Fails the first ``n`` loads with a connection error, like a Redis restart."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    async def load(self, *a):
        if self.n:
            self.n -= 1
            raise ConnectionError("Connection refused")
        return await super().load(*a)


def test_redis_errors_are_retried_and_reported_not_dead_lettered():
    s, h, sink = make(FlakyStore(3))
    asyncio.run(handled(h, [msg(ev("e1", "cart"), 0)]))
    assert sink.on(s.topic_dlq) == [] and len(sink.on(s.topic_decisions)) == 1
    assert h.health.redis_ok


class PoisonStore(MemoryStore):
    async def load(self, event_ids, triggers):
        if any("poison" in e for ids in event_ids.values() for e in ids):
            raise ValueError("models cannot handle this event")
        return await super().load(event_ids, triggers)


def test_an_event_the_engine_cannot_handle_is_isolated_and_dead_lettered():
    s, h, sink = make(PoisonStore())
    asyncio.run(handled(h, [msg(ev("e1", "cart"), 0), msg(ev("poison-1"), 1), msg(ev("e3", user="u2"), 2, b"u2")]))
    dlq = sink.on(s.topic_dlq)
    assert [(d["reason"], d["offset"]) for d in dlq] == [("internal_error", 1)]
    assert "ValueError" in dlq[0]["error"]
    assert len(sink.on(s.topic_decisions)) == 1


@pytest.mark.parametrize("raw,reason", [(b"[]", "not_object"), (b"x" * 20000, "oversized")])
def test_reasons(raw, reason):
    s, h, sink = make()
    asyncio.run(handled(h, [msg(raw, 0)]))
    assert sink.on(s.topic_dlq)[0]["reason"] == reason


def test_pseudonymised_ids_never_reach_the_store_but_decisions_carry_the_shop_id():
    store = MemoryStore()
    s, h, sink = make(store, pseudonymise_key="k" * 16)
    asyncio.run(handled(h, [msg(ev("e1", "cart", user="alice"), 0, b"alice")]))
    assert "alice" not in store.profiles and len(store.profiles) == 1
    (pseudo,) = store.profiles
    assert pseudo.startswith("p-")
    assert all("alice" not in json.dumps(v) for v in store.profiles.values())
    assert all(b"alice" not in js for js, _, _ in store.decisions.values())
    (ctx,) = [c for _, _, c in store.decisions.values()]
    assert pseudo in ctx and "alice" not in ctx  # the context kept for promo explain names the pseudonym only
    (d,) = sink.on(s.topic_decisions)
    assert d["user_id"] == "alice"
    assert [(t, k) for t, k, _ in sink.sent] == [(s.topic_decisions, b"alice")]


def test_learned_offsets_advance_and_a_gap_after_the_restored_snapshot_is_reported(caplog):
    s, h, sink = make()
    h.engine.restored_offsets = {("promo.events", 0): 5}
    with caplog.at_level("WARNING", logger="promo.worker"):
        asyncio.run(handled(h, [msg(ev("e1"), 12), msg(ev("e2"), 13)]))
        asyncio.run(handled(h, [msg(ev("e3"), 14)]))
    assert h.engine.learned_offsets == {("promo.events", 0): 15}
    gaps = [r.getMessage() for r in caplog.records if "did not learn" in r.getMessage()]
    assert len(gaps) == 1 and "did not learn 7 events" in gaps[0] and "promo.events[0]" in gaps[0]


def test_no_gap_is_reported_when_consumption_resumes_where_the_snapshot_ends(caplog):
    s, h, sink = make()
    h.engine.restored_offsets = {("promo.events", 0): 12}
    with caplog.at_level("WARNING", logger="promo.worker"):
        asyncio.run(handled(h, [msg(ev("e1"), 12)]))
    assert not [r for r in caplog.records if "did not learn" in r.getMessage()]


def test_events_lost_with_the_previous_worker_are_read_back_and_label_pending_points():
    """The restored models have a pending decision point of u1; u1's purchase was applied by the killed worker
    after the snapshot. The handler reads the gap back and the point is labelled positive before the first
    live batch teaches anything (without it the point would expire as a negative)."""
    from models.events import Event
    from models.state.item_memory import MemoryItemStore
    from models.learning.core import LearningCore
    from models.profile import Profile

    t0 = NOW - 10 * 60_000
    core = LearningCore(MemoryItemStore(), horizon_h=1.0, decision_points="batch", sample_gap_ms=0)
    prof = Profile()
    seen = [Event("a1", "view", "u1", "i1", t0), Event("a2", "cart", "u1", "i1", t0 + 1000, price=10.0)]
    for e in seen:
        prof.apply(e)
    core.learn_batch(seen, {"u1": prof})
    assert len(core.purchase_model) == 1 and core.purchase_model.n_positive == 0
    settings = Settings(_env_file=None, redis_retry_s=0.01, holdout_pct=0.0)
    gap = [json.dumps({"event_id": "a3", "type": "purchase", "user_id": "u1", "item_id": "i1", "ts": t0 + 60_000,
                       "price": 10.0}).encode(), b"{not json"]
    asked = []

    async def fetch(ranges):
        asked.append(ranges)
        return {("promo.events", 0): gap}

    engine = Engine(MemoryStore(), holdout_pct=0.0, learning=core)
    engine.restored_offsets = {("promo.events", 0): 5}
    h = BatchHandler(settings, engine, Sink(), Health(), fetch=fetch)
    asyncio.run(handled(h, [msg(ev("b1", user="u2"), 7)]))
    asyncio.run(handled(h, [msg(ev("b2", user="u2"), 8)]))
    assert asked == [{("promo.events", 0): (5, 7)}]  # once, for exactly the missing offsets
    assert core.purchase_model.n_positive == 1


@pytest.mark.parametrize("cap,want", [(3, [{("promo.events", 0): (97, 100)}]), (0, [])])
def test_reading_back_is_capped_to_the_newest_events_and_can_be_turned_off(cap, want, caplog):
    """A snapshot far behind (written long ago, or by another worker) must not make a restart read millions of
    events into memory: only the newest PROMO_RELEARN_MAX_EVENTS per partition are read back."""
    from models.state.item_memory import MemoryItemStore
    from models.learning.core import LearningCore

    asked = []

    async def fetch(ranges):
        asked.append(ranges)
        return {tp: [] for tp in ranges}

    settings = Settings(_env_file=None, redis_retry_s=0.01, holdout_pct=0.0, relearn_max_events=cap)
    engine = Engine(MemoryStore(), holdout_pct=0.0, learning=LearningCore(MemoryItemStore()))
    engine.restored_offsets = {("promo.events", 0): 5}
    h = BatchHandler(settings, engine, Sink(), Health(), fetch=fetch)
    with caplog.at_level("WARNING", logger="promo.worker"):
        asyncio.run(handled(h, [msg(ev("e1"), 100)]))
    assert asked == want
    (warning,) = [r.getMessage() for r in caplog.records if "did not learn 95 events" in r.getMessage()]
    assert ("reading back the newest 3 (PROMO_RELEARN_MAX_EVENTS=3)" in warning) == (cap == 3)
    assert ("reading" not in warning) == (cap == 0)


def test_batches_first_is_held_until_the_decisions_are_sent_and_released_after():
    """The expiry sweep's chunks wait in BatchesFirst.gap while a batch is on its way: the handler holds it from
    the batch's start until the broker acknowledged its decisions, and releases it then (and on an error)."""
    settings, h, sink = make()
    seen = []

    class Watching(Sink):
        async def __call__(self, topic, key, value, headers):
            seen.append(h.batches_first._idle.is_set())  # while the decision is sent: held
            return await super().__call__(topic, key, value, headers)

    h.send = Watching()
    asyncio.run(handled(h, [msg(ev("c1", "cart", price=50.0), 0)]))
    assert seen == [False]
    assert h.batches_first._idle.is_set()

    async def failing(*_a, **_k):
        raise RuntimeError("boom")

    h.engine.process_batch = failing
    with pytest.raises(RuntimeError):
        asyncio.run(handled(h, [msg(ev("c2", "cart", price=50.0), 1)]))
    assert h.batches_first._idle.is_set()  # a failed batch does not hold the sweep back


def test_a_gap_waits_for_the_batch_on_its_way_at_most_max_wait():
    from stream.handler import BatchesFirst

    with pytest.raises(ValueError, match="max_wait_s"):
        BatchesFirst(max_wait_s=0)
    first = BatchesFirst(max_wait_s=0.05)

    async def batch_that_never_ends() -> tuple[bool, float]:
        release = asyncio.Event()

        async def a_batch():
            with first.batch():
                await release.wait()

        task = asyncio.ensure_future(a_batch())
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        await first.gap()  # a saturated worker still sweeps: the wait is bounded
        waited = time.perf_counter() - t0
        release.set()
        await task
        return task.done(), waited

    done, waited = asyncio.run(batch_that_never_ends())
    assert done and waited >= 0.05


def test_a_failure_before_the_engine_takes_up_any_event_stops_the_batch_unacknowledged():
    """An error before the engine grouped the batch (a catalogue swap that cannot be built, a clock bug) belongs to no
    event: the batch must neither be acknowledged with nothing applied nor dead-lettered event by event. The error
    propagates (the worker stops, the group redelivers the batch)."""
    store = MemoryStore()
    s, h, sink = make(store)

    def broken(events):
        raise ValueError("a bug before the batch is grouped")

    h.engine.observe_clock = broken
    with pytest.raises(ValueError, match="before the batch is grouped"):
        asyncio.run(handled(h, [msg(ev("a1", "cart"), 0), msg(ev("b1", user="u2"), 1, b"u2")]))
    assert store.seen == set() and sink.sent == []


class MarkSentTimesOutOnce(MemoryStore):
    def __init__(self):
        super().__init__()
        self.failed = False

    async def mark_sent(self, sent):
        if not self.failed:
            self.failed = True
            import redis.exceptions

            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return await super().mark_sent(sent)


def test_a_transient_error_of_the_check_after_recovery_is_retried_not_fatal():
    """Redis answers again after a transient error, and the check run then (the epoch guard's GET of its marker)
    times out once: that is as transient as the error before it, so the step is not failed (the worker would
    stop); the check is retried with /readyz at 503 and passes."""
    import redis.exceptions

    store = MarkSentTimesOutOnce()
    settings = Settings(_env_file=None, redis_retry_s=0.01, holdout_pct=0.0)
    checks, not_ready = [], []

    async def on_recovered(component):
        checks.append(component)
        if len(checks) == 1:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")

    health = Health()
    fail = health.fail
    health.fail = lambda component, error: (not_ready.append(component), fail(component, error))
    h = BatchHandler(settings, Engine(store, holdout_pct=0.0), Sink(), health, on_recovered=on_recovered)
    asyncio.run(handled(h, [msg(ev("a1", "cart"), 0)]))
    assert store.failed and checks == ["redis", "redis"]
    assert set(not_ready) == {"redis"} and len(not_ready) >= 2  # 503 for the step's error, and for the check's
    assert [sent for _, sent, _ in store.decisions.values()] == [True]
    assert h.health.ok


class PoisonForU2(MemoryStore):
    async def load(self, event_ids, triggers):
        if "u2" in event_ids:
            raise ValueError("the models cannot handle this user's event")
        return await super().load(event_ids, triggers)


def test_a_poison_event_is_dead_lettered_as_its_own_message_when_another_user_has_the_same_event_id():
    """The engine's identity of an event is (user, event id): two users' events may share an id (a shop's per-store
    counters). The event that fails alone is dead-lettered with its own bytes, key and offset, not those of the
    other user's event, which was applied."""
    store = PoisonForU2()
    s, h, sink = make(store)

    def same_id(user: str) -> bytes:
        return json.dumps({"event_id": "42", "type": "view", "user_id": user, "item_id": "i1", "ts": NOW}).encode()

    asyncio.run(handled(h, [msg(same_id("u1"), 10, b"u1"), msg(same_id("u2"), 11, b"u2")]))
    assert ("u1", "42") in store.seen and ("u2", "42") not in store.seen
    (rec,) = sink.on(s.topic_dlq)
    assert rec["offset"] == 11 and json.loads(rec["raw"])["user_id"] == "u2"
    assert [k for t, k, _ in sink.sent if t == s.topic_dlq] == [b"u2"]
