"""A user decided again after a refused budget reservation, on the real embedded Redis.

Another worker takes the campaign's last coupon after this worker last read the campaign's spend: this worker
plans the coupon, Redis refuses the reservation, and the user is planned again from the same load with the coupon
blocked. The second plan must start from the profile as stored: a plan folds the batch's events into the profile
it is given, in place, and the re-plan used to start from the folded one, so the user's counts and cart held the
batch's events twice (and the decision saw a doubled cart).
"""

from __future__ import annotations

import asyncio
import json
import uuid

from models.engine import Engine
from models.events import Event
from models.policy.attribution import OutcomeStats
from models.policy.budget import BudgetGate
from models.policy.catalogue import parse_catalogue
from models.state.budget_redis import RedisBudgetStore
from models.state.budget_store import ReserveRequest
from models.state.engine_redis import RedisStore
from tests.helpers import choosing

CATALOGUE = """
offers:
  - {offer_id: c5, kind: coupon, value: 5, prior_uplift: 0.5, budget: 5}
"""
H = 3_600_000


def test_a_user_decided_again_after_a_refused_reservation_folds_the_batch_once(redis_url):
    import redis.asyncio as aioredis

    prefix = "r" + uuid.uuid4().hex[:10]

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        cat = parse_catalogue(CATALOGUE)
        budgets = RedisBudgetStore(client, prefix=prefix)
        engine = Engine(RedisStore(client, prefix=prefix), choosing("c5")(cat, holdout_pct=0.0), catalogue=cat,
                        holdout_pct=0.0, budget=BudgetGate(cat, budgets, window_ms=24 * H),
                        conversions=OutcomeStats(), clock_ms=lambda: 0, decision_cooldown_s=0)
        # a stored profile to load (a new user's empty profile is built afresh for every plan anyway)
        await engine.process_batch([Event("v0", "view", "u1", "i0", 0, price=20.0)])
        # another worker takes the whole budget; this worker's view of the campaign is from before
        other = RedisBudgetStore(aioredis.Redis.from_url(redis_url), prefix=prefix)
        (taken,) = await other.reserve([ReserveRequest("c5", "other-worker", 5.0, 5.0, 24 * H, 48 * H)])
        assert taken.ok
        await other.close()
        result = await engine.process_batch([Event("v1", "view", "u1", "i1", 1_000, price=50.0),
                                             Event("c1", "cart", "u1", "i1", 2_000, price=50.0)])
        packed = await client.hget(engine.store.profile_key("u1"), "v")
        await client.aclose()
        return result, json.loads(packed)

    result, prof = asyncio.run(go())
    (d,) = result.decisions
    assert d.offer.offer_id == "none"  # the reservation was refused, and the user decided again
    assert prof["counts"]["view"] == 2 and prof["counts"]["cart"] == 1, prof["counts"]
    assert prof["cart"] == {"i1": [1, 50.0, None]}, prof["cart"]
    assert prof["session_events"] == 3
