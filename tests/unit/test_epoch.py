"""The epoch marker's pure parts (stream/epoch.py): what a starting worker does, what a running one sees, the
messages. The start-up check runs on a dict standing in for Redis and a stub for the committed offsets; the real
thing (Redis restarted empty under a worker, on the embedded stack) is tests/integration/test_redis_state_lost.py.
"""

from __future__ import annotations

import logging

import pytest

from stream import metrics as m
from stream.epoch import (
    Epoch,
    StartAction,
    StateLostError,
    check_at_start,
    epoch_key,
    redis_facts,
    runtime_message,
    runtime_problem,
    start_action,
    start_message,
)
from stream.errors import PromoError
from stream.settings import Settings

SETTINGS = Settings(_env_file=None, redis_url="redis://:s3cret@cache:6380/2", redis_prefix="shop1",
                    topic_prefix="shop1", app_id="promo-shop1")


class DictRedis:
    """The four commands the start-up check uses, on a dict."""

    def __init__(self, data: dict | None = None) -> None:
        self.data = dict(data or {})
        self.sets: list[str] = []

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value, nx=False):
        self.sets.append(key)
        if nx and key in self.data:
            return None
        self.data[key] = value
        return True

    def info(self):
        return {"uptime_in_seconds": 7, "aof_enabled": 0, "db2": {"keys": len(self.data)}}

    def close(self):
        pass


def never_read(settings):
    raise AssertionError("the committed offsets are read only when the marker is missing")


@pytest.mark.parametrize("marker,committed,mode,want", [
    (None, 0, "stop", StartAction.CREATE),
    (None, 0, "reinit", StartAction.CREATE),
    (None, 1, "stop", StartAction.REFUSE),
    (None, 12, "reinit", StartAction.REINIT),
    (Epoch("a", 0, "fresh"), 0, "stop", StartAction.RUN),
    (Epoch("a", 0, "fresh"), 12, "reinit", StartAction.RUN),
])
def test_start_action_table(marker, committed, mode, want):
    assert start_action(marker, committed, mode) is want


def test_epoch_round_trip_and_fresh_ids():
    a, b = Epoch.new("fresh"), Epoch.new("fresh")
    assert a.id != b.id and len(a.id) == 32
    assert Epoch.from_bytes(a.to_bytes()) == a
    assert Epoch.from_bytes(a.to_bytes().decode()) == a  # a decoding client answers str
    for raw in (b"", b"null", b"[]", b'{"id": "x"}', b"\xff"):
        with pytest.raises(ValueError):
            Epoch.from_bytes(raw)


def test_runtime_problem_names_what_changed():
    e = Epoch("a" * 32, 0, "fresh")
    assert runtime_problem(e, e.to_bytes()) is None
    assert runtime_problem(e, Epoch(e.id, 1, "reinit").to_bytes()) is None  # same id: the same epoch
    assert runtime_problem(e, None) == "no longer holds the epoch marker"
    other = Epoch("b" * 32, 0, "reinit")
    assert runtime_problem(e, other.to_bytes()) == f"holds epoch {other.describe()} instead of {e.describe()}"
    assert "instead of the epoch marker" in runtime_problem(e, b"1")


def test_redis_facts():
    assert redis_facts({"uptime_in_seconds": 4, "aof_enabled": 1, "db0": {"keys": 2}, "db3": {"keys": 1}}) == \
        "Redis up 4 s, AOF on, 3 keys"
    assert "evicts keys without TTL" in redis_facts({"maxmemory_policy": "allkeys-lru"})
    assert redis_facts({"maxmemory_policy": "noeviction"}) == ""


def test_messages_are_one_line_name_redis_and_say_what_to_do():
    start = start_message(SETTINGS, {0: 10, 3: 5}, "Redis up 7 s, AOF off, 0 keys")
    running = runtime_message(SETTINGS, Epoch("c" * 32, 0, "fresh"), "no longer holds the epoch marker", "")
    for msg in (start, running):
        assert "\n" not in msg and msg.startswith("Redis state lost")
        assert "redis://:***@cache:6380/2" in msg and "s3cret" not in msg  # which Redis, password masked
        assert "shop1:epoch" in msg
        assert "append-only file or a backup" in msg and "PROMO_ON_STATE_LOSS=reinit" in msg  # what to do
    assert "promo-shop1" in start and "shop1.events" in start and "2 partitions, 15 events read" in start
    assert "Redis up 7 s, AOF off" in start
    assert "cccccccccccc (fresh" in running


def test_fresh_install_writes_the_marker_once():
    r = DictRedis()
    e = check_at_start(SETTINGS, client=r, read_committed=lambda s: {})
    assert e.reason == "fresh" and r.sets == ["shop1:epoch"]
    assert Epoch.from_bytes(r.data["shop1:epoch"]) == e
    assert check_at_start(SETTINGS, client=r, read_committed=never_read) == e  # the next worker: same epoch
    assert r.sets == ["shop1:epoch"]


def test_missing_marker_with_committed_offsets_refuses_and_writes_nothing():
    r = DictRedis({"other:epoch": b"x"})
    with pytest.raises(StateLostError) as err:
        check_at_start(SETTINGS, client=r, read_committed=lambda s: {0: 40, 1: 2})
    assert isinstance(err.value, PromoError)  # the CLI prints it as one line and exits 2
    assert "2 partitions, 42 events read" in str(err.value) and "Redis up 7 s, AOF off, 1 keys" in str(err.value)
    assert r.sets == [] and "shop1:epoch" not in r.data


def test_reinit_writes_a_new_epoch_loudly(caplog):
    r = DictRedis()
    before = m.STATE_REINITIALISED._value.get()
    with caplog.at_level(logging.INFO, logger="promo.worker"):
        e = check_at_start(SETTINGS.model_copy(update={"on_state_loss": "reinit"}), client=r,
                           read_committed=lambda s: {5: 100})
    assert e.reason == "reinit" and Epoch.from_bytes(r.data["shop1:epoch"]) == e
    assert m.STATE_REINITIALISED._value.get() == before + 1
    assert m.STATE_EPOCH_CREATED._value.get() == e.created_ms / 1000
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and "re-initialised" in errors[0].getMessage() and e.id[:12] in errors[0].getMessage()


def test_a_worker_starting_at_the_same_moment_wins_the_race():
    first = Epoch("f" * 32, 0, "fresh")

    class Raced(DictRedis):
        def get(self, key):  # missing when read first, then written by the other worker before our SET NX
            value = super().get(key)
            self.data.setdefault(key, first.to_bytes())
            return value

    r = Raced()
    assert check_at_start(SETTINGS, client=r, read_committed=lambda s: {}) == first


def test_a_key_that_is_not_a_marker_is_a_prefix_clash():
    r = DictRedis({epoch_key("shop1"): b"hello"})
    with pytest.raises(PromoError, match="another program uses the key prefix shop1") as err:
        check_at_start(SETTINGS, client=r, read_committed=never_read)
    assert not isinstance(err.value, StateLostError)
