"""The catalogue's YAML format: validation with the line of every error (``<file>:<line>: <what is wrong>``) and
the build of :class:`models.policy.catalogue.Catalogue` (:func:`parse`, called by
:func:`models.policy.catalogue.parse_catalogue`). Each offer kind adds its own keys (:mod:`models.policy.offers`).

``description`` (of an offer) and ``currency`` (of the catalogue) are annotations for the people who read the file:
validated, not used (amounts are in the shop's own currency; the engine converts nothing).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import yaml

from models.policy.catalogue import (
    CUSTOMER_KINDS,
    ID_RE,
    NONE_ID,
    Catalogue,
    CatalogueError,
    Eligibility,
    GlobalCaps,
    OfferCaps,
    OfferSpec,
)
from models.policy.offers import KINDS, catalogue_kinds


class _Validator:
    """Validation helpers over yaml nodes (which carry line marks)."""

    def __init__(self, name: str):
        self.name = name
        self._constructor = yaml.constructor.SafeConstructor()

    def err(self, node: yaml.Node | None, msg: str) -> CatalogueError:
        line = node.start_mark.line + 1 if node is not None else 1
        return CatalogueError(f"{self.name}:{line}: {msg}")

    def value(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

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
            if 946_684_800 <= v < 4_102_444_800:  # 2000-2100 in epoch seconds, which as ms is January 1970
                raise self.err(node, f"{what}: {v} looks like epoch seconds; give epoch milliseconds "
                                     f"({v * 1000}) or an RFC 3339 time (e.g. 2019-10-01T00:00:00Z)")
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


_TOP_KEYS = ("version", "currency", "margin_rate", "offer_validity_s", "caps", "offers", "triggers")
_TRIGGER_KEYS = ("enabled", "offers", "cooldown_s", "max_per_day")
"""Keys every trigger may have; each trigger adds its own (``models.triggers``, ``PARAMS``)."""
_OFFER_KEYS = ("offer_id", "kind", "value", "min_spend", "margin_rate", "prior_uplift", "eligibility", "caps",
               "budget", "period", "validity_s", "description")
"""Keys every offer may have; each kind adds its own (``models.policy.offers``, ``params``)."""
_ELIG_KEYS = ("segments", "categories", "min_cart_value", "customer", "churn_risk")
_CAPS_KEYS = ("per_user_per_day", "per_user_total", "cooldown_s")
_GCAPS_KEYS = ("max_offers_per_day", "min_gap_s")


def parse(text: str, name: str = "<catalogue>") -> Catalogue:
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
    if "currency" in top:
        v.string(top["currency"][1], "currency")  # an annotation: validated, not used
    gcaps = GlobalCaps()
    if "caps" in top:
        g = v.mapping(top["caps"][1], "caps", _GCAPS_KEYS)
        gcaps = GlobalCaps(
            max_offers_per_day=(_day_cap(v, g["max_offers_per_day"][1], "caps.max_offers_per_day")
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
    triggers = _parse_triggers(v, top["triggers"][1], offers) if "triggers" in top else {}
    return Catalogue(offers=offers, margin_rate=margin_rate, caps=gcaps, path=name, triggers=triggers)


def _day_cap(v: _Validator, node: yaml.Node, what: str) -> int:
    """A per-user daily cap: at most :attr:`models.profile.Profile.DAY_LOG_MAX`, the decisions of one day a profile
    keeps per offer and per trigger, which daily caps are counted from (a larger cap could not be enforced)."""
    from models.profile import Profile

    n = int(v.number(node, what, 0, integer=True))
    if n > Profile.DAY_LOG_MAX:
        raise v.err(node, f"{what} must be <= {Profile.DAY_LOG_MAX} (a user's profile keeps at most "
                          f"{Profile.DAY_LOG_MAX} decisions a day per offer and per trigger, which daily caps are "
                          f"counted from), got {n}")
    return n


def _parse_triggers(v: _Validator, node: yaml.Node, offers: dict[str, OfferSpec]) -> dict:
    """The ``triggers:`` section: ``{<trigger>: {enabled, offers, cooldown_s, max_per_day, <its own keys>}}``."""
    from models.triggers import TRIGGERS, TriggerSpec

    out = {}
    for name, (knode, tnode) in v.mapping(node, "triggers", tuple(TRIGGERS)).items():
        cls = TRIGGERS[name]
        w = f"triggers.{name}"
        t = v.mapping(tnode, w, _TRIGGER_KEYS + tuple(cls.PARAMS)) if tnode.tag != "tag:yaml.org,2002:null" else {}
        enabled = True
        if "enabled" in t:
            enabled = v.value(t["enabled"][1])
            if not isinstance(enabled, bool):
                raise v.err(t["enabled"][1], f"{w}.enabled must be true or false, got {enabled!r}")
        allowed = None
        if "offers" in t:
            onode = t["offers"][1]
            if not isinstance(onode, yaml.SequenceNode):
                raise v.err(onode, f"{w}.offers must be a list of offer ids")
            allowed = tuple(v.string(o, f"{w}.offers[]") for o in onode.value)
            for o, oid in zip(onode.value, allowed):
                if oid not in offers:
                    raise v.err(o, f"{w}.offers: no offer '{oid}' in this catalogue (offers: "
                                   f"{', '.join(x for x in offers if x != NONE_ID)})")

        def count(key: str) -> int | None:
            if key not in t or v.value(t[key][1]) is None:
                return None
            if key == "max_per_day":
                return _day_cap(v, t[key][1], f"{w}.{key}")
            return int(v.number(t[key][1], f"{w}.{key}", 0, integer=True))

        params = {}
        for key, (default, low, *high) in cls.PARAMS.items():
            if key in t:
                params[key] = v.number(t[key][1], f"{w}.{key}", low, high[0] if high else None,
                                       integer=isinstance(default, int))
        out[name] = TriggerSpec(name, enabled, allowed, count("cooldown_s"), count("max_per_day"), params)
    return out


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
    if not isinstance(oid, str) or not ID_RE.match(oid):
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
            if key == "per_user_per_day":
                return _day_cap(v, c[key][1], f"{w}: caps.{key}")
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
