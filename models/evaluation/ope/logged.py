"""Logged decisions, as off-policy evaluation reads them: one :class:`LoggedRow` per decision, from the JSONL log
format (:func:`iter_jsonl`) or the Open Bandit Dataset CSV (:func:`iter_obd`). Errors name ``<file>:<line>``."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class PolicyDataError(ValueError):
    """A logged-decisions file is invalid; the message names ``<file>:<line>``."""


@dataclass(slots=True)
class LoggedRow:
    context: dict
    action: str
    propensity: float
    reward: float
    actions: list[str] | None = None
    line: int = 0


def iter_jsonl(path: str | Path) -> Iterator[LoggedRow | list[str]]:
    """Rows of a JSONL log; a header ``{"actions": [...]}`` yields the declared action list."""
    p = Path(path)
    try:
        fh = p.open(encoding="utf-8")
    except OSError as exc:
        raise PolicyDataError(f"{p}:0: cannot read logged decisions: {exc.strerror or exc}") from None
    with fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise PolicyDataError(f"{p}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise PolicyDataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            if "action" not in obj and "actions" in obj:
                acts = obj["actions"]
                if not isinstance(acts, list) or not acts or not all(isinstance(a, (str, int)) for a in acts):
                    raise PolicyDataError(f"{p}:{n}: header 'actions' must be a non-empty list of action names")
                yield [str(a) for a in acts]
                continue
            yield _row(obj, p, n)


def _row(obj: dict, p: Path, n: int) -> LoggedRow:
    for k in ("context", "action", "propensity", "reward"):
        if k not in obj:
            raise PolicyDataError(f"{p}:{n}: missing '{k}' (each line needs context, action, propensity, reward)")
    ctx = obj["context"]
    if not isinstance(ctx, dict):
        raise PolicyDataError(f"{p}:{n}: 'context' must be an object, got {type(ctx).__name__}")
    for k, v in ctx.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise PolicyDataError(f"{p}:{n}: context value '{k}' must be a string or a finite number, got {v!r}")
    a = obj["action"]
    if isinstance(a, bool) or not isinstance(a, (str, int)) or a == "":
        raise PolicyDataError(f"{p}:{n}: 'action' must be a non-empty string, got {a!r}")
    pr = obj["propensity"]
    if isinstance(pr, bool) or not isinstance(pr, (int, float)) or not (0.0 < pr <= 1.0):
        raise PolicyDataError(f"{p}:{n}: 'propensity' must be a number in (0, 1], got {pr!r}")
    r = obj["reward"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise PolicyDataError(f"{p}:{n}: 'reward' must be a finite number, got {r!r}")
    acts = obj.get("actions")
    if acts is not None:
        if not isinstance(acts, list) or not acts or not all(isinstance(x, (str, int)) for x in acts):
            raise PolicyDataError(f"{p}:{n}: 'actions' must be a non-empty list of action names")
        acts = [str(x) for x in acts]
        if str(a) not in acts:
            raise PolicyDataError(f"{p}:{n}: logged action '{a}' is not among the row's eligible actions")
    return LoggedRow(ctx, str(a), float(pr), float(r), acts, n)


def obd_csv(path: Path) -> Path:
    if path.is_dir():
        cands = [path / f"{path.name}.csv", path / "all.csv"] + sorted(path.glob("*.csv"))
        for c in cands:
            if c.is_file() and c.name != "item_context.csv":
                return c
        raise PolicyDataError(f"{path}:0: no Open Bandit Dataset CSV in this directory (expected {path.name}.csv)")
    return path


def iter_obd(path: str | Path) -> Iterator[LoggedRow | list[str]]:
    """Open Bandit Dataset CSV (a campaign file or its directory) as logged rows.

    Context: ``user_feature_0..3`` (hashed categoricals) and ``position``; action: ``item_id``; reward:
    ``click``; propensity: ``propensity_score``. When ``item_context.csv`` sits next to the file, its items
    declare the action set.
    """
    p = obd_csv(Path(path))
    items = p.parent / "item_context.csv"
    if items.is_file():
        with items.open(newline="") as fh:
            acts = sorted({row["item_id"] for row in csv.DictReader(fh)}, key=lambda s: (len(s), s))
        if acts:
            yield acts
    try:
        fh = p.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise PolicyDataError(f"{p}:0: cannot read the Open Bandit CSV: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        need = ("item_id", "position", "click", "propensity_score")
        if header is None or any(c not in header for c in need):
            raise PolicyDataError(f"{p}:1: not an Open Bandit Dataset CSV (needs columns {', '.join(need)})")
        ix = {c: header.index(c) for c in header}
        feats = [c for c in header if c.startswith("user_feature_")]
        for n, rec in enumerate(reader, 2):
            try:
                ctx = {f: rec[ix[f]] for f in feats}
                ctx["position"] = rec[ix["position"]]
                yield _row({"context": ctx, "action": rec[ix["item_id"]],
                            "propensity": float(rec[ix["propensity_score"]]), "reward": float(rec[ix["click"]])}, p, n)
            except (IndexError, ValueError) as exc:
                if isinstance(exc, PolicyDataError):
                    raise
                raise PolicyDataError(f"{p}:{n}: malformed Open Bandit row ({exc})") from None


def obd_to_jsonl(src: str | Path, dst: str | Path) -> int:
    """Convert an Open Bandit Dataset CSV to the JSONL log format; returns the number of rows."""
    n = 0
    with Path(dst).open("w", encoding="utf-8") as out:
        for row in iter_obd(src):
            if isinstance(row, list):
                out.write(json.dumps({"actions": row}) + "\n")
                continue
            out.write(json.dumps({"context": row.context, "action": row.action, "propensity": row.propensity,
                                  "reward": row.reward}) + "\n")
            n += 1
    return n
