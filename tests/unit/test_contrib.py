"""models.learning.contrib: the per-user contributions the engine commits (pure logic; the Redis side is in
tests/integration/test_item_contributions.py)."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from models.learning.contrib import GRID_HALF_LIVES, Contribution, grid
from models.learning.similarity import count_pairs_py

HL = 7 * 86_400_000
WIDTH, WINDOW_MS = 4, 3_600_000


def contributions(events, hl=HL, phl=HL):
    """Per-user contributions of ``events`` [(user, item, ts, w)], in order; windows kept per user."""
    wins: dict = {}
    out: dict = {}
    for u, item, ts, w in events:
        c = out.setdefault(u, Contribution(hl, phl))
        c.add_event(wins.setdefault(u, []), item, ts, w, WIDTH, WINDOW_MS)
    return out, wins


def total(contribs, attr, hl, at):
    """Sum of all users' values of ``attr`` decayed to time ``at`` (what the store holds, read at ``at``)."""
    out: dict = {}
    for c in contribs.values():
        for k, (g, v) in getattr(c, attr).items():
            out[k] = out.get(k, 0.0) + v * 2.0 ** ((g - at) / hl)
    return out


events_st = st.lists(
    st.tuples(st.sampled_from("uvw"), st.sampled_from("abcdef"), st.integers(0, 5 * 3_600_000),
              st.sampled_from([0.0, 1.0, 3.0, 5.0])),
    max_size=60,
)


@given(events_st)
@settings(max_examples=200, deadline=None)
def test_pairs_match_the_similarity_kernel_reference(events):
    events = sorted(events, key=lambda e: e[2])
    huge = 10**15  # no decay within the test: values are the reference's plain weights (within 1e-6)
    contribs, wins = contributions(events, hl=huge, phl=huge)
    ref_windows: dict = {}
    ref = count_pairs_py([e[0] for e in events], [e[1] for e in events], [e[2] for e in events],
                         [e[3] for e in events], ref_windows, WIDTH, WINDOW_MS)
    got: dict = {}
    for c in contribs.values():
        for k, (_, v) in c.pairs.items():
            got[k] = got.get(k, 0.0) + v
    assert set(got) == {k for k, v in ref.items() if v > 0}
    for k, v in got.items():
        assert math.isclose(v, ref[k], rel_tol=1e-6)
    assert {u: w for u, w in wins.items() if w} == {u: w for u, w in ref_windows.items() if w}


@given(events_st, st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_totals_do_not_depend_on_how_users_interleave(events, rnd):
    events = sorted(events, key=lambda e: e[2])
    # another interleaving of the users, each user's own order kept (what Kafka guarantees per partition)
    queues: dict = {}
    for e in events:
        queues.setdefault(e[0], []).append(e)
    other = []
    while queues:
        u = rnd.choice(sorted(queues))
        other.append(queues[u].pop(0))
        if not queues[u]:
            del queues[u]
    a, _ = contributions(events)
    b, _ = contributions(other)
    at = 10 * 3_600_000
    for attr in ("items", "pairs", "pops"):
        ta, tb = total(a, attr, HL, at), total(b, attr, HL, at)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert math.isclose(ta[k], tb[k], rel_tol=1e-12)
            assert ta[k] > 0


def test_values_are_exact_powers_of_two_apart_across_grid_epochs():
    hl = 1000
    step = GRID_HALF_LIVES * hl
    c = Contribution(hl, hl)
    win: list = []
    c.add_event(win, "a", step - 1, 1.0, WIDTH, 10**9)  # last ms of epoch 0
    c.add_event(win, "a", step + 500, 1.0, WIDTH, 10**9)  # epoch 1: the first value moves by exactly 2**-16
    g, v = c.items["a"]
    assert g == grid(step + 500, hl) == step
    # each term is computed against its own epoch, then moved by an exact power of two
    assert v == 2.0 ** ((step - 1) / hl) * 2.0**-GRID_HALF_LIVES + 2.0 ** (500 / hl)
    # so the other order gives the same bits
    c2 = Contribution(hl, hl)
    c2.add_event([], "a", step + 500, 1.0, WIDTH, 10**9)
    c2.add_event([], "a", step - 1, 1.0, WIDTH, 10**9)
    assert c2.items["a"] == [step, v]


def test_zero_weight_events_contribute_nothing_and_json_holds_everything():
    c = Contribution(HL, HL)
    win: list = []
    c.add_event(win, "a", 0, 0.0, WIDTH, WINDOW_MS)
    assert not c and win == []
    rng = random.Random(1)
    for k in range(20):
        c.add_event(win, rng.choice("abc"), k * 1000, 1.0, WIDTH, WINDOW_MS)
    import json

    doc = json.loads(c.to_json({"prefix": "promo"}))
    assert doc["prefix"] == "promo"
    assert {x[0] for x in doc["i"]} == set(c.items)
    assert len(doc["p"]) == len(c.pairs) and len(doc["q"]) == len(c.pops)
    assert all(x[3] == c.last[x[0]] for x in doc["i"])
