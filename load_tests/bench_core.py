"""``promo bench core``: the learning core alone (no broker, no Redis), through the batch API.

What is measured, in one process and one run (so the ratios compare like with like on a shared machine):

1. **events/s** of the learning path the worker runs per batch: ``Profile.apply`` for every event, then
   ``LearningCore.learn_batch`` (numba pair counting, item store updates, category stats, propensity decision
   points and delayed labels with River, segments), on an in-memory item store, batches of ``batch_size``;
2. **numba vs pure Python**: the same pair counter (window update + pair increments + aggregation of identical
   pairs) as the numba kernel (:func:`models.learning.similarity.count_pairs`) and as the pure-Python reference
   (:func:`models.learning.similarity.count_pairs_py`) on identical int arrays in batches of ``batch_size``, garbage
   collector paused; ``numba_vs_python`` is the median ratio of their events/s over alternated passes
   (``counters_agree`` checks both produced the same pairs; see :func:`bench_counters` for the
   interleaved variant also reported);
3. **garbage collection**: the main pass runs with :func:`models.learning.core.tune_gc` (start-up objects frozen,
   young collections every 50,000 allocations), as a worker should; ``events_per_s_default_gc`` is the same
   pass with Python's defaults, run first (the benchmark keeps every profile in memory, which makes default
   collections scan hundreds of thousands of objects);
4. **decision compute**: per trigger (a sample of events after learning), ``recommend`` + ``propensity`` +
   ``segment`` for the user's profile; p50 / p99 in milliseconds.

Data: the real Taobao slice (``/work/shared/data/taobao_time_slice``), looped with shifted user ids and event
times until ``n_events`` (each loop is a new population of users on the same catalogue, later in time).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from models.events import Event
from models.state.item_memory import MemoryItemStore
from models.learning.core import LearningCore, tune_gc
from models.profile import EVENT_WEIGHTS, Profile
from models.learning.similarity import ItemVocab, UserWindows, count_pairs, count_pairs_py

DATA = Path(os.environ.get("PROMO_DATA_DIR", "/work/shared/data"))
TAOBAO = DATA / "taobao_time_slice" / "userbehavior_time_slice.csv"


def _say(msg: str) -> None:
    print(f"bench core: {msg}", file=sys.stderr, flush=True)


def looped(base: list[Event]):
    """``base`` (time-sorted) again and again: loop ``k`` has the ids ``<event id>~k`` and ``<user id>~k`` (new
    users) and comes after loop ``k - 1`` in event time (shifted by the log's span plus a second)."""
    span = base[-1].ts - base[0].ts + 1000
    for loop in itertools.count():
        shift = loop * span
        for e in base:
            yield dataclasses.replace(e, event_id=f"{e.event_id}~{loop}", user_id=f"{e.user_id}~{loop}",
                                      ts=e.ts + shift)


def real_events(n_events: int, path: Path = TAOBAO, fmt: str = "taobao") -> list[Event]:
    """``n_events`` events from a real log, looped with shifted user ids (``<user>~<loop>``) and event times."""
    from stream.evaluate import load_events

    base, _ = load_events(path, fmt, limit=min(n_events, 10**9))
    if not base:
        raise ValueError(f"no events in {path}")
    return list(itertools.islice(looped(base), n_events))


def _counter_rows(events: list[Event], batch_size: int):
    """The kernel's int inputs, per batch (users mapped to window slots, items to indices)."""
    vocab = ItemVocab()
    slot_of: dict[str, int] = {}
    rows = []
    for start in range(0, len(events), batch_size):
        b = events[start : start + batch_size]
        slots = np.array([slot_of.setdefault(e.user_id, len(slot_of)) for e in b], np.int64)
        items = vocab.index([e.item_id for e in b])
        ts = np.array([e.ts for e in b], np.int64)
        w = np.array([EVENT_WEIGHTS[e.type] for e in b], np.float64)
        rows.append((slots, items, ts, w))
    return rows, len(slot_of)


def bench_counters(events: list[Event], batch_size: int, width: int = 8, window_ms: int = 3_600_000,
                   rounds: int = 3) -> dict:
    """Numba kernel vs pure-Python reference on identical inputs (garbage collector paused, so a collection
    of the rest of the heap cannot land in one side's timing).

    ``numba_vs_python``: the whole stream through the numba counter, then through the Python one, alternated
    ``rounds`` times (each pass with fresh windows), median of the per-round ratios. ``..._interleaved``: one
    more pass alternating the two batch by batch (each call then starts with caches the other one cooled: the
    numba side's worst case).
    """
    rows, n_users = _counter_rows(events, batch_size)
    py_rows = [(s.tolist(), i.tolist(), t.tolist(), w.tolist()) for s, i, t, w in rows]
    count_pairs(*rows[0], UserWindows(capacity=max(2, n_users), width=width), window_ms)  # load from cache
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    clock = time.perf_counter
    n = len(events)
    try:
        ratios, nb_rates, py_rates = [], [], []
        agree = True
        pairs = 0
        for _ in range(rounds):
            win = UserWindows(capacity=max(2, n_users), width=width)
            t0 = clock()
            out = [count_pairs(s, i, t, w, win, window_ms) for s, i, t, w in rows]
            nb_s = clock() - t0
            pywin: dict = {}
            t0 = clock()
            ref = [count_pairs_py(ps, pi, pt, pw, pywin, width, window_ms) for ps, pi, pt, pw in py_rows]
            py_s = clock() - t0
            ratios.append(py_s / nb_s)
            nb_rates.append(n / nb_s)
            py_rates.append(n / py_s)
            agree = agree and all(dict(zip(zip(a.tolist(), b.tolist()), inc.tolist())) == r
                                  for (a, b, inc), r in zip(out, ref))
            pairs = int(sum(len(x[0]) for x in out))
            del out, ref
        # interleaved, batch by batch
        win = UserWindows(capacity=max(2, n_users), width=width)
        pywin = {}
        nb_s = py_s = 0.0
        for (s, i, t, w), (ps, pi, pt, pw) in zip(rows, py_rows):
            t0 = clock()
            count_pairs(s, i, t, w, win, window_ms)
            t1 = clock()
            count_pairs_py(ps, pi, pt, pw, pywin, width, window_ms)
            py_s += clock() - t1
            nb_s += t1 - t0
    finally:
        if was_enabled:
            gc.enable()
    return {
        "numba_counter_events_per_s": round(statistics.median(nb_rates), 1),
        "python_counter_events_per_s": round(statistics.median(py_rates), 1),
        "numba_vs_python": round(statistics.median(ratios), 2),
        "numba_vs_python_rounds": [round(r, 2) for r in ratios],
        "numba_vs_python_interleaved": round(py_s / nb_s, 2),
        "counters_agree": agree,
        "pairs": pairs,
    }


def _learning_pass(events: list[Event], batch_size: int, seed: int, label: str):
    core = LearningCore(MemoryItemStore(), seed=seed)
    profiles: dict[str, Profile] = {}
    apply_s = learn_s = 0.0
    n = len(events)
    last = time.perf_counter()
    clock = time.perf_counter
    for start in range(0, n, batch_size):
        batch = events[start : start + batch_size]
        t0 = clock()
        touched: dict[str, Profile] = {}
        for e in batch:
            p = profiles.get(e.user_id)
            if p is None:
                p = profiles[e.user_id] = Profile()
            p.apply(e)
            touched[e.user_id] = p
        t1 = clock()
        core.learn_batch(batch, touched)
        t2 = clock()
        apply_s += t1 - t0
        learn_s += t2 - t1
        if t2 - last > 2.0:
            last = t2
            done = start + len(batch)
            _say(f"{label}: {done}/{n} events, {done / (apply_s + learn_s):,.0f} ev/s")
    return core, profiles, apply_s, learn_s


def run(n_events: int = 200_000, batch_size: int = 500, n_decisions: int = 2000, seed: int = 0,
        compare_default_gc: bool = True) -> dict:
    """Run the benchmark; returns the report (keys in the module docstring and ``ARCHITECTURE.md``).

    The main learning pass runs with :func:`models.learning.core.tune_gc` (what a worker should do at start-up);
    with ``compare_default_gc`` the same pass first runs with Python's default collector settings, reported
    as ``events_per_s_default_gc``.
    """
    if n_events < batch_size:
        raise ValueError(f"n_events must be >= batch_size ({batch_size}), got {n_events}")
    _say(f"loading {n_events} real events from {TAOBAO}")
    events = real_events(n_events)
    # warm-up: numba from its cache, River code paths
    warm = LearningCore(MemoryItemStore())
    wp: dict[str, Profile] = {}
    for e in events[:batch_size]:
        wp.setdefault(e.user_id, Profile()).apply(e)
    warm.learn_batch(events[:batch_size], wp)
    del warm, wp

    _say("pair counter: numba kernel vs pure Python, same inputs")
    counters = bench_counters(events, batch_size)

    old_threshold = gc.get_threshold()
    default_gc_eps = None
    if compare_default_gc:
        _say("learning path with the default garbage collector settings")
        _, _, a_s, l_s = _learning_pass(events, batch_size, seed, "default gc")
        default_gc_eps = round(n_events / (a_s + l_s), 1)
        gc.collect()
    try:
        threshold = tune_gc()
        _say(f"learning path: Profile.apply + LearningCore.learn_batch (gc thresholds {threshold}, start-up frozen)")
        core, profiles, apply_s, learn_s = _learning_pass(events, batch_size, seed, "tuned gc")
        total_s = apply_s + learn_s

        _say("decision compute: recommend + propensity + segment")
        rng = np.random.default_rng(seed)
        sample = [events[i] for i in rng.choice(len(events), size=min(n_decisions, len(events)), replace=False)]
        lat = []
        for e in sample:
            prof = profiles[e.user_id]
            t0 = time.perf_counter_ns()
            core.recommend(prof, 10, now_ms=e.ts)
            core.propensity(prof, e.ts)
            core.segment(prof, e.ts)
            lat.append((time.perf_counter_ns() - t0) / 1e6)
        lat.sort()

    finally:
        gc.unfreeze()
        gc.set_threshold(*old_threshold)
    q = core.quality()
    tm = core.timings
    report = {
        "events_per_s": round(n_events / total_s, 1),
        "numba_vs_python": counters["numba_vs_python"],
        "decision_p50_ms": round(statistics.median(lat), 4),
        "decision_p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
        **{k: v for k, v in counters.items() if k != "numba_vs_python"},
        "events_per_s_default_gc": default_gc_eps,
        "gc_threshold": list(threshold),
        "n_events": n_events,
        "batch_size": batch_size,
        "users": len(profiles),
        "items": core.store.n_items(),
        "decision_points": core.purchase_model.n_observed,
        "labels": q["labels"],
        "seconds": {
            "profile_apply": round(apply_s, 3),
            "similarity": round(tm["similarity_s"], 3),
            "item_store": round(tm["store_s"], 3),
            "models": round(tm["models_s"], 3),
            "total": round(total_s, 3),
        },
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "data": str(TAOBAO),
    }
    _say(f"done: {report['events_per_s']:,.0f} ev/s, numba {report['numba_vs_python']}x python")
    return report


if __name__ == "__main__":
    import json

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)))
