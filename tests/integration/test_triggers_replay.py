"""Every trigger on the real embedded stack (issue 14, acceptance 1): the public slices replayed through a worker
with all five triggers on, in the production configuration (the exploring policy, the online learning core).

The replay: the events of one Taobao user in eight (all of each sampled user's events, so sessions and returns are
whole; dated 2017), then the first 10,000 REES46 events (2019): event-time order, as the crash tests replay. A tail
of one view each for 1,200 users (a hundred per partition) a day after the last event moves every partition's event-time clock past every
timer the replay armed, so the sweep fires them all.

Asserted: decisions of every trigger kind reach the decisions topic, each valid against decision v1 and carrying
its ``trigger``; every trigger id is sent once and decided once (one decision id each); and the set of
(trigger, trigger id) equals the one an in-memory engine decides from the same events in one stream, with no sweep
until the end. The worker's sweep ran whenever its timer said, concurrently with the batches, so the timers fired
independently of when the sweep ran. ``promo_trigger_decisions_total`` agrees per trigger. The counts are printed
(``-s``) for the closing note.
"""

from __future__ import annotations

import asyncio
import json
import sys
import zlib
from collections import Counter

import jsonschema
import pytest

from models.policy.catalogue import parse_catalogue
from stream.produce import produce_events
from stream.sources import read_events
from tests.helpers import DATA, ROOT, consume_all, metric, wait_until
from tests.trigger_replay import clock_tail, decided_in_memory, parse_ts

pytestmark = pytest.mark.integration

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"
TAOBAO = DATA / "taobao_time_slice" / "userbehavior_time_slice.csv"
TAOBAO_ONE_IN, N_REES46, N_TAIL = 8, 10_000, 1_200
KINDS = ("cart", "post_purchase", "retention", "cart_abandonment", "browse_abandonment")

# The default catalogue's offers, two more for the moments without a cart worth a threshold, and every trigger on.
# The slices are under three hours long: a "long absence" is scaled down with them (churn risk 0.0005 is about 22
# minutes away against the 30-day rhythm assumed before a second order; a new session needs 30 minutes anyway).
CATALOGUE = (ROOT / "models" / "policy" / "default_offers.yaml").read_text().split("\ntriggers:")[0] + """
  - offer_id: comeback_5
    kind: coupon
    value: 5
    min_spend: 30
    prior_uplift: 0.03
    caps: {per_user_per_day: 1}
    budget: 100000
  - offer_id: next_order_10
    kind: percent_off
    value: 10
    max_discount: 15
    prior_uplift: 0.02
    budget: 100000
triggers:
  cart: {offers: [coupon_5, pct_10, spend100_save15, gift_tote, welcome_10]}
  post_purchase: {offers: [next_order_10], cooldown_s: 0}
  retention: {offers: [comeback_5], min_churn_risk: 0.0005}
  cart_abandonment: {offers: [coupon_5, comeback_5], idle_s: 1200}
  browse_abandonment: {offers: [comeback_5], min_views: 3, idle_s: 900, max_per_day: 1}
"""


def replay() -> list[dict]:
    taobao = [e | {"user_id": f"tb-{e['user_id']}", "item_id": f"tb-{e['item_id']}"}
              for e in read_events(TAOBAO, "taobao") if zlib.crc32(str(e["user_id"]).encode()) % TAOBAO_ONE_IN == 0]
    events = sorted(taobao, key=lambda e: parse_ts(e["ts"])) + list(read_events(REES46, "rees46", limit=N_REES46))
    return events + clock_tail(max(parse_ts(e["ts"]) for e in events) + 86_400_000, N_TAIL)


def test_every_trigger_decides_on_the_public_slices(engine_settings, start_worker, redis_client, tmp_path):
    cat_path = tmp_path / "catalogue.yaml"
    cat_path.write_text(CATALOGUE)
    s = engine_settings.model_copy(update={"catalogue_path": cat_path, "maintenance_interval_s": 1.0})
    events = replay()
    want = decided_in_memory(events, CATALOGUE)
    by_kind = Counter(k for k, _ in want)
    assert set(by_kind) == set(KINDS), f"the replay must arm every kind of trigger: {dict(by_kind)}"

    worker = start_worker(s)
    worker.wait_ready()
    report = asyncio.run(produce_events(s, events, progress=False))
    assert report["sent"] == len(events)
    last = max(parse_ts(e["ts"]) for e in events)
    prefix = s.redis_prefix
    wait_until(lambda: sum(1 for _ in redis_client.scan_iter(match=f"{prefix}:{{u:*}}:e:*", count=5000))
               == len(events), 180, "every event applied")
    # every timer due by the tail fired, and every timer-fired decision was seen delivered (its record dropped)
    wait_until(lambda: redis_client.zcount(f"{prefix}:open", "-inf", last - 86_400_000 + 3_600_000) == 0, 120,
               "the sweep to fire every timer of the replay")

    msgs = consume_all(s, s.topic_decisions, lambda ms: len(ms) >= len(want), timeout=120)
    schema = json.loads((ROOT / "stream" / "schemas" / "decision.v1.json").read_text())
    docs = [json.loads(m.value) for m in msgs]
    for d, m in zip(docs, msgs):
        jsonschema.validate(d, schema)
        assert m.key.decode() == d["user_id"]
    sent = Counter(d["trigger_event_id"] for d in docs)
    twice = [t for t, n in sent.items() if n > 1]
    assert not twice, (f"sent twice: {twice[:5]}: {[d for d in docs if d['trigger_event_id'] in twice[:2]]}\n"
                       f"{worker.log_tail()}")
    assert len({d["decision_id"] for d in docs}) == len(docs)
    got = {(d["trigger"], d["trigger_event_id"]) for d in docs}
    assert got == want, (f"{len(got - want)} decided only by the worker (e.g. {sorted(got - want)[:3]}), "
                         f"{len(want - got)} only in memory (e.g. {sorted(want - got)[:3]})")
    counts = Counter(d["trigger"] for d in docs)
    offers = {k: Counter(d["offer"]["offer_id"] for d in docs if d["trigger"] == k) for k in KINDS}
    print(f"\ndecisions by trigger on {len(events)} events: {dict(counts)}\noffers by trigger: "
          f"{ {k: dict(v) for k, v in offers.items()} }", file=sys.stderr)
    allowed = parse_catalogue(CATALOGUE).triggers
    for k in KINDS:
        if allowed[k].offers is not None:
            assert set(offers[k]) <= set(allowed[k].offers) | {"none"}, (k, offers[k])
    samples = wait_until(lambda: (ms := worker.metrics()) and all(
        metric(ms, "promo_trigger_decisions_total", trigger=k) == counts[k] for k in KINDS) and ms, 30,
        "promo_trigger_decisions_total per trigger to match the topic")
    assert metric(samples, "promo_decisions_total") == len(docs)
