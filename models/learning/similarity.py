"""Item co-occurrence counting: a numba kernel and its pure-Python reference.

A user's **recent window** is their last ``W`` distinct items with the time and weight of their latest event
(most recent first). For each event ``(user, item, ts, w)`` of a batch, in order, the kernel emits one pair
increment ``min(w, w_j)`` for every other item ``j`` of the user's window seen at most ``window_ms`` before,
then moves ``item`` to the front of the window. An event repeating the window's front item (the same item
viewed again) emits nothing, and weight-0 events (``remove_from_cart``) are ignored. So the increments of an
event are a pure function of (the user's window, the event): an outbox keyed by event id makes them idempotent.

Pairs are canonical ``(a, b)`` with ``a < b`` (item indices from an :class:`ItemVocab`); :func:`aggregate_pairs`
sums identical pairs (in input order, so sums are bit-identical to the reference's) before they go to a store.

Examples
--------
>>> import numpy as np
>>> w = UserWindows(capacity=4, width=3)
>>> slots = w.slots_for(["u1", "u1", "u1", "u2"])
>>> items = np.array([10, 11, 12, 10]); ts = np.array([0, 1, 2, 3]); wt = np.array([1.0, 1.0, 3.0, 1.0])
>>> a, b, inc = count_pairs(slots, items, ts, wt, w, window_ms=1000)
>>> sorted((int(x), int(y), float(z)) for x, y, z in zip(a, b, inc))
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
def pair_increments(ev_slot, ev_item, ev_ts, ev_w, win, window_ms):  # pragma: no cover
    """Pair increments of a batch, updating the windows in place (see the module docstring).

    ``ev_*`` are 1-d arrays of one batch in order (slot of the user's window, item index, ts in ms, weight).
    ``win`` is a ``(n_slots, 1 + 3 * W)`` float64 array, one contiguous row per user (a few cache lines):
    ``[length, item_0, ts_0, w_0, item_1, ts_1, w_1, ...]``, most recent first (item indices and epoch-ms times
    are exact in float64). Returns ``(a, b, inc)`` with ``a < b``, one row per (event, window item), not yet
    aggregated.
    """
    width = (win.shape[1] - 1) // 3
    cap = ev_slot.shape[0] * width  # an item not in a full window pairs with all W of it
    out_a = np.empty(cap, np.int64)
    out_b = np.empty(cap, np.int64)
    out_w = np.empty(cap, np.float64)
    m = _increments_into(ev_slot, ev_item, ev_ts, ev_w, win, window_ms, out_a, out_b, out_w)
    return out_a[:m], out_b[:m], out_w[:m]


@njit(cache=True, nogil=True)
def _increments_into(ev_slot, ev_item, ev_ts, ev_w, win, window_ms, out_a, out_b, out_w):  # pragma: no cover
    """The loop of :func:`pair_increments`, writing into caller-owned buffers; returns the number of rows.

    """
    n = ev_slot.shape[0]
    width = (win.shape[1] - 1) // 3
    m = 0
    for e in range(n):
        w = ev_w[e]
        if w <= 0.0:
            continue
        row = win[ev_slot[e]]
        it = ev_item[e]
        fit = np.float64(it)
        t = np.float64(ev_ts[e])
        length = np.int64(row[0])
        pos = -1
        for j in range(length):
            if row[1 + 3 * j] == fit:
                pos = j
                break
        if pos != 0:
            for j in range(length):
                if j == pos:
                    continue
                k = 1 + 3 * j
                dt = t - row[k + 1]
                if dt > window_ms or dt < -window_ms:
                    continue
                jt = np.int64(row[k])
                wj = row[k + 2]
                if it < jt:
                    out_a[m] = it
                    out_b[m] = jt
                else:
                    out_a[m] = jt
                    out_b[m] = it
                out_w[m] = w if w < wj else wj
                m += 1
        # move / insert the item at the front of the window
        if pos >= 0:
            old = row[1 + 3 * pos + 2]
            neww = old if old > w else w
            last = pos
        else:
            neww = w
            last = length if length < width else width - 1
            if length < width:
                row[0] = length + 1
        for j in range(last, 0, -1):
            k = 1 + 3 * j
            row[k] = row[k - 3]
            row[k + 1] = row[k - 2]
            row[k + 2] = row[k - 1]
        row[1] = fit
        row[2] = t
        row[3] = neww
    return m


@njit(cache=True, nogil=True)
def aggregate_pairs(a, b, inc):  # pragma: no cover
    """Sum the increments of identical ``(a, b)`` pairs; output in first-seen order.

    An open-addressing hash table (multiplicative hashing, linear probing); identical pairs are summed in
    input order, so sums are bit-identical to the reference's.
    """
    n = a.shape[0]
    ua = np.empty(n, np.int64)
    ub = np.empty(n, np.int64)
    uw = np.empty(n, np.float64)
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    size = 1 << bits
    mask = size - 1
    shift = np.uint64(64 - bits)
    table = np.full(size, -1, np.int64)  # slot -> output row
    m = 0
    for i in range(n):
        ai = a[i]
        bi = b[i]
        h = np.int64((np.uint64(ai) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(bi) * np.uint64(0xC2B2AE3D27D4EB4F))
                     >> shift)
        while True:
            r = table[h]
            if r < 0:
                table[h] = m
                ua[m] = ai
                ub[m] = bi
                uw[m] = inc[i]
                m += 1
                break
            if ua[r] == ai and ub[r] == bi:
                uw[r] += inc[i]
                break
            h = (h + 1) & mask
    return ua[:m], ub[:m], uw[:m]


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
def count_pairs_kernel(ev_slot, ev_item, ev_ts, ev_w, win, window_ms, buf_i, buf_f):  # pragma: no cover
    """:func:`pair_increments` then :func:`aggregate_pairs` in one compiled call, with scratch buffers reused
    from call to call (``buf_i``: int64, at least ``2 * n * W`` long; ``buf_f``: float64, at least ``n * W``; warm
    in cache, no page faults). The output arrays are new (not views of the buffers)."""
    width = (win.shape[1] - 1) // 3
    cap = ev_slot.shape[0] * width  # an item not in a full window pairs with all W of it
    out_a = buf_i[:cap]
    out_b = buf_i[cap : 2 * cap]
    out_w = buf_f[:cap]
    m = _increments_into(ev_slot, ev_item, ev_ts, ev_w, win, window_ms, out_a, out_b, out_w)
    return aggregate_pairs(out_a[:m], out_b[:m], out_w[:m])


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

    The arrays are allocated for the first user: the live worker, whose item statistics come with the users'
    commits (:mod:`models.learning.contrib`), never uses its windows, and 200,000 users' rows are 40 MB. Pickled,
    only the occupied slots travel:

    >>> import pickle
    >>> big = UserWindows(capacity=200_000, width=8)
    >>> big.data.nbytes
    0
    >>> _ = big.slots_for(["a"])
    >>> len(pickle.dumps(big)) < 10_000 < big.data.nbytes
    True
    """

    def __init__(self, capacity: int = 100_000, width: int = 8) -> None:
        if capacity < 2 or width < 2:
            raise ValueError(f"UserWindows needs capacity >= 2 and width >= 2, got {capacity} and {width}")
        self.capacity = capacity
        self.width = width
        self.clear()

    def clear(self) -> None:
        """No user; nothing allocated until the next one (:meth:`_allocate`)."""
        self.slot: dict[str, int] = {}
        self.owner: list[str | None] = []
        self.used = np.full(0, 0, np.int64)
        self.data = np.full((0, 1 + 3 * self.width), 0.0, np.float64)
        self.buf_i = np.full(0, 0, np.int64)  # kernel scratch, grown on demand
        self.buf_f = np.full(0, 0.0, np.float64)
        self.free: list[int] = []
        self.tick = 0

    @property
    def allocated(self) -> bool:
        """Whether the arrays exist (they do from the first user on)."""
        return len(self.owner) == self.capacity

    def ensure_allocated(self) -> None:
        """The arrays, made now if they are not yet: before anything indexes them (:meth:`slots_for`, the
        kernel of :func:`count_pairs`, which does not check bounds)."""
        if not self.allocated:
            self._allocate()

    def _allocate(self) -> None:
        self.owner = [None] * self.capacity
        self.used = np.full(self.capacity, 0, np.int64)
        # one row per user: [length, item, ts, w, item, ts, w, ...]; np.full writes every page now, so the
        # kernel's hot loop takes no page faults later
        self.data = np.full((self.capacity, 1 + 3 * self.width), 0.0, np.float64)
        self.free = list(range(self.capacity - 1, -1, -1))

    def __getstate__(self) -> dict:
        """Only the occupied slots: the preallocated arrays of an empty or small window set are mostly zeros, and
        a model snapshot (every ``PROMO_SNAPSHOT_INTERVAL_S``, pickled in the worker's event loop) would otherwise
        carry all of them (about 40 MB at the default 200,000 users)."""
        slots = np.fromiter(self.slot.values(), np.int64, len(self.slot))
        return {"capacity": self.capacity, "width": self.width, "tick": self.tick, "users": list(self.slot),
                "slots": slots, "used": self.used[slots], "rows": self.data[slots], **self._free_state()}

    def _free_state(self) -> dict:
        """The free list as its untouched head (``capacity - 1, capacity - 2, ...``: a length) and the rest."""
        free = np.asarray(self.free, np.int64)
        head = np.arange(self.capacity - 1, self.capacity - 1 - len(free), -1, dtype=np.int64)
        differ = np.flatnonzero(free != head)
        n_head = int(differ[0]) if len(differ) else len(free)
        return {"free_head": n_head, "free_tail": free[n_head:]}

    def __setstate__(self, state: dict) -> None:
        if "users" not in state:  # a snapshot written before the compact form: the full arrays
            self.__dict__.update(state)
            return
        self.capacity, self.width = state["capacity"], state["width"]
        self.clear()
        self.tick = state["tick"]
        if not state["users"]:  # nobody held: allocated at the next user, as a fresh one
            return
        self._allocate()
        slots = state["slots"]
        self.slot = dict(zip(state["users"], slots.tolist()))
        for u, s in self.slot.items():
            self.owner[s] = u
        self.used[slots] = state["used"]
        self.data[slots] = state["rows"]
        n_head = state["free_head"]
        self.free = list(range(self.capacity - 1, self.capacity - 1 - n_head, -1)) + state["free_tail"].tolist()

    def resized(self, capacity: int) -> "UserWindows":
        """The same windows with room for ``capacity`` users: the most recently used ones when fewer fit.

        >>> w = UserWindows(capacity=4, width=2)
        >>> for u in "abc":
        ...     _ = w.slots_for([u])
        >>> small = w.resized(2)
        >>> small.capacity, sorted(small.slot), len(small.free), w.resized(4) is w
        (2, ['b', 'c'], 0, True)
        >>> sorted(small.resized(3).slot), small.resized(3).slots_for(["d"]).tolist()
        (['b', 'c'], [2])
        """
        if capacity == self.capacity:
            return self
        new = UserWindows(capacity, self.width)
        new.tick = self.tick
        keep = sorted(self.slot, key=lambda u: self.used[self.slot[u]], reverse=True)[:capacity]
        if not keep:
            return new
        new._allocate()
        old = np.fromiter((self.slot[u] for u in keep), np.int64, len(keep))
        n = len(keep)
        new.slot = dict(zip(keep, range(n)))
        new.owner[:n] = keep
        new.used[:n] = self.used[old]
        new.data[:n] = self.data[old]
        new.free = list(range(capacity - 1, n - 1, -1))
        return new

    def slots_for(self, users) -> np.ndarray:
        """Slot of each user (allocating, and evicting the least recently used half when full)."""
        self.ensure_allocated()
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
                self.data[s, 0] = 0.0
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
            self.data[s, 0] = 0.0
            self.free.append(s)

    def drop(self, users) -> int:
        """Forget ``users``' windows (their slots are freed); returns how many were held.

        >>> w = UserWindows(capacity=4, width=2)
        >>> _ = w.slots_for(["a", "b"])
        >>> w.drop(["a", "x"]), sorted(w.slot), len(w.free)
        (1, ['b'], 3)
        """
        n = 0
        for u in users:
            s = self.slot.pop(u, None)
            if s is None:
                continue
            self.owner[s] = None
            self.data[s, :] = 0.0
            self.used[s] = 0
            self.free.append(s)
            n += 1
        return n

    def window(self, user: str) -> list[int]:
        """Item indices of a user's window, most recent first."""
        s = self.slot.get(user)
        if s is None:
            return []
        n = int(self.data[s, 0])
        return [int(x) for x in self.data[s, 1 : 1 + 3 * n : 3]]


def count_pairs(slots, items, ts, weights, windows: UserWindows, window_ms: int):
    """Kernel + aggregation: the aggregated ``(a, b, inc)`` of one batch; updates ``windows``."""
    windows.ensure_allocated()  # slots may come straight from the caller, not from slots_for
    need = 2 * len(slots) * windows.width  # what count_pairs_kernel writes at most (buf_i: two halves)
    if windows.buf_i.shape[0] < need:
        windows.buf_i = np.full(need, 0, np.int64)
        windows.buf_f = np.full(need, 0.0, np.float64)
    return count_pairs_kernel(
        np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(items, np.int64),
        np.ascontiguousarray(ts, np.int64), np.ascontiguousarray(weights, np.float64),
        windows.data, np.float64(window_ms), windows.buf_i, windows.buf_f,
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
