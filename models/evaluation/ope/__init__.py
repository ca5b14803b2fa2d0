"""Off-policy evaluation of offer policies on logged decisions: IPS, SNIPS and doubly robust, with 95 % CIs.

Input, one JSON object per line (``--format jsonl``)::

    {"context": {"segment": "3", "cart": 54.0}, "action": "coupon_5", "propensity": 0.25, "reward": 11.5}

``context`` values are numbers or strings; ``propensity`` is the probability the logging policy gave the
logged ``action`` (0 < p <= 1); ``reward`` a finite number. Optional: ``"actions": [...]``, the actions
eligible in that row. A header line ``{"actions": [...]}`` (no ``action``) declares the action set; then an
action outside it is an error naming its line. ``--format obd`` reads the Open Bandit Dataset CSV directly
(see :func:`models.evaluation.ope.logged.iter_obd`).

Evaluated policies (values are mean reward per decision):

* ``learned``: learned progressively - row ``t`` is scored by a policy trained on rows ``< t`` only
  (greedy on a shrinkage reward model, ties split uniformly), then the row is learned;
* ``logging``: the policy that produced the log (its on-policy mean reward);
* ``always:<a>``: every constant single-action policy; ``best_constant_ips`` names the best of them in hindsight,
  and ``best_constant_cross_fitted`` gives the best chosen on one half of the log and scored on the other (both
  ways round), which the winner's curse does not inflate.

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

from models.evaluation.ope.estimators import (ESTIMATORS, DoublyRobust, InverseProbabilityWeighting,
                                              OffPolicyEstimator, SelfNormalisedIPS)
from models.evaluation.ope.evaluate import evaluate_rows
from models.evaluation.ope.logged import LoggedRow, PolicyDataError, iter_jsonl, iter_obd, obd_to_jsonl

__all__ = ["ESTIMATORS", "DoublyRobust", "InverseProbabilityWeighting", "LoggedRow", "OffPolicyEstimator",
           "PolicyDataError", "SelfNormalisedIPS", "evaluate_rows", "iter_jsonl", "iter_obd", "obd_to_jsonl"]
