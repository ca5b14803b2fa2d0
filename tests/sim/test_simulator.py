"""Acceptance: on a seeded simulator with known true responses, the learned policy earns >= 90 % of the
oracle's realised incremental margin after 50k users, beats every single offer and always-none, and never
exceeds a budget or a cap (checked after every decision and settlement)."""

from __future__ import annotations

import random

import pytest

import promo_sim as S
from models.policy.catalogue import NONE_ID
from models.policy.base import PolicyChoice


@pytest.fixture(scope="module")
def report():
    return S.simulate(n_users=50_000, seed=1)


def test_learned_policy_earns_its_cost(report):
    runs = report["runs"]
    learned, oracle = runs["learned"]["incremental"], runs["oracle"]["incremental"]
    singles = {k: r["incremental"] for k, r in runs.items() if k.startswith("always:") and k != "always:none"}
    assert oracle > 0
    assert learned >= 0.90 * oracle, report["ratio_vs_oracle"]
    assert learned > max(singles.values()), singles
    assert learned > runs["always:none"]["incremental"] == 0.0
    # the learning curve rises: the last tenth of the traffic is closer to the oracle than the first
    lc, oc = runs["learned"]["curve"], runs["oracle"]["curve"]
    assert lc[-2] / oc[-2] > lc[0] / oc[0]


def test_constraints_checked_and_binding(report):
    for name, r in report["runs"].items():
        assert r["checks"] >= r["decisions"], name  # budgets checked after every decision (and settlement)
        assert all(u <= 1.0 for u in r["max_budget_use"].values()), name
    # the pct_10 budget binds for the learned policy: the check is not vacuous
    assert report["runs"]["learned"]["max_budget_use"]["pct_10"] > 0.99
    assert 0.04 <= report["holdout_share"] <= 0.06


class RoguePolicy:
    """Ignores eligibility, caps and budgets: always the first offer."""

    model_version = "rogue"

    def __init__(self, catalogue):
        self.catalogue = catalogue

    def choose(self, ctx, rng: random.Random) -> PolicyChoice:
        spec = self.catalogue["pct_10"]
        return PolicyChoice(spec.to_offer(ctx.now_ms), 1.0, {}, "treatment", [], self.model_version)

    def learn_one(self, *a, **k):
        return None


def test_checker_catches_a_policy_that_breaks_the_rules():
    visits = S.make_visits(3000, seed=5)
    with pytest.raises(S.ConstraintViolation):
        S.run_policy("rogue", lambda c, p: RoguePolicy(c), visits)


def test_simulator_is_deterministic():
    visits = S.make_visits(500, seed=9)
    assert visits == S.make_visits(500, seed=9)
    a = S.run_policy("none", lambda c, p: S.FixedPolicy(c, NONE_ID, 5.0), visits)
    assert a.incremental == 0.0 and a.decisions == len(visits)
