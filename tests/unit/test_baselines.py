"""Next-item baselines of ``promo evaluate stream`` (:mod:`models.evaluation.baselines`): each on a tiny stream
whose right answer is obvious, the predict-then-learn order, bounds, and the report's ``baselines`` key."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.evaluation.baselines import (VSKNN, ItemKNN, RecentItems, SequentialRules, Sessions,
                                         make_baselines)
from models.evaluation.prequential import evaluate_events
from models.events import Event
from stream.evaluate import evaluate_file

SAMPLE = Path(__file__).resolve().parents[2] / "stream" / "data" / "rees46_sample.csv"
MIN = 60_000
NAMES = ["popularity", "recent", "item_knn", "vsknn", "sr"]


def feed(model, rows, t0=0, step=MIN):
    """Learn ``rows`` of ``(user, item)`` or ``(user, item, session_id)``, one minute apart."""
    for n, row in enumerate(rows):
        user, item, *sid = row
        model.learn_one(Event(f"e{t0}-{n}", "view", user, item, t0 + n * step, session_id=sid[0] if sid else None))


# --- recent ----------------------------------------------------------------------------------------
def test_recent_returns_revisited_items_most_recent_first():
    m = RecentItems()
    feed(m, [("u", "a"), ("u", "b"), ("u", "c"), ("u", "a"), ("u", "a"), ("v", "z")])
    assert m.recommend("u", 10) == ["a", "c", "b"]
    assert m.recommend("u", 10, exclude={"a"}) == ["c", "b"]  # the evaluator excludes the current item
    assert m.recommend("u", 1, exclude={"a"}) == ["c"]
    assert m.recommend("v", 10) == ["z"] and m.recommend("nobody", 10) == []


def test_recent_keeps_at_most_size_items():
    m = RecentItems(size=3)
    feed(m, [("u", str(i)) for i in range(10)])
    assert m.recommend("u", 10) == ["9", "8", "7"]


# --- item-kNN --------------------------------------------------------------------------------------
def test_item_knn_ranks_items_that_co_occur_with_the_last_item():
    m = ItemKNN()
    rows = []
    for s in range(6):  # a goes with b in six sessions, with c in two, d only in other sessions
        rows += [(f"u{s}", "a"), (f"u{s}", "b")] + ([(f"u{s}", "c")] if s < 2 else [])
    rows += [("w", "d"), ("w", "e"), ("me", "x"), ("me", "a")]
    feed(m, rows)
    recs = m.recommend("me", 5, exclude={"a"})
    assert recs[:2] == ["b", "c"] and "d" not in recs and "e" not in recs
    assert "x" in recs  # co-occurs with a in the user's own ongoing session (learnt online)


def test_item_knn_follows_the_current_session_only():
    m = ItemKNN()
    feed(m, [("u1", "a"), ("u1", "b"), ("u2", "c"), ("u2", "d")])
    feed(m, [("me", "a")], t0=0)
    feed(m, [("me", "c")], t0=3 * 3_600_000)  # hours later: a new session whose last item is c
    assert m.recommend("me", 5, exclude={"c"}) == ["d"]


def test_item_knn_bounds_the_neighbours_per_item():
    m = ItemKNN(max_neighbours=3)
    feed(m, [("u", "hub")] + [("u", f"i{j}") for j in range(40)])
    assert max(len(n) for n in m._co.values()) < 2 * 3


# --- V-SKNN ----------------------------------------------------------------------------------------
def test_vsknn_recommends_the_continuation_of_the_most_similar_session():
    m = VSKNN()
    feed(m, [("s1", "a", "1"), ("s1", "b", "1"), ("s1", "c", "1"), ("s1", "next", "1"),
             ("s2", "c", "2"), ("s2", "other", "2"),
             ("me", "a", "3"), ("me", "b", "3"), ("me", "c", "3")])
    assert m.recommend("me", 3, exclude={"a", "b", "c"}) == ["next", "other"]  # s1 shares a, b, c; s2 only c
    recs = m.recommend("me", 5, exclude={"c"})  # the session's own items get the votes of s1 too (as session-rec)
    assert recs.index("next") < recs.index("other")


def test_vsknn_weights_recent_items_of_the_session_more():
    m = VSKNN()
    feed(m, [("s1", "old", "1"), ("s1", "x", "1"), ("s2", "new", "2"), ("s2", "y", "2"),
             ("me", "old", "3"), ("me", "new", "3")])
    assert m.recommend("me", 4, exclude={"new"})[:2] == ["y", "old"]  # s2 shares the last item: weight 1 vs 0.9
    assert m.recommend("me", 4, exclude={"new", "old"}) == ["y", "x"]


def test_vsknn_samples_the_most_recent_sessions_and_forgets_old_ones():
    m = VSKNN(k=1, sample_size=1)
    feed(m, [("s1", "a"), ("s1", "early")])
    feed(m, [("s2", "a"), ("s2", "late")], t0=10 * MIN)
    feed(m, [("me", "a")], t0=20 * MIN)
    assert m.recommend("me", 5, exclude={"a"}) == ["late"]
    small = VSKNN(max_sessions=2)
    feed(small, [(f"u{i}", "a") for i in range(5)])
    assert len(small._items) == 2 and set(small._by_item["a"]) == set(small._items)


# --- sequential rules ------------------------------------------------------------------------------
def test_sr_recommends_what_frequently_follows_the_last_item():
    m = SequentialRules()
    rows = []
    for s in range(5):
        rows += [(f"u{s}", "a"), (f"u{s}", "b")]
    rows += [("v", "a"), ("v", "c"), ("w", "b"), ("w", "a"), ("me", "a")]
    feed(m, rows)
    assert m.recommend("me", 3) == ["b", "c"]  # a -> b five times, a -> c once; b -> a is not a -> b
    assert m.recommend("w", 3) == ["b", "c"]


def test_sr_weights_by_distance_and_stops_at_steps():
    m = SequentialRules(steps=2)
    feed(m, [("u", "a"), ("u", "x"), ("u", "b"), ("u", "c")])
    assert m._rules["a"] == {"x": 1.0, "b": 0.5}  # c is three steps after a
    m2 = SequentialRules()
    feed(m2, [("u", "a"), ("u", "a"), ("u", "b")])  # a consecutive repeat is no step
    assert m2._rules == {"a": {"b": 1.0}}


# --- shared ---------------------------------------------------------------------------------------
def test_sessions_split_on_session_id_and_on_inactivity():
    s = Sessions()
    first = s.observe(Event("1", "view", "u", "a", 0, session_id="x"))[0]
    assert s.observe(Event("2", "view", "u", "b", MIN, session_id="x"))[0] is first
    assert s.observe(Event("3", "view", "u", "c", 2 * MIN, session_id="y"))[0] is not first
    no_id = Sessions()
    a = no_id.observe(Event("1", "view", "u", "a", 0))[0]
    assert no_id.observe(Event("2", "view", "u", "b", 30 * MIN))[0] is a  # 30 minutes: still the session
    assert no_id.observe(Event("3", "view", "u", "c", 61 * MIN))[0] is not a


@pytest.mark.parametrize("make", [lambda: RecentItems(size=0), lambda: ItemKNN(alpha=2.0),
                                  lambda: ItemKNN(lmbd=-1), lambda: VSKNN(k=0), lambda: VSKNN(sample_size=1.5),
                                  lambda: SequentialRules(steps=0), lambda: make_baselines(["nope"])])
def test_parameters_are_checked_on_construction(make):
    with pytest.raises(ValueError):
        make()


def test_every_baseline_is_empty_before_learning_and_learn_one_returns_none():
    for m in make_baselines().values():
        assert m.recommend("u", 20) == []
        assert m.learn_one(Event("1", "view", "u", "a", 0)) is None


# --- in the prequential evaluation ---------------------------------------------------------------------
def test_baselines_are_scored_before_they_learn_the_event():
    """u walks a -> b -> a: recent can only hit the return to a, never b (not seen before it is predicted)."""
    evs = [Event("1", "view", "u", "a", 0), Event("2", "view", "u", "b", MIN), Event("3", "view", "u", "a", 2 * MIN)]
    r = evaluate_events(evs, batch_size=10)
    assert r["next_item_targets"] == 2
    assert r["baselines"]["recent"] == {"hr_at_20": 0.5, "mrr_at_20": 0.5}
    assert r["baselines"]["sr"]["hr_at_20"] == 0.0  # b -> a was never seen before it happened
    assert r["baselines"]["item_knn"]["hr_at_20"] == 0.5  # a and b co-occur in the session by then


def test_baseline_names_may_not_shadow_report_keys():
    with pytest.raises(ValueError):
        evaluate_events([], baselines={"engine": RecentItems()})
    assert set(evaluate_events([], baselines={})["baselines"]) == {"popularity"}


def test_report_has_every_baseline_on_the_bundled_sample():
    r = evaluate_file(SAMPLE, "rees46", progress=False)
    assert list(r["baselines"]) == NAMES
    for name, scores in r["baselines"].items():
        assert set(scores) == {"hr_at_20", "mrr_at_20"}, name
        assert 0.0 <= scores["mrr_at_20"] <= scores["hr_at_20"] <= 1.0, name
    assert r["baselines"]["popularity"] == {k: r["baseline"][k] for k in ("hr_at_20", "mrr_at_20")}
    assert {"engine", "baseline"} <= set(r) and r["next_item_targets"] > 0
    assert r["baselines"]["recent"]["hr_at_20"] > 0 and r["baselines"]["item_knn"]["hr_at_20"] > 0
