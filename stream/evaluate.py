"""Offline evaluation from files: ``promo evaluate stream`` (:func:`evaluate_file`: event logs read, validated as
the worker validates, de-duplicated, time-sorted by :func:`load_events`, then
:func:`models.evaluation.prequential.evaluate_events`, engine vs popularity and the next-item baselines of
:mod:`models.evaluation.baselines`) and ``promo evaluate policy`` (:func:`evaluate_policy_file`:
logged decisions, :func:`models.evaluation.ope.evaluate_rows`)."""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

from models.evaluation.ope import evaluate_rows, iter_jsonl, iter_obd
from models.evaluation.ope.logged import PolicyDataError, obd_csv
from models.evaluation.prequential import evaluate_events, fmt_score
from models.policy.catalogue import DEFAULT_PATH, load_catalogue
from models.events import Event
from stream.errors import PromoError
from stream.sources import read_events
from stream.validation import InvalidEvent, Limits, decode_event

_FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01: offline logs are not checked against the wall clock


def load_events(path, fmt: str, limit: int | None = None, progress=None) -> tuple[list[Event], dict]:
    """Read, validate, de-duplicate and time-sort a log. Returns the events and counts of what was set aside
    (``invalid`` with the first ``errors``, ``duplicates``); nothing is dropped silently."""
    limits = Limits(max_future_skew_s=10**9)
    errors: list = []
    invalid: list = []
    events: list[Event] = []
    seen: set[str] = set()
    duplicates = 0
    dumps = json.dumps
    for n, doc in enumerate(read_events(Path(path), fmt, limit=limit, errors=errors), 1):
        try:
            e = decode_event(dumps(doc).encode(), limits, _FAR_FUTURE_MS)
        except InvalidEvent as exc:
            invalid.append({"event_id": doc.get("event_id") if isinstance(doc, dict) else None, "error": str(exc)})
            continue
        if e.event_id in seen:
            duplicates += 1
            continue
        seen.add(e.event_id)
        events.append(e)
        if progress and n % 50_000 == 0:
            progress(f"read {n} rows")
    events.sort(key=lambda e: e.ts)  # stable: file order within a millisecond
    bad = [{"line": x["line"], "error": x["error"]} for x in errors] + invalid
    return events, {"invalid": len(bad), "errors": bad[:5], "duplicates": duplicates}


def _stderr(msg: str) -> None:
    print(f"evaluate: {msg}", file=sys.stderr, flush=True)


def evaluate_file(path, fmt: str, limit: int | None = None, horizon_h: float | None = None,
                  batch_size: int = 100, progress: bool = True) -> dict:
    """Evaluate on a log file (``promo evaluate stream``); progress on stderr, returns the report dict.

    ``horizon_h`` defaults to 1 hour (the sample logs cover 2-3 hours).
    """
    path = Path(path)
    if horizon_h is not None and not (horizon_h > 0 and math.isfinite(horizon_h)):
        raise PromoError(f"--horizon-h must be a finite number > 0 of hours, got {horizon_h}")
    if limit is not None and limit < 0:
        raise PromoError(f"--limit must be >= 0, got {limit}")
    say = _stderr if progress else None
    try:
        events, dropped = load_events(path, fmt, limit, progress=say)
    except OSError as exc:
        raise PromoError(f"cannot read {path}: {exc.strerror or exc}; check the path") from exc
    except (EOFError, zlib.error) as exc:  # a truncated (EOFError) or corrupt (zlib.error) .gz file
        raise PromoError(f"cannot read {path}: {type(exc).__name__}: {exc}; the compressed file is damaged") from exc
    except ValueError as exc:  # stream.sources.SourceError
        raise PromoError(f"{exc}") from exc
    if say:
        say(f"{len(events)} events from {path} ({dropped['invalid']} invalid, {dropped['duplicates']} duplicates)")
    report = evaluate_events(events, horizon_h=horizon_h or 1.0, batch_size=batch_size, progress=say)
    report.update(dropped)
    report["file"] = str(path)
    report["format"] = fmt
    if say:
        e, b = report["engine"], report["baseline"]
        say(f"done: HR@20 engine {fmt_score(e['hr_at_20'])} vs popularity {fmt_score(b['hr_at_20'])}; "
            f"AUC engine {fmt_score(e['auc'])} vs frequency {fmt_score(b['auc'])}")
        say("HR@20 / MRR@20 of the baselines: " + ", ".join(
            f"{name} {fmt_score(m['hr_at_20'])} / {fmt_score(m['mrr_at_20'])}"
            for name, m in report["baselines"].items()))
        say("AUC engine / frequency by horizon: " + ", ".join(
            f"{h} h {fmt_score(m['engine'])} / {fmt_score(m['frequency'])}"
            for h, m in report["auc_by_horizon_h"].items()))
        say("engine over each baseline, HR@20 / MRR@20 with 95 % intervals: " + ", ".join(
            f"{name} {_ratio(v['hr_at_20'])} / {_ratio(v['mrr_at_20'])}"
            for name, v in report["engine_vs_baselines"].items()))
    return report


def _ratio(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['ratio']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def evaluate_policy_file(path: str | Path, fmt: str = "jsonl", seed: int = 0, policies: tuple[str, ...] = ("thompson",),
                         learning: str = "replay", catalogue_path: str | Path | None = None) -> dict:
    """``promo evaluate policy FILE --format jsonl|obd --seed N --policy thompson|rules``: the report dict
    (:mod:`models.evaluation.ope`), with the worker's policy classes in ``policies`` replayed over the log as
    ``engine:<name>`` (:mod:`models.evaluation.ope.engine`; ``learning``: ``replay`` or ``all``).

    ``catalogue_path`` (the CLI passes ``PROMO_CATALOGUE_PATH``'s; default the bundled catalogue) is the worker's
    catalogue the replayed policies decide with when the log's actions are its offers (a ``promo ledger export``).
    Raises :class:`PolicyDataError` (a ``ValueError``) naming ``<file>:<line>`` for invalid input.
    """
    if fmt == "jsonl":
        rows = iter_jsonl(path)
    elif fmt == "obd":
        rows = iter_obd(path)
    else:
        raise PolicyDataError(f"{path}:0: unknown format '{fmt}' (use jsonl or obd)")
    catalogue = load_catalogue(catalogue_path or DEFAULT_PATH)

    def progress(n: int) -> None:
        print(f"evaluate policy: {n} rows", file=sys.stderr, flush=True)

    src = str(obd_csv(Path(path))) if fmt == "obd" else str(path)
    report = evaluate_rows(rows, seed=seed, progress=progress, source=src, engine_policies=policies,
                           learning=learning, catalogue=catalogue)
    report["file"] = str(path)
    report["format"] = fmt
    return report
