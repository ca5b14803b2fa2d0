"""The decision ledger: one record per closed decision, with the context the policy saw, the action it took, the
probability it took it with and the reward it earned.

The engine appends a record to the user's ledger in the commit that closes the decision (the same atomic step
that teaches the policy), so the engine's own logs can be evaluated offline: :func:`ope_row` turns a record into a
line of ``promo evaluate policy``'s JSONL format (``context``, ``action``, ``propensity``, ``reward``).

Examples
--------
>>> from models.policy.attribution import Closed, OpenDecision
>>> d = OpenDecision("d1", "u1", "pct10", "treatment", ts=1_000, expires_ms=9_000, cart_value=80.0, propensity=0.25,
...                  ctx={"cart_value": 80.0, "is_new": True, "segment": 2, "propensity": 0.1,
...                       "features": {"carts": 3.0}, "cart_items": ["i1"]})
>>> rec = ledger_record(Closed(d, "converted", reward=12.0, revenue=80.0, cost=8.0, margin=20.0, closed_ms=5_000),
...                     logged_ms=77)
>>> rec["outcome"], rec["reward"], rec["logged_ms"]
('converted', 12.0, 77)
>>> row = ope_row(rec)
>>> row["action"], row["propensity"], row["reward"]
('pct10', 0.25, 12.0)
>>> row["context"]
{'carts': 3.0, 'cart_value': 80.0, 'is_new': 1, 'segment': 'segment_2', 'p_buy': 0.1}
"""

from __future__ import annotations

import math

from models.policy.attribution import Closed

__all__ = ["ledger_record", "ope_row", "CONTEXT_FIELDS"]

CONTEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("cart_value", "cart_value"),
    ("is_new", "is_new"),
    ("n_purchases", "n_purchases"),
    ("segment", "segment"),
    ("churn_risk", "churn_risk"),
    ("propensity", "p_buy"),
    ("offers_today", "offers_today"),
)
"""(decision-context field, OPE context name): the scalar parts of a decision context an evaluator may use; the
model features follow as they are named. Lists and maps (cart items, caps) are left out: an OPE context holds
strings and finite numbers only."""


def ledger_record(closed: Closed, logged_ms: int) -> dict:
    """The ledger record of a closed decision; ``logged_ms`` is the wall-clock time it closed (what ``promo
    ledger export --since`` filters on: event times of a replayed log may be years old)."""
    d = closed.decision
    return {
        "decision_id": d.decision_id,
        "offer_id": d.offer_id,
        "group": d.group,
        "propensity": d.propensity,
        "decided_ms": d.ts,
        "closed_ms": closed.closed_ms,
        "outcome": closed.outcome,
        "reward": closed.reward,
        "revenue": closed.revenue,
        "cost": closed.cost,
        "margin": closed.margin,
        "logged_ms": logged_ms,
        "ctx": d.ctx,
    }


def _scalar(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value
    return None


def ope_row(record: dict) -> dict:
    """A ledger record as a line of ``promo evaluate policy``'s JSONL (:mod:`models.evaluation.ope.logged`), with
    the decision's id, group and outcome beside it. The segment becomes a category (``segment_<n>``): its
    number names a cluster, not a quantity."""
    ctx = record.get("ctx") or {}
    context: dict = {}
    for name, v in (ctx.get("features") or {}).items():
        if (v := _scalar(v)) is not None:
            context[name] = v
    for field, name in CONTEXT_FIELDS:
        v = _scalar(ctx.get(field))
        if v is None:
            continue
        context[name] = f"segment_{v}" if field == "segment" else v
    return {
        "context": context,
        "action": record["offer_id"],
        "propensity": record["propensity"],
        "reward": record["reward"],
        "decision_id": record["decision_id"],
        "group": record["group"],
        "outcome": record["outcome"],
        "closed_ms": record["closed_ms"],
        "logged_ms": record["logged_ms"],
    }
