"""Issue 13: the propensity yardstick (``load_tests/propensity_yardstick.py``) on the real REES46 slice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from load_tests import propensity_yardstick as yardstick
from tests.helpers import DATA

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"


@pytest.fixture(scope="module")
def report():
    assert REES46.exists(), f"{REES46} is missing: the shared datasets must sit beside the repository"
    from stream.evaluate import load_events

    events, _ = load_events(REES46, "rees46")
    return yardstick.run(events, horizon_h=0.05, progress=None)  # 3 minutes: the slice is under 3 hours


def test_report_shape(report):
    assert {"horizon_h", "points_train", "points_test", "positives_train", "positives_test", "features", "auc",
            "ratio", "gap_to_gbm", "split", "train_share"} <= set(report)
    assert set(report["auc"]) == {"gbm", "engine", "frequency"} and set(report["ratio"]) == {"engine", "frequency"}
    # the points split 70 / 30 in time, and both sides hold both classes
    n = report["points_train"] + report["points_test"]
    assert abs(report["points_train"] / n - 0.7) < 0.05
    assert report["positives_train"] > 10 and report["positives_test"] > 10
    assert all(isinstance(v, float) for v in report["auc"].values())


def test_the_gradient_boosted_model_learns_something(report):
    assert report["auc"]["gbm"] > 0.5


def test_every_auc_and_the_gap_come_with_an_interval(report):
    assert set(report["ci95"]) == {"gbm", "engine", "frequency"}
    for name, (low, high) in report["ci95"].items():
        assert low <= report["auc"][name] <= high and high - low > 0.0
    low, high = report["gap_to_gbm_ci95"]
    assert low <= report["gap_to_gbm"] <= high


def test_the_cut_leaves_later_points_to_test():
    ts = np.array([5, 1, 2, 3, 4, 100, 6, 7, 8, 9])
    cut = yardstick.time_cut(ts, 0.7)
    assert (ts < cut).sum() == 7
    assert yardstick.time_cut(ts, 0.7, "span") == 70


def test_cli_prints_one_json_object(capsys):
    yardstick.main(["--data", str(REES46), "--format", "rees46", "--horizon-h", "0.05", "--limit", "2000"])
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "rees46" and out["horizon_h"] == 0.05 and "auc" in out
