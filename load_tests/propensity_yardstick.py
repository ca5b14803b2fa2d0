"""The propensity yardstick: an offline gradient-boosted model on the evaluator's own decision points, beside the
engine and the frequency baseline on the same points.

``python -m load_tests.propensity_yardstick --data FILE --format rees46|taobao|jsonl --horizon-h 1`` prints one
JSON object on stdout (progress on stderr):

1. the log is replayed by the prequential evaluator (:func:`models.evaluation.prequential.evaluate_events`, no
   next-item baselines) with a core that keeps each decision point's features
   (:class:`models.learning.delayed_labels.DelayedLabelLearner` ``keep_features``): the same points, features,
   labels and predictions the engine's AUC is computed on;
2. the points whose horizon closed before the log ends (the evaluator's scored points) are split in time: by
   default (``--split points``) at the time before which 70 % of the points lie, earlier points train and later
   ones test; ``--split span`` cuts at 70 % of their time span instead (on a log whose traffic grows, as the REES46
   sample's does from midnight on, that leaves the model a handful of positives to learn from);
3. scikit-learn's ``HistGradientBoostingClassifier`` learns the training points offline (it sees them all at once,
   many times: what an online learner could at best approach) and scores the test points; the engine's and the
   baseline's predictions on the test points are the ones they made online at each point.

Keys: ``horizon_h``, ``points_train``, ``points_test``, ``positives_train``, ``positives_test``, ``features``,
``auc`` (``gbm``, ``engine``, ``frequency`` on the test points), ``ratio`` (``engine`` and ``frequency`` AUC over
``gbm``'s), ``gap_to_gbm`` (``gbm`` minus ``engine``), ``ci95`` (each AUC's DeLong interval, its variance computed
over users), ``gap_to_gbm_ci95`` (the paired interval of the gap: both models score the same test points, so what
they share cancels; an interval that holds 0 is no measured gap), and what describes the run. An AUC is ``null``
when the test points hold one class only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.evaluation.intervals import auc_difference, auc_interval, rounded
from models.evaluation.prequential import closed_predictions, evaluate_events, roc_auc
from models.events import Event
from models.learning.core import LearningCore
from models.learning.features import MODEL_FEATURE_NAMES
from models.state.item_memory import MemoryItemStore

__all__ = ["run", "decision_point_table", "time_cut", "fit_and_score", "main"]

TRAIN_SHARE = 0.7
GBM_OPTIONS = dict(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=40,
                   l2_regularization=1.0, early_stopping=False, random_state=0)
"""Fixed, moderate settings (not tuned on the test points): few positives, so small leaves would overfit."""


def _say(msg: str) -> None:
    print(f"propensity yardstick: {msg}", file=sys.stderr, flush=True)


def decision_point_table(core: LearningCore) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str],
                                                       np.ndarray]:
    """The core's scored decision points as arrays: features ``X`` (the dense features, then every context key
    seen, 0 where absent), labels ``y``, point times ``ts``, the predictions ``online`` (engine, baseline) made
    at each point, the column names, and each point's user (the intervals' clusters)."""
    model = core.purchase_model
    closed = core.watermark - model.horizon_ms
    rows = [(t, f) for t, f in zip(model.predictions, model.kept_features) if t[3] < closed]  # as closed_predictions
    assert len(rows) == len(closed_predictions(core)), "kept features out of step with the predictions"
    extra_keys = sorted({k for _, (_, extra) in rows if extra for k in extra})
    names = list(MODEL_FEATURE_NAMES) + extra_keys
    col = {k: len(MODEL_FEATURE_NAMES) + i for i, k in enumerate(extra_keys)}
    X = np.zeros((len(rows), len(names)))
    for i, (_, (values, extra)) in enumerate(rows):
        X[i, : len(values)] = values
        if extra:
            for k, v in extra.items():
                X[i, col[k]] = v
    y = np.array([t[0] for t, _ in rows], dtype=np.int64)
    ts = np.array([t[3] for t, _ in rows], dtype=np.int64)
    online = np.array([(t[1], t[2]) for t, _ in rows], dtype=np.float64).reshape(-1, 2)
    users = np.array([t[4] for t, _ in rows], dtype=object)
    return X, y, ts, online, names, users


def time_cut(ts: np.ndarray, train_share: float = TRAIN_SHARE, split: str = "points") -> int:
    """The time that splits the points: before it ``train_share`` of the points (``points``) or of their time
    span (``span``).

    >>> time_cut(np.array([0, 1, 2, 3, 100]), 0.6), time_cut(np.array([0, 1, 2, 3, 100]), 0.6, "span")
    (3, 60)
    """
    if split == "span":
        return int(ts.min() + train_share * (ts.max() - ts.min()))
    if split == "points":
        return int(np.sort(ts)[min(len(ts) - 1, int(train_share * len(ts)))])
    raise ValueError(f"split must be 'points' or 'span', got {split!r}")


def fit_and_score(X: np.ndarray, y: np.ndarray, ts: np.ndarray, online: np.ndarray,
                  train_share: float = TRAIN_SHARE, split: str = "points", users: np.ndarray | None = None) -> dict:
    """Split the points in time (:func:`time_cut`), fit the gradient-boosted model on the earlier ones, and score
    it, the engine and the baseline on the later ones. ``users``: each point's user, over whom the intervals'
    variance is computed (None: every point independent)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(y) == 0:
        raise ValueError("no scored decision point: the log is shorter than the horizon")
    cut = time_cut(ts, train_share, split)
    train, test = ts < cut, ts >= cut
    out = {"points_train": int(train.sum()), "points_test": int(test.sum()),
           "positives_train": int(y[train].sum()), "positives_test": int(y[test].sum()), "cut_ts": cut}
    gbm = gbm_p = None
    if 0 < y[train].sum() < train.sum():
        model = HistGradientBoostingClassifier(**GBM_OPTIONS).fit(X[train], y[train])
        gbm_p = model.predict_proba(X[test])[:, 1]
        gbm = roc_auc(y[test], gbm_p)
    engine, frequency = roc_auc(y[test], online[test, 0]), roc_auc(y[test], online[test, 1])
    out["auc"] = {"gbm": gbm, "engine": engine, "frequency": frequency}
    out["ratio"] = {name: (round(a / gbm, 4) if a is not None and gbm else None)
                    for name, a in (("engine", engine), ("frequency", frequency))}
    out["gap_to_gbm"] = round(gbm - engine, 4) if gbm is not None and engine is not None else None
    clusters = users[test] if users is not None else None
    out["ci95"] = {name: rounded(auc_interval(y[test], p, clusters=clusters) if p is not None else None)
                   for name, p in (("gbm", gbm_p), ("engine", online[test, 0]), ("frequency", online[test, 1]))}
    gap = auc_difference(y[test], gbm_p, online[test, 0], clusters=clusters) if gbm_p is not None else None
    out["gap_to_gbm_ci95"] = rounded(gap["ci95"]) if gap is not None else None
    return out


def run(events: list[Event], horizon_h: float = 1.0, batch_size: int = 100, train_share: float = TRAIN_SHARE,
        split: str = "points", progress=_say) -> dict:
    """Replay ``events`` (time-sorted, de-duplicated) through the evaluator and compare the models on its last
    ``1 - train_share`` of time (see the module docstring)."""
    t0 = time.perf_counter()
    core = LearningCore(MemoryItemStore(), horizon_h=horizon_h, keep_predictions=True)
    core.purchase_model.keep_features = True
    evaluate_events(events, horizon_h=horizon_h, batch_size=batch_size, core=core, baselines={},
                    report_horizons_h=(), progress=progress)
    X, y, ts, online, names, users = decision_point_table(core)
    if progress:
        progress(f"{len(y)} scored decision points ({int(y.sum())} positive), {len(names)} features; fitting")
    out = {"horizon_h": horizon_h, "events": len(events), "features": len(names)}
    out.update(fit_and_score(X, y, ts, online, train_share, split, users))
    out.update(train_share=train_share, split=split)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m load_tests.propensity_yardstick", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="event log")
    ap.add_argument("--format", default="rees46", choices=("jsonl", "rees46", "taobao"))
    ap.add_argument("--horizon-h", type=float, default=1.0, help="purchase-within-H horizon, hours")
    ap.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--train-share", type=float, default=TRAIN_SHARE, help="share of the points (or span) that trains")
    ap.add_argument("--split", default="points", choices=("points", "span"),
                    help="cut where train-share of the points lie before (points) or at train-share of the time span")
    args = ap.parse_args(argv)
    from stream.evaluate import load_events

    events, dropped = load_events(args.data, args.format, args.limit)
    _say(f"{len(events)} events from {args.data} ({dropped['invalid']} invalid, {dropped['duplicates']} duplicates)")
    out = run(events, args.horizon_h, args.batch_size, args.train_share, args.split)
    out.update(data=str(args.data), format=args.format)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
