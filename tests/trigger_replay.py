"""What the trigger tests on the real stack compare with: the decisions an in-memory engine makes from the same
events (:func:`decided_in_memory`), and a tail of events that moves every partition's clock past the replay
(:func:`clock_tail`), so that every timer it armed is due."""

from __future__ import annotations

import asyncio
import time

from models.clock import EventClock
from models.engine import Engine
from models.policy.catalogue import parse_catalogue
from models.policy.rules import RulePolicy
from models.state.engine_memory import MemoryStore
from stream.validation import Limits, decode_event
from tests.helpers import event_bytes

ALL_TRIGGERS = ["cart", "post_purchase", "retention", "cart_abandonment", "browse_abandonment"]


def parse_ts(ts) -> int:
    """Event time in ms from a source row's ``ts`` (epoch ms, or RFC 3339 text as REES46 rows have it)."""
    if isinstance(ts, (int, float)):
        return int(ts)
    from datetime import datetime

    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def clock_tail(start_ms: int, n: int = 1_200) -> list[dict]:
    """One view each for ``n`` users from ``start_ms`` on: about a hundred per partition of twelve, enough to move
    every partition's watermark (the lower median of its last 32 event times) to ``start_ms``."""
    return [{"event_id": f"tick-{i}", "type": "view", "user_id": f"tick-{i}", "item_id": "tick", "ts": start_ms + i}
            for i in range(n)]


def decided_in_memory(events: list[dict], catalogue_text: str, names: list[str] | None = None) -> set[tuple[str, str]]:
    """(trigger, trigger id) of every decision an in-memory engine makes from ``events`` as one stream (rules
    policy, the catalogue's triggers or ``names``), with no sweep until after the last event: then the sweep runs
    until nothing is due. Whether and where a trigger fires depends on the users' events only, so a worker on the
    real stack, whose sweep runs whenever its timer says, must decide at the same triggers."""
    cat = parse_catalogue(catalogue_text)
    wall = time.time_ns() // 1_000_000
    eng = Engine(MemoryStore(), RulePolicy(cat, holdout_pct=5.0), catalogue=cat, trigger_names=names or [],
                 clock_ms=lambda: wall, event_clock=EventClock(wall_ms=lambda: wall))
    evs = [decode_event(event_bytes(e), Limits(), wall) for e in events]
    end = max(e.ts for e in evs)
    out: set[tuple[str, str]] = set()

    async def go():
        for i in range(0, len(evs), 500):
            res = await eng.process_batch(evs[i:i + 500])
            out.update((d.trigger, d.trigger_event_id) for d in res.decisions)
            await eng.delivered(res)  # as the worker, once they are on the broker
        for _ in range(1_000):  # a sweep takes up to 1,000 users; the next drops the records of what it fired
            if not await eng.store.due_users(end):
                return
            swept = await eng.sweep(end)
            out.update((d.trigger, d.trigger_event_id) for d in swept.decisions)
            await eng.delivered(swept)
        raise AssertionError("users stay due for the sweep after 1,000 sweeps")

    asyncio.run(go())
    return out
