"""Item co-occurrence counting: a numba kernel and its pure-Python reference.

A user's **recent window** is their last ``W`` distinct items with the time and weight of their latest event
(most recent first). For each event ``(user, item, ts, w)`` of a batch, in order, the kernel emits one pair
increment ``min(w, w_j)`` for every other item ``j`` of the user's window seen at most ``window_ms`` before,
then moves ``item`` to the front of the window. An event repeating the window's front item (the same item
viewed again) emits nothing, and weight-0 events (``remove_from_cart``) are ignored. So the increments of an
event are a pure function of (the user's window, the event): an outbox keyed by event id makes them idempotent.

Pairs are canonical ``(a, b)`` with ``a < b`` (item indices from an :class:`ItemVocab`); :func:`aggregate_pairs`
sums identical pairs (stable order, so sums are bit-identical to the reference's) before they go to a store.

Examples
--------
>>> import numpy as np
>>> w = UserWindows(capacity=4, width=3)
>>> slots = w.slots_for(["u1", "u1", "u1", "u2"])
>>> items = np.array([10, 11, 12, 10]); ts = np.array([0, 1, 2, 3]); wt = np.array([1.0, 1.0, 3.0, 1.0])
>>> a, b, inc = count_pairs(slots, items, ts, wt, w, window_ms=1000)
>>> [(int(x), int(y), float(z)) for x, y, z in zip(a, b, inc)]
[(10, 11, 1.0), (10, 12, 1.0), (11, 12, 1.0)]
>>> pairs = count_pairs_py(slots.tolist(), items.tolist(), ts.tolist(), wt.tolist(), {}, width=3, window_ms=1000)
>>> sorted(pairs.items())
[((10, 11), 1.0), ((10, 12), 1.0), ((11, 12), 1.0)]
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "ItemVocab", "UserWindows", "pair_increments", "aggregate_pairs", "aggregate_items", "count_pairs_kernel",
    "count_pairs", "count_pairs_py",
]


# --- numba kernels --------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def pair_increments(ev_slot, ev_item, ev_ts, ev_w, win_item, win_ts, win_w, win_len, window_ms):  # pragma: no cover
    """Pair increments of a batch, updating the windows in place (see the module docstring).

    ``ev_*`` are 1-d arrays of one batch in order (slot of the user's window, item index, ts in ms, weight);
    ``win_*`` are ``(n_slots, W)`` arrays, most recent first, and ``win_len`` the filled length per slot.
    Returns ``(a, b, inc)`` with ``a < b``, one row per (event, window item), not yet aggregated.
    """
    n = ev_slot.shape[0]
    width = win_item.shape[1]
    out_a = np.empty(n * max(width - 1, 1), np.int64)
    out_b = np.empty(n * max(width - 1, 1), np.int64)
    out_w = np.empty(n * max(width - 1, 1), np.float64)
    m = 0
    for e in range(n):
        w = ev_w[e]
        if w <= 0.0:
            continue
        s = ev_slot[e]
        it = ev_item[e]
        t = ev_ts[e]
        length = win_len[s]
        pos = -1
        for j in range(length):
            if win_item[s, j] == it:
                pos = j
                break
        if pos != 0:
            for j in range(length):
                jt = win_item[s, j]
                if jt == it:
                    continue
                dt = t - win_ts[s, j]
                if dt > window_ms or dt < -window_ms:
                    continue
                wj = win_w[s, j]
                inc = w if w < wj else wj
                if it < jt:
                    out_a[m] = it
                    out_b[m] = jt
                else:
                    out_a[m] = jt
                    out_b[m] = it
                out_w[m] = inc
                m += 1
        # move / insert the item at the front of the window
        if pos >= 0:
            neww = win_w[s, pos] if win_w[s, pos] > w else w
            last = pos
        else:
            neww = w
            last = length if length < width else width - 1
            if length < width:
                win_len[s] = length + 1
        for j in range(last, 0, -1):
            win_item[s, j] = win_item[s, j - 1]
            win_ts[s, j] = win_ts[s, j - 1]
            win_w[s, j] = win_w[s, j - 1]
        win_item[s, 0] = it
        win_ts[s, 0] = t
        win_w[s, 0] = neww
    return out_a[:m], out_b[:m], out_w[:m]


@njit(cache=True, nogil=True)
def _bits(x):  # pragma: no cover
    n = 0
    while x > 0:
        x >>= 1
        n += 1
    return n


@njit(cache=True, nogil=True)
def aggregate_pairs(a, b, inc):  # pragma: no cover
    """Sum the increments of identical ``(a, b)`` pairs, in input order; output sorted by ``(a, b)``.

    Sorts one int64 per pair ``(a, b, position)`` when the bits fit (item indices below about 2**26), else a
    stable argsort; either way identical pairs are summed in input order (bit-identical to the reference).
    """
    n = a.shape[0]
    ua = np.empty(n, np.int64)
    ub = np.empty(n, np.int64)
    uw = np.empty(n, np.float64)
    if n == 0:
        return ua, ub, uw
    mx = max(a.max(), b.max())
    bi = _bits(mx)
    bp = _bits(n)
    m = -1
    if 2 * bi + bp <= 63:
        comp = np.empty(n, np.int64)
        for i in range(n):
            comp[i] = (((a[i] << bi) | b[i]) << bp) | i
        comp.sort()
        maskp = (np.int64(1) << bp) - 1
        prev = np.int64(-1)
        for j in range(n):
            c = comp[j]
            o = c & maskp
            k = c >> bp
            if m < 0 or k != prev:
                m += 1
                ua[m] = a[o]
                ub[m] = b[o]
                uw[m] = 0.0
                prev = k
            uw[m] += inc[o]
    else:
        keys = a * np.int64(2147483648) + b
        order = np.argsort(keys, kind="mergesort")
        prev = np.int64(-1)
        for j in range(n):
            o = order[j]
            k = keys[o]
            if m < 0 or k != prev:
                m += 1
                ua[m] = a[o]
                ub[m] = b[o]
                uw[m] = 0.0
                prev = k
            uw[m] += inc[o]
    return ua[: m + 1], ub[: m + 1], uw[: m + 1]


@njit(cache=True, nogil=True)
def aggregate_items(item, w):  # pragma: no cover
    """Sum positive weights per item; output sorted by item."""
    n = item.shape[0]
    order = np.argsort(item, kind="mergesort")
    ui = np.empty(n, np.int64)
    uw = np.empty(n, np.float64)
    m = -1
    for i in range(n):
        o = order[i]
        if w[o] <= 0.0:
            continue
        if m < 0 or item[o] != ui[m]:
            m += 1
            ui[m] = item[o]
            uw[m] = 0.0
        uw[m] += w[o]
    return ui[: m + 1], uw[: m + 1]


@njit(cache=True, nogil=True)
def count_pairs_kernel(ev_slot, ev_item, ev_ts, ev_w, win_item, win_ts, win_w, win_len, window_ms):  # pragma: no cover
    """:func:`pair_increments` then :func:`aggregate_pairs`, in one compiled call."""
    a, b, inc = pair_increments(ev_slot, ev_item, ev_ts, ev_w, win_item, win_ts, win_w, win_len, window_ms)
    return aggregate_pairs(a, b, inc)


# --- state holders ---------------------------------------------------------------------------------
class ItemVocab:
    """Item id <-> dense int index (what the kernel works on).

    >>> v = ItemVocab()
    >>> v.index(["a", "b", "a"]).tolist(), v.ids[1], len(v)
    ([0, 1, 0], 'b', 2)
    """

    def __init__(self) -> None:
        self.idx: dict[str, int] = {}
        self.ids: list[str] = []

    def index(self, items) -> np.ndarray:
        idx = self.idx
        ids = self.ids
        out = np.empty(len(items), np.int64)
        for n, it in enumerate(items):
            i = idx.get(it)
            if i is None:
                i = idx[it] = len(ids)
                ids.append(it)
            out[n] = i
        return out

    def __len__(self) -> int:
        return len(self.ids)


class UserWindows:
    """The recent window of up to ``capacity`` users, ``width`` items each, in numpy arrays for the kernel.

    When full, the least recently used half of the users is evicted (their windows restart empty).

    >>> w = UserWindows(capacity=2, width=2)
    >>> w.slots_for(["a", "b"]).tolist(), w.slots_for(["c"]).tolist(), sorted(w.slot)
    ([0, 1], [0], ['b', 'c'])
    """

    def __init__(self, capacity: int = 100_000, width: int = 8) -> None:
        if capacity < 2 or width < 2:
            raise ValueError(f"UserWindows needs capacity >= 2 and width >= 2, got {capacity} and {width}")
        self.capacity = capacity
        self.width = width
        self.clear()

    def clear(self) -> None:
        self.slot: dict[str, int] = {}
        self.owner: list[str | None] = [None] * self.capacity
        self.used = np.zeros(self.capacity, np.int64)
        self.item = np.zeros((self.capacity, self.width), np.int64)
        self.ts = np.zeros((self.capacity, self.width), np.int64)
        self.w = np.zeros((self.capacity, self.width), np.float64)
        self.length = np.zeros(self.capacity, np.int64)
        self.free = list(range(self.capacity - 1, -1, -1))
        self.tick = 0

    def slots_for(self, users) -> np.ndarray:
        """Slot of each user (allocating, and evicting the least recently used half when full)."""
        self.tick += 1
        tick = self.tick
        slot = self.slot
        out = np.empty(len(users), np.int64)
        used = self.used
        for n, u in enumerate(users):
            s = slot.get(u)
            if s is None:
                if not self.free:
                    self._evict(protect=tick)
                s = self.free.pop()
                slot[u] = s
                self.owner[s] = u
                self.length[s] = 0
            used[s] = tick
            out[n] = s
        return out

    def _evict(self, protect: int) -> None:
        cand = np.flatnonzero(self.used < protect)
        if not len(cand):
            raise RuntimeError(f"UserWindows capacity {self.capacity} is smaller than the users of one batch")
        k = max(1, len(cand) // 2)
        victims = cand[np.argsort(self.used[cand], kind="stable")[:k]]
        for s in victims.tolist():
            del self.slot[self.owner[s]]
            self.owner[s] = None
            self.length[s] = 0
            self.free.append(s)

    def window(self, user: str) -> list[int]:
        """Item indices of a user's window, most recent first."""
        s = self.slot.get(user)
        return [] if s is None else self.item[s, : self.length[s]].tolist()

    def remap(self, mapping: np.ndarray) -> None:
        """Renumber items after a vocabulary rebuild (``mapping[old] = new``)."""
        self.item = mapping[self.item]


def count_pairs(slots, items, ts, weights, windows: UserWindows, window_ms: int):
    """Kernel + aggregation: the aggregated ``(a, b, inc)`` of one batch; updates ``windows``."""
    return count_pairs_kernel(
        np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(items, np.int64),
        np.ascontiguousarray(ts, np.int64), np.ascontiguousarray(weights, np.float64),
        windows.item, windows.ts, windows.w, windows.length, np.int64(window_ms),
    )


# --- the pure-Python reference ------------------------------------------------------------------------
def count_pairs_py(slots, items, ts, weights, windows: dict, width: int, window_ms: int) -> dict:
    """Reference implementation of :func:`count_pairs` with lists and dicts (the benchmark's comparison row).

    ``windows`` maps slot -> list of ``[item, ts, w]``, most recent first, and is updated in place.
    Returns ``{(a, b): inc}``.
    """
    out: dict = {}
    for s, it, t, w in zip(slots, items, ts, weights):
        if w <= 0.0:
            continue
        win = windows.get(s)
        if win is None:
            win = windows[s] = []
        pos = -1
        for j, entry in enumerate(win):
            if entry[0] == it:
                pos = j
                break
        if pos != 0:
            for jt, jts, jw in win:
                if jt == it or abs(t - jts) > window_ms:
                    continue
                key = (it, jt) if it < jt else (jt, it)
                out[key] = out.get(key, 0.0) + (w if w < jw else jw)
        if pos >= 0:
            old = win.pop(pos)
            win.insert(0, [it, t, old[2] if old[2] > w else w])
        else:
            win.insert(0, [it, t, w])
            if len(win) > width:
                win.pop()
    return out
