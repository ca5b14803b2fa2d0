"""The offer catalogue: which offers exist, what they cost, who may get them, caps, budgets.

Loaded from YAML and validated at start-up; every error names ``<file>:<line>: <what is wrong>``.

>>> cat = load_catalogue(DEFAULT_PATH)
>>> sorted(cat.kinds())
['coupon', 'gift', 'none', 'percent_off', 'threshold']
>>> o = cat["coupon_5"]
>>> o.cost(80.0), o.max_cost(80.0), round(o.margin(80.0), 2)
(5.0, 5.0, 20.0)
>>> cat["pct_10"].cost(200.0), cat["pct_10"].cost(900.0)
(20.0, 50.0)
>>> cat["spend100_save15"].cost(99.0), cat["spend100_save15"].cost(100.0)
(0.0, 15.0)
>>> cat["none"].kind, cat["none"].cost(50.0)
('none', 0.0)

A wrong value is reported with its line:

>>> bad = "version: 1\\noffers:\\n  - offer_id: c1\\n    kind: coupn\\n    value: 5\\n"
>>> try:
...     parse_catalogue(bad, "shop.yaml")
... except CatalogueError as e:
...     print(e)  # doctest: +ELLIPSIS
shop.yaml:4: offer c1: kind 'coupn' is not one of coupon, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from models.decision import Offer
from models.policy.offers import KINDS

DEFAULT_PATH = Path(__file__).resolve().parent / "default_offers.yaml"
NONE_ID = "none"
CUSTOMER_KINDS: tuple[str, ...] = ("any", "new", "returning")
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class CatalogueError(ValueError):
    """The catalogue file is invalid; the message is ``<file>:<line>: <what is wrong>``."""


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Who may receive an offer. ``None`` means "no restriction"."""

    segments: frozenset[int] | None = None
    categories: tuple[str, ...] | None = None
    min_cart_value: float = 0.0
    customer: str = "any"
    churn_risk: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True, slots=True)
class OfferCaps:
    """Per-user caps of one offer (``None`` = unlimited)."""

    per_user_per_day: int | None = None
    per_user_total: int | None = None
    cooldown_s: int = 0


@dataclass(frozen=True, slots=True)
class GlobalCaps:
    """Per-user caps across all offers."""

    max_offers_per_day: int | None = None
    min_gap_s: int = 0


@dataclass(frozen=True, slots=True)
class OfferSpec:
    """One catalogue offer with its cost model, eligibility, caps, budget and period."""

    offer_id: str
    kind: str
    value: float = 0.0
    min_spend: float = 0.0
    margin_rate: float = 0.25
    params: dict[str, float] = field(default_factory=dict)  # the kind's own parameters (offers.<kind>.params)
    prior_uplift: float = 0.0
    eligibility: Eligibility = field(default_factory=Eligibility)
    caps: OfferCaps = field(default_factory=OfferCaps)
    budget: float | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    validity_s: int = 86400
    line: int = 0

    # --- cost model: the kind's (models.policy.offers) -------------------------------------
    def basket(self, cart_value: float) -> float:
        """Basket value if the offer is redeemed: at least ``min_spend`` (the user tops up to redeem)."""
        return KINDS[self.kind].basket(self, cart_value)

    def cost(self, basket: float) -> float:
        """What one redemption on a basket of this value costs the shop."""
        return KINDS[self.kind].cost(self, basket)

    def max_cost(self, cart_value: float) -> float:
        """The most one redemption may cost: what a budget reserves at decision time."""
        return KINDS[self.kind].max_cost(self, cart_value)

    def margin(self, basket: float) -> float:
        """Margin earned on a basket before the offer's cost."""
        return self.margin_rate * basket

    def to_offer(self, now_ms: int) -> Offer:
        """The decision v1 ``offer`` object for a decision taken at ``now_ms``."""
        if self.offer_id == NONE_ID:
            return Offer(offer_id=NONE_ID, kind="none")
        return Offer(
            offer_id=self.offer_id,
            kind=self.kind,
            value=float(self.value),
            min_spend=float(self.min_spend),
            expires_at=int(now_ms + self.validity_s * 1000),
        )

    # --- eligibility -----------------------------------------------------------------------
    def ineligible_reason(self, ctx: Any) -> str | None:
        """Why this offer may not go to the user in ``ctx`` (a ``DecisionContext``), or ``None``."""
        if self.offer_id == NONE_ID:
            return None
        if self.start_ms is not None and ctx.now_ms < self.start_ms:
            return "campaign not started"
        if self.end_ms is not None and ctx.now_ms >= self.end_ms:
            return "campaign ended"
        el = self.eligibility
        if ctx.cart_value < el.min_cart_value:
            return f"cart {ctx.cart_value:.2f} < min {el.min_cart_value:g}"
        if el.customer == "new" and not ctx.is_new:
            return "only for new customers"
        if el.customer == "returning" and ctx.is_new:
            return "only for returning customers"
        lo, hi = el.churn_risk
        if not (lo <= ctx.churn_risk <= hi):
            return f"churn risk {ctx.churn_risk:.2f} outside [{lo:g}, {hi:g}]"
        if el.segments is not None and ctx.segment not in el.segments:
            return f"segment {ctx.segment} not eligible"
        if el.categories is not None:
            cats = ctx.cart_categories or []
            if not any(c == p or c.startswith(p + ".") for c in cats if c for p in el.categories):
                return "no eligible category in cart"
        return None

    def cap_reason(self, ctx: Any) -> str | None:
        """Why a per-user cap of this offer blocks it for ``ctx`` (a ``DecisionContext``), or ``None``."""
        c = self.caps
        if c.per_user_per_day is not None and (ctx.offer_counts_today or {}).get(self.offer_id, 0) >= c.per_user_per_day:
            return f"cap {c.per_user_per_day}/day reached"
        if c.per_user_total is not None and (ctx.offer_counts_total or {}).get(self.offer_id, 0) >= c.per_user_total:
            return f"cap {c.per_user_total} per user reached"
        last = ctx.last_offer_ms.get(self.offer_id) if ctx.last_offer_ms else None
        if c.cooldown_s and last is not None and ctx.now_ms - last < c.cooldown_s * 1000:
            return f"cooldown {c.cooldown_s}s"
        return None


NONE_OFFER = OfferSpec(offer_id=NONE_ID, kind="none")


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The validated catalogue. ``offers`` keeps file order and always contains ``"none"`` first."""

    offers: dict[str, OfferSpec]
    margin_rate: float = 0.25
    caps: GlobalCaps = field(default_factory=GlobalCaps)
    path: str = "<memory>"
    # the ``triggers:`` section: trigger name -> models.triggers.base.TriggerSpec (a trigger not named keeps its
    # defaults; only ``cart`` is on unless named here or in PROMO_TRIGGERS)
    triggers: dict = field(default_factory=dict)

    def __getitem__(self, offer_id: str) -> OfferSpec:
        return self.offers[offer_id]

    def __contains__(self, offer_id: object) -> bool:
        return offer_id in self.offers

    def __iter__(self) -> Iterator[OfferSpec]:
        return iter(self.offers.values())

    def __len__(self) -> int:
        return len(self.offers)

    @property
    def offer_ids(self) -> list[str]:
        return list(self.offers)

    def kinds(self) -> set[str]:
        return {o.kind for o in self.offers.values()}

    def none_margin(self, cart_value: float) -> float:
        """Margin of the basket without an offer (catalogue default margin rate, as ``self["none"]``)."""
        return self.margin_rate * cart_value

    def budgets(self) -> dict[str, float]:
        """Offer id -> campaign budget, for offers that have one."""
        return {o.offer_id: o.budget for o in self.offers.values() if o.budget is not None}


# --- loading and validation (models.policy.catalogue_yaml) --------------------------------------
def parse_catalogue(text: str, name: str = "<catalogue>") -> Catalogue:
    """Validate YAML text and build a :class:`Catalogue`; ``name`` is used in error messages
    (:class:`CatalogueError`: ``<name>:<line>: <what is wrong>``)."""
    from models.policy.catalogue_yaml import parse

    return parse(text, name)


def load_catalogue(path: str | Path = DEFAULT_PATH) -> Catalogue:
    """Read and validate a catalogue file. Raises :class:`CatalogueError` (``<file>:<line>: ...``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogueError(f"{p}:0: catalogue file not found (set PROMO_CATALOGUE_PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{p}:0: cannot read catalogue: {exc}") from None
    return parse_catalogue(text, str(p))
