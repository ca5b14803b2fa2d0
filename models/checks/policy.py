"""The checks policies pass besides the common ones (:class:`models.policy.base.Policy`): valid choices, and a
reported propensity that is the probability of the choice."""

from __future__ import annotations

import math
import random

from models.checks.adapters import train_policy
from models.checks.data import decision_contexts, events, probe_contexts
from models.policy.base import Policy
from models.policy.eligibility import filter_offers, holdout

__all__ = ["check_choices_are_valid", "check_propensity_is_the_choice_probability"]


def check_choices_are_valid(policy: Policy) -> None:
    """Every choice is an eligible, unblocked offer of the catalogue (``none`` included), with a probability in
    (0, 1], scores only for eligible offers; holdout users get ``none``."""
    train_policy(policy, events())
    for i, (ctx, _) in enumerate(decision_contexts(events(400, seed=11))):
        ctx.blocked = {oid: "blocked by the check" for oid in list(policy.catalogue.offers)[1::3] if oid != "none"}
        choice = policy.choose(ctx, random.Random(i))
        eligible = {s.offer_id for s in filter_offers(policy.catalogue, ctx)[0]}
        assert choice.offer.offer_id in eligible, f"{choice.offer.offer_id} is not eligible for {ctx}: {eligible}"
        assert 0.0 < choice.propensity <= 1.0, f"propensity {choice.propensity} outside (0, 1]"
        assert set(choice.scores) <= eligible, f"scores for ineligible offers: {set(choice.scores) - eligible}"
        if holdout(ctx.user_id, policy.holdout_pct, policy.holdout_salt):
            assert choice.group == "holdout" and choice.offer.kind == "none", choice
        else:
            assert choice.group == "treatment", choice


def check_propensity_is_the_choice_probability(policy: Policy, draws: int = 800) -> None:
    """Inverse propensity weighting, what off-policy evaluation does with logged decisions, must be unbiased:
    over seeds, the mean of ``1{choice = k} / propensity`` is 1 for every offer ``k`` the policy gives (a policy
    whose randomness has stages, as Thompson sampling's posterior draws, may report the probability given its
    draws: the identity holds all the same)."""
    train_policy(policy, events())
    for ctx in probe_contexts()[:3]:
        chosen: list[tuple[str, float]] = []
        for seed in range(draws):
            choice = policy.choose(ctx, random.Random(seed))
            assert 0.0 < choice.propensity <= 1.0, f"propensity {choice.propensity} outside (0, 1]"
            chosen.append((choice.offer.offer_id, choice.propensity))
        for offer_id in {o for o, _ in chosen}:
            weights = [1.0 / p if o == offer_id else 0.0 for o, p in chosen]
            mean = sum(weights) / draws
            if sum(1 for o, _ in chosen if o == offer_id) < 0.1 * draws:
                continue  # too rare to estimate here
            sd = math.sqrt(max(sum(w * w for w in weights) / draws - mean * mean, 0.0) / draws)
            assert abs(mean - 1.0) <= 4 * sd + 0.02, (  # slack: offers too rare to be drawn here carry the rest
                f"{offer_id}: mean of 1{{chosen}}/propensity is {mean:.3f} over {draws} seeds, not 1 (sd {sd:.3f}): "
                "the reported propensity is not the probability of the choice")
