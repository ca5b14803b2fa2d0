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

import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from models.decision import Offer
from models.policy.offers import KINDS, catalogue_kinds

DEFAULT_PATH = Path(__file__).resolve().parent / "default_offers.yaml"
NONE_ID = "none"
CUSTOMER_KINDS: tuple[str, ...] = ("any", "new", "returning")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


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
    currency: str = "USD"
    path: str = "<memory>"

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


# --- loading and validation -------------------------------------------------------------------
class _Validator:
    """Validation helpers over yaml nodes (which carry line marks)."""

    def __init__(self, name: str):
        self.name = name
        self._c = yaml.constructor.SafeConstructor()

    def err(self, node: yaml.Node | None, msg: str) -> CatalogueError:
        line = node.start_mark.line + 1 if node is not None else 1
        return CatalogueError(f"{self.name}:{line}: {msg}")

    def value(self, node: yaml.Node) -> Any:
        return self._c.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = self.value(k)
            if not isinstance(key, str):
                raise self.err(k, f"{what}: key {key!r} must be a string")
            if key not in allowed:
                raise self.err(k, f"{what}: unknown key '{key}' (allowed: {', '.join(allowed)})")
            if key in out:
                raise self.err(k, f"{what}: duplicate key '{key}'")
            out[key] = (k, v)
        return out

    def number(self, node: yaml.Node, what: str, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, integer: bool = False) -> float:
        v = self.value(node)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise self.err(node, f"{what} must be a finite number, got {v!r}")
        if integer and not isinstance(v, int):
            raise self.err(node, f"{what} must be an integer, got {v!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.err(node, f"{what} must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
        if hi is not None and v > hi:
            raise self.err(node, f"{what} must be <= {hi:g}, got {v!r}")
        return v

    def string(self, node: yaml.Node, what: str) -> str:
        v = self.value(node)
        if not isinstance(v, str) or not v:
            raise self.err(node, f"{what} must be a non-empty string, got {v!r}")
        return v

    def time_ms(self, node: yaml.Node, what: str) -> int:
        v = self.value(node)
        if isinstance(v, bool):
            raise self.err(node, f"{what} must be an RFC 3339 time or epoch ms, got {v!r}")
        if isinstance(v, int):
            return v
        if isinstance(v, str):
            try:
                v = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                raise self.err(node, f"{what}: cannot parse time {v!r} (use e.g. 2019-10-01T00:00:00Z)") from None
        if isinstance(v, _dt.date) and not isinstance(v, _dt.datetime):
            v = _dt.datetime(v.year, v.month, v.day, tzinfo=_dt.timezone.utc)
        if isinstance(v, _dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=_dt.timezone.utc)
            return int(v.timestamp() * 1000)
        raise self.err(node, f"{what} must be an RFC 3339 time or epoch ms, got {v!r}")


_TOP_KEYS = ("version", "currency", "margin_rate", "offer_validity_s", "caps", "offers")
_OFFER_KEYS = ("offer_id", "kind", "value", "min_spend", "margin_rate", "prior_uplift", "eligibility", "caps",
               "budget", "period", "validity_s", "description")
"""Keys every offer may have; each kind adds its own (``models.policy.offers``, ``params``)."""
_ELIG_KEYS = ("segments", "categories", "min_cart_value", "customer", "churn_risk")
_CAPS_KEYS = ("per_user_per_day", "per_user_total", "cooldown_s")
_GCAPS_KEYS = ("max_offers_per_day", "min_gap_s")


def parse_catalogue(text: str, name: str = "<catalogue>") -> Catalogue:
    """Validate YAML text and build a :class:`Catalogue`; ``name`` is used in error messages."""
    v = _Validator(name)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise CatalogueError(f"{name}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{name}:1: invalid YAML: {exc}") from None
    if root is None:
        raise CatalogueError(f"{name}:1: the catalogue is empty (expected a mapping with 'offers')")
    top = v.mapping(root, "catalogue", _TOP_KEYS)
    if "version" in top:
        ver = v.value(top["version"][1])
        if ver != 1:
            raise v.err(top["version"][1], f"unsupported catalogue version {ver!r} (this engine reads version 1)")
    margin_rate = v.number(top["margin_rate"][1], "margin_rate", 0, 1, lo_open=True) if "margin_rate" in top else 0.25
    validity = (int(v.number(top["offer_validity_s"][1], "offer_validity_s", 1, integer=True))
                if "offer_validity_s" in top else 86400)
    currency = v.string(top["currency"][1], "currency") if "currency" in top else "USD"
    gcaps = GlobalCaps()
    if "caps" in top:
        g = v.mapping(top["caps"][1], "caps", _GCAPS_KEYS)
        gcaps = GlobalCaps(
            max_offers_per_day=(int(v.number(g["max_offers_per_day"][1], "caps.max_offers_per_day", 0, integer=True))
                                if "max_offers_per_day" in g and v.value(g["max_offers_per_day"][1]) is not None
                                else None),
            min_gap_s=int(v.number(g["min_gap_s"][1], "caps.min_gap_s", 0, integer=True)) if "min_gap_s" in g else 0,
        )
    if "offers" not in top:
        raise v.err(root, "catalogue has no 'offers' list")
    onode = top["offers"][1]
    if not isinstance(onode, yaml.SequenceNode):
        raise v.err(onode, "'offers' must be a list of offers")
    offers: dict[str, OfferSpec] = {NONE_ID: OfferSpec(offer_id=NONE_ID, kind="none", margin_rate=margin_rate)}
    for item in onode.value:
        spec = _parse_offer(v, item, margin_rate, validity)
        if spec.offer_id in offers:
            raise v.err(item, f"offer id '{spec.offer_id}' is defined twice"
                        + (" ('none' is built in)" if spec.offer_id == NONE_ID else
                           f" (first at line {offers[spec.offer_id].line})"))
        offers[spec.offer_id] = spec
    return Catalogue(offers=offers, margin_rate=margin_rate, caps=gcaps, currency=currency, path=name)


def _kind_params() -> dict[str, list[str]]:
    """Every kind-specific catalogue key, with the kinds that take it."""
    out: dict[str, list[str]] = {}
    for name in catalogue_kinds():
        for p in KINDS[name].params:
            out.setdefault(p.name, []).append(name)
    return out


def _parse_offer(v: _Validator, node: yaml.Node, default_margin: float, default_validity: int) -> OfferSpec:
    kind_params = _kind_params()
    m = v.mapping(node, "offer", _OFFER_KEYS + tuple(kind_params))
    if "offer_id" not in m:
        raise v.err(node, "offer has no offer_id")
    oid = v.value(m["offer_id"][1])
    if not isinstance(oid, str) or not _ID_RE.match(oid):
        raise v.err(m["offer_id"][1], f"offer_id {oid!r} must be 1-64 characters of letters, digits, _ . : -")
    w = f"offer {oid}"
    if oid == NONE_ID:
        raise v.err(m["offer_id"][1], f"{w}: 'none' is built in and cannot be defined")
    kinds = catalogue_kinds()
    if "kind" not in m:
        raise v.err(node, f"{w}: missing kind (one of {', '.join(kinds)})")
    kind = v.value(m["kind"][1])
    if kind not in kinds:
        raise v.err(m["kind"][1], f"{w}: kind {kind!r} is not one of {', '.join(kinds)}")
    kind_def = KINDS[kind]
    if "value" not in m:
        raise v.err(node, f"{w}: missing value")

    def num(key: str, default: float | None, **kw: Any) -> float | None:
        if key not in m or v.value(m[key][1]) is None:
            return default
        return v.number(m[key][1], f"{w}: {key}", **kw)

    value = num("value", None, lo=0, hi=kind_def.value_hi, lo_open=True)
    min_spend = num("min_spend", 0.0, lo=0)
    margin_rate = num("margin_rate", default_margin, lo=0, hi=1, lo_open=True)
    prior_uplift = num("prior_uplift", 0.0, lo=0, hi=1)
    budget = num("budget", None, lo=0, lo_open=True)
    validity = int(num("validity_s", default_validity, lo=1, integer=True))
    own = {p.name: p for p in kind_def.params}
    for key, takers in kind_params.items():
        if key in m and key not in own:
            raise v.err(m[key][0], f"{w}: {key} only applies to {', '.join(takers)}")
    params: dict[str, float] = {}
    for p in kind_def.params:
        x = num(p.name, None, lo=p.lo, hi=p.hi, lo_open=p.lo_open)
        if x is None:
            if p.required:
                raise v.err(node, f"{w}: {kind} needs {p.name} ({p.doc})")
            continue
        params[p.name] = float(x)

    elig = Eligibility()
    if "eligibility" in m:
        elig = _parse_eligibility(v, m["eligibility"][1], w)
    caps = OfferCaps()
    if "caps" in m:
        c = v.mapping(m["caps"][1], f"{w}: caps", _CAPS_KEYS)

        def cap(key: str) -> int | None:
            if key not in c or v.value(c[key][1]) is None:
                return None
            return int(v.number(c[key][1], f"{w}: caps.{key}", 0, integer=True))

        caps = OfferCaps(per_user_per_day=cap("per_user_per_day"), per_user_total=cap("per_user_total"),
                         cooldown_s=cap("cooldown_s") or 0)
    start_ms = end_ms = None
    if "period" in m:
        p = v.mapping(m["period"][1], f"{w}: period", ("start", "end"))
        if "start" in p:
            start_ms = v.time_ms(p["start"][1], f"{w}: period.start")
        if "end" in p:
            end_ms = v.time_ms(p["end"][1], f"{w}: period.end")
        if start_ms is not None and end_ms is not None and end_ms <= start_ms:
            raise v.err(m["period"][1], f"{w}: period end must be after its start")
    spec = OfferSpec(
        offer_id=oid, kind=kind, value=float(value), min_spend=float(min_spend), margin_rate=float(margin_rate),
        params=params, prior_uplift=float(prior_uplift), eligibility=elig, caps=caps, budget=budget,
        start_ms=start_ms, end_ms=end_ms, validity_s=validity, line=node.start_mark.line + 1,
    )
    problem = kind_def.check(spec)
    if problem is not None:
        key, msg = problem
        raise v.err(m[key][1] if key in m else node, f"{w}: {msg}")
    return spec


def _parse_eligibility(v: _Validator, node: yaml.Node, w: str) -> Eligibility:
    e = v.mapping(node, f"{w}: eligibility", _ELIG_KEYS)
    segments = categories = None
    if "segments" in e:
        sn = e["segments"][1]
        sv = v.value(sn)
        if not isinstance(sv, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sv):
            raise v.err(sn, f"{w}: eligibility.segments must be a list of segment numbers, got {sv!r}")
        segments = frozenset(sv)
    if "categories" in e:
        cn = e["categories"][1]
        cv = v.value(cn)
        if not isinstance(cv, list) or not cv or not all(isinstance(s, (str, int)) and s != "" for s in cv):
            raise v.err(cn, f"{w}: eligibility.categories must be a non-empty list of category codes, got {cv!r}")
        categories = tuple(str(s) for s in cv)
    min_cart = v.number(e["min_cart_value"][1], f"{w}: eligibility.min_cart_value", 0) if "min_cart_value" in e else 0.0
    customer = "any"
    if "customer" in e:
        customer = v.value(e["customer"][1])
        if customer not in CUSTOMER_KINDS:
            raise v.err(e["customer"][1], f"{w}: eligibility.customer {customer!r} is not one of any, new, returning")
    churn = (0.0, 1.0)
    if "churn_risk" in e:
        cn = e["churn_risk"][1]
        cv = v.value(cn)
        if (not isinstance(cv, list) or len(cv) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in cv)
                or not 0 <= cv[0] <= cv[1] <= 1):
            raise v.err(cn, f"{w}: eligibility.churn_risk must be [lo, hi] with 0 <= lo <= hi <= 1, got {cv!r}")
        churn = (float(cv[0]), float(cv[1]))
    return Eligibility(segments=segments, categories=categories, min_cart_value=float(min_cart),
                       customer=customer, churn_risk=churn)


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
