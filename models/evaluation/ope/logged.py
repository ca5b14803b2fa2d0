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
    """One logged decision: the ``context`` it was taken in, the logged ``action``, the ``propensity`` the logging
    policy gave it, the ``reward`` it earned, the ``actions`` eligible then (``None``: all) and its ``line``.
    ``holdout``: the decision was the engine's control group's (``"group": "holdout"`` in a ledger export), always
    no offer whatever the policy, so no target policy could act there (:func:`evaluate_rows` leaves it out)."""

    context: dict
    action: str
    propensity: float
    reward: float
    actions: list[str] | None = None
    line: int = 0
    holdout: bool = False


def iter_jsonl(path: str | Path) -> Iterator[LoggedRow | list[str]]:
    """Rows of a JSONL log; a header ``{"actions": [...]}`` yields the declared action list."""
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise PolicyDataError(f"{path}:0: cannot read logged decisions: {exc.strerror or exc}") from None
    with fh:
        for line, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise PolicyDataError(f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise PolicyDataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
            if "action" not in obj and "actions" in obj:
                actions = obj["actions"]
                if not isinstance(actions, list) or not actions or not all(isinstance(a, (str, int)) for a in actions):
                    raise PolicyDataError(f"{path}:{line}: header 'actions' must be a non-empty list of action names")
                yield [str(a) for a in actions]
                continue
            yield _parse_row(obj, path, line)


def _parse_row(obj: dict, path: Path, line: int) -> LoggedRow:
    """One logged decision from its JSON object, every field checked; errors name ``<path>:<line>``."""
    for k in ("context", "action", "propensity", "reward"):
        if k not in obj:
            raise PolicyDataError(f"{path}:{line}: missing '{k}' (each line needs context, action, propensity, reward)")
    context = obj["context"]
    if not isinstance(context, dict):
        raise PolicyDataError(f"{path}:{line}: 'context' must be an object, got {type(context).__name__}")
    for k, v in context.items():
        if (isinstance(v, bool) or not isinstance(v, (str, int, float))
                or (isinstance(v, float) and not math.isfinite(v))):
            raise PolicyDataError(f"{path}:{line}: context value '{k}' must be a string or a finite number, got {v!r}")
    action = obj["action"]
    if isinstance(action, bool) or not isinstance(action, (str, int)) or action == "":
        raise PolicyDataError(f"{path}:{line}: 'action' must be a non-empty string, got {action!r}")
    propensity = obj["propensity"]
    if isinstance(propensity, bool) or not isinstance(propensity, (int, float)) or not (0.0 < propensity <= 1.0):
        raise PolicyDataError(f"{path}:{line}: 'propensity' must be a number in (0, 1], got {propensity!r}")
    reward = obj["reward"]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise PolicyDataError(f"{path}:{line}: 'reward' must be a finite number, got {reward!r}")
    eligible = obj.get("actions")
    if eligible is not None:
        if not isinstance(eligible, list) or not eligible or not all(isinstance(a, (str, int)) for a in eligible):
            raise PolicyDataError(f"{path}:{line}: 'actions' must be a non-empty list of action names")
        eligible = [str(a) for a in eligible]
        if str(action) not in eligible:
            raise PolicyDataError(f"{path}:{line}: logged action '{action}' is not among the row's eligible actions")
    return LoggedRow(context, str(action), float(propensity), float(reward), eligible, line,
                     holdout=obj.get("group") == "holdout")


def obd_csv(path: Path) -> Path:
    """The Open Bandit Dataset CSV at ``path``: the file itself, or in a directory ``<dir>.csv``, ``all.csv``, or
    the first other CSV but ``item_context.csv``."""
    if path.is_dir():
        candidates = [path / f"{path.name}.csv", path / "all.csv"] + sorted(path.glob("*.csv"))
        for candidate in candidates:
            if candidate.is_file() and candidate.name != "item_context.csv":
                return candidate
        raise PolicyDataError(f"{path}:0: no Open Bandit Dataset CSV in this directory (expected {path.name}.csv)")
    return path


def iter_obd(path: str | Path) -> Iterator[LoggedRow | list[str]]:
    """Open Bandit Dataset CSV (a campaign file or its directory) as logged rows.

    Context: ``user_feature_0..3`` (hashed categoricals) and ``position``; action: ``item_id``; reward:
    ``click``; propensity: ``propensity_score``. When ``item_context.csv`` sits next to the file, its items
    declare the action set.
    """
    csv_path = obd_csv(Path(path))
    item_context = csv_path.parent / "item_context.csv"
    if item_context.is_file():
        with item_context.open(newline="") as fh:
            items = sorted({row["item_id"] for row in csv.DictReader(fh)}, key=lambda s: (len(s), s))
        if items:
            yield items
    try:
        fh = csv_path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise PolicyDataError(f"{csv_path}:0: cannot read the Open Bandit CSV: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        required = ("item_id", "position", "click", "propensity_score")
        if header is None or any(c not in header for c in required):
            raise PolicyDataError(f"{csv_path}:1: not an Open Bandit Dataset CSV (needs columns {', '.join(required)})")
        column = {c: header.index(c) for c in header}
        user_features = [c for c in header if c.startswith("user_feature_")]
        for line, record in enumerate(reader, 2):
            try:
                context = {f: record[column[f]] for f in user_features}
                context["position"] = record[column["position"]]
                yield _parse_row({"context": context, "action": record[column["item_id"]],
                                  "propensity": float(record[column["propensity_score"]]),
                                  "reward": float(record[column["click"]])}, csv_path, line)
            except (IndexError, ValueError) as exc:
                if isinstance(exc, PolicyDataError):
                    raise
                raise PolicyDataError(f"{csv_path}:{line}: malformed Open Bandit row ({exc})") from None


def obd_to_jsonl(src: str | Path, dst: str | Path) -> int:
    """Convert an Open Bandit Dataset CSV to the JSONL log format; returns the number of rows."""
    n_rows = 0
    with Path(dst).open("w", encoding="utf-8") as out:
        for row in iter_obd(src):
            if isinstance(row, list):
                out.write(json.dumps({"actions": row}) + "\n")
                continue
            out.write(json.dumps({"context": row.context, "action": row.action, "propensity": row.propensity,
                                  "reward": row.reward}) + "\n")
            n_rows += 1
    return n_rows
