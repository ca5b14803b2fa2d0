"""Delayed labels, the propensity model and its baseline, conversion stats, segments."""

from __future__ import annotations

import math
import random

import pytest

from models.learning.conversion import ConversionRates
from models.learning.delayed_labels import DelayedLabelLearner
from models.learning.propensity import FrequencyPropensity, PurchasePropensity
from models.learning.segments import ProfileSegments

H = 1_000


def learner(**kw) -> DelayedLabelLearner:
    model = PurchasePropensity(feature_names=("x",), lr=0.02, intercept_init=0.0)
    return DelayedLabelLearner(horizon_ms=H, model=model, keep_predictions=True, **kw)


def test_purchase_within_horizon_is_positive_after_it_is_negative():
    d = learner()
    d.observe("u", 0, {"x": 1.0})
    d.observe("u", 500, {"x": 1.0})
    d.observe("u", 900, {"x": 1.0})
    d.purchase("u", 900)  # same time as the last point: that one stays open
    assert [y for y, *_ in d.predictions] == [1, 1] and len(d) == 1
    d.observe("v", 0, {"x": 0.0})
    d.purchase("v", H + 1)  # too late for v's point: negative
    assert d.predictions[-1][0] == 0
    d.advance(900 + H + 1)  # u's last point expires: negative
    assert len(d) == 0 and d.n_labels == 4 and d.n_positive == 2


def test_expiry_is_strictly_after_the_horizon():
    d = learner()
    d.observe("u", 0, {"x": 1.0})
    d.advance(H)
    assert len(d) == 1
    d.purchase("u", H)  # exactly H later still counts
    assert d.n_positive == 1


def test_oldest_points_are_dropped_and_counted_beyond_max_pending():
    d = learner(max_pending=3)
    for t in range(5):
        d.observe(f"u{t}", t, {"x": 0.0})
    assert len(d) == 3 and d.n_dropped == 2
    d.purchase("u0", 10)  # a dropped point gets no label
    assert d.n_labels == 0


def test_predictions_are_made_before_the_label_is_known():
    d = learner()
    for t in range(200):
        d.advance(10 * H * t)
        d.observe("u", 10 * H * t, {"x": 1.0})
        d.purchase("u", 10 * H * t + 1)
    first, last = d.predictions[0][1], d.predictions[-1][1]
    assert first == 0.5 and last > 0.75  # the first point was scored by an untrained model


def test_learning_modes():
    lazy, eager, fake = learner(learn_at="horizon"), learner(), learner(learn_at="fake_negative", negative_rate=1.0)
    for d in (lazy, eager, fake):
        d.observe("u", 0, {"x": 1.0})
    assert (lazy.model.n, eager.model.n, fake.model.n) == (0, 0, 1)  # fake negatives are learnt at once
    for d in (lazy, eager, fake):
        d.purchase("u", 10)
    assert (lazy.model.n, eager.model.n, fake.model.n) == (0, 1, 2)  # the positive is known to all
    assert lazy.n_labels == eager.n_labels == fake.n_labels == 1 and lazy.n_scored == eager.n_scored == 0
    for d in (lazy, eager, fake):
        d.advance(H + 1)  # scored when the horizon closes, in every mode
    assert (lazy.model.n, eager.model.n, fake.model.n) == (1, 1, 2)
    assert lazy.n_scored == eager.n_scored == fake.n_scored == 1
    assert 0.0 < fake.predict_proba({"x": 1.0}) < 1.0
    with pytest.raises(ValueError, match="learn_at"):
        learner(learn_at="whenever")


def test_negative_subsampling_keeps_the_model_calibrated():
    rng = random.Random(0)
    rate = 0.1
    full = learner(negative_rate=1.0)
    sub = learner(negative_rate=0.25)
    for t in range(6000):
        x = {"x": rng.random()}
        y = rng.random() < rate
        for d in (full, sub):  # points 2H apart: each label arrives before the next point
            d.observe(f"u{t}", 2 * H * t, x)
            if y:
                d.purchase(f"u{t}", 2 * H * t + 1)
            d.advance(2 * H * t)
    for d in (full, sub):
        d.advance(10**9)
    pf = full.predict_proba({"x": 0.5})
    ps = sub.predict_proba({"x": 0.5})
    assert abs(pf - rate) < 0.04 and abs(ps - rate) < 0.04
    assert sub.n_negative_seen > 0 and sub.n_labels == full.n_labels


def test_quality_is_nan_before_labels_then_finite():
    d = learner()
    assert all(math.isnan(v) for v in d.quality().values())
    rng = random.Random(1)
    for t in range(300):
        x = rng.random()
        d.advance(2 * H * t)
        d.observe(f"u{t}", 2 * H * t, {"x": x}, base_p=0.1)
        if x > 0.7:
            d.purchase(f"u{t}", 2 * H * t + 1)
    d.advance(10**9)
    q = d.quality()
    assert 0.5 < q["auc"] <= 1.0 and q["logloss"] > 0 and q["base_auc"] == pytest.approx(0.5)


def test_frequency_baseline_learns_the_global_rate_only_when_horizons_close():
    d = learner()
    d.observe("u", 0, {"x": 1.0})
    d.purchase("u", 10)
    assert d.baseline.n == 0  # positive known, but the horizon has not elapsed: not yet counted
    d.advance(H + 1)
    assert (d.baseline.n, d.baseline.pos) == (1, 1)
    b = FrequencyPropensity(m=1.0)
    assert b.predict_counts(3, 3) > b.predict_counts(0, 3) > 0


def test_feature_scaling_ignores_constant_features_and_clips():
    m = PurchasePropensity(feature_names=("const", "x"), clip=2.0)
    for k in range(50):
        m.learn_one({"const": 7.0, "x": float(k % 2)}, bool(k % 2))
    scaled = m._scaled([7.0, 1000.0], None)
    assert scaled == {"const": 0.0, "x": 2.0}
    assert 0.0 <= m.predict_proba({"x": 1.0, "unknown_key": 5.0}) <= 1.0
    with pytest.raises(ValueError, match="optimizer"):
        PurchasePropensity(optimizer="lbfgs")


def test_conversion_stats_are_bounded():
    c = ConversionRates(max_keys=10)
    for k in range(25):
        c.update(f"i{k}", "view")
    assert len(c.events) <= 10
    c.update("", "purchase")  # no key: ignored
    assert c.n == 25


def test_segments_do_not_depend_on_what_they_learnt_or_their_seed():
    """Segments are fixed rules (tests/unit/test_segments.py): differently fed and seeded, they answer alike."""
    def train(seed):
        s = ProfileSegments(n_segments=3, seed=seed)
        rng = random.Random(seed)
        for _ in range(300):
            g = rng.randrange(3)
            s.learn_one({"spend": 3.0 * g + rng.random() * 0.1, "n_orders": float(g)})
        return s

    a, b = train(2), train(9)
    probes = [{"n_events": 1.0}, {"n_events": 3.0}, {"spend": 3.0, "n_orders": 1.0}, {"spend": 6.0, "n_orders": 2.0}]
    assert [a.predict_one(x) for x in probes] == [b.predict_one(x) for x in probes] == [0, 1, 2, 2]
    with pytest.raises(ValueError):
        ProfileSegments(n_segments=0)


def _labelled_run(cap: int | None, max_pending: int = 10_000) -> DelayedLabelLearner:
    """Many points, a few purchases, then a clock jump; with ``cap``, the closing is spread over later batches."""
    rng = random.Random(7)
    d = learner(max_pending=max_pending)
    for i in range(300):
        d.observe(f"u{i % 40}", i, {"x": rng.random()})
        if i % 9 == 0:
            d.purchase(f"u{i % 40}", i + rng.randrange(1, 3 * H))
    t = 300
    for _batch in range(20):  # batches after the jump: each observes one point, advances with the cap
        t += 10 * H
        d.observe(f"w{t}", t, {"x": 0.5})
        d.advance(t, cap)
    return d


def test_a_capped_advance_closes_at_most_that_many_and_the_rest_later_with_the_same_labels():
    d = learner()
    for i in range(10):
        d.observe(f"u{i}", i, {"x": 1.0})
    assert d.advance(10 * H, max_points=4) is True and d.n_labels == 4
    d.purchase("u9", 10 * H)  # long after u9's horizon: a negative at once, before its point closes
    assert d.n_labels == 5 and d.n_positive == 0
    assert d.advance(10 * H, max_points=4) is True and d.n_labels == 9
    assert d.advance(10 * H, max_points=4) is False and d.n_labels == 10 and d.n_positive == 0
    # the same stream, capped or not, ends with the same labels and counts (predictions made after the jump may
    # differ: the model learnt the capped negatives a few batches later)
    free, capped = _labelled_run(None), _labelled_run(25)
    labels = [sorted((y, ts) for y, _, _, ts, _ in run.predictions) for run in (free, capped)]
    assert labels[0] == labels[1]
    assert (free.n_labels, free.n_positive, free.n_dropped) == (capped.n_labels, capped.n_positive,
                                                                capped.n_dropped) == (319, free.n_positive, 0)
    assert free.n_positive > 0


def test_a_full_queue_labels_the_points_a_capped_advance_left_instead_of_dropping_them():
    d = learner(max_pending=5)
    for i in range(5):
        d.observe(f"u{i}", i, {"x": 1.0})
    d.advance(10 * H, max_points=1)  # four points past their horizon are left in the queue
    for i in range(5):
        d.observe(f"v{i}", 10 * H + i, {"x": 1.0})  # the queue overflows: the expired ones leave as negatives
    assert d.n_dropped == 0 and d.n_labels == 5 and len(d) == 5
    d.observe("v5", 10 * H + 5, {"x": 1.0})  # an open point within its horizon is still dropped, as before
    assert d.n_dropped == 1


def test_the_learning_core_caps_the_labels_of_one_batch():
    from models.learning.core import LearningCore

    with pytest.raises(ValueError, match="labels_per_batch"):
        LearningCore(labels_per_batch=0)
    assert LearningCore(labels_per_batch=7).clone().labels_per_batch == 7


def test_relearning_after_a_restart_closes_labels_within_the_same_cap():
    """``LearningCore.relearn`` (a restarted worker reading back the batches after its snapshot) advances the
    labels with ``labels_per_batch`` too; the next batches close the rest."""
    from models.events import Event
    from models.learning.core import LearningCore

    core = LearningCore(labels_per_batch=3, horizon_h=1.0)
    model = core.purchase_model
    for i in range(10):
        model.observe(f"u{i}", i, {"x": 1.0})
    core.relearn([Event("e1", "view", "late", "i1", 10 * 3_600_000)])
    assert model.n_labels == 3 and len(model) == 7
    core.relearn([Event("e2", "view", "late", "i1", 10 * 3_600_000 + 1)])
    assert model.n_labels == 6
