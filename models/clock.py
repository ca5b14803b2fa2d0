"""An event-time clock that one event cannot move: "now" for the expiry sweep and for lazy expiry.

Event times come from shops and devices. One wrong clock (an event 23 h ahead of the stream) must not close every
open attribution window, so :class:`EventClock` reads time as Flink and Beam combine their inputs' watermarks, with
each partition's own watermark made robust to outliers:

* **per partition**: the last ``window`` event times observed. Once there are at least ``min_events`` of them the
  partition's watermark advances to their ``quantile`` (the lower median by default), and it never goes back. Events
  ahead of the others move it only when they are more than ``1 - quantile`` of those recent events: with the
  defaults at least 3 of the first 5 and 17 of the last 32;
* **over partitions**: the clock is the lowest watermark of the *active* partitions (a low watermark: it trails
  every partition that still delivers events). A partition without a watermark yet holds the clock where it is:
  one observed with too few events, and one of ``partitions`` (the topic's) not observed yet, as Flink holds an
  input that has sent nothing; otherwise a partition consumed later than the others, behind them, would find the
  clock past its events. A partition **idle** for ``idle_ms`` of wall-clock time (no event observed, no newer
  watermark merged) stops holding the clock back, so one quiet partition cannot stop it forever; its next event
  makes it active again. When every partition is idle the clock stays where it is;
* **bounded** by wall-clock now + ``max_future_skew_ms`` (when set) and **monotone**: it never goes back.

Observing only records; the clock moves in :meth:`advance`, so everything read between two calls (one batch, one
sweep) sees one value. :meth:`state` and :meth:`merge` share the watermarks with other workers and carry them over a
restart: a merged watermark is bounded by wall clock + skew like an observed one, and it is still combined as a low
watermark, so one wrong partition entry cannot move the clock either.

Parameters
----------
partitions
    The partitions expected (e.g. ``range(12)`` for the events topic): from the first event observed with a
    partition on, each holds the clock until it has a watermark or has been idle ``idle_ms``. (Events observed
    without a partition, as one stream, leave them out.)
window
    Recent event times kept per partition.
quantile
    Where in its recent event times a partition's watermark goes (0.5: the lower median).
min_events
    Recent event times a partition needs before it has a watermark of its own.
idle_ms
    Wall-clock time without news after which a partition stops holding the clock back.
max_future_skew_ms
    The clock never passes wall-clock now + this (``None``: no bound; offline replays).
wall_ms
    Wall-clock now in epoch milliseconds (default: ``time.time``).

Examples
--------
>>> wall = [0]
>>> clock = EventClock(window=8, min_events=3, idle_ms=60_000, wall_ms=lambda: wall[0])
>>> for ts in (100, 110, 86_400_000, 120, 130):     # partition 0: one event a day ahead of the others
...     clock.observe(0, ts)
>>> clock.advance()                                 # the lower median of 100, 110, 120, 130, 86_400_000
120
>>> for ts in (90, 95):                             # partition 1 is behind, with too few events to say how far
...     clock.observe(1, ts)
>>> clock.advance()
120
>>> for ts in (140, 150, 160):
...     clock.observe(0, ts)
>>> clock.observe(1, 100); clock.advance()         # partition 1 (lower median 95) holds it back; it never goes back
120
>>> wall[0] = 60_001                                # partition 1 went quiet: after idle_ms it stops holding it back
>>> clock.observe(0, 170); clock.advance()
140
>>> clock.state()                                   # per partition: [watermark, wall time of its last event]
{'0': [140, 60001], '1': [95, 0]}
>>> restarted = EventClock(window=8, min_events=3, idle_ms=60_000, wall_ms=lambda: wall[0])
>>> restarted.merge(clock.state(), restored=True); restarted.advance()  # both count as seen now: the lower wins
95
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Hashable, Iterable, Mapping

DEFAULT_PARTITION = "-"  # the key of partition ``None`` (offline replays and tests: one stream) in :meth:`state`


class _Partition:
    __slots__ = ("recent", "watermark", "seen_ms", "local_ms", "fresh")

    def __init__(self, window: int) -> None:
        self.recent: deque[int] = deque(maxlen=window)
        self.watermark: int | None = None
        self.seen_ms = 0  # wall-clock time of the last news: an event observed or a newer watermark merged
        self.local_ms: int | None = None  # wall-clock time of the last event observed here (None: never, not published)
        self.fresh = False  # events observed since the last advance


def _key(partition: Hashable) -> str:
    return DEFAULT_PARTITION if partition is None else str(partition)


def _partition(key: str) -> Hashable:
    if key == DEFAULT_PARTITION:
        return None
    try:
        return int(key)
    except ValueError:
        return key


class EventClock:
    """Event-time low watermark over partitions, robust to outliers; see the module docstring."""

    def __init__(
        self,
        partitions: Iterable[Hashable] = (),
        *,
        window: int = 32,
        quantile: float = 0.5,
        min_events: int = 5,
        idle_ms: int = 300_000,
        max_future_skew_ms: int | None = None,
        wall_ms: Callable[[], int] | None = None,
    ) -> None:
        if window < 1 or not 1 <= min_events <= window:
            raise ValueError(f"need 1 <= min_events <= window, got min_events={min_events}, window={window}")
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {quantile}")
        self.window = window
        self.quantile = quantile
        self.min_events = min_events
        self.idle_ms = idle_ms
        self.max_future_skew_ms = max_future_skew_ms
        self.wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self.time_ms = 0  # the clock: event-time "now" (0 until the first watermark)
        self._parts: dict[Hashable, _Partition] = {}
        self._expected = list(partitions)  # registered at the first event observed with a partition

    def __repr__(self) -> str:
        marks = {k: p.watermark for k, p in self._parts.items()}
        return f"EventClock(time_ms={self.time_ms}, watermarks={marks})"

    def _get(self, partition: Hashable) -> _Partition:
        p = self._parts.get(partition)
        if p is None:
            p = self._parts[partition] = _Partition(self.window)
        return p

    def _bound(self, now: int) -> int | None:
        return None if self.max_future_skew_ms is None else now + self.max_future_skew_ms

    def observe(self, partition: Hashable, ts_ms: int) -> None:
        """Record one event time of ``partition`` (a Kafka partition number; ``None`` for a single stream)."""
        if self._expected and partition is not None:  # the first event with a partition, whether or not a
            now = self.wall_ms()                        # restore (merge) made some partitions known already
            for q in self._expected:  # from now on each holds the clock until it has a watermark (or is idle)
                e = self._get(q)
                e.seen_ms = max(e.seen_ms, now)
            self._expected = []
        p = self._get(partition)
        p.recent.append(ts_ms)
        p.fresh = True

    def advance(self) -> int:
        """Move the partitions' watermarks and the clock as the module docstring says; returns the clock."""
        now = self.wall_ms()
        bound = self._bound(now)
        lowest: int | None = None
        held = False
        for p in self._parts.values():
            if p.fresh:
                p.fresh = False
                p.seen_ms = max(p.seen_ms, now)
                p.local_ms = now
                n = len(p.recent)
                if n >= self.min_events:
                    mark = sorted(p.recent)[int(self.quantile * (n - 1))]
                    if bound is not None and mark > bound:
                        mark = bound
                    if p.watermark is None or mark > p.watermark:
                        p.watermark = mark
            if now - p.seen_ms > self.idle_ms:
                continue  # idle: does not hold the clock back
            if p.watermark is None:
                held = True  # active, but too few events to know where it is
            elif lowest is None or p.watermark < lowest:
                lowest = p.watermark
        if lowest is not None and not held:
            if bound is not None and lowest > bound:
                lowest = bound
            if lowest > self.time_ms:
                self.time_ms = lowest
        return self.time_ms

    def state(self) -> dict[str, list[int]]:
        """``{partition: [watermark, wall time of its last event]}`` for the partitions observed here that have a
        watermark: what this worker publishes (:meth:`merge` takes it back)."""
        return {_key(k): [p.watermark, p.local_ms] for k, p in self._parts.items()
                if p.watermark is not None and p.local_ms is not None}

    def merge(self, state: Mapping[str, list[int]], restored: bool = False) -> None:
        """Take watermarks published elsewhere (:meth:`state` of another worker, or of this one before a restart).

        Each is bounded by wall clock + skew and raises its partition's watermark only. A partition counts as seen
        when its publisher last observed an event, or now with ``restored`` (after a restart every known partition
        holds the clock back for ``idle_ms``, until it shows where it is). Call :meth:`advance` to move the clock.
        """
        now = self.wall_ms()
        bound = self._bound(now)
        for key, (mark, seen) in state.items():
            mark = int(mark)
            if bound is not None and mark > bound:
                mark = bound
            p = self._get(_partition(key))
            if p.watermark is None or mark > p.watermark:
                p.watermark = mark
            p.seen_ms = max(p.seen_ms, now if restored else int(seen))

    @staticmethod
    def encode(state: Mapping[str, list[int]]) -> dict[str, str]:
        """:meth:`state` as hash fields ``{partition: "<watermark> <seen>"}`` (what Redis keeps).

        >>> EventClock.encode({"3": [1_569_888_000_000, 1_700_000_000_000]})
        {'3': '1569888000000 1700000000000'}
        """
        return {k: f"{int(m)} {int(s)}" for k, (m, s) in state.items()}

    @staticmethod
    def decode(fields: Mapping) -> dict[str, list[int]]:
        """Hash fields written by :meth:`encode` (bytes or text) back to a state; malformed entries are skipped
        (they can only hold the clock back less, never move it).

        >>> EventClock.decode({b"3": b"1569888000000 1700000000000", b"4": b"junk"})
        {'3': [1569888000000, 1700000000000]}
        """
        out: dict[str, list[int]] = {}
        for k, v in fields.items():
            k = k.decode() if isinstance(k, bytes) else str(k)
            v = v.decode() if isinstance(v, bytes) else str(v)
            parts = v.split()
            if len(parts) == 2 and all(x.lstrip("-").isdigit() for x in parts):
                out[k] = [int(parts[0]), int(parts[1])]
        return out
