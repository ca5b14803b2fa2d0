"""Evaluate policies on logged decisions (see :mod:`models.evaluation.ope`): the progressive learned policy,
the logging policy and every constant policy, with each estimator of :mod:`models.evaluation.ope.estimators`."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from models.evaluation.ope.estimators import ESTIMATORS, Z95, OffPolicyEstimator, SelfNormalisedIPS
from models.evaluation.ope.logged import LoggedRow, PolicyDataError
from models.evaluation.ope.reward_model import ShrinkageRewardModel, greedy


class _Estimates:
    """Every estimator of :data:`ESTIMATORS` for ``k`` target policies, fed together."""

    def __init__(self, k: int) -> None:
        self.each: dict[str, OffPolicyEstimator] = {cls.name: cls(k) for cls in ESTIMATORS}

    def add(self, w: np.ndarray, r: float, dr: np.ndarray) -> None:
        for e in self.each.values():
            e.add(w, r, dr)

    def report(self, i: int) -> dict:
        out: dict = {}
        for name, e in self.each.items():
            v, se = e.estimate(i)
            out[name] = _r(v)
            out[f"{name}_ci95"] = [_r(v - Z95 * se), _r(v + Z95 * se)]
        snips = self.each["snips"]
        assert isinstance(snips, SelfNormalisedIPS)
        return {"ips": out["ips"], "snips": out["snips"], "dr": out["dr"], "ci95": out["dr_ci95"],
                "ips_ci95": out["ips_ci95"], "snips_ci95": out["snips_ci95"], "dr_ci95": out["dr_ci95"],
                "ess": _r(snips.effective_sample_size(i))}


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
    const = _Estimates(A)  # always:<a>
    learned = _Estimates(1)
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
        pi = greedy(rhat, mask)
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
