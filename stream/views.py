"""Read-only views of what the engine holds, for operators: a user's state now (``promo user show``), why a
decision was made (``promo explain``), the closed decisions (``promo ledger export``), and the worker's HTTP views.

Everything here reads; nothing writes. The views use the engine's own objects (:func:`stream.app.build_engine`
in the CLI, the running engine in a worker), so what they show is computed by the code that decides, and every
Redis read is asynchronous with the store's timeouts (a worker's event loop is never blocked by a view).

What they read (:mod:`models.state.engine_store`): the profile hash, the user's decision hashes (``json``,
``sent`` and the ``ctx`` the policy saw), the user's ledger of closed decisions, the budgets, and the item
statistics for recommendations. The propensity model is the engine's learning core: in the CLI, the latest
snapshot in Redis.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from models.learning.recommend import possible_seeds
from models.planning import DAY_MS, OPEN_FIELD
from models.policy.base import DecisionContext
from models.policy.explain import explain_decision
from models.profile import Profile
from stream.forget import user_pattern

__all__ = ["EngineViews"]

RECENT_SHOWN = 10  # recent items, decisions and closed decisions a user view lists


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class EngineViews:
    """Read-only views over an engine's state (its :class:`models.state.engine_redis.RedisStore`).

    Parameters
    ----------
    engine
        The engine whose store, catalogue, budgets and learning core are read.
    user_key
        Maps the id an operator types to the id the engine keys its state by (the pseudonym when
        ``PROMO_PSEUDONYMISE_KEY`` is set: :func:`stream.forget.engine_user_id`).
    """

    def __init__(self, engine, user_key=lambda u: u) -> None:
        self.engine = engine
        self.store = engine.store
        self.user_key = user_key

    # --- reads ------------------------------------------------------------------------------
    async def _profile(self, uid: str) -> tuple[Profile, list[dict]] | None:
        packed = await self.store.r.hget(self.store.profile_key(uid), "v")
        if not packed:
            return None
        raw = json.loads(packed)
        open_ = raw.pop(OPEN_FIELD, None) or []
        return Profile.from_dict(raw), open_

    async def _decisions(self, uid: str) -> list[dict]:
        """The user's stored decisions (newest first): ``decision``, ``sent``, ``ctx`` (dict or None)."""
        _, pattern = user_pattern(self.store.prefix, uid, "d:*")  # the user's decision hashes, glob-escaped
        keys = [k async for k in self.store.r.scan_iter(match=pattern, count=500)]
        if not keys:
            return []
        pipe = self.store.r.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, "json", "sent", "ctx")
        out = []
        for js, sent, ctx in await pipe.execute():
            if js is not None:
                out.append({"decision": json.loads(js), "sent": sent == b"1",
                            "ctx": json.loads(ctx) if ctx else None})
        out.sort(key=lambda d: d["decision"].get("ts", 0), reverse=True)
        return out

    async def _ledger(self, uid: str, n: int = 0) -> list[dict]:
        return [json.loads(r) for r in await self.store.ledger(uid, n)]

    async def budgets(self) -> dict[str, dict]:
        """Offer id -> its campaign's budget now: ``budget``, ``spent`` (reserved + committed), ``reserved``,
        ``committed``, ``remaining``."""
        gate = self.engine.budget
        if gate is None or not gate.budgets:
            return {}
        spends = await gate.store.spend(list(gate.budgets))
        out = {}
        for oid, budget in gate.budgets.items():
            s = spends.get(oid)
            spent = s.spent if s is not None else 0.0
            out[oid] = {"budget": budget, "spent": round(spent, 2),
                        "reserved": round(s.reserved, 2) if s is not None else 0.0,
                        "committed": round(s.committed, 2) if s is not None else 0.0,
                        "remaining": round(max(0.0, budget - spent), 2)}
        return out

    # --- views ------------------------------------------------------------------------------
    async def user(self, user_id: str) -> dict:
        """A user's state now: profile, session, segment, p_buy, caps and offer history, open decisions, stored
        and closed decisions, and the items the engine would recommend now. ``found`` is false when the engine
        holds no profile."""
        uid = self.user_key(user_id)
        got = await self._profile(uid)
        if got is None:
            return {"user_id": user_id, "found": False}
        prof, open_ = got
        engine = self.engine
        now = prof.last_ts
        day_start = now - now % DAY_MS
        caps = engine.catalogue.caps
        view = {
            "user_id": user_id,
            "found": True,
            "profile": {
                "events": prof.counts, "first_ts": prof.first_ts, "last_ts": prof.last_ts,
                "orders": prof.n_orders, "spend": round(prof.spend, 2), "is_new": prof.is_new,
                "loyalty": round(prof.loyalty, 4), "churn_risk": round(prof.churn_risk, 4),
                "cart": [{"item_id": i, "quantity": q, "price": p, "category": c}
                         for i, (q, p, c) in prof.cart.items()],
                "cart_value": round(prof.cart_value, 2),
                "recent_items": list(reversed(prof.recent_items))[:RECENT_SHOWN],
                "top_categories": prof.top_categories(5),
            },
            "session": {"session_id": prof.session_id, "start_ts": prof.session_start,
                        "events": prof.session_events, "views": prof.session_views, "carts": prof.session_carts,
                        "cart_value": round(prof.session_cart_value, 2), "sessions": prof.n_sessions},
            "caps": {"offers_today": prof.offers_since(day_start), "max_offers_per_day": caps.max_offers_per_day,
                     "min_gap_s": caps.min_gap_s, "last_decision_ts": prof.last_decision_ts,
                     "decisions": prof.n_decisions},
            "offer_history": prof.offer_history,
            "open_decisions": [{k: d.get(k) for k in ("decision_id", "offer_id", "group", "ts", "expires_ms",
                                                      "propensity", "cart_value")} for d in open_],
            "decisions": [{**d["decision"], "sent": d["sent"]}
                          for d in (await self._decisions(uid))[:RECENT_SHOWN]],
            "closed": [{k: r.get(k) for k in ("decision_id", "offer_id", "group", "outcome", "reward", "closed_ms")}
                       for r in await self._ledger(uid, RECENT_SHOWN)],
            "at_ts": now,
        }
        learning = engine.learning
        if learning is not None:
            view["segment"] = learning.segment(prof, now)
            view["p_buy"] = round(learning.propensity(prof, now), 6)
            recent = prof.recent_items
            seeds = possible_seeds(recent[:-1], [(recent[-1], True)], **learning.recommend_options) if recent else []
            reads = await learning.prefetch_items(seeds, engine.planner.k)
            items = learning.recommend(prof, engine.planner.k, now, reads)
        else:
            items = list(reversed(prof.recent_items))[: engine.planner.k]
        view["recommended_items"] = [i for i in items if i not in prof.cart]  # as a decision now would list them
        return view

    async def explain(self, decision_id: str, user_id: str) -> dict | None:
        """Why ``decision_id`` (a decision of ``user_id``) was made, or None when the engine no longer holds it
        (decisions are kept twice the attribution window)."""
        uid = self.user_key(user_id)
        found = next((d for d in await self._decisions(uid) if d["decision"].get("decision_id") == decision_id),
                     None)
        if found is None:
            return None
        ctx = DecisionContext.from_dict(found["ctx"]) if found["ctx"] else None
        contributions = None
        learning = self.engine.learning
        if ctx is not None and ctx.features and learning is not None:
            contributions = learning.purchase_model.model.contributions(ctx.features)
        out = explain_decision(found["decision"], ctx, self.engine.catalogue, await self.budgets(), contributions)
        out["sent"] = found["sent"]
        closed = next((r for r in await self._ledger(uid) if r.get("decision_id") == decision_id), None)
        out["outcome"] = ({k: closed.get(k) for k in ("outcome", "reward", "revenue", "cost", "margin", "closed_ms")}
                          if closed else None)
        if ctx is None:
            out["note"] = "no stored context (a decision made before contexts were stored): verdicts unknown"
        return out

    async def ledger(self, since_ms: int | None = None) -> AsyncIterator[dict]:
        """Every user's closed decisions (:mod:`models.policy.ledger` records) logged at or after ``since_ms``."""
        pattern = f"{self.store.prefix}:{{u:*}}:l"
        async for key in self.store.r.scan_iter(match=pattern, count=1000):
            if key.index(b"}") != len(key) - 3:  # a decision key whose event id ends in "}:l", not a ledger
                continue
            for raw in await self.store.r.lrange(key, 0, -1):
                rec = json.loads(raw)
                if since_ms is None or rec.get("logged_ms", 0) >= since_ms:
                    yield rec

