"""The engine fetches its recommendations' item reads before planning (``models/state/item_reads.py``): on a real
REES46 replay every read planning makes is answered from what was fetched, and the decisions are the ones the
engine makes when planning reads the item store itself."""

from __future__ import annotations

import asyncio

from models.engine import Engine
from models.learning.core import LearningCore
from models.policy.catalogue import load_catalogue
from models.policy.thompson import ThompsonPolicy
from models.state.engine_memory import MemoryStore
from stream.evaluate import load_events
from tests.helpers import DATA

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"


def replay(prefetch: bool) -> tuple[list, Engine]:
    events, _ = load_events(REES46, "rees46", limit=17000)
    cat = load_catalogue()
    engine = Engine(MemoryStore(), ThompsonPolicy(cat, holdout_pct=0.0), catalogue=cat, holdout_pct=0.0,
                    decision_cooldown_s=0, learning=LearningCore(horizon_h=0.05), clock_ms=lambda: 0)
    if not prefetch:
        async def none(*args):
            return None
        engine._prefetch_items = none  # planning reads the item store itself, as before the prefetch
    decisions = []
    for i in range(0, len(events), 250):
        decisions += asyncio.run(engine.process_batch(events[i:i + 250])).decisions
    return decisions, engine


def test_planning_reads_only_what_was_fetched_and_decides_the_same():
    fetched, engine = replay(prefetch=True)
    direct, _ = replay(prefetch=False)
    assert len(fetched) > 100 and sum(1 for d in fetched if d.items) > 100, len(fetched)
    assert engine.item_reads_missed == 0
    assert [(d.decision_id, d.offer.offer_id, d.items) for d in fetched] == \
           [(d.decision_id, d.offer.offer_id, d.items) for d in direct]
