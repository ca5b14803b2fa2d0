"""The event-time clock (models.clock): outliers, idle partitions, the wall-clock bound, monotonicity, restore."""

from __future__ import annotations

import random

import pytest

from models.clock import EventClock

DAY = 86_400_000
T0 = 1_569_888_000_000  # 2019-10-01: a replay, far behind the wall clock


class Wall:
    """A wall clock the test moves."""

    def __init__(self, ms: int = 1_700_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def clock(wall=None, **kw) -> EventClock:
    return EventClock(wall_ms=wall or Wall(), **kw)


def feed(c: EventClock, partition, times) -> int:
    for t in times:
        c.observe(partition, t)
    return c.advance()


def test_one_event_a_day_ahead_does_not_move_the_clock():
    c = clock()
    assert feed(c, 0, [T0 + i * 1000 for i in range(20)]) == T0 + 9_000  # the lower median of the last 20
    assert feed(c, 0, [T0 + DAY - 3_600_000]) == T0 + 10_000  # the outlier only shifts the median by one event
    assert feed(c, 0, [T0 + 20_000 + i * 1000 for i in range(5)]) < T0 + 60_000


def test_a_few_outliers_cannot_move_a_young_partition_but_a_majority_does():
    c = clock()
    # from its 5th event on a partition has a watermark: 2 of 5 ahead cannot move it
    assert feed(c, 0, [T0, T0 + DAY, T0 + 1, T0 + DAY, T0 + 2]) == T0 + 2
    # what is more than half of the recent events is the stream, not an outlier
    assert feed(c, 0, [T0 + DAY + i for i in range(40)]) >= T0 + DAY


def test_outliers_in_one_partition_are_held_back_by_the_others():
    c = clock()
    feed(c, 1, [T0 + i for i in range(10)])
    feed(c, 0, [T0 + DAY + i for i in range(10)])  # a whole partition a day ahead (a replay of another day)
    assert c.advance() == T0 + 4  # the low watermark: partition 1 is where the stream is


def test_a_partition_without_a_watermark_holds_the_clock():
    c = clock()
    assert feed(c, 0, [T0 + i * 1000 for i in range(10)]) == T0 + 4_000
    feed(c, 1, [T0 + 30_000 + i for i in range(4)])  # too few events to know where partition 1 is
    assert feed(c, 0, [T0 + 10_000 + i * 1000 for i in range(30)]) == T0 + 4_000
    assert feed(c, 1, [T0 + 40_000]) > T0 + 4_000


def test_an_idle_partition_stops_holding_the_clock_back_and_its_next_event_makes_it_active():
    wall = Wall()
    c = clock(wall, idle_ms=60_000)
    feed(c, 0, [T0 + i for i in range(10)])  # partition 0 goes quiet at T0 + 9
    assert feed(c, 1, [T0 + 1000 + i for i in range(10)]) == T0 + 4
    wall.ms += 60_000  # exactly idle_ms: still active
    assert feed(c, 1, [T0 + 2000 + i for i in range(10)]) == T0 + 4
    wall.ms += 1
    # partition 0 is idle: partition 1 alone moves the clock (the lower median of its last 21 events)
    assert feed(c, 1, [T0 + 3000]) == T0 + 2_000
    # partition 0 is back, behind: it holds the clock again from now on (which never goes back)
    feed(c, 0, [T0 + 100 + i for i in range(10)])
    assert feed(c, 1, [T0 + 10_000 + i for i in range(40)]) == T0 + 2_000
    assert feed(c, 0, [T0 + 20_000 + i for i in range(40)]) == T0 + 10_023  # partition 1's median of 10,008..10,039


def test_with_every_partition_idle_the_clock_stays():
    wall = Wall()
    c = clock(wall, idle_ms=1_000)
    t = feed(c, 0, [T0 + i for i in range(10)])
    wall.ms += 10 * 1_000
    assert c.advance() == t


def test_the_clock_never_passes_wall_clock_plus_the_skew():
    wall = Wall(T0)
    c = clock(wall, max_future_skew_ms=300_000)
    # a whole stream 10 min ahead of the wall clock (validation lets through at most the skew): bounded
    assert feed(c, 0, [T0 + 600_000 + i for i in range(10)]) == T0 + 300_000
    wall.ms += 60_000
    assert c.advance() == T0 + 300_000  # the partition's watermark was bounded too: no jump when wall time passes
    assert feed(c, 0, [T0 + 600_000 + i for i in range(10)]) == T0 + 360_000


def test_late_events_never_move_the_clock_back():
    c = clock()
    t = feed(c, 0, [T0 + i * 1000 for i in range(32)])
    assert feed(c, 0, [T0 - DAY] * 32) == t  # a whole window of late events: the watermark stays


def test_monotone_and_never_ahead_of_a_live_partition_on_random_streams():
    rnd = random.Random(11)
    wall = Wall()
    c = clock(wall, idle_ms=5_000, max_future_skew_ms=DAY // 2)
    heads = {p: T0 for p in range(4)}  # per partition: where its (in-order) stream is
    for p in range(3):
        c.observe(p, T0)  # partitions 0-2 are there from the start; partition 3 joins later
    last_event_wall = {p: wall.ms for p in range(3)}
    went_idle: set[int] = set()
    prev = 0
    for _ in range(3000):
        wall.ms += rnd.randrange(0, 200)
        p = rnd.randrange(4)
        if p == 3 and rnd.random() < 0.97:
            continue  # partition 3 is quiet: mostly idle
        went_idle |= {q for q, w in last_event_wall.items() if wall.ms - w > 5_000}
        heads[p] += rnd.randrange(0, 5000)
        ts = heads[p] + (DAY if rnd.random() < 0.02 else 0)  # 2 % of events are a day ahead
        c.observe(p, ts)
        last_event_wall[p] = wall.ms
        now = c.advance()
        assert now >= prev
        prev = now
        # a low watermark: behind every partition that has delivered events all along (one that joins late or
        # comes back from idle may be behind it: its events are late)
        assert now <= min(heads[q] for q in range(3) if q not in went_idle)
        assert now <= wall.ms + DAY // 2
    assert prev > T0 + 1_000_000 and 3 in went_idle  # it moved; the quiet partition went idle and did not stop it


def test_restore_keeps_every_partition_and_a_restored_outlier_cannot_move_the_clock():
    wall = Wall()
    before = clock(wall, idle_ms=60_000)
    feed(before, 0, [T0 + i for i in range(10)])
    feed(before, 1, [T0 + 50 + i for i in range(10)])
    state = before.state()
    assert state == {"0": [T0 + 4, wall.ms], "1": [T0 + 54, wall.ms]}
    state["2"] = [T0 + DAY, wall.ms]  # a wrong entry (e.g. written by an older version): one partition a day ahead
    wall.ms += 3_600_000  # restarted an hour later: the stored wall times are stale, every entry still counts
    after = clock(wall, idle_ms=60_000)
    after.merge(EventClock.decode(EventClock.encode(state)), restored=True)
    assert after.advance() == T0 + 4
    bounded = clock(Wall(T0), max_future_skew_ms=300_000)
    bounded.merge({"0": [T0 + DAY, 0]}, restored=True)
    assert bounded.advance() == T0 + 300_000  # a restored value is bounded by wall clock + skew as well


def test_merged_entries_of_other_workers_hold_the_clock_until_they_go_idle():
    wall = Wall()
    c = clock(wall, idle_ms=60_000)
    c.merge({"5": [T0, wall.ms - 1_000]})  # another worker's partition 5, behind, seen a second ago
    assert feed(c, 0, [T0 + 10_000 + i for i in range(10)]) == T0
    assert c.state() == {"0": [T0 + 10_004, wall.ms]}  # only what this worker observed is published
    wall.ms += 60_000
    assert feed(c, 0, [T0 + 20_000]) == T0 + 10_005  # partition 5's publisher stopped a minute ago


def test_single_stream_and_bad_parameters():
    c = clock()
    assert feed(c, None, [T0 + i for i in range(5)]) == T0 + 2
    assert c.state() == {"-": [T0 + 2, c.wall_ms()]}
    assert EventClock.decode({"-": f"{T0} 1"}) == {"-": [T0, 1]}
    with pytest.raises(ValueError, match="min_events"):
        EventClock(window=4, min_events=5)
    with pytest.raises(ValueError, match="quantile"):
        EventClock(quantile=1.0)


def test_a_partition_expected_from_the_start_holds_the_clock_until_it_shows_where_it_is_or_goes_idle():
    wall = Wall()
    c = clock(wall, partitions=range(3), idle_ms=60_000)
    feed(c, 0, [T0 + DAY + i for i in range(10)])  # partition 0 is consumed first, a day ahead of the others
    assert feed(c, 1, [T0 + DAY + i for i in range(10)]) == 0  # partition 2 not consumed yet: nothing moves
    assert feed(c, 2, [T0 + i for i in range(10)]) == T0 + 4
    quiet = clock(wall, partitions=range(3), idle_ms=60_000)
    feed(quiet, 0, [T0 + i for i in range(10)])
    wall.ms += 60_001  # partitions 1 and 2 never had an event: after idle_ms they stop holding it
    assert feed(quiet, 0, [T0 + 10]) == T0 + 5
    one_stream = clock(wall, partitions=range(3))  # events without a partition (no worker): nothing expected
    assert feed(one_stream, None, [T0 + i for i in range(5)]) == T0 + 2


def test_partitions_not_heard_from_hold_the_clock_after_a_restore_that_covers_only_some():
    """After a restart the restored watermarks may cover some partitions only (the others never published). The
    partitions expected but not heard from still hold the clock once events arrive, as without a restore: else
    the sweep would close windows and fire timers ahead of their events."""
    wall = [1_000_000]

    def clock():
        return EventClock(range(3), min_events=1, idle_ms=60_000, wall_ms=lambda: wall[0])

    fresh, restored = clock(), clock()
    restored.merge({"0": [50, 999_000]}, restored=True)
    for c in (fresh, restored):
        for t in (100, 200, 300):
            c.observe(0, t)
    assert fresh.advance() == 0
    assert restored.advance() == 0  # partitions 1 and 2 have sent nothing: held
    wall[0] += 61_000  # they stay silent past idle_ms: idle, they no longer hold it
    for c in (fresh, restored):
        c.observe(0, 400)
    assert fresh.advance() == restored.advance() > 0
