"""Issue 13: model snapshots written before the propensity features changed (version 1) still load."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from models.events import Event
from models.learning.core import LearningCore
from models.learning.features import MODEL_FEATURE_NAMES
from models.learning.snapshot import SNAPSHOT_VERSION, loads
from models.profile import Profile

V1 = Path(__file__).parent / "data" / "snapshot_v1.pickle"
"""Written by the engine at a16f336 (version 1, 32 features): users u1-u3, 5 events, 2 pending points."""


def test_a_version_1_snapshot_loads_with_a_fresh_purchase_model(caplog):
    old = loads(V1.read_bytes())
    assert old["version"] == 1 and len(old["labels"].model.feature_names) < len(MODEL_FEATURE_NAMES)
    core = LearningCore(horizon_h=1.0, decision_points="batch")
    with caplog.at_level(logging.WARNING):
        assert core.restore(V1.read_bytes()) == {("promo.events", 0): 5}
    assert "starts afresh" in caplog.text and "2 pending decision points dropped" in caplog.text
    # everything but the purchase model came back
    assert core.watermark == 5_000 and core.n_events == 5 and core.recommend(Profile(recent_items=["a"]), 2) == ["b"]
    assert core.purchase_model.model.feature_names == MODEL_FEATURE_NAMES and len(core.purchase_model) == 0
    assert core.purchase_model.baseline.n == old["labels"].baseline.n
    assert core.cat_conv.carts == {} and core.cat_conv.events["tv"] == 5
    # and the engine runs on: it predicts, learns and snapshots in the new version
    prof = Profile()
    e = Event("e6", "cart", "u4", "a", 6_000, category="tv", price=10.0)
    prof.apply(e)
    core.learn_batch([e], {"u4": prof})
    assert 0.0 < core.propensity(prof, 6_000) < 1.0 and len(core.purchase_model) == 1
    assert pickle.loads(core.snapshot({}))["version"] == SNAPSHOT_VERSION == 2


def test_a_current_snapshot_keeps_its_purchase_model():
    core = LearningCore(horizon_h=1.0, decision_points="batch")
    prof = Profile()
    e = Event("e1", "view", "u1", "a", 1_000, category="tv")
    prof.apply(e)
    core.learn_batch([e], {"u1": prof})
    other = LearningCore(horizon_h=1.0)
    other.restore(core.snapshot({}))
    assert len(other.purchase_model) == 1 and other.propensity(prof, 1_000) == core.propensity(prof, 1_000)


def test_an_unknown_version_is_refused():
    with pytest.raises(ValueError, match="reads versions 1, 2"):
        LearningCore().restore(pickle.dumps({"version": 3}))
