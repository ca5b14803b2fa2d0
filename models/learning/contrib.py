"""A user's contributions to the item statistics: exact, order-independent, and removable.

The live engine does not learn item similarity from batches (whose boundaries depend on timing): each user's
events are turned into **contributions** while the user is planned, from the user's own recent window kept in
the profile (:attr:`models.profile.Profile.item_window`), and parked in the user's atomic commit together with the
event markers (:class:`models.state.engine_redis.RedisStore`); once the batch's decisions are sent, one script per user
applies the parked payload to the item statistics and deletes it, and what a killed worker left parked is
applied by the next worker's maintenance (``RedisStore.apply_parked``). So item statistics are a function of
the committed events alone: a redelivered event is a duplicate and adds nothing, a crash can not lose or repeat
a contribution, and the order in which users' batches interleave does not matter.

Time decay without order: a contribution of weight ``w`` at event time ``ts`` is stored as
``w * 2 ** ((ts - G) / half_life)`` relative to the **grid epoch** ``G = grid(ts)``, a multiple of
:data:`GRID_HALF_LIVES` half-lives. Moving a value from one grid epoch to another multiplies it by an exact
power of two, so every stored sum is the same set of terms whatever the order they were added in (floating-point
sums differ only by rounding, far below 1e-9 relative).

Each user also keeps a **record** of what they contributed (same units), under their own hash tag, for as long
as their profile lives (``PROMO_PROFILE_TTL_S``, refreshed at every commit): ``promo forget`` subtracts it.

Pairs follow :mod:`models.learning.similarity`: for each event of weight ``w > 0``, one increment ``min(w, w_j)`` with
every other item ``j`` of the user's window seen at most ``window_ms`` before; repeating the window's front item
emits nothing; then the item moves to the front (its weight is the largest seen).

Examples
--------
>>> c = Contribution(half_life_ms=1000, pop_half_life_ms=1000)
>>> win = []
>>> for item, ts in (("a", 0), ("b", 500), ("a", 1000)):
...     c.add_event(win, item, ts, 1.0, width=4, window_ms=10_000)
>>> win
[['a', 1000, 1.0], ['b', 500, 1.0]]
>>> c.items["a"], c.pairs[("a", "b")]
([0, 3.0], [0, 3.414213562373095])
>>> grid(17_000, 1000), grid(-1, 1000)
(16000, -16000)
"""

from __future__ import annotations

from models import jsoncodec

__all__ = ["GRID_HALF_LIVES", "grid", "Contribution", "SEP"]

GRID_HALF_LIVES = 16
"""Grid epochs are multiples of this many half-lives (stored values stay within ``[w, w * 2**16)``)."""

SEP = "\x1f"
"""Separator of the two items of a pair in a record field (ASCII unit separator)."""


def grid(ts: int, half_life_ms: int) -> int:
    """The grid epoch of event time ``ts``: the largest multiple of ``GRID_HALF_LIVES * half_life_ms`` <= ts."""
    step = GRID_HALF_LIVES * int(half_life_ms)
    return ts - ts % step


class Contribution:
    """The item, pair and popularity increments of one user's new events in one commit.

    ``items``/``pops``: ``{item: [grid epoch, value]}``; ``pairs``: ``{(a, b): [epoch, value]}`` with ``a < b``;
    ``last``: ``{item: latest event time}`` (the store's item index). Values are relative to their epoch.
    """

    __slots__ = ("half_life_ms", "pop_half_life_ms", "items", "pairs", "pops", "last")

    def __init__(self, half_life_ms: int, pop_half_life_ms: int) -> None:
        self.half_life_ms = int(half_life_ms)
        self.pop_half_life_ms = int(pop_half_life_ms)
        self.items: dict[str, list] = {}
        self.pairs: dict[tuple[str, str], list] = {}
        self.pops: dict[str, list] = {}
        self.last: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.items or self.pairs)

    @staticmethod
    def _put(acc: dict, key, g: int, v: float, hl: int) -> None:
        """Add ``v`` (relative to grid epoch ``g``) to ``acc[key]``."""
        cur = acc.get(key)
        if cur is None:
            acc[key] = [g, v]
        elif cur[0] == g:
            cur[1] += v
        elif cur[0] > g:  # an older event: into the newer epoch (an exact power of two)
            cur[1] += v * 2.0 ** (-(cur[0] - g) / hl)
        else:
            cur[1] = cur[1] * 2.0 ** (-(g - cur[0]) / hl) + v
            cur[0] = g

    def add_event(self, win: list, item: str, ts: int, w: float, width: int, window_ms: int) -> None:
        """Add one event (weight ``w``) and advance the user's window ``win`` (``[[item, ts, w], ...]``,
        most recent first) in place."""
        if w <= 0.0:
            return
        hl, phl = self.half_life_ms, self.pop_half_life_ms
        g = grid(ts, hl)
        f = 2.0 ** ((ts - g) / hl)  # this event's weight factor against its epoch, computed once
        put = self._put
        put(self.items, item, g, w * f, hl)
        gp = grid(ts, phl)
        put(self.pops, item, gp, w * 2.0 ** ((ts - gp) / phl), phl)
        last = self.last.get(item)
        if last is None or ts > last:
            self.last[item] = ts
        pos = -1
        for j, entry in enumerate(win):
            if entry[0] == item:
                pos = j
                break
        if pos != 0:
            for j, (other, t_j, w_j) in enumerate(win):
                if j == pos or abs(ts - t_j) > window_ms:
                    continue
                key = (item, other) if item < other else (other, item)
                put(self.pairs, key, g, (w if w < w_j else w_j) * f, hl)
        if pos >= 0:
            old = win.pop(pos)
            win.insert(0, [item, ts, old[2] if old[2] > w else w])
        else:
            win.insert(0, [item, ts, w])
            del win[width:]

    def to_json(self, header: dict | None = None) -> str:
        """The payload of the user's commit script (see :class:`models.state.engine_redis.RedisStore`), after ``header``
        (the item store's prefix and bounds)."""
        return jsoncodec.dumps_str({
            **(header or {}),
            "i": [[k, g, v, self.last[k]] for k, (g, v) in self.items.items()],
            "q": [[k, g, v] for k, (g, v) in self.pops.items()],
            "p": [[a, b, g, v] for (a, b), (g, v) in self.pairs.items()],
        })
