"""Why a decision was made: every offer of the catalogue with its eligibility verdict in the decision's context, its
score, and the probability of the chosen one; what ``promo explain`` prints.

It is computed on demand from the context stored beside the decision (``ctx`` in its hash, see
:mod:`models.state.engine_store`), so it costs the decision path nothing. The verdicts are recomputed with
the catalogue in use *now*: an offer added or changed since is judged by its current rules, and the explanation
names the catalogue version it used.

Examples
--------
>>> from models.decision import Decision, Offer
>>> from models.policy.base import DecisionContext
>>> from models.policy.catalogue import load_catalogue
>>> cat = load_catalogue()
>>> ctx = DecisionContext("u1", 0, cart_value=5.0, cart_items=["i1"], cart_categories=[], is_new=True,
...                       n_purchases=0, segment=1, churn_risk=0.0, propensity=0.1)
>>> d = Decision("d1", "u1", 0, "e1", Offer("none", "none"), propensity=0.6, scores={"none": 0.0})
>>> out = explain_decision(d.to_dict(), ctx, cat)
>>> out["chosen"], out["offers"][0]["offer_id"], out["offers"][0]["verdict"], out["offers"][0]["probability"]
('none', 'none', 'eligible', 0.6)
>>> all(o["verdict"] for o in out["offers"])
True
"""

from __future__ import annotations

from models.policy.base import DecisionContext
from models.policy.catalogue import Catalogue
from models.policy.eligibility import filter_offers

__all__ = ["explain_decision", "offer_verdicts", "top_contributions"]


def offer_verdicts(catalogue: Catalogue, ctx: DecisionContext) -> dict[str, str]:
    """Offer id -> ``"eligible"`` or why it was not (the engine's own filter, :func:`filter_offers`), in the
    catalogue's order."""
    eligible, reasons = filter_offers(catalogue, ctx)
    ok = {spec.offer_id for spec in eligible}
    why: dict[str, str] = {}
    everyone = None
    for text in reasons:
        head, _, rest = text.partition(": ")
        if head == "all offers":
            everyone = rest
        else:
            why[head] = rest
    return {oid: "eligible" if oid in ok else why.get(oid) or everyone or "not eligible" for oid in catalogue.offers}


def top_contributions(contributions: dict[str, float], n: int = 8) -> list[dict]:
    """The ``n`` largest contributions to the log-odds by absolute value (the intercept always included last)."""
    intercept = contributions.get("(intercept)")
    rest = sorted(((k, v) for k, v in contributions.items() if k != "(intercept)"), key=lambda kv: -abs(kv[1]))
    out = [{"feature": k, "log_odds": round(v, 4)} for k, v in rest[:n] if v]
    if intercept is not None:
        out.append({"feature": "(intercept)", "log_odds": round(intercept, 4)})
    return out


def explain_decision(decision: dict, ctx: DecisionContext | None, catalogue: Catalogue,
                     budgets: dict[str, dict] | None = None, contributions: dict[str, float] | None = None) -> dict:
    """The explanation of ``decision`` (a decision v1 dict) made in ``ctx``.

    Parameters
    ----------
    decision
        The decision as sent.
    ctx
        The context the policy saw, or None when it is no longer stored (then no verdicts).
    catalogue
        The catalogue in use now.
    budgets
        Offer id -> the campaign's budget state now (``budget``, ``spent``, ``reserved``, ``remaining``).
    contributions
        Feature -> share of the log-odds of p_buy in the decision's context (the propensity model now).
    """
    chosen = decision["offer"]["offer_id"]
    verdicts = offer_verdicts(catalogue, ctx) if ctx is not None else {}
    scores = decision.get("scores") or {}
    ids = list(catalogue.offers) + [o for o in scores if o not in catalogue.offers]
    if chosen not in ids:
        ids.append(chosen)
    offers = []
    for oid in ids:
        spec = catalogue.offers.get(oid)
        offers.append({
            "offer_id": oid,
            "kind": spec.kind if spec is not None else None,
            "in_catalogue": spec is not None,
            "verdict": (verdicts.get(oid, "unknown: no stored context") if spec is not None
                        else "not in the catalogue now"),
            "score": scores.get(oid),
            "chosen": oid == chosen,
            "probability": decision.get("propensity") if oid == chosen else None,
            "budget": (budgets or {}).get(oid),
        })
    out = {
        "decision_id": decision["decision_id"],
        "chosen": chosen,
        "group": decision.get("group"),
        "reasons": decision.get("reasons", []),
        "offers": offers,
        "decision": decision,
    }
    if ctx is not None:
        out["context"] = {"cart_value": ctx.cart_value, "is_new": ctx.is_new, "n_purchases": ctx.n_purchases,
                          "segment": ctx.segment, "churn_risk": ctx.churn_risk, "p_buy": ctx.propensity,
                          "offers_today": ctx.offers_today, "blocked": ctx.blocked}
    if contributions:
        out["p_buy_contributions"] = top_contributions(contributions)
    return out
