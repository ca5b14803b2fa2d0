"""Prequential (predict-then-learn) evaluation of the learning core on an event log, against baselines.

``promo evaluate stream FILE --format jsonl|rees46|taobao --json`` reads the log (``stream.evaluate``: validated
like the worker does, de-duplicated by ``event_id``, stably sorted by event time) and calls
:func:`evaluate_events`.

Protocol
--------
The events are replayed in batches of ``batch_size`` events, as the worker would see them:

* **next item** — for every event of a user whose item differs from the user's previous item (a repeat of
  the item being looked at is not a prediction task), *before* the event is applied: the engine's
  :meth:`models.learning.core.LearningCore.recommend` (neighbours of the recent items + popularity) and the
  baseline (recency-weighted popularity, the current item excluded) each propose 20 items; HR@20 is the share
  of events whose item is in the list, MRR@20 the mean of ``1 / rank`` (0 when absent). The models and the item
  store have learnt from the previous batches only; the profile includes the user's earlier events.
  The stronger baselines of :mod:`models.evaluation.baselines` (``recent``, ``item_knn``, ``vsknn``, ``sr``) are
  scored at the same points with the same metrics and the same exclusion (the current item); they learn each
  event right after it is scored (the engine's item statistics lag by up to one batch, a slight edge to them).
* **purchase within H** — the core's decision points (see :mod:`models.learning.core`) are scored when their
  delayed label arrives, with the prediction made at the decision point, for the engine model and the
  frequency baseline; AUC (exact, rank-based) and log loss are computed over the points whose horizon closed
  before the log ends (``scored_points``): a positive label arrives early and a negative one only when H
  elapses, so scoring every label seen would pit late positives against early negatives.
* **purchase within H, at several H** — ``auc_by_horizon_h`` scores the same way at each horizon of
  ``report_horizons_h`` (default 0.05, 0.25, 1 and 24 hours), from the same replay: beside the core, one
  propensity-only core per other horizon (the same events and profiles, its own decision points, labels and
  model; no item statistics) learns each batch, so the four horizons cost one replay plus the propensity part
  three more times (``horizons_s``), not four replays. A horizon longer than the log leaves no point whose horizon
  closed: its AUCs are ``null``.
* **events/s** — events divided by the time spent in the learning path (profile apply + ``learn_batch``);
  the time spent on the evaluation's own predictions is excluded (it is reported as ``predict_s``).

Output keys (contract): ``events``, ``events_per_s``, ``engine`` and ``baseline`` with ``hr_at_20``,
``mrr_at_20``, ``auc``, ``logloss``; ``baselines`` with ``{"<name>": {"hr_at_20", "mrr_at_20"}}`` for
``popularity`` (the same numbers as ``baseline``) and each baseline of :mod:`models.evaluation.baselines`;
``auc_by_horizon_h`` with ``{"<H>": {"engine", "frequency", "scored_points", "scored_positives", "engine_ci95",
"frequency_ci95", "engine_minus_frequency"}}``; ``engine_vs_baselines`` with ``{"<name>": {"hr_at_20", "mrr_at_20"}}``
for every baseline, each ``{"ratio", "ci95"}``: the engine's figure over the baseline's. More keys describe the run
(``baselines_s``: time the baselines spent learning and recommending). Undefined values (no label yet, one class
only) are ``null``.

Uncertainty
-----------
The public slices have few positives and many targets from few users, so every comparison comes with a 95 %
interval (:mod:`models.evaluation.intervals`), its variance computed over users (one user's decision points, or
next-item targets, are not independent): ``engine_ci95`` and ``frequency_ci95`` are DeLong intervals of the AUCs,
``engine_minus_frequency`` is their paired difference with its interval (``{"difference", "ci95"}``), and
``engine_vs_baselines`` gives each ratio of HR@20 and MRR@20 with its interval. A ratio whose interval holds 1, or
a difference whose interval holds 0, is not a measured difference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from models.evaluation.baselines import NextItemBaseline, make_baselines
from models.evaluation.intervals import auc_difference, auc_interval, midranks, ratio_interval, rounded
from models.events import Event
from models.state.item_memory import MemoryItemStore
from models.learning.core import LearningCore
from models.profile import Profile

__all__ = ["evaluate_events", "closed_predictions", "roc_auc", "log_loss", "REPORT_HORIZONS_H"]

K = 20
REPORT_HORIZONS_H = (0.05, 0.25, 1.0, 24.0)
"""Horizons (hours) of ``auc_by_horizon_h``."""


def roc_auc(y, p) -> float | None:
    """Exact ROC AUC (ties count one half); ``None`` when only one class is present.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([1, 1], [0.2, 0.3]) is None
    True
    """
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = midranks(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y, p, eps: float = 1e-15) -> float | None:
    """Mean binary cross-entropy; ``None`` for no points.

    >>> round(log_loss([1, 0], [0.9, 0.2]), 6)
    0.164252
    """
    if len(y) == 0:
        return None
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def evaluate_events(
    events: list[Event],
    *,
    horizon_h: float = 1.0,
    batch_size: int = 100,
    k: int = K,
    core: LearningCore | None = None,
    baselines: dict[str, NextItemBaseline] | None = None,
    progress=None,
    report_horizons_h: tuple[float, ...] = REPORT_HORIZONS_H,
) -> dict:
    """Prequential evaluation of a time-sorted, de-duplicated event list (see the module docstring).

    ``baselines``: the next-item baselines by name (default :func:`models.evaluation.baselines.make_baselines`;
    ``{}`` for popularity only). ``report_horizons_h``: the horizons of ``auc_by_horizon_h`` (``()``: none)."""
    core = core or LearningCore(MemoryItemStore(), horizon_h=horizon_h, keep_predictions=True)
    core.purchase_model.keep_predictions = True
    horizon_cores = {h: (core if h == core.horizon_h else _propensity_core(core, h)) for h in report_horizons_h}
    if baselines is None:
        baselines = make_baselines()
    clash = {"engine", "baseline", "popularity"} & set(baselines)
    if clash:
        raise ValueError(f"baseline names {sorted(clash)} are taken by the report")
    t_start = time.perf_counter()
    extra = [c for c in horizon_cores.values() if c is not core]
    run = _replay(events, core, batch_size, k, progress, baselines, extra)
    report = _report(core, run, len(events), batch_size, t_start)
    report["auc_by_horizon_h"] = {f"{h:g}": _horizon_scores(c) for h, c in horizon_cores.items()}
    report["horizons_s"] = round(run.horizons_s, 3)
    if k != K:
        report["k"] = k
    return report


def _propensity_core(core: LearningCore, horizon_h: float) -> LearningCore:
    """A core like ``core`` at another horizon that learns only purchase propensity (the item statistics are
    the main core's: ``items_via_commit`` skips them)."""
    other = LearningCore(MemoryItemStore(), horizon_h=horizon_h, decision_points=core.decision_points,
                         keep_predictions=True, propensity_options=core.propensity_options,
                         context_keys=core.context_keys)
    other.items_via_commit = True
    return other


def closed_predictions(core: LearningCore) -> list[tuple[int, float, float, int, str]]:
    """The ``(label, engine p, baseline p, ts, user)`` of the core's points whose horizon closed before its
    watermark."""
    # score only points whose horizon closed before the log ends: positives close early, negatives only at
    # the horizon, so scoring every label seen would compare late positives with early negatives
    # (strictly before, as the label learner closes a point: at the boundary itself a positive would be scored and
    # its negative twin, still open, not)
    closed = core.watermark - core.purchase_model.horizon_ms
    return [t for t in core.purchase_model.predictions if t[3] < closed]


def _horizon_scores(core: LearningCore) -> dict:
    preds = closed_predictions(core)
    y = [t[0] for t in preds]
    engine, frequency, users = [t[1] for t in preds], [t[2] for t in preds], [t[4] for t in preds]
    diff = auc_difference(y, engine, frequency, clusters=users)
    return {"engine": roc_auc(y, engine), "frequency": roc_auc(y, frequency),
            "scored_points": len(preds), "scored_positives": int(sum(y)),
            "engine_ci95": rounded(auc_interval(y, engine, clusters=users)),
            "frequency_ci95": rounded(auc_interval(y, frequency, clusters=users)),
            "engine_minus_frequency": None if diff is None else {"difference": round(diff["difference"], 4),
                                                                 "ci95": rounded(diff["ci95"])}}


@dataclass
class _NextItem:
    """Next-item hits and reciprocal ranks of the engine (``engine``), the popularity baseline (``baseline``) and
    the other baselines (by name)."""

    targets: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    rr: dict[str, float] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)  # user id -> index, in order of their first target
    # name -> user index -> [hits, reciprocal ranks] of the user's targets: the clusters of ratio_interval
    by_user: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    user: int = -1  # the index of the current target's user

    def target(self, user_id: str) -> None:
        """A new target, of ``user_id``: the methods' :meth:`score` calls that follow are for it."""
        self.targets += 1
        self.user = self.users.setdefault(user_id, len(self.users))

    def score(self, name: str, proposed: list[str], item: str) -> None:
        try:
            r = proposed.index(item)
        except ValueError:
            return
        self.hits[name] = self.hits.get(name, 0) + 1
        self.rr[name] = self.rr.get(name, 0.0) + 1.0 / (r + 1)
        per_user = self.by_user.setdefault(name, {}).setdefault(self.user, [0.0, 0.0])
        per_user[0] += 1.0
        per_user[1] += 1.0 / (r + 1)

    def per_user(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Hits and summed reciprocal ranks of ``name`` per user (0 for a user it never hit)."""
        hits, rr = np.zeros(len(self.users)), np.zeros(len(self.users))
        for u, (h, r) in self.by_user.get(name, {}).items():
            hits[u], rr[u] = h, r
        return hits, rr

    def versus(self, name: str, other: str) -> dict:
        """``name``'s HR@20 and MRR@20 over ``other``'s at the same targets, each ``{"ratio", "ci95"}`` (None when
        ``other`` never hit), the variance over users."""
        (h1, r1), (h2, r2) = self.per_user(name), self.per_user(other)
        out = {}
        for metric, a, b in (("hr_at_20", h1, h2), ("mrr_at_20", r1, r2)):
            r = ratio_interval(a, b)
            out[metric] = None if r is None else {"ratio": round(r["ratio"], 4), "ci95": rounded(r["ci95"])}
        return out

    def hit_rate(self, name: str) -> float | None:
        return self.hits.get(name, 0) / self.targets if self.targets else None

    def mrr(self, name: str) -> float | None:
        return self.rr.get(name, 0.0) / self.targets if self.targets else None


@dataclass
class _Replay:
    """What a replay measured: the users' profiles, the next-item scores and the time spent learning and
    predicting."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    next_item: _NextItem = field(default_factory=_NextItem)
    learn_s: float = 0.0
    predict_s: float = 0.0
    baselines: tuple[str, ...] = ()
    baselines_s: float = 0.0
    horizons_s: float = 0.0


def _replay(events: list[Event], core: LearningCore, batch_size: int, k: int, progress,
            baselines: dict[str, NextItemBaseline], horizon_cores: list[LearningCore] = ()) -> _Replay:
    """Replay ``events`` in batches as the worker would: each event's next item predicted before it is applied,
    then the batch learnt; the baselines predict at the same points and learn each event after it;
    ``horizon_cores`` (propensity at other horizons) learn each batch after the core."""
    run = _Replay(baselines=tuple(baselines))
    models = list(baselines.items())
    profiles = run.profiles
    n = len(events)
    last_report = time.perf_counter()
    for start in range(0, n, batch_size):
        batch = events[start : start + batch_size]
        touched: dict[str, Profile] = {}
        for e in batch:
            prof = profiles.get(e.user_id)
            if prof is None:
                prof = profiles[e.user_id] = Profile()
            recent = prof.recent_items
            if recent and e.type != "remove_from_cart" and e.item_id != recent[-1]:
                t0 = time.perf_counter()
                _predict_next_item(core, prof, e, k, run.next_item)
                t1 = time.perf_counter()
                run.predict_s += t1 - t0
                exclude = {recent[-1]}
                for name, model in models:
                    run.next_item.score(name, model.recommend(e.user_id, k, exclude=exclude), e.item_id)
                run.baselines_s += time.perf_counter() - t1
            t0 = time.perf_counter()
            prof.apply(e)
            t1 = time.perf_counter()
            run.learn_s += t1 - t0
            for _, model in models:
                model.learn_one(e)
            run.baselines_s += time.perf_counter() - t1
            touched[e.user_id] = prof
        t0 = time.perf_counter()
        core.learn_batch(batch, touched)
        t1 = time.perf_counter()
        run.learn_s += t1 - t0
        for other in horizon_cores:
            other.learn_batch(batch, touched)
        run.horizons_s += time.perf_counter() - t1
        if progress and time.perf_counter() - last_report > 2.0:
            last_report = time.perf_counter()
            done = start + len(batch)
            progress(f"{done}/{n} events ({100 * done // max(n, 1)}%), core {done / max(run.learn_s, 1e-9):,.0f} ev/s")
    return run


def _predict_next_item(core: LearningCore, prof: Profile, e: Event, k: int, tally: _NextItem) -> None:
    """The engine's and the baseline's ``k`` items for the user before ``e``, scored against ``e``'s item."""
    tally.target(e.user_id)
    recs = core.recommend(prof, k, now_ms=e.ts)
    base = [i for i, _ in core.store.popular(k + 1, e.ts) if i != prof.recent_items[-1]][:k]
    tally.score("engine", recs, e.item_id)
    tally.score("baseline", base, e.item_id)


def _report(core: LearningCore, run: _Replay, n: int, batch_size: int, t_start: float) -> dict:
    """The output keys (see the module docstring)."""
    preds = closed_predictions(core)
    y = [t[0] for t in preds]
    q = core.quality()
    next_item = run.next_item
    baselines = [("popularity", "baseline")] + [(b, b) for b in run.baselines]  # (report name, tally name)
    return {
        "events": n,
        "events_per_s": round(n / run.learn_s, 1) if run.learn_s > 0 else None,
        "engine": _model_scores(next_item, "engine", y, [t[1] for t in preds]),
        "baseline": _model_scores(next_item, "baseline", y, [t[2] for t in preds]),
        "baselines": {name: {"hr_at_20": next_item.hit_rate(key), "mrr_at_20": next_item.mrr(key)}
                      for name, key in baselines},
        "engine_vs_baselines": {name: next_item.versus("engine", key) for name, key in baselines},
        "next_item_targets": next_item.targets,
        "horizon_h": core.horizon_h,
        "decision_points": core.purchase_model.n_observed,
        "scored_points": len(preds),
        "scored_positives": int(sum(y)),
        "labels": q["labels"],
        "unlabelled_at_end": q["pending"],
        "online_auc_river": _finite(q["auc"]),
        "users": len(run.profiles),
        "items": core.store.n_items(),
        "batch_size": batch_size,
        "learn_s": round(run.learn_s, 3),
        "predict_s": round(run.predict_s, 3),
        "baselines_s": round(run.baselines_s, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }


def _model_scores(next_item: _NextItem, name: str, y: list[int], p: list[float]) -> dict:
    return {"hr_at_20": next_item.hit_rate(name), "mrr_at_20": next_item.mrr(name), "auc": roc_auc(y, p),
            "logloss": log_loss(y, p)}


def _finite(x) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def fmt_score(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
