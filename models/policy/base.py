"""The policy interface: the decision context a policy sees, the choice it returns, and what it learns from.

The engine builds a :class:`DecisionContext` for a triggering event, seeds a ``random.Random`` from the
decision id (a redelivered trigger reproduces the same choice) and calls ``policy.choose(ctx, rng)``.
When the attribution window of a decision closes, it calls ``policy.learn_one(ctx, offer_id, reward)``.
Implementations: :class:`models.policy.rules.RulePolicy`, :class:`models.policy.thompson.ThompsonPolicy`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

from models.decision import Offer


@dataclass(slots=True)
class DecisionContext:
    """Everything a policy may look at to decide for one user at one moment.

    ``offers_today`` counts offers (any kind but none) the user got in the current UTC day;
    ``last_offer_ms`` maps offer id -> event time of the last time the user got it.
    ``offer_counts_today`` / ``offer_counts_total`` count per offer (for per-offer caps) and
    ``blocked`` maps offer id -> reason for offers the engine already knows are unavailable
    (e.g. budget exhausted, or not given at this trigger); those are filtered before the policy draws, so
    propensities stay exact. ``trigger`` names the moment decided at (:mod:`models.triggers`).
    """

    user_id: str
    now_ms: int
    cart_value: float
    cart_items: list[str]
    cart_categories: list[str]
    is_new: bool
    n_purchases: int
    segment: int | None
    churn_risk: float
    propensity: float
    features: dict[str, float] = field(default_factory=dict)
    offers_today: int = 0
    last_offer_ms: dict[str, int] = field(default_factory=dict)
    offer_counts_today: dict[str, int] = field(default_factory=dict)
    offer_counts_total: dict[str, int] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    trigger: str = "cart"

    def to_dict(self) -> dict:
        """JSON-able dict (stored with a pending decision so the policy can learn when it closes).

        Written out rather than ``dataclasses.asdict``, which deep-copies field by field: this runs for every
        decision, and the containers here hold only strings and numbers, so a copy of each container is a full
        copy.

        >>> ctx = DecisionContext("u", 5, 10.0, ["i"], ["c"], True, 0, 1, 0.2, 0.1, features={"x": 1.0})
        >>> d = ctx.to_dict()
        >>> d["cart_items"] is ctx.cart_items, d == asdict(ctx), DecisionContext.from_dict(d) == ctx
        (False, True, True)
        """
        return {
            "user_id": self.user_id, "now_ms": self.now_ms, "cart_value": self.cart_value,
            "cart_items": list(self.cart_items), "cart_categories": list(self.cart_categories),
            "is_new": self.is_new, "n_purchases": self.n_purchases, "segment": self.segment,
            "churn_risk": self.churn_risk, "propensity": self.propensity, "features": dict(self.features),
            "offers_today": self.offers_today, "last_offer_ms": dict(self.last_offer_ms),
            "offer_counts_today": dict(self.offer_counts_today), "offer_counts_total": dict(self.offer_counts_total),
            "blocked": dict(self.blocked), "trigger": self.trigger,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DecisionContext":
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})  # type: ignore[attr-defined]


@dataclass(slots=True)
class PolicyChoice:
    """What the policy chose: the offer, the exact probability it had, scores and explanations."""

    offer: Offer
    propensity: float
    scores: dict[str, float]
    group: str
    reasons: list[str]
    model_version: str


class Policy(ABC):
    """Chooses an offer for a decision context, and learns from closed decisions.

    Lifecycle: :meth:`choose` for every triggering event (deterministic given ``rng``, which the engine seeds
    from the decision id, so a redelivered trigger gets the same choice); when the decision's attribution window
    closes, :meth:`learn_one` with its reward.

    A policy that :attr:`shares_state` learns through the engine store instead, so that every worker learns from
    every worker's decisions and nothing learnt dies with a worker: the engine puts :meth:`exposure_update` and
    :meth:`outcome_update` into the users' atomic commits and hands the store's sum back to :meth:`load_state`.
    :mod:`models.checks` runs one suite over every policy.
    """

    model_version: str = "unknown"
    """Written into every decision (``model_version``)."""

    shares_state: bool = False
    """Learns through the engine store's shared hash (the three methods below) instead of :meth:`learn_one`."""

    defer_exposure: bool = False
    """Exposures are counted when the engine reports a decision final (:meth:`expose`), not at :meth:`choose`:
    a decision planned again after a refused commit or reservation is counted once."""

    @abstractmethod
    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice:
        """The offer for ``ctx``, with the exact probability this policy gave it."""

    @abstractmethod
    def learn_one(self, ctx: DecisionContext, offer_id: str, reward: float, converted: bool | None = None) -> None:
        """Outcome of a closed decision: ``reward`` = margin - cost (0 when expired); ``converted`` whether
        the user bought inside the window (default ``reward != 0``)."""

    @abstractmethod
    def clone(self) -> "Policy":
        """A new policy with the same parameters and nothing learnt."""

    def expose(self, ctx: DecisionContext, offer_id: str) -> None:
        """A decision with this offer is final (with :attr:`defer_exposure`)."""

    def exposure_update(self, ctx: DecisionContext, offer_id: str):
        """What a final decision teaches, as an update of the shared hash, or None (:attr:`shares_state`)."""
        return None

    def outcome_update(self, ctx: DecisionContext, offer_id: str, reward: float, converted: bool | None = None):
        """What a closed decision teaches, as an update of the shared hash, or None (:attr:`shares_state`)."""
        return None

    def load_state(self, state: dict) -> None:
        """Adopt the shared hash every worker's commits added to (:attr:`shares_state`)."""
