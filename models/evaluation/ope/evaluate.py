"""Evaluate policies on logged decisions (see :mod:`models.evaluation.ope`): the progressive learned policy,
the logging policy, every constant policy and the worker's own policy classes replayed over the log
(``engine:<name>``, :mod:`models.evaluation.ope.engine`), with each estimator of
:mod:`models.evaluation.ope.estimators`.

One pass over the log (:func:`evaluate_rows`): the rows are checked against the declared actions
(:func:`_logged_rows`), the actions indexed (:func:`_action_list`), then each row scores every target policy and
is learnt (:class:`_ProgressiveEvaluation`), which reports each policy's estimates at the end."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from models.evaluation.ope.engine import EnginePolicyReplay
from models.evaluation.intervals import Z95
from models.evaluation.ope.estimators import (ESTIMATORS, InverseProbabilityWeighting, OffPolicyEstimator,
                                              SelfNormalisedIPS)
from models.evaluation.ope.logged import LoggedRow, PolicyDataError
from models.evaluation.ope.reward_model import ShrinkageRewardModel, greedy

PROGRESS_EVERY = 10_000
"""Rows between two calls of ``progress``."""


def _reported(x: float) -> float | None:
    """``x`` as the report gives it: rounded to 8 decimals, ``None`` (JSON null) where undefined (NaN)."""
    if x != x:
        return None
    return round(float(x), 8)


def _reported_interval(value: float, se: float) -> list[float | None]:
    """The 95 % normal interval ``value ± Z95 se`` as the report gives it (:func:`_reported` ends)."""
    return [_reported(value - Z95 * se), _reported(value + Z95 * se)]


class _Estimates:
    """Every estimator of :data:`ESTIMATORS` for ``n_policies`` target policies, fed together."""

    def __init__(self, n_policies: int) -> None:
        self.each: dict[str, OffPolicyEstimator] = {cls.name: cls(n_policies) for cls in ESTIMATORS}

    def add(self, w: np.ndarray, r: float, dr: np.ndarray) -> None:
        for estimator in self.each.values():
            estimator.add(w, r, dr)

    def report(self, i: int) -> dict:
        """Policy ``i``'s estimates, their 95 % intervals (``ci95`` is DR's) and SNIPS's effective sample size."""
        out: dict = {}
        for name, estimator in self.each.items():
            value, se = estimator.estimate(i)
            out[name] = _reported(value)
            out[f"{name}_ci95"] = _reported_interval(value, se)
        snips = self.each["snips"]
        assert isinstance(snips, SelfNormalisedIPS)
        return {"ips": out["ips"], "snips": out["snips"], "dr": out["dr"], "ci95": out["dr_ci95"],
                "ips_ci95": out["ips_ci95"], "snips_ci95": out["snips_ci95"], "dr_ci95": out["dr_ci95"],
                "ess": _reported(snips.effective_sample_size(i))}


def _logged_rows(rows: Iterable[LoggedRow | list[str]], source: str) -> tuple[list[str] | None, list[LoggedRow]]:
    """The declared actions (the header lists, merged; ``None`` without one) and the logged rows, each row's
    logged and eligible actions checked against the declared ones."""
    declared: list[str] | None = None
    logged: list[LoggedRow] = []
    for row in rows:
        if isinstance(row, list):
            declared = row if declared is None else declared + [a for a in row if a not in declared]
            continue
        if declared is not None:
            _check_declared(row, declared, source)
        logged.append(row)
    if not logged:
        raise PolicyDataError(f"{source}:0: no logged decisions to evaluate")
    return declared, logged


def _check_declared(row: LoggedRow, declared: list[str], source: str) -> None:
    if row.action not in declared:
        raise PolicyDataError(f"{source}:{row.line}: unknown action '{row.action}' (declared actions: "
                              f"{', '.join(declared[:10])}{', ...' if len(declared) > 10 else ''})")
    if row.actions and any(a not in declared for a in row.actions):
        undeclared = next(a for a in row.actions if a not in declared)
        raise PolicyDataError(f"{source}:{row.line}: unknown eligible action '{undeclared}'")


def _action_list(declared: list[str] | None, logged: list[LoggedRow]) -> list[str]:
    """The declared actions, then every other action the rows log or make eligible, in order of appearance."""
    actions = list(declared) if declared is not None else []
    seen = set(actions)
    for row in logged:
        for action in [row.action] + (row.actions or []):
            if action not in seen:
                seen.add(action)
                actions.append(action)
    return actions


class _ProgressiveEvaluation:
    """One pass over the log: each row is scored by every target policy with the reward model trained on the rows
    before it, then learnt. Families of target policies: ``always:<a>`` (one per action), ``learned`` (greedy on
    the reward model) and ``logging`` (the logged rewards themselves). With ``true_reward``, each policy's true
    value is summed too. ``engines``: the worker's policies replayed over the log (``engine:<name>``), each scored
    on a row before it may learn it."""

    def __init__(self, actions: list[str], strength: float,
                 true_reward: Callable[[dict, str], float] | None,
                 engines: list[EnginePolicyReplay] | None = None, n_total: int = 0) -> None:
        self.actions = actions
        self.index = {a: i for i, a in enumerate(actions)}
        self.none_index = self.index.get("none")
        self.true_reward = true_reward
        self.model = ShrinkageRewardModel(actions, strength)
        self.constant = _Estimates(len(actions))  # always:<a>
        # always:<a>'s IPS on the first n_total // 2 rows and on the rest, to choose the best constant on one half
        # and score it on the other (best_constant_cross_fitted)
        self.half = n_total // 2
        self.constant_halves = (InverseProbabilityWeighting(len(actions)), InverseProbabilityWeighting(len(actions)))
        self.learned = _Estimates(1)
        self.logged_reward_sum = self.logged_reward_sq_sum = 0.0
        self.true_constant = np.zeros(len(actions))
        self.true_learned = 0.0
        self.engines = list(engines or [])
        self.engine_estimates = _Estimates(len(self.engines)) if self.engines else None
        self.true_engines = np.zeros(len(self.engines))
        self.n_rows = 0

    def add(self, row: LoggedRow) -> None:
        """Score ``row`` with every target policy, then learn it."""
        logged = self.index[row.action]
        eligible = self._eligible(row)
        rhat = self.model.predict(row.context)
        learned_pi = greedy(rhat, eligible)
        constant_actions = self._constant_actions(logged, eligible)
        self._add_constant(row, logged, rhat, constant_actions)
        self._add_learned(row, logged, rhat, learned_pi)
        engine_pis = self._add_engines(row, logged, rhat)
        self.logged_reward_sum += row.reward
        self.logged_reward_sq_sum += row.reward * row.reward
        if self.true_reward is not None:
            true_rewards = np.array([self.true_reward(row.context, a) for a in self.actions])
            self.true_constant += true_rewards[constant_actions]
            self.true_learned += float(learned_pi @ true_rewards)
            for k, pi in enumerate(engine_pis):
                self.true_engines[k] += float(pi @ true_rewards)
        self.model.learn(row.context, row.action, row.reward)
        for engine, pi in zip(self.engines, engine_pis):
            engine.learn(row, pi)  # after scoring: row t is scored by the policy as it stood after rows < t
        self.n_rows += 1

    def _eligible(self, row: LoggedRow) -> np.ndarray | None:
        """The row's eligible actions as a mask over the action index; ``None``: all are."""
        if not row.actions:
            return None
        mask = np.zeros(len(self.actions), dtype=bool)
        mask[[self.index[a] for a in row.actions]] = True
        return mask

    def _constant_actions(self, logged: int, eligible: np.ndarray | None) -> np.ndarray:
        """The action each constant policy takes on the row: its own when eligible; otherwise ``none`` when
        eligible, else the logged action."""
        own = np.arange(len(self.actions))
        if eligible is None:
            return own
        fallback = self.none_index if (self.none_index is not None and eligible[self.none_index]) else logged
        return np.where(eligible, own, fallback)

    def _add_constant(self, row: LoggedRow, logged: int, rhat: np.ndarray, constant_actions: np.ndarray) -> None:
        w = (constant_actions == logged) / row.propensity
        dr = rhat[constant_actions] + w * (row.reward - rhat[logged])
        eligible = self._eligible(row)
        if eligible is not None:
            # a constant policy whose action and `none` are both ineligible here takes the logged action, so on
            # this row it IS the logging policy: weight 1 (not 1/p), and its value the reward earned
            follows = ~eligible & ~(eligible[self.none_index] if self.none_index is not None else False)
            w = np.where(follows, 1.0, w)
            dr = np.where(follows, row.reward, dr)
        self.constant.add(w, row.reward, dr)
        self.constant_halves[self.n_rows >= self.half].add(w, row.reward, dr)

    def _add_learned(self, row: LoggedRow, logged: int, rhat: np.ndarray, learned_pi: np.ndarray) -> None:
        w = learned_pi[logged] / row.propensity
        dr = float(learned_pi @ rhat) + w * (row.reward - rhat[logged])
        self.learned.add(np.array([w]), row.reward, np.array([dr]))

    def _add_engines(self, row: LoggedRow, logged: int, rhat: np.ndarray) -> list[np.ndarray]:
        """Score ``row`` with every replayed engine policy; returns their distributions (for :meth:`add` to learn)."""
        if not self.engines:
            return []
        pis = [engine.distribution(row) for engine in self.engines]
        w = np.array([pi[logged] for pi in pis]) / row.propensity
        dr = np.array([float(pi @ rhat) for pi in pis]) + w * (row.reward - rhat[logged])
        assert self.engine_estimates is not None
        self.engine_estimates.add(w, row.reward, dr)
        return pis

    def logged_mean(self) -> float:
        return self.logged_reward_sum / self.n_rows

    def policies(self) -> dict[str, dict]:
        """Each target policy's report: ``learned``, ``logging``, then ``always:<a>`` in action order."""
        n = self.n_rows
        policies: dict[str, dict] = {"learned": self.learned.report(0), "logging": self._logging_report()}
        for k, engine in enumerate(self.engines):
            assert self.engine_estimates is not None
            policies[f"engine:{engine.name}"] = {**self.engine_estimates.report(k), "learning": engine.learning,
                                                 "rows_learnt": engine.rows_learnt}
        for action, i in self.index.items():
            policies[f"always:{action}"] = self.constant.report(i)
        if self.true_reward is not None:
            for k, engine in enumerate(self.engines):
                policies[f"engine:{engine.name}"]["true"] = _reported(self.true_engines[k] / n)
            policies["learned"]["true"] = _reported(self.true_learned / n)
            for action, i in self.index.items():
                policies[f"always:{action}"]["true"] = _reported(self.true_constant[i] / n)
        return policies

    def best_constant_cross_fitted(self) -> dict | None:
        """The best constant policy chosen on one half of the log and scored on the other, both ways round (IPS).

        The best of many constant policies, chosen and scored on the same rows, is biased upwards (the winner's
        curse: with 80 actions and a few dozen clicks, the luckiest action wins). Scoring the choice on rows it
        was not chosen on removes that bias: ``ips`` is the mean of the two out-of-half values, the value a
        policy that commits to the best-looking constant would have earned. ``None`` when a half is empty."""
        first, second = self.constant_halves
        if first.n == 0 or second.n == 0:
            return None
        halves = []
        for name, chooser, scorer in (("first", first, second), ("second", second, first)):
            where_chosen = [chooser.estimate(i)[0] for i in range(len(self.actions))]
            best = int(np.argmax(where_chosen))
            value, se = scorer.estimate(best)
            halves.append({"chosen_on": f"{name} half", "policy": f"always:{self.actions[best]}",
                           "ips_where_chosen": _reported(where_chosen[best]), "ips_on_other_half": _reported(value),
                           "ci95": _reported_interval(value, se)})
        mean = (halves[0]["ips_on_other_half"] + halves[1]["ips_on_other_half"]) / 2.0
        return {"ips": _reported(mean), "halves": halves}

    def _logging_report(self) -> dict:
        """The logging policy's value is the on-policy mean reward: every estimator gives it, with its normal CI."""
        n = self.n_rows
        mean = self.logged_mean()
        se = math.sqrt(max(self.logged_reward_sq_sum / n - mean * mean, 0.0) / n)
        ci95 = _reported_interval(mean, se)
        return {"ips": _reported(mean), "snips": _reported(mean), "dr": _reported(mean), "ci95": ci95,
                "ips_ci95": ci95, "snips_ci95": ci95, "dr_ci95": ci95, "ess": float(n)}


def evaluate_rows(
    rows: Iterable[LoggedRow | list[str]],
    seed: int = 0,
    *,
    strength: float = 5.0,
    true_reward: Callable[[dict, str], float] | None = None,
    progress: Callable[[int], None] | None = None,
    source: str = "<rows>",
    engine_policies: Iterable[str] = (),
    learning: str = "replay",
    catalogue=None,
) -> dict:
    """Evaluate the learned, logging and constant policies on logged rows (see the module docstring), and the
    worker's policy classes named in ``engine_policies`` (``"thompson"``, ``"rules"``) replayed with ``learning``
    (``"replay"`` or ``"all"``, :mod:`models.evaluation.ope.engine`) over ``catalogue`` (default: the bundled one).

    ``true_reward(context, action)`` (simulated logs only) adds each policy's true value as ``"true"``.
    The progressive greedy learner is deterministic; ``seed`` seeds the replayed Thompson policy's draws.
    """
    declared, logged = _logged_rows(rows, source)
    # the engine's control group decided `none` whatever the policy (propensity 1): no target policy could give
    # an offer there, so those rows would count as earning nothing under every offer; the rest are a hash sample
    # of users, as representative as all of them
    holdout = sum(row.holdout for row in logged)
    logged = [row for row in logged if not row.holdout]
    if not logged:
        raise PolicyDataError(f"{source}:0: no logged decisions to evaluate ({holdout} holdout rows left out)")
    actions = _action_list(declared, logged)
    p_min = min(row.propensity for row in logged)
    engines = [EnginePolicyReplay(name, actions, p_min, catalogue=catalogue, learning=learning, seed=seed)
               for name in dict.fromkeys(engine_policies)]
    evaluation = _ProgressiveEvaluation(actions, strength, true_reward, engines, n_total=len(logged))
    for row in logged:
        evaluation.add(row)
        if progress is not None and evaluation.n_rows % PROGRESS_EVERY == 0:
            progress(evaluation.n_rows)
    policies = evaluation.policies()
    constants = [name for name in policies if name.startswith("always:")]
    def by(estimate: str):  # None (undefined) ranks last; 0.0 is a value like any other
        return lambda name: -math.inf if policies[name][estimate] is None else policies[name][estimate]

    best = max(constants, key=by("dr"))
    return {
        "rows": len(logged),
        "holdout_rows_left_out": holdout,
        "actions": len(actions),
        "seed": seed,
        "learning": "progressive (row t scored by a policy trained on rows < t)",
        "engine_learning": learning if engines else None,
        "mean_reward": _reported(evaluation.logged_mean()),
        "best_constant": best,
        "best_constant_ips": max(constants, key=by("ips")),
        "best_constant_cross_fitted": evaluation.best_constant_cross_fitted(),
        "policies": policies,
    }
