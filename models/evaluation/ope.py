"""Off-policy evaluation of offer policies on logged decisions: IPS, SNIPS and doubly robust, with 95 % CIs.

Input, one JSON object per line (``--format jsonl``)::

    {"context": {"segment": "3", "cart": 54.0}, "action": "coupon_5", "propensity": 0.25, "reward": 11.5}

``context`` values are numbers or strings; ``propensity`` is the probability the logging policy gave the
logged ``action`` (0 < p <= 1); ``reward`` a finite number. Optional: ``"actions": [...]``, the actions
eligible in that row. A header line ``{"actions": [...]}`` (no ``action``) declares the action set; then an
action outside it is an error naming its line. ``--format obd`` reads the Open Bandit Dataset CSV directly
(see :func:`iter_obd`).

Evaluated policies (values are mean reward per decision):

* ``learned``: learned progressively - row ``t`` is scored by a policy trained on rows ``< t`` only
  (greedy on a shrinkage reward model, ties split uniformly), then the row is learned;
* ``logging``: the policy that produced the log (its on-policy mean reward);
* ``always:<a>``: every constant single-action policy.

IPS = mean of ``w r``; SNIPS = ``sum(w r) / sum(w)``; DR = mean of ``sum_a pi(a|x) rhat(x, a) + w (r - rhat(x, a_t))``,
with ``w = pi(a_t | x) / p_t`` and ``rhat`` the same progressive reward model (trained on earlier rows,
so DR stays unbiased). CIs are normal approximations (delta method for SNIPS).

>>> rows = [LoggedRow({"s": "a"}, "x", 0.5, 1.0), LoggedRow({"s": "a"}, "y", 0.5, 0.0)] * 50
>>> rep = evaluate_rows(rows, seed=0)
>>> rep["rows"], rep["policies"]["always:x"]["ips"], rep["policies"]["always:y"]["snips"]
(100, 1.0, 0.0)
>>> rep["policies"]["logging"]["ips"]
0.5
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

Z95 = 1.959963984540054


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


# --- readers -----------------------------------------------------------------------------------
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


def _obd_csv(path: Path) -> Path:
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
    p = _obd_csv(Path(path))
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


# --- reward model and learned policy --------------------------------------------------------------
def _feature(k: str, v) -> str:
    if isinstance(v, str):
        return f"{k}={v}"
    v = float(v)
    if v == int(v) and abs(v) < 100:
        return f"{k}={int(v)}"
    if v == 0:
        return f"{k}~0"
    return f"{k}~{'-' if v < 0 else ''}{math.floor(2 * math.log2(abs(v)))}"  # half-octave buckets


class ShrinkageRewardModel:
    """Progressive reward model over all actions at once: per-action means shrunk to the global mean, and
    per (action, context feature) means shrunk to the action's, averaged over the context's features.

    >>> m = ShrinkageRewardModel(["a", "b"], strength=1.0)
    >>> for _ in range(20):
    ...     m.learn({"s": "x"}, "a", 1.0); m.learn({"s": "y"}, "a", 0.0); m.learn({"s": "x"}, "b", 0.5)
    >>> [round(float(v), 2) for v in m.predict({"s": "x"})]
    [0.98, 0.5]
    """

    def __init__(self, actions: list[str], strength: float = 5.0) -> None:
        self.actions = list(actions)
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.lam = strength
        A = len(self.actions)
        self.n = np.zeros(A)
        self.s = np.zeros(A)
        self.fn: dict[str, np.ndarray] = {}
        self.fs: dict[str, np.ndarray] = {}
        self.total_n = 0
        self.total_s = 0.0

    def predict(self, context: dict) -> np.ndarray:
        mu = self.total_s / self.total_n if self.total_n else 0.0
        mu_a = (self.s + self.lam * mu) / (self.n + self.lam)
        feats = [_feature(k, v) for k, v in context.items()]
        parts = [(self.fs[f] + self.lam * mu_a) / (self.fn[f] + self.lam) for f in feats if f in self.fn]
        if not parts:
            return mu_a
        return np.mean(parts, axis=0)

    def learn(self, context: dict, action: str, reward: float) -> None:
        i = self.index[action]
        self.n[i] += 1
        self.s[i] += reward
        self.total_n += 1
        self.total_s += reward
        A = len(self.actions)
        for k, v in context.items():
            f = _feature(k, v)
            if f not in self.fn:
                self.fn[f] = np.zeros(A)
                self.fs[f] = np.zeros(A)
            self.fn[f][i] += 1
            self.fs[f][i] += reward


def _greedy(rhat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Greedy distribution on ``rhat`` over allowed actions, ties split uniformly."""
    vals = rhat if mask is None else np.where(mask, rhat, -np.inf)
    best = vals >= vals.max() - 1e-12
    return best / best.sum()


# --- estimators ------------------------------------------------------------------------------------
@dataclass
class _Acc:
    """Running sums for IPS / SNIPS / DR of a family of policies (vectorised over policies)."""

    k: int
    n: int = 0
    ips: np.ndarray = field(init=False)
    ips2: np.ndarray = field(init=False)
    w: np.ndarray = field(init=False)
    w2: np.ndarray = field(init=False)
    w2r: np.ndarray = field(init=False)
    dr: np.ndarray = field(init=False)
    dr2: np.ndarray = field(init=False)

    def __post_init__(self):
        for name in ("ips", "ips2", "w", "w2", "w2r", "dr", "dr2"):
            setattr(self, name, np.zeros(self.k))

    def add(self, w: np.ndarray, r: float, dr: np.ndarray) -> None:
        self.n += 1
        wr = w * r
        self.ips += wr
        self.ips2 += wr * wr
        self.w += w
        self.w2 += w * w
        self.w2r += w * w * r
        self.dr += dr
        self.dr2 += dr * dr

    def report(self, i: int) -> dict:
        n = self.n
        ips = self.ips[i] / n
        ips_se = math.sqrt(max(self.ips2[i] / n - ips * ips, 0.0) / n)
        if self.w[i] > 0:
            sn = self.ips[i] / self.w[i]
            # delta method: Var(SNIPS) ~ sum((w r - sn w)^2) / (sum w)^2
            num = self.ips2[i] - 2 * sn * self.w2r[i] + sn * sn * self.w2[i]
            sn_se = math.sqrt(max(num, 0.0)) / self.w[i]
        else:
            sn, sn_se = float("nan"), float("nan")
        dr = self.dr[i] / n
        dr_se = math.sqrt(max(self.dr2[i] / n - dr * dr, 0.0) / n)
        return {
            "ips": _r(ips), "snips": _r(sn), "dr": _r(dr),
            "ci95": [_r(dr - Z95 * dr_se), _r(dr + Z95 * dr_se)],
            "ips_ci95": [_r(ips - Z95 * ips_se), _r(ips + Z95 * ips_se)],
            "snips_ci95": [_r(sn - Z95 * sn_se), _r(sn + Z95 * sn_se)],
            "dr_ci95": [_r(dr - Z95 * dr_se), _r(dr + Z95 * dr_se)],
            "ess": _r(self.w[i] ** 2 / self.w2[i]) if self.w2[i] > 0 else 0.0,
        }


def _r(x: float) -> float | None:
    if x != x:
        return None
    return round(float(x), 8)


def evaluate_rows(
    rows: Iterable[LoggedRow | list[str]],
    seed: int = 0,
    *,
    strength: float = 5.0,
    true_reward: Callable[[dict, str], float] | None = None,
    progress: Callable[[int], None] | None = None,
    source: str = "<rows>",
) -> dict:
    """Evaluate the learned, logging and constant policies on logged rows (see the module docstring).

    ``true_reward(context, action)`` (simulated logs only) adds each policy's true value as ``"true"``.
    The progressive greedy learner is deterministic; ``seed`` is recorded in the report.
    """
    declared: list[str] | None = None
    data: list[LoggedRow] = []
    for row in rows:
        if isinstance(row, list):
            declared = row if declared is None else declared + [a for a in row if a not in declared]
            continue
        if declared is not None and row.action not in declared:
            raise PolicyDataError(f"{source}:{row.line}: unknown action '{row.action}' (declared actions: "
                                  f"{', '.join(declared[:10])}{', ...' if len(declared) > 10 else ''})")
        if declared is not None and row.actions and any(a not in declared for a in row.actions):
            bad = next(a for a in row.actions if a not in declared)
            raise PolicyDataError(f"{source}:{row.line}: unknown eligible action '{bad}'")
        data.append(row)
    if not data:
        raise PolicyDataError(f"{source}:0: no logged decisions to evaluate")
    actions = list(declared) if declared is not None else []
    seen = set(actions)
    for row in data:
        for a in [row.action] + (row.actions or []):
            if a not in seen:
                seen.add(a)
                actions.append(a)
    A = len(actions)
    idx = {a: i for i, a in enumerate(actions)}
    none_i = idx.get("none")
    model = ShrinkageRewardModel(actions, strength)
    const = _Acc(A)  # always:<a>
    learned = _Acc(1)
    log_sum = log_sum2 = 0.0
    true_const = np.zeros(A)
    true_learned = 0.0
    for t, row in enumerate(data):
        i = idx[row.action]
        mask = None
        if row.actions:
            mask = np.zeros(A, dtype=bool)
            mask[[idx[a] for a in row.actions]] = True
        rhat = model.predict(row.context)
        pi = _greedy(rhat, mask)
        # constant policies: an ineligible action falls back to "none" when eligible, else the logged action
        if mask is None:
            targets = np.arange(A)
        else:
            fallback = none_i if (none_i is not None and mask[none_i]) else i
            targets = np.where(mask, np.arange(A), fallback)
        w_const = (targets == i) / row.propensity
        dr_const = rhat[targets] + w_const * (row.reward - rhat[i])
        const.add(w_const, row.reward, dr_const)
        w_l = pi[i] / row.propensity
        learned.add(np.array([w_l]), row.reward, np.array([float(pi @ rhat) + w_l * (row.reward - rhat[i])]))
        log_sum += row.reward
        log_sum2 += row.reward * row.reward
        if true_reward is not None:
            tr = np.array([true_reward(row.context, a) for a in actions])
            true_const += tr[targets]
            true_learned += float(pi @ tr)
        model.learn(row.context, row.action, row.reward)
        if progress is not None and (t + 1) % 10_000 == 0:
            progress(t + 1)
    n = len(data)
    mean = log_sum / n
    se = math.sqrt(max(log_sum2 / n - mean * mean, 0.0) / n)
    lo, hi = _r(mean - Z95 * se), _r(mean + Z95 * se)
    policies: dict[str, dict] = {
        "learned": learned.report(0),
        "logging": {"ips": _r(mean), "snips": _r(mean), "dr": _r(mean), "ci95": [lo, hi], "ips_ci95": [lo, hi],
                    "snips_ci95": [lo, hi], "dr_ci95": [lo, hi], "ess": float(n)},
    }
    for a, k in idx.items():
        policies[f"always:{a}"] = const.report(k)
    if true_reward is not None:
        policies["learned"]["true"] = _r(true_learned / n)
        for a, k in idx.items():
            policies[f"always:{a}"]["true"] = _r(true_const[k] / n)
    best = max((k for k in policies if k.startswith("always:")), key=lambda k: policies[k]["dr"] or -math.inf)
    return {
        "rows": n,
        "actions": A,
        "seed": seed,
        "learning": "progressive (row t scored by a policy trained on rows < t)",
        "mean_reward": _r(mean),
        "best_constant": best,
        "policies": policies,
    }


def evaluate_file(path: str | Path, fmt: str = "jsonl", seed: int = 0) -> dict:
    """``promo evaluate policy FILE --format jsonl|obd --seed N``: the report dict (see the module docstring).

    Raises :class:`PolicyDataError` (a ``ValueError``) naming ``<file>:<line>`` for invalid input.
    """
    if fmt == "jsonl":
        rows = iter_jsonl(path)
    elif fmt == "obd":
        rows = iter_obd(path)
    else:
        raise PolicyDataError(f"{path}:0: unknown format '{fmt}' (use jsonl or obd)")

    def progress(n: int) -> None:
        print(f"evaluate policy: {n} rows", file=sys.stderr, flush=True)

    src = str(_obd_csv(Path(path))) if fmt == "obd" else str(path)
    report = evaluate_rows(rows, seed=seed, progress=progress, source=src)
    report["file"] = str(path)
    report["format"] = fmt
    return report
