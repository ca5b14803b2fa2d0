"""Smoke tests of the core benchmark and the similarity memory script: report shape and invariants only (no
timing asserts: performance is measured by running them, see load_tests/)."""

from __future__ import annotations

import gc

from load_tests import bench_core, gc_pauses, redis_per_event, similarity_memory


def test_bench_core_report():
    before = gc.get_threshold()
    r = bench_core.run(n_events=3000, batch_size=500, n_decisions=50)
    assert {"events_per_s", "numba_vs_python", "decision_p50_ms", "decision_p99_ms"} <= set(r)
    assert r["counters_agree"] is True and r["pairs"] > 0
    assert r["events_per_s"] > 0 and r["numba_vs_python"] > 0 and r["decision_p99_ms"] >= r["decision_p50_ms"] > 0
    assert r["n_events"] == 3000 and r["decision_points"] > 0
    assert gc.get_threshold() == before and gc.isenabled()  # the benchmark restores the collector


def test_real_events_loop_with_new_users_later_in_time():
    evs = bench_core.real_events(250, bench_core.TAOBAO)
    assert len(evs) == 250
    # limit=250 rows loaded: the second loop re-uses them with new user ids, later in event time
    first, second = evs[:125], evs[125:]
    assert not {e.user_id for e in first} & {e.user_id for e in evs[-10:]} or len({e.event_id for e in evs}) == 250
    assert [e.ts for e in evs] == sorted(e.ts for e in evs)
    assert len({e.event_id for e in evs}) == 250 and second


def test_similarity_memory_is_bounded(redis_url):
    r = similarity_memory.run(checkpoints=(2000, 6000), cap_mb=0.5, redis_url=redis_url, batch_size=500)
    rows = r["checkpoints"]
    assert [x["events"] for x in rows] == [2000, 6000]
    assert r["under_cap"] and all(x["bytes"] <= r["memory_cap_bytes"] for x in rows)
    assert rows[-1]["items"] <= r["item_cap"]


def test_similarity_memory_on_the_live_worker_path_is_capped_and_reports_the_records(redis_url):
    r = similarity_memory.run(checkpoints=(2000, 6000), cap_mb=0.5, redis_url=redis_url, batch_size=500,
                              path="worker")
    rows = r["checkpoints"]
    assert r["path"] == "worker" and [x["events"] for x in rows] == [2000, 6000]
    assert r["under_cap"] and all(x["items"] <= r["item_cap"] for x in rows)
    # the users' contribution records (for an exact forget) grow with the users, outside the cap
    assert 0 < rows[0]["record_bytes"] < rows[1]["record_bytes"] and rows[1]["records"] > rows[0]["records"]
    # the performance budget's memory per 1M users and per 1M items, from the last checkpoint
    last = rows[-1]
    assert last["users"] > rows[0]["users"] > 0 and last["user_bytes"] > last["record_bytes"]
    assert last["bytes_per_item"] == round(last["bytes"] / last["items"], 1)
    assert r["per_1m"]["users_mb"] == round(last["bytes_per_user"] * 1e6 / 2**20, 1) > 0
    assert r["per_1m"]["items_mb"] > 0 and r["per_1m"]["event_markers_mb"] > 0


def test_gc_pauses_times_every_collection_and_restores_the_collector(redis_url):
    before = gc.get_threshold()
    r = gc_pauses.run(redis_url, passes=2, batch=100, limit=1500)
    assert r["events"] % 2 == 0 and r["events"] > 2000 and r["batch_size"] == 100  # both files, twice
    assert set(r["collections"]) == {"gen0", "gen1", "gen2"}
    for c in r["collections"].values():
        assert c["count"] >= 0 and c["sum_ms"] >= c["longest_ms"] >= 0
    assert r["tracked_objects_at_end"] > 0 and r["batch_ms"]["max"] >= r["batch_ms"]["p50"] > 0
    assert gc.get_threshold() == before and gc.isenabled()  # the benchmark restores the collector


def test_looped_events_have_new_users_later_in_time():
    import itertools

    from models.events import Event

    evs = [Event(event_id=f"e{i}", type="view", user_id=f"u{i % 2}", item_id="i", ts=1000 + i, price=2.0,
                 order_id="o") for i in range(3)]
    out = list(itertools.islice(bench_core.looped(evs), 6))
    assert [e.user_id for e in out] == ["u0~0", "u1~0", "u0~0", "u0~1", "u1~1", "u0~1"]
    assert [e.ts for e in out] == sorted(e.ts for e in out) and out[3].ts == 1000 + 1002
    assert len({e.event_id for e in out}) == 6
    assert all(e.price == 2.0 and e.order_id == "o" for e in out)  # every other field kept


def test_redis_per_event_reports_the_work_of_the_batch_path_and_splits_it_by_script():
    r = redis_per_event.run(n_events=1200, batch=50, by_script=True)
    assert r["events"] == 900 and r["batch"] == 50  # a quarter of 1,200 warms up
    assert r["client_cpu_us_per_event"] > 0 and r["redis_cpu_us_per_event"] > 0
    assert r["redis_commands_per_event"] > 5 and r["script_us_per_event"] > 0
    # every user's commit and the applying of its contributions are scripts of their own
    assert {"script:commit", "script:apply"} <= set(r["by_script"])
    assert r["by_script"]["script:commit"]["calls"] > 0.3 and r["by_script"]["script:apply"]["usec"] > 0
