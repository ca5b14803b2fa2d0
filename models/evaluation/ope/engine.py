"""The worker's own policy classes as target policies of off-policy evaluation: ``engine:thompson``
(:class:`models.policy.thompson.ThompsonPolicy`) and ``engine:rules`` (:class:`models.policy.rules.RulePolicy`),
replayed progressively over the logged rows in log order.

At each row the replayed policy gives its action distribution for the row's context (the Thompson policy's
:meth:`~models.policy.thompson.ThompsonPolicy.choice_distribution`, the exact probabilities it logs; the rule
policy's one choice), the estimators of :mod:`models.evaluation.ope.estimators` score it, and then the policy may
learn the row. Two learning methods:

``replay`` (default): rejection-sampling replay (Li, Chu, Langford and Wang, WSDM 2011, "Unbiased offline
    evaluation of contextual-bandit-based news article recommendation algorithms"; Dudik, Erhan, Langford and Li,
    UAI 2012, for non-uniform logs). The policy learns row ``t`` only with probability
    ``pi_t(a_t | x_t) * p_min / p_t`` (``p_min``: the log's smallest propensity); on a uniformly random log that is
    "the action the policy draws equals the logged one". The rows it learns are then distributed as the decisions
    the policy would have taken itself, so it learns what it would learn running live: from its own choices only,
    exploration included. That is the point of evaluating the worker's policy rather than a learner, and why it is
    the default; the price is data: on a log of ``K`` uniform actions it learns about one row in ``K``.
``all``: progressive validation (Blum, Kalai and Langford, COLT 1999), as the greedy ``learned`` yardstick: the
    policy learns every row after scoring it, each row's reward teaching the logged action's posterior. It
    measures the policy's model with all the log's feedback (as if other workers' decisions taught it, which is
    what the shared posteriors do), not its own exploration.

Either way row ``t`` is scored by a policy that learnt from rows ``< t`` only, so IPS, SNIPS and DR keep their
meaning: each estimates the mean, over the log, of the value of the policy as it stood at that row (with
``replay``, IPS weighted by the full distribution is the Rao-Blackwellised replay estimator).

Contexts. A row whose actions are all offers of the catalogue (``promo ledger export``'s rows, :mod:`models.policy.
ledger`) becomes the :class:`~models.policy.base.DecisionContext` the worker saw, as far as the row keeps it
(``cart_value``, ``is_new``, ``n_purchases``, ``segment``, ``churn_risk``, ``p_buy``, ``offers_today``; the other
numbers as features), and the worker's catalogue is used without campaign periods and budgets (the replay has no
clock or budget store). Any other log (the Open Bandit Dataset's items, a JSONL of unknown actions) gets a unit
catalogue: every action an offer that earns its logged reward as is, at no cost, and no cell context (the worker's
cells are its segments; such logs have none). ``q(x)``, the purchase probability the Thompson policy scales its
lifts by, is the row's ``p_buy`` where present, else the share of earlier rows with a non-zero reward. A log
without a ``none`` action (Open Bandit) never shows nothing, so the policy's floor mass on ``none`` is spread over
the logged actions in proportion (a renormalisation, so the estimate is of the policy restricted to the log's
actions). Holdout is off: the evaluated policy is the treatment policy.

A uniformly random log of two actions, ``x`` earning 1 a third of the time and ``y`` nothing:

>>> rows = [LoggedRow({"seg": "a"}, "xy"[i % 2], 0.5, float(i % 2 == 0 and i % 3 == 0)) for i in range(400)]
>>> replay = EnginePolicyReplay("thompson", ["x", "y"], p_min=0.5, seed=0)
>>> learnt = [replay.learn(row, replay.distribution(row)) for row in rows]
>>> [round(float(p), 2) for p in replay.distribution(LoggedRow({"seg": "a"}, "x", 0.5, 1.0))]
[1.0, 0.0]
>>> 0 < replay.rows_learnt < 400  # replay: the rows whose action it would have chosen itself
True
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np

from models.evaluation.ope.logged import LoggedRow
from models.policy.base import DecisionContext, Policy
from models.policy.catalogue import NONE_ID, Catalogue, OfferSpec, load_catalogue
from models.policy.eligibility import filter_offers

ENGINE_POLICIES: tuple[str, ...] = ("thompson", "rules")
"""The worker's policy classes (``PROMO_POLICY``) :class:`EnginePolicyReplay` can replay."""

LEARNING: tuple[str, ...] = ("replay", "all")
"""Learning methods of a replayed policy (see the module docstring)."""

_CONTEXT_FIELDS = {"cart_value", "is_new", "n_purchases", "segment", "churn_risk", "p_buy", "offers_today", "trigger"}


def unit_catalogue(actions: list[str]) -> Catalogue:
    """A catalogue whose offers are ``actions``, each earning its logged reward as is: margin rate 1 on a basket of
    1 (``min_spend``), at no cost, no prior uplift. ``none`` earns the same when the log has it, else nothing
    (with a cart of 0, see :func:`_unit_cart`).

    >>> cat = unit_catalogue(["14", "2"])
    >>> cat.offer_ids, cat["14"].basket(0.0), cat["14"].margin(1.0), cat["14"].cost(1.0), cat["none"].margin(0.0)
    (['none', '14', '2'], 1.0, 1.0, 0.0, 0.0)
    """
    offers = {NONE_ID: OfferSpec(NONE_ID, "none", margin_rate=1.0)}
    for a in actions:
        if a != NONE_ID:
            offers[a] = OfferSpec(a, "coupon", value=0.0, min_spend=1.0, margin_rate=1.0)
    return Catalogue(offers, margin_rate=1.0, path="<unit>")


def _unit_cart(actions: list[str]) -> float:
    """The cart of a unit-catalogue context: 1 when ``none`` is an action (it earns its reward too), else 0, so
    that ``none`` and the incremental score's baseline earn nothing."""
    return 1.0 if NONE_ID in actions else 0.0


def _timeless(catalogue: Catalogue) -> Catalogue:
    """The catalogue without campaign periods and budgets: the replay has no clock or budget store."""
    offers = {k: replace(s, start_ms=None, end_ms=None, budget=None) for k, s in catalogue.offers.items()}
    return replace(catalogue, offers=offers)


def _number(value, default: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _segment(value) -> int | None:
    """``segment_3`` (as :func:`models.policy.ledger.ope_row` writes it), ``"3"`` or 3 -> 3; else None."""
    if isinstance(value, str):
        value = value.removeprefix("segment_")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class EnginePolicyReplay:
    """One of the worker's policy classes, replayed over logged rows: :meth:`distribution`, then :meth:`learn`.

    Parameters
    ----------
    name
        ``"thompson"`` or ``"rules"`` (:data:`ENGINE_POLICIES`).
    actions
        The log's actions in report order; distributions are over them.
    p_min
        The log's smallest propensity (``replay`` learning accepts a row with probability
        ``pi(a_t | x_t) p_min / p_t``).
    catalogue
        The worker's catalogue; used when every action is one of its offers (default: the bundled one).
    learning
        ``"replay"`` or ``"all"`` (:data:`LEARNING`, see the module docstring).
    seed
        Seeds the policy's draws and the replay's acceptance draws.
    """

    def __init__(self, name: str, actions: list[str], p_min: float, catalogue: Catalogue | None = None,
                 learning: str = "replay", seed: int = 0) -> None:
        if name not in ENGINE_POLICIES:
            raise ValueError(f"unknown engine policy '{name}' (use one of {', '.join(ENGINE_POLICIES)})")
        if learning not in LEARNING:
            raise ValueError(f"unknown learning method '{learning}' (use one of {', '.join(LEARNING)})")
        if not 0.0 < p_min <= 1.0:
            raise ValueError(f"p_min must be in (0, 1], got {p_min}")
        self.name = name
        self.actions = list(actions)
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.p_min = p_min
        self.learning = learning
        catalogue = catalogue if catalogue is not None else load_catalogue()
        # the worker's catalogue only when it knows every logged action; otherwise the actions are not offers
        self.engine_context = all(a in catalogue.offers for a in self.actions)
        self.catalogue = _timeless(catalogue) if self.engine_context else unit_catalogue(self.actions)
        self.cart = _unit_cart(self.actions)
        self.policy = self._make_policy()
        self.rng = random.Random(f"engine:{name}:{seed}")
        self.n_rows = 0
        self.n_converted = 0
        self.rows_learnt = 0

    def _make_policy(self) -> Policy:
        if self.name == "thompson":
            from models.policy.thompson import ThompsonPolicy

            # the worker's defaults; exposure counted when a row is learnt, the replay's "decision is final"
            return ThompsonPolicy(self.catalogue, holdout_pct=0.0, exposure_at_choice=False)
        from models.policy.rules import RulePolicy

        return RulePolicy(self.catalogue, holdout_pct=0.0)

    def context(self, row: LoggedRow) -> DecisionContext:
        """The decision context of ``row`` (see the module docstring)."""
        # the running conversion rate of earlier rows, Laplace-smoothed: q(x) where the row has no p_buy
        q_default = (self.n_converted + 1.0) / (self.n_rows + 2.0)
        c = row.context
        if not self.engine_context:
            return DecisionContext(f"row{row.line}", 0, self.cart, [], [], False, 0, None, 0.0, q_default)
        features = {k: v for k, v in c.items() if k not in _CONTEXT_FIELDS}
        return DecisionContext(
            user_id=f"row{row.line}", now_ms=0, cart_value=_number(c.get("cart_value"), 0.0), cart_items=[],
            cart_categories=[], is_new=bool(_number(c.get("is_new"), 0.0)),
            n_purchases=int(_number(c.get("n_purchases"), 0.0)), segment=_segment(c.get("segment")),
            churn_risk=_number(c.get("churn_risk"), 0.0), propensity=_number(c.get("p_buy"), q_default),
            features=features, offers_today=int(_number(c.get("offers_today"), 0.0)),
            # the moment decided at (a ledger's context has it; logs without it are a cart's): the policy's cells
            trigger=str(c.get("trigger") or "cart"))

    def distribution(self, row: LoggedRow) -> np.ndarray:
        """The policy's probability of each action (in :attr:`actions` order) for ``row``'s context, given what it
        learnt from earlier rows; mass on offers outside the log's (or the row's eligible) actions is spread over
        the rest in proportion."""
        ctx = self.context(row)
        eligible, _ = filter_offers(self.catalogue, ctx)
        if self.name == "thompson" and len(eligible) > 1:
            probs, _ = self.policy.choice_distribution(ctx, eligible, self.rng)  # type: ignore[attr-defined]
        else:
            chosen = self.policy.choose(ctx, self.rng).offer.offer_id
            probs = np.array([1.0 if s.offer_id == chosen else 0.0 for s in eligible])
        pi = np.zeros(len(self.actions))
        allowed = set(row.actions) if row.actions else None
        for spec, p in zip(eligible, probs):
            i = self.index.get(spec.offer_id)
            if i is not None and (allowed is None or spec.offer_id in allowed):
                pi[i] += p
        total = pi.sum()
        if total <= 0.0:  # nothing the policy would do is possible here: uniform over the possible actions
            mask = np.array([allowed is None or a in allowed for a in self.actions], dtype=float)
            return mask / mask.sum()
        return pi / total

    def learn(self, row: LoggedRow, pi: np.ndarray) -> bool:
        """After :meth:`distribution` scored ``row`` (``pi``): learn it (``all``), or learn it when the replay
        accepts it (``replay``). Returns whether the policy learnt the row."""
        accept = self.learning == "all"
        if not accept:
            u = self.rng.random()  # drawn on every row, so acceptance draws do not depend on earlier acceptances
            accept = bool(u < pi[self.index[row.action]] * self.p_min / row.propensity)
        if accept:
            self.policy.learn_one(self.context(row), row.action, row.reward)
            self.rows_learnt += 1
        self.n_rows += 1
        self.n_converted += row.reward != 0.0
        return accept
