"""``promo bench pipeline`` end to end in a small configuration: its own embedded stack, the two trivial agents,
one and two engine workers, a short latency run. Checks the report's contract keys, types and internal
consistency, that stdout stays clean (JSON only comes from the CLI) and that the private stack is gone
afterwards. No timing thresholds: the numbers themselves are the benchmark's business.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from load_tests.bench_pipeline import BenchError, run
from stream.settings import Settings
from stream.stack import port_open

pytestmark = pytest.mark.integration

N_EVENTS = 3000
RATE = 300.0


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    settings = Settings(_env_file=None, state_dir=tmp_path_factory.mktemp("unused-state"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = run(settings, n_events=N_EVENTS, rate=RATE, latency_s=4.0)
    return report, out.getvalue()


@pytest.fixture(scope="module")
def bench(bench_run):
    return bench_run[0]


def test_report_has_the_contract_keys_with_sane_values(bench):
    for key in ("consume_only_eps", "passthrough_eps", "engine_eps", "engine_2_workers_eps"):
        assert isinstance(bench[key], float) and math.isfinite(bench[key]) and bench[key] > 0, (key, bench[key])
    assert bench["offered_rate"] == RATE
    assert bench["ratio_consume_only"] == pytest.approx(bench["engine_eps"] / bench["consume_only_eps"], abs=1e-3)
    assert bench["ratio_passthrough"] == pytest.approx(bench["engine_eps"] / bench["passthrough_eps"], abs=1e-3)
    lat = bench["latency_ms"]
    assert set(lat) >= {"p50", "p95", "p99"}
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert isinstance(bench["rss_mb"], float) and 10 < bench["rss_mb"] <= bench["rss_hwm_mb"]
    json.dumps(bench)  # the CLI prints it as JSON


def test_the_floor_agent_decides_the_same_triggers_and_the_ratio_is_against_its_p99(bench):
    floor = bench["floor_latency_ms"]
    assert 0 < floor["p50"] <= floor["p95"] <= floor["p99"] <= floor["max"]
    assert bench["ratio_latency_floor"] == pytest.approx(bench["latency_ms"]["p99"] / floor["p99"], abs=1e-3)
    assert bench["floor"]["decisions"] > 0
    assert bench["floor"]["engine_latency_ms"]["p50"] > 0  # the floor's own receipt-to-send time
    assert {"engine", "broker", "redis", "bench"} <= set(bench["floor"]["latency_cpu_us_per_event"])


def test_every_variant_processed_every_event(bench):
    runs = bench["runs"]
    assert set(runs) == {"consume", "passthrough", "engine", "engine2"}
    for name, r in runs.items():
        assert sum(r["counts"]) >= N_EVENTS, (name, r)
        assert r["seconds"] > 0 and r["eps"] > 0
        assert r["cpu_us_per_event"][name if name != "engine2" else "engine2-a"] > 0
        assert {"broker", "redis"} <= set(r["cpu_us_per_event"])
    # two workers in one group shared the partitions and both did work
    assert sorted(runs["engine2"]["assigned_partitions"]) == [6, 6]
    assert all(c > 0 for c in runs["engine2"]["counts"])


def test_latency_run_measured_decisions_of_the_offered_events(bench):
    assert bench["latency_events"] == int(RATE * 4.0)
    assert 0 < bench["latency_decisions"] < bench["latency_events"]  # decisions come from triggers only
    assert bench["decisions"] > 0
    assert bench["achieved_rate"] > 0
    eng = bench["engine_latency_ms"]
    assert 0 <= eng["p50"] <= eng["p95"] <= eng["p99"]
    # per second of the run: the median and the worst decision, the worst never below the median
    p50s, maxes = bench["latency_p50_by_second_ms"], bench["latency_max_by_second_ms"]
    assert len(p50s) == len(maxes) > 0 and all(m >= p for p, m in zip(p50s, maxes))
    timer = bench["latency_maintenance"]  # what the worker's maintenance timer did in the run, beside its batches
    assert set(timer) == {"sweeps", "sweep_ms_sum", "snapshots"} and min(timer.values()) >= 0
    assert timer["sweeps"] > 0 or timer["sweep_ms_sum"] == 0


def test_stages_and_redis_work_are_reported_per_batch_and_per_event(bench):
    for stages, redis_work in ((bench["runs"]["engine"]["stage_ms_per_batch"],
                                bench["runs"]["engine"]["redis_per_event"]),
                               (bench["latency_stage_ms_per_batch"], bench["latency_redis_per_event"])):
        assert set(stages) == {"decide", "send", "delivered", "learn"}
        assert stages["decide"] > 0 and stages["send"] > 0 and all(v >= 0 for v in stages.values())
        # every event is loaded and committed through Redis: some work per event, and scripts are commands
        assert 0 < redis_work["script_calls"] <= redis_work["commands"], redis_work


def test_private_stack_is_stopped_and_stdout_untouched(bench_run):
    bench, stdout = bench_run
    assert stdout == ""  # progress goes to stderr; only the CLI prints the JSON
    stack = bench["config"]["stack"]
    host, port = stack["kafka_bootstrap"].rsplit(":", 1)
    assert not port_open(host, int(port))
    rhost, rport = stack["redis_url"].split("//")[1].split("/")[0].rsplit(":", 1)
    assert not port_open(rhost, int(rport))


def test_bad_arguments_are_errors_before_anything_starts(capfd):
    with pytest.raises(BenchError, match="at least 100"):
        run(Settings(_env_file=None), n_events=10)
    with pytest.raises(BenchError, match="must be > 0"):
        run(Settings(_env_file=None), n_events=1000, rate=0)
    assert capfd.readouterr().out == ""


def test_real_events_interleave_rebase_and_loop_without_duplicates():
    import itertools

    from load_tests.bench_pipeline import SOURCES, real_events

    start = 1_700_000_000_000
    mixed = list(itertools.islice(real_events(("rees46", "taobao"), start_ms=start), 1000))
    assert mixed[0]["event_id"].startswith("rees46-") and mixed[1]["event_id"].startswith("taobao-")
    assert min(e["ts"] for e in mixed[0::2]) == min(e["ts"] for e in mixed[1::2]) == start  # one common start

    with open(SOURCES["rees46"][0]) as f:
        n_rows = sum(1 for _ in f) - 1  # header
    events = list(itertools.islice(real_events(("rees46",), start_ms=start), n_rows + 1000))
    assert len({e["event_id"] for e in events}) == len(events)  # fresh ids on every loop
    assert all(isinstance(e["ts"], int) and e["ts"] >= start for e in events)
    looped = events[n_rows:]
    assert all(e["event_id"].endswith("~1") and e["user_id"].endswith("~1") for e in looped)
    assert looped[0]["ts"] > max(e["ts"] for e in events[:n_rows])  # the replay comes later in time
    # per user, event time never goes backwards (each source keeps its order; loops move forward in time)
    last: dict[str, int] = {}
    for e in events:
        assert e["ts"] >= last.get(e["user_id"], 0)
        last[e["user_id"]] = e["ts"]
