"""The co-occurrence counter: numba kernel == pure-Python reference, and the counter's invariants (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.learning.similarity import ItemVocab, UserWindows, aggregate_items, aggregate_pairs, count_pairs, count_pairs_py

WIDTH = 4
WINDOW = 1_000

# a batch: events (user slot, item, dt, weight) with non-decreasing time per stream
event = st.tuples(st.integers(0, 4), st.integers(0, 9), st.integers(0, 700), st.sampled_from([0.0, 1.0, 1.5, 3.0, 4.0]))
batches = st.lists(event, min_size=0, max_size=60)


def arrays(evs):
    ts = np.cumsum([e[2] for e in evs]).astype(np.int64) if evs else np.zeros(0, np.int64)
    return (np.array([e[0] for e in evs], np.int64), np.array([e[1] for e in evs], np.int64), ts,
            np.array([e[3] for e in evs], np.float64))


def numba_pairs(evs, windows=None) -> dict:
    windows = windows or UserWindows(capacity=8, width=WIDTH)
    s, i, t, w = arrays(evs)
    a, b, inc = count_pairs(s, i, t, w, windows, WINDOW)
    return dict(zip(zip(a.tolist(), b.tolist()), inc.tolist()))


def python_pairs(evs) -> dict:
    s, i, t, w = arrays(evs)
    return count_pairs_py(s.tolist(), i.tolist(), t.tolist(), w.tolist(), {}, WIDTH, WINDOW)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_kernel_equals_reference(evs):
    assert numba_pairs(evs) == python_pairs(evs)


def test_a_user_browsing_only_new_items_fills_every_window_pair():
    """Every event of a user who never repeats an item pairs with the whole full window (W pairs, not W - 1):
    the kernel's buffers must hold that (they held W - 1 per event: a bot browsing distinct items wrote past
    them, corrupting counts or memory)."""
    evs = [(0, i, 10, 1.0) for i in range(200)]  # one user, 200 distinct items, 10 ms apart
    got = numba_pairs(evs)
    assert got == python_pairs(evs)
    assert len(got) == sum(min(i, WIDTH) for i in range(200))


@settings(max_examples=100, deadline=None)
@given(batches)
def test_pairs_are_canonical_positive_and_never_self(evs):
    for (a, b), inc in numba_pairs(evs).items():
        assert a < b, "pairs are canonical (a < b): the store counts (a, b) and (b, a) once, symmetrically"
        assert inc > 0


@settings(max_examples=100, deadline=None)
@given(batches, st.randoms(use_true_random=False))
def test_interleaving_users_does_not_change_counts(evs, rnd):
    """Order independence across users: any interleaving keeping each user's own order gives the same pairs."""
    s, i, t, w = arrays(evs)
    rows = list(zip(s.tolist(), i.tolist(), t.tolist(), w.tolist()))
    by_user: dict = {}
    for r in rows:
        by_user.setdefault(r[0], []).append(r)
    queues = [list(v) for v in by_user.values()]
    shuffled = []
    while any(queues):
        q = rnd.choice([q for q in queues if q])
        shuffled.append(q.pop(0))
    a = count_pairs_py(*map(list, zip(*rows)), {}, WIDTH, WINDOW) if rows else {}
    b = count_pairs_py(*map(list, zip(*shuffled)), {}, WIDTH, WINDOW) if shuffled else {}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k])


@settings(max_examples=100, deadline=None)
@given(batches, st.integers(1, 20))
def test_batch_boundaries_do_not_change_counts(evs, size):
    """Increments are a pure function of (window, event): splitting the stream into batches changes nothing."""
    whole = numba_pairs(evs)
    windows = UserWindows(capacity=8, width=WIDTH)
    s, i, t, w = arrays(evs)
    total: dict = {}
    for k in range(0, len(evs), size):
        a, b, inc = count_pairs(s[k:k + size], i[k:k + size], t[k:k + size], w[k:k + size], windows, WINDOW)
        for key, v in zip(zip(a.tolist(), b.tolist()), inc.tolist()):
            total[key] = total.get(key, 0.0) + v
    assert total.keys() == whole.keys()
    for key in total:
        assert total[key] == pytest.approx(whole[key])


def test_window_rules():
    # u0: a, b, b (repeat of the front: no new pairs), c after the time window of a, weight-0 event ignored
    evs = [(0, 1, 0, 1.0), (0, 2, 10, 3.0), (0, 2, 10, 3.0), (0, 9, 0, 0.0), (0, 3, 1500, 1.0)]
    pairs = python_pairs(evs)
    # b-a: min(3, 1) = 1 once; c at t=1520: a (t=0) is outside the 1000 ms window, b (t=20) is too
    assert pairs == {(1, 2): 1.0}
    assert numba_pairs(evs) == pairs


def test_window_keeps_the_most_recent_width_items():
    w = UserWindows(capacity=2, width=3)
    slot = int(w.slots_for(["u"])[0])
    numba_pairs([(slot, k, 1, 1.0) for k in range(5)], w)
    assert w.window("u") == [4, 3, 2]


def test_windows_evict_least_recently_used_users():
    w = UserWindows(capacity=4, width=2)
    w.slots_for(["a", "b", "c", "d"])
    w.slots_for(["a"])
    w.slots_for(["e"])  # full: the least recently used half of the others (b, c) is evicted
    assert set(w.slot) == {"a", "d", "e"}
    with pytest.raises(RuntimeError, match="smaller than the users of one batch"):
        UserWindows(capacity=2, width=2).slots_for(["x", "y", "z"])


def test_aggregation_sums_duplicates_in_order():
    a = np.array([1, 1, 2, 1], np.int64)
    b = np.array([5, 5, 3, 4], np.int64)
    inc = np.array([0.1, 0.2, 1.0, 2.0])
    ua, ub, uw = aggregate_pairs(a, b, inc)
    assert list(zip(ua.tolist(), ub.tolist(), uw.tolist())) == [(1, 5, 0.1 + 0.2), (2, 3, 1.0), (1, 4, 2.0)]
    ui, iw = aggregate_items(np.array([3, 1, 3], np.int64), np.array([1.0, 2.0, 0.0]))
    assert ui.tolist() == [1, 3] and iw.tolist() == [2.0, 1.0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40), st.sampled_from([0.5, 1.0, 3.0])),
                max_size=300))
def test_aggregation_matches_a_dict(rows):
    a = np.array([r[0] for r in rows], np.int64)
    b = np.array([r[1] for r in rows], np.int64)
    inc = np.array([r[2] for r in rows], np.float64)
    want: dict = {}
    for x, y, w in rows:
        want[(x, y)] = want.get((x, y), 0.0) + w
    ua, ub, uw = aggregate_pairs(a, b, inc)
    assert list(zip(zip(ua.tolist(), ub.tolist()), uw.tolist())) == list(want.items())


def test_vocab_is_dense_and_stable():
    v = ItemVocab()
    assert v.index(["x", "y", "x"]).tolist() == [0, 1, 0]
    assert v.index(["y", "z"]).tolist() == [1, 2]


def test_user_windows_pickle_round_trip_keeps_slots_and_what_comes_next():
    """A snapshot restores the windows exactly: same slots, rows, recency and free list, so the next batches
    count the same pairs and evict the same users as without the round trip."""
    import pickle

    rng = np.random.default_rng(3)
    a, b = UserWindows(capacity=6, width=WIDTH), UserWindows(capacity=6, width=WIDTH)

    def batch(n=5):
        users = [f"u{x}" for x in rng.integers(0, 9, n)]
        return users, rng.integers(0, 20, n).astype(np.int64), np.sort(rng.integers(0, 10_000, n)).astype(np.int64)

    for _ in range(4):
        users, items, ts = batch()
        w = np.ones(len(users))
        for win in (a, b):
            count_pairs(win.slots_for(users), items, ts, w, win, 60_000)
    b = pickle.loads(pickle.dumps(b))
    assert b.slot == a.slot and b.free == a.free and b.tick == a.tick and b.owner == a.owner
    occupied = list(a.slot.values())
    assert np.array_equal(b.data[occupied], a.data[occupied]) and np.array_equal(b.used[occupied], a.used[occupied])
    for _ in range(6):  # more users than slots: evictions happen
        users, items, ts = batch()
        w = np.ones(len(users))
        got = [tuple(x.tolist()) for x in count_pairs(b.slots_for(users), items, ts, w, b, 60_000)]
        want = [tuple(x.tolist()) for x in count_pairs(a.slots_for(users), items, ts, w, a, 60_000)]
        assert got == want and b.slot == a.slot


def test_user_windows_from_a_snapshot_in_the_full_form_still_load():
    w = UserWindows(capacity=4, width=WIDTH)
    w.slots_for(["a", "b"])
    old_form = UserWindows.__new__(UserWindows)
    old_form.__setstate__(dict(vars(w)))  # what unpickling a snapshot of the earlier form does
    assert old_form.slot == w.slot and old_form.free == w.free and np.array_equal(old_form.data, w.data)
