"""One valid event 23 h ahead of the stream closes no attribution window early (issue 11, point 4; acceptance 1).

The fault as measured: a device with a wrong clock sends one valid event 23 h ahead of the stream. The stream replays
2019 data, so the event is still in the past for the wall clock and ``PROMO_MAX_FUTURE_SKEW_S`` lets it through
(it is 23 h ahead of the stream, not of the wall clock). The next expiry sweep used to expire every open decision and
release every reservation; later purchases quoting those ``decision_id``s were neither attributed nor charged, and
a restarted worker took the outlier back from its snapshot.

Here, on the real embedded broker and Redis, a worker replays the REES46 slice (17,434 events, 2 h 50 min of event
time; 10 min attribution windows, every cart a decision with a budgeted coupon, maintenance every second so the
sweep runs all the time) at a steady pace. The outlier - a view by a user whose decision is open - comes in the
middle; purchases quoting open decisions come after it; the worker is killed (``kill -9``) after the outlier was in
its snapshot and the clock it published, and a new worker replays the rest, with more quoting purchases.

A poller reads the state all along: every decision found closed, or with its reservation released, must by then be
either past its window in stream time (the largest event time handed to the producer so far, outliers left out:
an upper bound of what the worker has seen) or closable by a purchase of its user handed so far. At the end: every
quoting purchase was attributed and charged, every open decision still holds its reservation, the windows that
ended 3 minutes of stream time before the end were closed, and no partition's published watermark is the
outlier's.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from datetime import datetime

import pytest
import redis

from models.decision import decision_id_for
from stream.sources import read_events
from tests.helpers import DATA, wait_until
from tests.integration.test_crash_safety import PacedProducer

pytestmark = pytest.mark.integration

REES46 = DATA / "rees46_multicategory" / "2019-Oct_first17k.csv"
CATALOGUE = """
version: 1
margin_rate: 0.25
caps: {max_offers_per_day: 1000, min_gap_s: 0}
offers:
  - offer_id: c1
    kind: coupon
    value: 1
    prior_uplift: 0.5
    eligibility: {min_cart_value: 1}
    budget: 1000000
"""
MIN = 60_000
WINDOW_MS = 10 * MIN
AHEAD_MS = 23 * 60 * MIN
PACE = 400.0  # events/s: about 4 min of event time per second, the sweep every second
COST_UNITS = 10_000  # a redeemed c1 charges 1, in the ledger's 1/10000 units


def ms(ts) -> int:
    return ts if isinstance(ts, int) else int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def named_purchase(k: int, cart: dict, ts: int) -> dict:
    return {"event_id": f"quoting-{k}", "type": "purchase", "user_id": cart["user_id"], "item_id": cart["item_id"],
            "ts": ts, "price": 100.0, "decision_id": decision_id_for(cart["event_id"])}


def purchases_of(events: list[dict], user: str, lo: int, hi: int) -> bool:
    return any(e["type"] == "purchase" and e["user_id"] == user and lo <= ms(e["ts"]) <= hi for e in events)


def quotable(events: list[dict], at: int, n: int, exclude: set) -> list[dict]:
    """``n`` carts before index ``at`` whose decision is still open at that point's stream time (its window has more
    than 2 minutes left and no purchase of the user closed it), one per user, worth 20 or more."""
    now = ms(events[at]["ts"])
    out, users = [], set(exclude)
    for e in reversed(events[:at]):
        t = ms(e["ts"])
        if now - t > WINDOW_MS - 2 * MIN:
            break
        if (e["type"] == "cart" and e["user_id"] not in users and now - t >= MIN and e["price"] >= 20
                # (the rules policy gives the coupon where it pays: carts worth a few times its value)
                and not purchases_of(events, e["user_id"], t, now)):
            out.append(e)
            users.add(e["user_id"])
            if len(out) == n:
                break
    assert len(out) == n, f"only {len(out)} open decisions to quote at index {at}"
    return out


def replay() -> tuple[list[dict], dict]:
    """The REES46 slice with the outlier in the middle and quoting purchases after it and after the restart."""
    events = list(read_events(REES46, "rees46"))
    mid, restart = len(events) // 2, len(events) * 3 // 4
    victim = quotable(events, mid, 1, set())[0]  # the device with a wrong clock belongs to a user with an open decision
    outlier = {"event_id": "clockless-1", "type": "view", "user_id": victim["user_id"], "item_id": victim["item_id"],
               "ts": ms(events[mid]["ts"]) + AHEAD_MS, "price": 20.0}
    first = [victim] + quotable(events, mid + 200, 4, {victim["user_id"]})
    second = quotable(events, restart + 200, 5, {c["user_id"] for c in first})
    quoting = [named_purchase(k, c, ms(events[mid + 200]["ts"])) for k, c in enumerate(first)]
    quoting += [named_purchase(5 + k, c, ms(events[restart + 200]["ts"])) for k, c in enumerate(second)]
    out = (events[:mid] + [outlier] + events[mid:mid + 200] + quoting[:5] + events[mid + 200:restart + 200]
           + quoting[5:] + events[restart + 200:])
    return out, {"outlier": outlier, "quoting": quoting, "restart": restart + 1 + 5}


class Decision:
    def __init__(self, cart: dict, events: list[dict]) -> None:
        self.id = decision_id_for(cart["event_id"])
        self.user, self.trigger = cart["user_id"], cart["event_id"]
        self.ts = ms(cart["ts"])
        self.expires = self.ts + WINDOW_MS
        # the index of the first purchase of the user that may close it: one quoting it (timed before the window's
        # end) or any inside the window
        self.closable_at = next(
            (i for i, e in enumerate(events) if e["type"] == "purchase" and e["user_id"] == self.user
             and ms(e["ts"]) < self.expires and (ms(e["ts"]) >= self.ts or e.get("decision_id") == self.id)),
            len(events))


class Poller(threading.Thread):
    """Reads decisions, open windows and the ledger all along; records what closed or was released too early."""

    def __init__(self, settings, events: list[dict], decisions: list[Decision], producer_at) -> None:
        super().__init__(daemon=True)
        self.p, self.events, self.decisions, self.producer_at = settings.redis_prefix, events, decisions, producer_at
        self.r = redis.Redis.from_url(settings.redis_url)
        # stream time after i events handed to the producer: the largest event time so far, outliers left out
        self.stream_ms, t = [], 0
        for e in events:
            self.stream_ms.append(t)
            if e["event_id"] != "clockless-1":
                t = max(t, ms(e["ts"]))
        self.stream_ms.append(t)
        self.closed: dict[str, int] = {}  # decision id -> events handed when it was first seen closed
        self.released: dict[str, int] = {}
        self.early: list[str] = []
        self.polls = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def state(self) -> tuple[set, dict, dict]:
        """(decisions stored, open decision ids, ledger) - decisions read first: a decision stored and not open in
        the profile read after it is closed (one commit writes both)."""
        pipe = self.r.pipeline(transaction=False)
        for d in self.decisions:
            pipe.exists(f"{self.p}:{{u:{d.user}}}:d:{d.trigger}")
        stored = {d.id for d, n in zip(self.decisions, pipe.execute()) if n}
        users = sorted({d.user for d in self.decisions})
        pipe = self.r.pipeline(transaction=False)
        for u in users:
            pipe.hget(f"{self.p}:{{u:{u}}}:p", "v")
        pipe.hgetall(f"{self.p}:{{b:c1}}:res")
        *profiles, ledger = pipe.execute()
        open_ = {o["decision_id"] for v in profiles if v for o in json.loads(v).get("open") or []}
        return stored, open_, {k.decode(): v.decode() for k, v in ledger.items()}

    def check(self) -> None:
        stored, open_, ledger = self.state()
        handed = self.producer_at()  # after the read: an upper bound of the events the worker had seen
        now = self.stream_ms[handed]
        for d in self.decisions:
            closed = d.id in stored and d.id not in open_
            released = ledger.get(d.id, "A")[0] == "S"
            for what, seen, found in (("closed", self.closed, closed), ("released", self.released, released)):
                if found and d.id not in seen:
                    seen[d.id] = handed
                    if d.expires > now and d.closable_at >= handed:
                        self.early.append(f"{d.id} ({d.user}) {what} with {(d.expires - now) / MIN:.1f} min of its "
                                          f"window left in stream time ({handed} events handed), before any purchase")
        self.polls += 1

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.check()
                time.sleep(0.2)  # polling period, not synchronisation
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        self.check()  # once more on the final state
        self.r.close()
        assert self.error is None, f"poller failed: {self.error!r}"


def markers(r, prefix: str) -> int:
    return sum(1 for _ in r.scan_iter(match=f"{prefix}:{{u:*}}:e:*", count=5000))


def test_one_event_23h_ahead_expires_no_open_decision_early_even_after_a_restart(
        engine_settings, start_worker, redis_client, tmp_path):
    cat = tmp_path / "offers.yaml"
    cat.write_text(CATALOGUE)
    s = engine_settings.model_copy(update={
        "catalogue_path": cat, "policy": "rules", "holdout_pct": 0.0, "decision_cooldown_s": 0,
        "attribution_window_s": WINDOW_MS // 1000, "maintenance_interval_s": 1.0, "snapshot_interval_s": 1.0,
        "session_timeout_s": 3.0, "rebalance_timeout_s": 3.0,  # the restarted worker takes over in seconds
    })
    events, plan = replay()
    outlier, quoting, restart = plan["outlier"], plan["quoting"], plan["restart"]
    decisions = [Decision(e, events) for e in events if e["type"] == "cart"]
    r, p = redis_client, s.redis_prefix
    producers: list[PacedProducer] = []

    def handed() -> int:
        return sum(pr.handed for pr in producers)

    poller = Poller(s, events, decisions, handed)
    worker = start_worker(s)
    worker.wait_ready()
    poller.start()

    def phase(lo: int, hi: int, what: str) -> None:
        producer = PacedProducer(s, events[lo:hi], PACE)
        producers.append(producer)
        producer.run()
        assert producer.error is None and producer.report["sent"] == hi - lo, (producer.error, producer.report)
        wait_until(lambda: markers(r, p) == hi, 120, f"{what}: every event applied")
        # the clock moves on: every window that ended 3 min of stream time before the last event is closed
        end = poller.stream_ms[hi]
        due = {d.id for d in decisions if d.expires <= end - 3 * MIN}
        wait_until(lambda: not due & poller.state()[1], 60, f"{what}: the sweep to close the windows that ended")
        assert poller.error is None and not poller.early, "\n".join(poller.early[:20])

    phase(0, restart, "before the restart")
    assert r.exists(f"{p}:{{u:{outlier['user_id']}}}:e:{outlier['event_id']}"), "the outlier must be accepted"
    # neither the learning snapshot's clock (its labels close by the engine's clock, not the largest event time,
    # which a restart used to take back) nor any partition's published watermark is the outlier's
    snapshot_mark = pickle.loads(r.get(f"{p}:models:snapshot"))["watermark"]
    marks = {k: int(v.split()[0]) for k, v in r.hgetall(f"{p}:clock").items()}
    assert marks and max([snapshot_mark, *marks.values()]) < outlier["ts"] - AHEAD_MS + 60 * MIN, (snapshot_mark, marks)

    worker.kill()  # kill -9: the next worker starts from the snapshot and the published clock
    worker = start_worker(s)
    worker.wait_ready()
    phase(restart, len(events), "after the restart")
    poller.finish()
    worker.stop()

    assert not poller.early, "decisions closed or released early:\n" + "\n".join(poller.early[:20])
    _, open_, ledger = poller.state()
    offers = {d.id: json.loads(js)["offer"]["offer_id"] for d in decisions
              if (js := r.hget(f"{p}:{{u:{d.user}}}:d:{d.trigger}", "json"))}
    assert len(offers) == len(decisions)
    # every purchase quoting an open decision was attributed and charged (the ledger settles a redemption's cost)
    for q in quoting:
        assert offers[q["decision_id"]] == "c1", q
        assert q["decision_id"] not in open_ and ledger.get(q["decision_id"]) == f"S{COST_UNITS}", (q, ledger.get(
            q["decision_id"]))
    # every decision still open holds its reservation
    held = [d for d in open_ if offers[d] == "c1"]
    assert held and all(ledger.get(d, "")[:1] == "A" for d in held), {d: ledger.get(d) for d in held}
    expired = {d.id for d in decisions if d.id in poller.closed and d.closable_at >= len(events)}
    must = {d.id for d in decisions if d.closable_at >= len(events) and d.expires <= poller.stream_ms[-1] - 3 * MIN}
    assert len(must) >= 30 and must <= expired, "the clock must expire the windows that ended without a purchase"
    marks = {k: int(v.split()[0]) for k, v in r.hgetall(f"{p}:clock").items()}
    assert max(marks.values()) < poller.stream_ms[-1] + 1 and min(marks.values()) > poller.stream_ms[-1] - 30 * MIN
    print(f"{len(decisions)} decisions, {len(expired)} expired by the clock, {len(poller.closed) - len(expired)} "
          f"closed by purchases, {len(open_)} open at the end; {poller.polls} polls; clock {marks}")


def test_published_watermarks_only_rise_and_every_workers_come_back(redis_url):
    """``RedisStore.sync_clock``: one Lua call keeps the larger watermark and wall time per partition (a worker that
    lost a partition in a rebalance cannot move it back) and returns every worker's entries."""
    import asyncio
    import uuid

    import redis.asyncio as aioredis

    from models.state.engine_redis import RedisStore

    async def go():
        store = RedisStore(aioredis.Redis.from_url(redis_url), prefix="t" + uuid.uuid4().hex[:8])
        try:
            assert await store.sync_clock({"0": [1_000, 50], "1": [2_000, 60]}) == {"0": [1_000, 50], "1": [2_000, 60]}
            # another worker: partition 1 behind (it lost it), partition 2 its own
            got = await store.sync_clock({"1": [1_500, 70], "2": [3_000, 80]})
            assert got == {"0": [1_000, 50], "1": [2_000, 70], "2": [3_000, 80]}
            assert await store.sync_clock({}) == got  # reading only
            await store.r.delete(store.clock_key)
        finally:
            await store.close()

    asyncio.run(go())
