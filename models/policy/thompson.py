"""Contextual Thompson-sampling offer policy learning the incremental margin it optimises.

Reward model. A closed decision's reward is what it earned (:mod:`models.policy.attribution`): the order's margin
net of the offer's cost (only when redeemed), 0 when the window expired; ``none`` earns the order's margin. For a
context ``x`` the catalogue says what each offer ``a`` (``none`` included) earns *if* the user buys,
``v(a, x)`` (``margin(basket) - cost(basket)``; ``none``: the cart's margin), and the learning core estimates
``q(x) = P(buy | x)`` (``ctx.propensity``). The policy learns, per offer and context cell (by default the user's
segment; at a trigger other than the cart, the trigger too: :meth:`ThompsonPolicy.cell`), a value lift ``m``::

    E[reward | a, x] = q(x) * v(a, x) * m[a, cell(x)],     m ~ Gamma(alpha, beta)

a conjugate Gamma-Poisson model on the reward counted in units of ``v(a, x)``: every decision adds its exposure
``q(x)`` to ``beta`` of the chosen offer's cell, every closed decision adds ``reward / v(a, x)`` to ``alpha``
(1 for a purchase at the catalogue's terms; more when the basket was larger, less when the discount gave away
more; 0 when the window expired). So the posterior is over the reward itself, not over conversions: an offer
whose buyers spend less than the cart, or a coupon redeemed on small baskets, earns a lower ``m`` although it
converts. Exposure is counted when the offer is chosen and the reward when the attribution window closes, so
delayed rewards do not bias early estimates upwards (purchases arrive within hours, "no purchase" only when the
window expires).

Decision. Draw ``m`` for every eligible offer (``n_draws`` times, from the posterior tempered by
``temper``: ``Gamma(temper*alpha, temper*beta)``), score each draw's incremental margin against the no-offer arm's
own draw (pacing's shadow price charged on the offer's cost)

    q m[a] (margin - (1 + shadow price) cost) - q m[none] margin

(``none`` scores 0), and count how often each offer wins. Mixing in a minimum exploration ``floor`` per
eligible offer gives the choice distribution; the offer is drawn from it with the caller's ``rng``. The
logged ``propensity`` is the exact probability of the chosen offer given the state and the draws, as
off-policy evaluation needs. "none" wins when no offer pays: when a discount gives away more margin than the
purchases it adds.

>>> import random
>>> from models.policy.catalogue import load_catalogue
>>> from models.policy.base import DecisionContext
>>> policy = ThompsonPolicy(load_catalogue(), holdout_pct=0.0)
>>> ctx = DecisionContext("u1", 1_700_000_000_000, 120.0, ["i1"], ["apparel"], False, 3, 2, 0.5, 0.1)
>>> choice = policy.choose(ctx, random.Random(42))
>>> choice.group, choice.model_version, sorted(choice.scores)
('treatment', 'ts-3', ['coupon_5', 'none', 'pct_10', 'spend100_save15'])
>>> 0.0 < choice.propensity <= 1.0
True
>>> policy.learn_one(ctx, choice.offer.offer_id, 30.0)
"""

from __future__ import annotations

import json
import random

import numpy as np

from models.policy.catalogue import NONE_ID, Catalogue, OfferSpec
from models.policy.base import DecisionContext, Policy, PolicyChoice
from models.policy.eligibility import filter_offers, holdout

MIN_EXPOSURE = 1e-3

VALUE_FLOOR = 0.1
"""The reward of a decision is counted in units of at least this share of the cart's margin: an offer the catalogue
expects to keep (almost) nothing of the margin, chosen only by the exploration floor, would otherwise turn a small
difference of baskets into a huge count."""

CART_TRIGGER = "cart"
"""The trigger whose cells are keyed as before triggers existed (``DecisionContext.trigger``'s default)."""

MIN_ALPHA = 1e-6
"""``alpha`` read from a cell is at least this: rewards net of cost may be negative (a discount larger than the
order's margin), so a cell's sum may fall to or below 0, where the Gamma posterior is undefined."""


_UNREAD = object()


def _parse_field(raw: bytes | str) -> tuple[str, tuple, int] | None:
    """``(offer id, cell, 0 for alpha or 1 for beta)`` of a shared-hash field name (:meth:`ThompsonPolicy.cell_field`
    after ``a:`` or ``b:``); None for the hash's other fields.

    >>> _parse_field(b'b:["pct_10",[3,"retention"]]'), _parse_field("n")
    (('pct_10', (3, 'retention'), 1), None)
    """
    name = raw.decode() if isinstance(raw, bytes) else raw
    if name[:2] not in ("a:", "b:"):
        return None
    offer_id, cell = json.loads(name[2:])
    return offer_id, tuple(cell), 0 if name[0] == "a" else 1


def _cell_value(ctx: DecisionContext, key: str):
    if key == "segment":
        return ctx.segment
    if key == "new":
        return bool(ctx.is_new)
    return ctx.features.get(key) if ctx.features else None


class ThompsonPolicy(Policy):
    """Thompson sampling over eligible offers with per-offer, per-cell models of the reward (value lift).

    Parameters
    ----------
    catalogue
        The offers; ``prior_uplift`` of an offer sets its prior lift to ``1 + prior_uplift / q(x)`` at the
        first context of a cell (``none``: lift 1).
    holdout_pct, holdout_salt
        Deterministic control group (hash of user id): always ``none``, ``group="holdout"``.
    floor
        Minimum probability of each eligible offer (``none`` included) in treatment; at most ``1/K``.
    n_draws
        Posterior draws per decision used to compute the choice distribution.
    prior_strength
        Prior weight, in expected purchases (``beta`` of a new cell).
    temper
        Draw from the posterior with ``temper`` times its counts (> 1: less exploration of offers that
        are probably worse; the floor keeps every eligible offer possible).
    cell_keys
        Context fields a cell is made of: ``"segment"``, ``"new"`` or a key of ``ctx.features``; at a trigger other
        than the cart, the trigger's name follows them (:meth:`cell`).
    pacing
        Optional object with ``price(offer_id) -> float`` (shadow price per unit of cost,
        :class:`models.policy.pacing.PacingController`).
    exposure_at_choice
        Count a decision's exposure in :meth:`choose` (default). Set False to count it in
        :meth:`learn_one` instead (e.g. when replaying logged decisions).
    defer_exposure
        With ``exposure_at_choice``: :meth:`choose` does not count the exposure, the caller calls :meth:`expose`
        once the decision is final (the engine does after the user's commit succeeded, so a decision planned
        again - a refused budget reservation, a concurrent change of the user - is counted once).
    """

    model_version = "ts-3"
    shares_state = True

    def __init__(
        self,
        catalogue: Catalogue,
        holdout_pct: float = 5.0,
        holdout_salt: str = "",
        floor: float = 0.001,
        n_draws: int = 64,
        prior_strength: float = 1.0,
        temper: float = 3.0,
        cell_keys: tuple[str, ...] = ("segment",),
        pacing=None,
        exposure_at_choice: bool = True,
        defer_exposure: bool = False,
    ) -> None:
        self.catalogue = catalogue
        self.holdout_pct = holdout_pct
        self.holdout_salt = holdout_salt
        self.floor = floor
        self.n_draws = n_draws
        self.prior_strength = prior_strength
        self.temper = temper
        self.cell_keys = tuple(cell_keys)
        self.pacing = pacing
        self.exposure_at_choice = exposure_at_choice
        self.defer_exposure = defer_exposure
        self.cells: dict[tuple[str, tuple], list[float]] = {}  # (offer, cell) -> [alpha, beta]
        self.n_learned = 0
        # the store's field names parsed once (load_state reads the whole hash after every batch that decided)
        self._field_names: dict[bytes | str, tuple[str, tuple, int] | None] = {}

    # --- response model ----------------------------------------------------------------------
    def cell(self, ctx: DecisionContext) -> tuple:
        """The cell of ``ctx``: the values of :attr:`cell_keys`, then the trigger's name unless it is the cart.

        Users answer an offer differently at each trigger (an abandoned cart is price-sensitive, a browse without a
        cart rarely buys), so a cell mixing triggers would learn none of them; the cart's cells keep the keys they
        had before triggers existed, so the posteriors already shared in the store stay valid. A trigger cell has
        one value more than a cart cell: the two never collide.

        >>> from models.policy.catalogue import load_catalogue
        >>> policy = ThompsonPolicy(load_catalogue())
        >>> ctx = DecisionContext("u", 0, 80.0, [], [], False, 1, 2, 0.0, 0.2)
        >>> policy.cell(ctx)
        (2,)
        >>> ctx.trigger = "cart_abandonment"
        >>> policy.cell(ctx)
        (2, 'cart_abandonment')
        """
        values = tuple(_cell_value(ctx, k) for k in self.cell_keys)
        trigger = ctx.trigger or CART_TRIGGER  # None: a context stored without one, which was a cart's
        return values if trigger == CART_TRIGGER else values + (trigger,)

    @staticmethod
    def exposure(ctx: DecisionContext) -> float:
        q = ctx.propensity
        if not (q == q) or q < MIN_EXPOSURE:  # NaN or tiny
            return MIN_EXPOSURE
        return min(float(q), 1.0)

    def _prior(self, spec: OfferSpec, ctx: DecisionContext) -> list[float]:
        """``[alpha, beta]`` of a new cell, first seen in context ``ctx``."""
        lift = 1.0 if spec.kind == "none" else 1.0 + spec.prior_uplift / max(self.exposure(ctx), 0.01)
        return [lift * self.prior_strength, self.prior_strength]

    def _posterior(self, spec: OfferSpec, ctx: DecisionContext) -> list[float]:
        """The cell's ``[alpha, beta]`` to read: its prior while nothing was learnt in it (reading stores nothing,
        so choosing never changes what the policy learns next); ``alpha`` at least :data:`MIN_ALPHA`."""
        ab = self.cells.get((spec.offer_id, self.cell(ctx)))
        if ab is None:
            return self._prior(spec, ctx)
        return [max(ab[0], MIN_ALPHA), ab[1]]

    @staticmethod
    def value(spec: OfferSpec, ctx: DecisionContext) -> float:
        """What a decision with ``spec`` earns if the user buys on the catalogue's terms, before pacing: the
        basket's margin net of the offer's cost (``none``: the cart's margin).

        >>> from models.policy.catalogue import load_catalogue
        >>> cat = load_catalogue()
        >>> ctx = DecisionContext("u", 0, 80.0, [], [], False, 1, None, 0.0, 0.2)
        >>> ThompsonPolicy.value(cat["coupon_5"], ctx), ThompsonPolicy.value(cat["none"], ctx)
        (15.0, 20.0)
        """
        if spec.kind == "none":
            return spec.margin(ctx.cart_value)
        basket = spec.basket(ctx.cart_value)
        return spec.margin(basket) - spec.cost(basket)

    def reward_units(self, spec: OfferSpec, ctx: DecisionContext, reward: float) -> float:
        """``reward`` in units of :meth:`value` (at least :data:`VALUE_FLOOR` of the cart's margin): what a closed
        decision adds to its cell's ``alpha``. 0 when the context has no value to count in (an empty cart)."""
        unit = max(self.value(spec, ctx), VALUE_FLOOR * spec.margin(ctx.cart_value))
        if not unit > 0.0:
            return 0.0
        return float(reward) / unit

    def _posterior_to_learn(self, spec: OfferSpec, ctx: DecisionContext) -> list[float]:
        """The cell's ``[alpha, beta]`` to update in place, created from the prior of the context that first
        teaches it (as the store's shared hash creates it from the first update)."""
        key = (spec.offer_id, self.cell(ctx))
        ab = self.cells.get(key)
        if ab is None:
            ab = self.cells[key] = self._prior(spec, ctx)
        return ab

    def predict_buy(self, ctx: DecisionContext, offer_id: str) -> float:
        """Posterior-mean purchases per decision at the catalogue's terms, ``q(x) m`` (at most 1): the expected
        reward :meth:`predict_reward` in units of :meth:`value`."""
        spec = self.catalogue.offers.get(offer_id) or self.catalogue[NONE_ID]
        a, b = self._posterior(spec, ctx)
        return min(1.0, self.exposure(ctx) * a / b)

    def predict_reward(self, ctx: DecisionContext, offer_id: str) -> float:
        """Posterior-mean reward of a decision with ``offer_id`` in ``ctx``, ``q(x) v(a, x) m`` (no pacing)."""
        spec = self.catalogue.offers.get(offer_id) or self.catalogue[NONE_ID]
        a, b = self._posterior(spec, ctx)
        return self.exposure(ctx) * self.value(spec, ctx) * a / b

    # --- policy interface --------------------------------------------------------------------
    def clone(self) -> "ThompsonPolicy":
        return ThompsonPolicy(self.catalogue, self.holdout_pct, self.holdout_salt, self.floor, self.n_draws,
                              self.prior_strength, self.temper, self.cell_keys, self.pacing, self.exposure_at_choice,
                              self.defer_exposure)

    def choose(self, ctx: DecisionContext, rng: random.Random) -> PolicyChoice:
        none = self.catalogue[NONE_ID]
        if holdout(ctx.user_id, self.holdout_pct, self.holdout_salt):
            self._expose(none, ctx)
            return PolicyChoice(none.to_offer(ctx.now_ms), 1.0, {}, "holdout",
                                [f"holdout: user in the {self.holdout_pct:g}% control group"], self.model_version)
        eligible, reasons = filter_offers(self.catalogue, ctx)
        if len(eligible) == 1:
            self._expose(none, ctx)
            reasons.append("none: no eligible offer")
            return PolicyChoice(none.to_offer(ctx.now_ms), 1.0, {NONE_ID: 0.0}, "treatment", reasons,
                                self.model_version)
        probs, mean_scores = self.choice_distribution(ctx, eligible, rng)
        cum = np.cumsum(probs)
        k = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(eligible) - 1)
        chosen = eligible[k]
        best = int(np.argmax(mean_scores))
        scores = {s.offer_id: round(float(mean_scores[i]), 4) for i, s in enumerate(eligible)}
        if chosen.kind == "none":
            why = "no offer is expected to pay for its cost" if best == 0 else "sampled models favour no offer"
        else:
            why = f"best sampled incremental margin (estimate {mean_scores[k]:.2f})"
        if k != best:
            why += f"; exploring, best estimate is {eligible[best].offer_id}"
        reasons.append(f"{chosen.offer_id}: {why}, p={probs[k]:.3f}")
        self._expose(chosen, ctx)
        return PolicyChoice(chosen.to_offer(ctx.now_ms), float(probs[k]), scores, "treatment", reasons,
                            self.model_version)

    def choice_distribution(
        self, ctx: DecisionContext, eligible: list[OfferSpec], rng: random.Random
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probability of each eligible offer (floor included) and its posterior-mean incremental margin.

        ``eligible[0]`` must be ``none``. The draws use a numpy generator seeded from ``rng``.
        """
        n = len(eligible)
        a = np.empty(n)
        b = np.empty(n)
        margin = np.empty(n)
        gain = np.empty(n)  # margin - (1 + shadow price) * cost, if the user buys with the offer
        for i, s in enumerate(eligible):
            a[i], b[i] = self._posterior(s, ctx)
            basket = s.basket(ctx.cart_value)
            lam = self.pacing.price(s.offer_id) if (self.pacing is not None and s.kind != "none") else 0.0
            margin[i] = s.margin(ctx.cart_value)
            gain[i] = s.margin(basket) - (1.0 + lam) * s.cost(basket)
        q = self.exposure(ctx)
        gen = np.random.default_rng(rng.getrandbits(63))
        t = self.temper
        # not clipped at 1: q m is the reward in units of value, and larger baskets may earn more than one unit
        p = q * gen.gamma(a * t, 1.0 / (b * t), size=(self.n_draws, n))
        inc = p * gain - p[:, :1] * margin
        inc[:, 0] = 0.0
        wins = np.bincount(np.argmax(inc, axis=1), minlength=n) / self.n_draws
        f = min(self.floor, 1.0 / n)
        probs = (1.0 - n * f) * wins + f
        pm = q * a / b
        mean_scores = pm * gain - pm[0] * margin
        mean_scores[0] = 0.0
        return probs, mean_scores

    def _expose(self, spec: OfferSpec, ctx: DecisionContext) -> None:
        if self.exposure_at_choice and not self.defer_exposure:
            self._posterior_to_learn(spec, ctx)[1] += self.exposure(ctx)

    def expose(self, ctx: DecisionContext, offer_id: str) -> None:
        """Count the exposure of a final decision (with ``defer_exposure``; otherwise :meth:`choose` did)."""
        spec = self.catalogue.offers.get(offer_id)
        if spec is not None and self.exposure_at_choice and self.defer_exposure:
            self._posterior_to_learn(spec, ctx)[1] += self.exposure(ctx)

    def learn_one(self, ctx: DecisionContext, offer_id: str, reward: float, converted: bool | None = None) -> None:
        """Learn the reward of a closed decision (holdout decisions teach ``none`` too): ``alpha`` of the offer's
        cell gains the reward in units of :meth:`value` (:meth:`reward_units`).

        ``converted`` is not needed: the reward says what the decision earned (0 when the window expired).
        """
        spec = self.catalogue.offers.get(offer_id)
        if spec is None:
            return None
        ab = self._posterior_to_learn(spec, ctx)
        ab[0] += self.reward_units(spec, ctx, reward)
        if not self.exposure_at_choice:
            ab[1] += self.exposure(ctx)
        self.n_learned += 1
        return None

    # --- posteriors shared through the store --------------------------------------------------
    # Under the engine (``shares_state``) the policy does not change ``cells`` itself: every decision's exposure
    # and every closed decision's outcome travel as an update in the user's atomic commit, which adds it
    # to one hash in the store, exactly once (a redelivered batch commits nothing), and :meth:`load_state` reads
    # that hash back as the worker's view. Nothing learnt is lost when a worker dies, and all workers learn
    # from all decisions.
    @staticmethod
    def cell_field(offer_id: str, cell: tuple) -> str:
        """The hash-field suffix of an (offer, cell) pair: compact JSON, e.g. ``["pct_10",[3]]``."""
        return json.dumps([offer_id, list(cell)], separators=(",", ":"))

    def _update(self, ctx: DecisionContext, offer_id: str, d_alpha: float, d_beta: float):
        spec = self.catalogue.offers.get(offer_id)
        if spec is None:
            return None
        a0, b0 = self._prior(spec, ctx)  # written only where the store has no such cell yet
        return (self.cell_field(offer_id, self.cell(ctx)), a0, b0, float(d_alpha), float(d_beta))

    def exposure_update(self, ctx: DecisionContext, offer_id: str):
        """``(cell field, alpha if new, beta if new, d_alpha, d_beta)`` for a final decision, or None.

        What :meth:`expose` would add (nothing unless exposure is counted at choice)."""
        if not self.exposure_at_choice:
            return None
        return self._update(ctx, offer_id, 0.0, self.exposure(ctx))

    def outcome_update(self, ctx: DecisionContext, offer_id: str, reward: float, converted: bool | None = None):
        """The update :meth:`learn_one` would make for a closed decision, as :meth:`exposure_update`: ``d_alpha``
        is the reward in units of :meth:`value` (a float, possibly negative; the store adds it with
        ``HINCRBYFLOAT`` as before)."""
        spec = self.catalogue.offers.get(offer_id)
        if spec is None:
            return None
        return self._update(ctx, offer_id, self.reward_units(spec, ctx, reward),
                            0.0 if self.exposure_at_choice else self.exposure(ctx))

    def load_state(self, state: dict) -> None:
        """Replace the posteriors with the store's hash: fields ``a:<cell field>``, ``b:<cell field>`` and ``n``
        (outcomes learnt), as :meth:`exposure_update` and :meth:`outcome_update` build them.

        >>> from models.policy.catalogue import load_catalogue
        >>> p = ThompsonPolicy(load_catalogue())
        >>> p.load_state({b'a:["pct_10",[3]]': b"2.5", b'b:["pct_10",[3]]': b"4", b"n": b"7"})
        >>> p.cells, p.n_learned
        ({('pct_10', (3,)): [2.5, 4.0]}, 7)
        """
        cells: dict[tuple[str, tuple], list[float]] = {}
        names = self._field_names
        if len(names) > 2 * len(state) + 64:  # names of fields the hash no longer has: start again
            names.clear()
        offers = self.catalogue.offers
        for raw, value in state.items():
            field = names.get(raw, _UNREAD)
            if field is _UNREAD:
                field = names[raw] = _parse_field(raw)
            if field is None or field[0] not in offers:  # not a posterior, or an offer no longer in the catalogue
                continue
            offer_id, cell, i = field
            ab = cells.get((offer_id, cell))
            if ab is None:
                ab = cells[(offer_id, cell)] = [0.0, 0.0]
            ab[i] = float(value)
        self.cells = cells
        n = state.get(b"n", state.get("n"))
        self.n_learned = int(float(n)) if n is not None else 0
