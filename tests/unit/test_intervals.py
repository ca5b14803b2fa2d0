"""The evaluator's intervals (:mod:`models.evaluation.intervals`) against their definitions, and in the report."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation.intervals import auc_difference, auc_interval, delong, ratio_interval
from models.evaluation.prequential import evaluate_events, roc_auc


def _placements(y, s):
    """DeLong's structural components by their O(m n) definition: per positive, the share of negatives it
    outranks; per negative, the share of positives that outrank it (ties one half)."""
    y, s = np.asarray(y), np.asarray(s, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def test_delong_matches_its_definition_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.2
    s1 = np.round(rng.random(300) + 0.5 * y, 1)  # rounded: many ties
    s2 = np.round(rng.random(300) + 0.2 * y, 2)
    aucs, cov = delong(y.astype(int), [s1, s2])
    (v1p, v1n), (v2p, v2n) = _placements(y, s1), _placements(y, s2)
    m, n = len(v1p), len(v1n)
    assert aucs[0] == pytest.approx(roc_auc(y, s1)) and aucs[1] == pytest.approx(roc_auc(y, s2))
    assert aucs[0] == pytest.approx(v1p.mean())
    want = np.array([[np.var(v1p, ddof=1) / m + np.var(v1n, ddof=1) / n,
                      np.cov(v1p, v2p)[0, 1] / m + np.cov(v1n, v2n)[0, 1] / n],
                     [0.0, np.var(v2p, ddof=1) / m + np.var(v2n, ddof=1) / n]])
    want[1, 0] = want[0, 1]
    assert cov == pytest.approx(want)


def test_one_class_has_no_interval():
    assert delong([1, 1], [[0.1, 0.2]]) is None
    assert auc_interval([0, 0], [0.1, 0.2]) is None and auc_difference([0, 0], [0.1, 0.2], [0.3, 0.1]) is None


def test_the_auc_interval_covers_the_true_auc_about_95_percent_of_the_time():
    """Binormal scores with a known AUC, Phi(d / sqrt(2)) = 0.7602 for d = 1: the interval holds it in about 95 % of
    400 samples (a wrong variance, e.g. forgetting the negatives' share, gives far fewer)."""
    rng = np.random.default_rng(7)
    true_auc = 0.760249
    held = 0
    for _ in range(400):
        y = np.r_[np.ones(40, dtype=int), np.zeros(200, dtype=int)]
        s = np.r_[rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 200)]
        low, high = auc_interval(y, s)
        held += low <= true_auc <= high
    assert 0.91 <= held / 400 <= 0.98


def test_the_paired_difference_is_narrower_than_the_two_intervals():
    """Two scores sharing most of their noise: the paired interval of the difference is much narrower than what
    the two separate intervals suggest."""
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.1).astype(int)
    base = rng.normal(0, 1, 2000) + y
    s1, s2 = base + rng.normal(0, 0.1, 2000), base + 0.15 * y + rng.normal(0, 0.1, 2000)
    d = auc_difference(y, s2, s1)
    lo1, hi1 = auc_interval(y, s1)
    lo2, hi2 = auc_interval(y, s2)
    assert d["difference"] == pytest.approx(roc_auc(y, s2) - roc_auc(y, s1))
    assert d["ci95"][0] > 0  # s2 is better, measurably, although the separate intervals overlap
    assert lo2 < hi1
    assert d["ci95"][1] - d["ci95"][0] < 0.5 * (hi1 - lo1)


def test_a_ratio_clustered_by_user_is_wider_when_one_users_targets_move_together():
    """The same 400 targets, once as 400 users of one target each, once as 20 users of 20 targets each, where a
    user's targets go the same way (the users on whom one method beats the other): the same ratio, and the
    clustered interval is wider (20 users are less evidence than 400)."""
    rng = np.random.default_rng(5)
    a = (rng.random(400) < 0.3).astype(float)
    b = (rng.random(400) < 0.25).astype(float)
    order = np.argsort(a - b, kind="stable")  # blocks of 20: users where a hits and b misses, and the reverse
    a, b = a[order], b[order]
    single = ratio_interval(a, b)
    grouped = ratio_interval(a.reshape(20, 20).sum(axis=1), b.reshape(20, 20).sum(axis=1))
    assert single["ratio"] == pytest.approx(grouped["ratio"]) == pytest.approx(a.sum() / b.sum())
    assert grouped["ci95"][1] - grouped["ci95"][0] > 1.5 * (single["ci95"][1] - single["ci95"][0])
    assert ratio_interval([1.0, 2.0], [0.0, 0.0]) is None and ratio_interval([1.0], [1.0]) is None


def test_the_report_gives_each_comparison_its_interval():
    from tests.unit.test_prequential import load_events_from_docs, shop_log

    events, _ = load_events_from_docs(shop_log())
    r = evaluate_events(events, horizon_h=0.05, report_horizons_h=(0.05,))
    h = r["auc_by_horizon_h"]["0.05"]
    low, high = h["engine_ci95"]
    assert low <= h["engine"] <= high and h["frequency_ci95"][0] <= h["frequency"] <= h["frequency_ci95"][1]
    diff = h["engine_minus_frequency"]
    assert diff["difference"] == pytest.approx(h["engine"] - h["frequency"], abs=1e-4)
    assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1]
    assert set(r["engine_vs_baselines"]) == set(r["baselines"])
    for name, versus in r["engine_vs_baselines"].items():
        base = r["baselines"][name]
        for metric in ("hr_at_20", "mrr_at_20"):
            if not base[metric]:
                assert versus[metric] is None
                continue
            ratio = versus[metric]["ratio"]
            assert ratio == pytest.approx(r["engine"][metric] / base[metric], rel=1e-3)
            assert versus[metric]["ci95"][0] <= ratio <= versus[metric]["ci95"][1]


def test_a_user_repeated_five_times_is_the_evidence_of_one_user():
    """Each point repeated five times: counted as independent points, the AUC's variance falls about five-fold
    (false confidence); clustered by user, it is exactly that of the original points, each its own cluster."""
    rng = np.random.default_rng(11)
    y = (rng.random(300) < 0.2).astype(int)
    s = rng.normal(0, 1, 300) + y
    users = np.arange(300)
    _, once = delong(y, [s], clusters=users)
    _, naive = delong(np.repeat(y, 5), [np.repeat(s, 5)])
    _, clustered = delong(np.repeat(y, 5), [np.repeat(s, 5)], clusters=np.repeat(users, 5))
    assert clustered[0, 0] == pytest.approx(once[0, 0])
    assert naive[0, 0] < 0.25 * clustered[0, 0]


def test_clusters_of_one_point_agree_with_delong():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.3).astype(int)
    s1, s2 = rng.normal(0, 1, 400) + y, rng.normal(0, 1, 400) + 0.5 * y
    _, plain = delong(y, [s1, s2])
    _, clustered = delong(y, [s1, s2], clusters=[f"u{i}" for i in range(400)])
    assert clustered == pytest.approx(plain, rel=0.02)  # n / (n - 1) factors apart
    assert np.all(np.linalg.eigvalsh(clustered) >= -1e-15)  # a covariance matrix
