"""Prequential evaluation (`promo evaluate stream`): protocol, report keys, bad input, exact AUC."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from models.evaluation.prequential import evaluate_events, log_loss, roc_auc
from stream.evaluate import evaluate_file, load_events
from stream.cli import cli

T0 = 1_700_000_000_000
KEYS = {"hr_at_20", "mrr_at_20", "auc", "logloss"}


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def shop_log(n_users=150, seed=0):
    """Users walk a -> b -> c (items that go together) or look at random items; some buy after c."""
    rng = random.Random(seed)
    docs = []
    ts = T0
    for u in range(n_users):
        ts += rng.randint(1, 20) * 1000
        if rng.random() < 0.6:
            path = [f"set{u % 25}-a", f"set{u % 25}-b", f"set{u % 25}-c"]
        else:
            path = [f"x{rng.randrange(200)}" for _ in range(3)]
        for k, item in enumerate(path):
            docs.append({"event_id": f"e{u}-{k}", "type": "view", "user_id": f"u{u}", "item_id": item,
                         "ts": ts + k * 10_000, "price": 10.0, "category": item.split("-")[0]})
        if path[0].startswith("set") and rng.random() < 0.5:
            docs.append({"event_id": f"p{u}", "type": "purchase", "user_id": f"u{u}", "item_id": path[-1],
                         "ts": ts + 40_000, "price": 10.0})
    return docs


def test_report_keys_and_the_engine_beats_popularity(tmp_path):
    path = write_jsonl(tmp_path / "log.jsonl", shop_log())
    r = evaluate_file(path, "jsonl", horizon_h=0.05, progress=False)
    assert {"events", "events_per_s", "engine", "baseline"} <= set(r)
    assert set(r["engine"]) == KEYS and set(r["baseline"]) == KEYS
    assert r["events"] == len(shop_log()) and r["invalid"] == 0 and r["duplicates"] == 0
    assert r["next_item_targets"] > 0
    assert r["engine"]["hr_at_20"] > r["baseline"]["hr_at_20"]
    assert r["engine"]["mrr_at_20"] > r["baseline"]["mrr_at_20"]
    assert 0.0 <= r["engine"]["mrr_at_20"] <= r["engine"]["hr_at_20"] <= 1.0
    assert r["scored_points"] > 0 and r["engine"]["auc"] is not None


def test_bad_rows_and_duplicates_are_counted_not_dropped(tmp_path):
    docs = shop_log(20)
    docs.insert(3, {"event_id": "bad", "type": "teleport", "user_id": "u1", "item_id": "i", "ts": T0})
    docs.insert(5, docs[0])  # a duplicate event id
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{not json\n")
    events, dropped = load_events(path, "jsonl")
    assert len(events) == len(docs) - 2
    assert dropped["invalid"] == 2 and dropped["duplicates"] == 1
    assert any("line" in e for e in dropped["errors"]) and any("teleport" in e["error"] for e in dropped["errors"])
    assert [e.ts for e in events] == sorted(e.ts for e in events)


def test_predictions_come_before_learning():
    """The first event of the log can only be predicted by an empty model: no hit, no label yet."""
    from models.events import Event

    evs = [Event("1", "view", "u", "a", T0), Event("2", "view", "u", "b", T0 + 1)]
    r = evaluate_events(evs, batch_size=10)
    assert r["next_item_targets"] == 1 and r["engine"]["hr_at_20"] == 0.0 and r["baseline"]["hr_at_20"] == 0.0


def test_cli_prints_one_json_object(tmp_path):
    path = write_jsonl(tmp_path / "log.jsonl", shop_log(40))
    res = CliRunner().invoke(cli, ["evaluate", "stream", str(path), "--format", "jsonl", "--json",
                                   "--horizon-h", "0.05"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip())
    assert report["events"] == len(shop_log(40))


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["evaluate", "stream", str(tmp_path / "missing.jsonl"), "--format", "jsonl", "--json"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "missing.jsonl" in res.stderr and res.stderr.startswith("promo: error:")
    path = write_jsonl(tmp_path / "log.jsonl", shop_log(5))
    res = runner.invoke(cli, ["evaluate", "stream", str(path), "--format", "jsonl", "--horizon-h", "-1"])
    assert res.exit_code == 2 and "horizon" in res.stderr


def test_exact_auc_and_log_loss():
    assert roc_auc([0, 1], [0.3, 0.3]) == 0.5  # ties count one half
    assert roc_auc([0, 0, 1], [0.1, 0.9, 0.5]) == 0.5
    assert roc_auc([0, 1, 1, 0], [0.1, 0.8, 0.7, 0.2]) == 1.0
    assert roc_auc([], []) is None and log_loss([], []) is None
    assert log_loss([1], [1.0]) == pytest.approx(0.0, abs=1e-12)


def test_auc_is_reported_at_several_horizons_from_one_replay():
    """``auc_by_horizon_h``: one entry per horizon; the core's own horizon repeats the main AUCs, and a horizon
    longer than the log has no closed point (null AUCs, none scored)."""
    events, _ = load_events_from_docs(shop_log())
    r = evaluate_events(events, horizon_h=0.05, baselines={}, report_horizons_h=(0.01, 0.05, 24.0))
    by_h = r["auc_by_horizon_h"]
    assert list(by_h) == ["0.01", "0.05", "24"]
    assert set(by_h["0.05"]) == {"engine", "frequency", "scored_points", "scored_positives", "engine_ci95",
                                 "frequency_ci95", "engine_minus_frequency"}
    assert by_h["0.05"]["engine"] == r["engine"]["auc"] and by_h["0.05"]["frequency"] == r["baseline"]["auc"]
    assert by_h["0.05"]["scored_points"] == r["scored_points"]
    assert by_h["0.01"]["scored_points"] > 0 and by_h["0.01"]["engine"] is not None
    assert by_h["0.01"]["scored_positives"] <= by_h["0.05"]["scored_positives"]  # a shorter window, fewer buys
    assert by_h["24"] == {"engine": None, "frequency": None, "scored_points": 0, "scored_positives": 0,
                          "engine_ci95": None, "frequency_ci95": None, "engine_minus_frequency": None}
    assert r["horizons_s"] >= 0.0


def load_events_from_docs(docs):
    from stream.validation import Limits, decode_event

    evs = [decode_event(json.dumps(d).encode(), Limits(max_future_skew_s=10**9), 4_102_444_800_000) for d in docs]
    return sorted(evs, key=lambda e: e.ts), {}


def test_points_at_the_horizon_boundary_are_scored_alike_whatever_their_label():
    """Two carts at one millisecond, one bought within the horizon, the log ending exactly one horizon later: a point
    still open at the boundary (the negative) must not be left out while its bought twin is scored, which biased
    the AUC towards positives."""
    from models.evaluation.prequential import evaluate_events
    from models.events import Event

    h = 3_600_000
    evs = [Event("1", "cart", "a", "i1", 1000, price=10.0), Event("2", "cart", "b", "i2", 1000, price=10.0),
           Event("3", "purchase", "a", "i1", 1000 + h // 2, price=10.0), Event("4", "view", "c", "i3", 1000 + h)]
    r = evaluate_events(evs, horizon_h=1.0, batch_size=1, baselines={}, report_horizons_h=())
    assert r["decision_points"] == 2 and (r["scored_points"], r["scored_positives"]) in {(2, 1), (0, 0)}
