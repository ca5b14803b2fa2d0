"""The operator commands that read the engine's state: ``promo user show``, ``promo explain`` and ``promo ledger
export`` (the views themselves are :class:`stream.views.EngineViews`, shared with the worker's HTTP views).

Each builds the production engine as a worker does (:func:`stream.app.build_engine`: the catalogue in use, the
budgets, the learning core from its latest snapshot), reads, and closes its connections. Nothing is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Callable

from stream.errors import PromoError
from stream.settings import Settings

__all__ = ["user_show", "explain", "ledger_export", "explain_lines"]


@contextlib.asynccontextmanager
async def _views(settings: Settings):
    import redis

    from stream.app import build_engine
    from stream.forget import engine_user_id
    from stream.views import EngineViews

    try:
        engine = await asyncio.to_thread(build_engine, settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _unreachable(settings, exc) from None
    try:
        yield EngineViews(engine, user_key=lambda u: engine_user_id(settings, u))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _unreachable(settings, exc) from None
    finally:
        await engine.store.close()
        if engine.budget is not None:
            with contextlib.suppress(Exception):  # closing a client that never connected: nothing to release
                await engine.budget.store.close()


def _unreachable(settings: Settings, exc: BaseException) -> PromoError:
    return PromoError(f"Redis at {settings.redis_url_safe} (PROMO_REDIS_URL) did not answer "
                      f"({type(exc).__name__}: {exc}); start it (promo stack up) or set PROMO_REDIS_URL")


def user_show(settings: Settings, user_id: str) -> dict:
    """``promo user show``: the user's state now (:meth:`stream.views.EngineViews.user`)."""

    async def run():
        async with _views(settings) as views:
            return await views.user(user_id)

    return asyncio.run(run())


async def _find_decision(settings: Settings, decision_id: str) -> dict | None:
    """The decision ``decision_id`` as sent, read from the decisions topic (its key and ``user_id`` name the user)."""
    from stream.tail import tail

    found: list[dict] = []

    def keep(doc: dict) -> None:
        value = doc.get("value")
        if isinstance(value, dict) and value.get("decision_id") == decision_id:
            found.append(value)

    await tail(settings, "decisions", keep)
    return found[-1] if found else None


def explain(settings: Settings, decision_id: str, user_id: str | None = None) -> dict:
    """``promo explain``: why ``decision_id`` was made (:meth:`stream.views.EngineViews.explain`). Without
    ``user_id`` the decisions topic is read to find whose decision it is."""

    async def run():
        uid = user_id
        if uid is None:
            print("promo explain: looking the decision up in the decisions topic (give --user to skip this)",
                  file=sys.stderr)
            sent = await _find_decision(settings, decision_id)
            if sent is None:
                raise PromoError(f"decision {decision_id} is not in the decisions topic {settings.topic_decisions}; "
                                 "check the id (promo tail decisions)")
            uid = sent["user_id"]
        async with _views(settings) as views:
            out = await views.explain(decision_id, uid)
        if out is None:
            raise PromoError(f"the engine holds no decision {decision_id} for this user: decisions are kept "
                             f"{2 * settings.attribution_window_s} s (twice PROMO_ATTRIBUTION_WINDOW_S), or the user "
                             "was forgotten")
        return out

    return asyncio.run(run())


def explain_lines(out: dict) -> list[str]:
    """A person's reading of :func:`explain`'s report."""
    d = out["decision"]
    lines = [f"decision {out['decision_id']} for user {d['user_id']} at {d['ts']}: {out['chosen']} "
             f"({d['offer']['kind']}, value {d['offer']['value']}), group {out['group']}, "
             f"probability {d['propensity']}, {'sent' if out['sent'] else 'NOT marked sent'}"]
    lines += [f"  reason: {r}" for r in out["reasons"]]
    if out.get("context"):
        c = out["context"]
        lines.append(f"  context: cart {c['cart_value']}, p_buy {c['p_buy']:.3f}, segment {c['segment']}, "
                     f"{'new' if c['is_new'] else 'returning'} customer, {c['offers_today']} offers today")
    for o in out["offers"]:
        mark = "*" if o["chosen"] else " "
        score = "-" if o["score"] is None else f"{o['score']:.4f}"
        budget = "" if not o["budget"] else f", budget {o['budget']['remaining']} of {o['budget']['budget']} left"
        lines.append(f"  {mark} {o['offer_id']:<16} score {score:>8}  {o['verdict']}{budget}")
    if out.get("p_buy_contributions"):
        lines.append("  p_buy log-odds: " + ", ".join(f"{c['feature']} {c['log_odds']:+.3f}"
                                                       for c in out["p_buy_contributions"]))
    if out.get("outcome"):
        o = out["outcome"]
        lines.append(f"  outcome: {o['outcome']}, reward {o['reward']}")
    if out.get("note"):
        lines.append(f"  note: {out['note']}")
    return lines


def ledger_export(settings: Settings, write: Callable[[str], None], since_ms: int | None = None) -> dict:
    """``promo ledger export``: every closed decision the engine holds, one line of ``promo evaluate policy``'s
    JSONL each (:func:`models.policy.ledger.ope_row`), passed to ``write``; returns the counts."""
    from models.policy.ledger import ope_row

    async def run():
        n, by_outcome = 0, {}
        async with _views(settings) as views:
            async for rec in views.ledger(since_ms):
                write(json.dumps(ope_row(rec), separators=(",", ":")))
                n += 1
                by_outcome[rec["outcome"]] = by_outcome.get(rec["outcome"], 0) + 1
        return {"rows": n, "by_outcome": by_outcome}

    return asyncio.run(run())
