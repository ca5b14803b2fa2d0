"""One contract per state interface, run over every implementation (Arroyo's ``tests/backends/mixins.py``).

* :class:`EngineStoreContract` - :class:`models.state.engine_store.EngineStore`;
* :class:`ItemStoreContract` - :class:`models.state.item_store.ItemStore`;
* :class:`BudgetStoreContract` - :class:`models.state.budget_store.BudgetStore`.

Each ``test_*_stores.py`` module beside this one runs a mixin over the in-memory implementation and the Redis one
(on the session's real redis-server); ``test_coverage.py`` fails when an implementation has no contract run.
Policies and learning models pass the checks of :mod:`models.checks` (``test_estimators.py``).
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from models.state.budget_store import ReserveRequest
from models.state.engine_store import UserCommit
from models.state.item_store import HOUR_MS, ItemBatch, ItemStore, SimilarityConfig


def run(coro):
    return asyncio.run(coro)


# --- the engine store ------------------------------------------------------------------------------------------
class EngineStoreContract:
    """Subclasses provide ``make_store()`` returning a fresh, empty store."""

    def make_store(self):
        raise NotImplementedError

    def test_empty_user_loads_empty(self):
        store = self.make_store()
        load = run(store.load({"nobody": ["e1"]}, {"nobody": ["e1"]}))["nobody"]
        assert load.profile == {} and load.seen == set() and load.stored == {}

    def test_commit_then_load_round_trip(self):
        store = self.make_store()
        c = UserCommit("u1", {"a": "1", "b": "x"}, ["e1", "e2"], [("e2", b'{"d":1}')])
        assert run(store.commit([c])) == [True]
        load = run(store.load({"u1": ["e1", "e2", "e3"]}, {"u1": ["e2", "e3"]}))["u1"]
        assert {k.decode() if isinstance(k, bytes) else k: (v.decode() if isinstance(v, bytes) else v)
                for k, v in load.profile.items()} == {"a": "1", "b": "x"}
        assert load.seen == {"e1", "e2"}
        assert load.stored == {"e2": (b'{"d":1}', False)}

    def test_contexts_and_ledger_travel_with_the_commit_and_the_ledger_keeps_the_last(self):
        store = self.make_store()
        c = UserCommit("u1", {"n": "1"}, ["e1", "e2"], [("e1", b'{"d":1}'), ("e2", b'{"d":2}')],
                       contexts={"e1": '{"cart_value":5}'}, ledger=[f'{{"i":{i}}}' for i in range(3)])
        assert run(store.commit([c])) == [True]
        assert run(store.decision_context("u1", "e1")) == '{"cart_value":5}'
        assert run(store.decision_context("u1", "e2")) is None and run(store.decision_context("u2", "e1")) is None
        more = UserCommit("u1", {"n": "2"}, ["e3"], [], version="1", ledger=[f'{{"i":{i}}}' for i in range(3, 60)])
        assert run(store.commit([more])) == [True]
        kept = run(store.ledger("u1"))
        assert kept == [f'{{"i":{i}}}' for i in range(10, 60)]  # the last 50, oldest first
        assert run(store.ledger("u1", 2)) == ['{"i":58}', '{"i":59}'] and run(store.ledger("u2")) == []
        refused = UserCommit("u1", {"n": "3"}, ["e1"], [], version="2", ledger=['{"i":"never"}'])
        assert run(store.commit([refused])) == [False] and run(store.ledger("u1", 1)) == ['{"i":59}']

    def test_every_plan_after_the_first_takes_a_fresh_copy_of_the_stored_profile(self):
        store = self.make_store()
        stored = {"counts": {"cart": 1}, "cart": {"i1": [1, 50.0, None]}}
        assert run(store.commit([UserCommit("u1", stored, ["e1"], [])])) == [True]
        load = run(store.load({"u1": ["e2"]}, {}))["u1"]
        first = load.take_profile()
        assert first == stored
        first["counts"]["cart"] += 1  # a plan folds an add-to-cart in place
        first["cart"]["i1"][0] += 1
        again = load.take_profile()
        assert again == stored and again is not first
        assert run(store.load({"u1": []}, {}))["u1"].take_profile() == stored  # nothing written back
        assert run(store.load({"nobody": []}, {}))["nobody"].take_profile() == {}

    def test_load_tells_which_events_each_user_has_seen_all_some_or_none(self):
        store = self.make_store()
        commits = [UserCommit("all", {"n": "1"}, ["a1", "a2"], []), UserCommit("some", {"n": "1"}, ["s1"], [])]
        assert run(store.commit(commits)) == [True, True]
        loads = run(store.load({"all": ["a1", "a2", "a1"], "some": ["s0", "s1", "s2"], "none": ["n1"], "empty": []},
                               {}))
        assert {u: ld.seen for u, ld in loads.items()} == {"all": {"a1", "a2"}, "some": {"s1"}, "none": set(),
                                                           "empty": set()}

    def test_commit_is_refused_whole_when_any_marker_exists(self):
        store = self.make_store()
        assert run(store.commit([UserCommit("u1", {"n": "1"}, ["e1"], [])])) == [True]
        again = UserCommit("u1", {"n": "2"}, ["e2", "e1"], [("e2", b"{}")])
        assert run(store.commit([again])) == [False]
        load = run(store.load({"u1": ["e1", "e2"]}, {"u1": ["e2"]}))["u1"]
        assert load.seen == {"e1"} and load.stored == {}
        assert {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in load.profile.items()} == {"n": "1"}

    def test_users_are_independent_in_one_commit_call(self):
        store = self.make_store()
        run(store.commit([UserCommit("u1", {"n": "1"}, ["e1"], [])]))
        res = run(store.commit([UserCommit("u1", {"n": "2"}, ["e1"], []), UserCommit("u2", {"n": "1"}, ["e1"], [])]))
        assert res == [False, True]

    def test_mark_sent(self):
        store = self.make_store()
        run(store.commit([UserCommit("u1", {}, ["e1"], [("e1", b"{}")])]))
        run(store.mark_sent([("u1", "e1"), ("u1", "unknown"), ("u9", "e1")]))  # no such decisions: none created
        assert run(store.load({"u1": []}, {"u1": ["e1", "unknown"]}))["u1"].stored == {"e1": (b"{}", True)}
        assert run(store.load({"u9": []}, {"u9": ["e1"]}))["u9"].stored == {}

    def test_ping(self):
        assert run(self.make_store().ping()) is True

    def test_reindex_and_due_users(self):
        store = self.make_store()
        run(store.commit([UserCommit("u1", {}, ["e1"], [], open_until=100, had_open=False)]))
        run(store.commit([UserCommit("u2", {}, ["e1"], [], open_until=300, had_open=False)]))
        assert run(store.due_users(200)) == ["u1"]
        run(store.reindex([("u1", None, "1"), ("u2", 150, "1")]))
        assert run(store.due_users(200)) == ["u2"]
        # a correction computed from an older profile version is skipped: the newer commit wrote the index
        run(store.commit([UserCommit("u1", {}, ["e2"], [], version="1", open_until=120, had_open=False)]))
        run(store.reindex([("u1", None, "1")]))
        assert run(store.due_users(200)) == ["u1", "u2"]
        run(store.reindex([("u1", None, "2")]))
        assert run(store.due_users(200)) == ["u2"]
        run(store.commit([UserCommit("u2", {"n": "1"}, ["e2"], [], version="1", had_open=True)]))
        assert run(store.due_users(10**9)) == []

    def test_policy_updates_ride_on_the_commit_and_only_on_a_successful_one(self):
        store = self.make_store()
        f = '["c5",[3]]'
        first = UserCommit("u1", {}, ["e1"], [], policy=[(f, 2.0, 1.0, 0.0, 0.25)])
        assert run(store.commit([first])) == [True]
        # the prior is written once (the first commit), increments add up, ``n`` counts outcomes
        closing = UserCommit("u1", {}, ["e2"], [], version="1", policy=[(f, 9.0, 9.0, 1.0, 0.0)],
                             counts={"n": 1, "closed:treatment": 1})
        refused = UserCommit("u1", {}, ["e3"], [], version="0", policy=[(f, 9.0, 9.0, 1.0, 1.0)], counts={"n": 1})
        assert run(store.commit([closing, refused])) == [True, False]
        state = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in run(store.policy_state()).items()}
        assert state == {"a:" + f: 3.0, "b:" + f: 1.25, "n": 1.0, "closed:treatment": 1.0}

    def test_a_commit_token_is_read_back_with_the_profile(self):
        """A writer whose commit pipeline failed as a whole recognises its own commit by the token."""
        store = self.make_store()
        assert run(store.commit([UserCommit("u1", {"n": 1}, ["e1"], [], token="w1:7")])) == [True]
        assert run(store.load({"u1": []}, {}))["u1"].token == "w1:7"

    def test_the_clock_keeps_the_largest_entry_per_partition(self):
        store = self.make_store()
        assert run(store.sync_clock({})) == {}
        run(store.sync_clock({"0": [100, 5], "1": [50, 9]}))
        assert run(store.sync_clock({"0": [80, 7]})) == {"0": [100, 7], "1": [50, 9]}

    def test_a_store_without_parked_contributions_applies_none(self):
        store = self.make_store()
        if store.applies_contributions:
            return  # tested with the item store it applies to (tests/integration/test_item_contributions.py)
        assert run(store.apply_contributions([])) == 0 and run(store.apply_parked()) == 0



# --- the item store --------------------------------------------------------------------------------------------
T0 = 1_700_000_000_000
HL = 10 * HOUR_MS


def cfg(**kw) -> SimilarityConfig:
    base = dict(max_neighbours=4, max_items=100, half_life_ms=HL, rescale_after_ms=HOUR_MS, min_score=0.05,
                pop_half_life_ms=HL, max_popular=5)
    base.update(kw)
    return SimilarityConfig(**base)


def pair_batch(ts, pairs, items=None) -> ItemBatch:
    """A batch of pairs ``[(a, b, inc)]``; item increments default to 1 per item appearing in a pair."""
    if items is None:
        items = {}
        for a, b, _ in pairs:
            items[a] = items.get(a, 0.0) + 1.0
            items[b] = items.get(b, 0.0) + 1.0
    return ItemBatch(ts=ts, items=list(items), item_inc=list(items.values()),
                     pair_a=[p[0] for p in pairs], pair_b=[p[1] for p in pairs], pair_inc=[p[2] for p in pairs])


class ItemStoreContract:
    """Behaviour every :class:`ItemStore` implementation must have."""

    def make(self, config: SimilarityConfig) -> ItemStore:
        raise NotImplementedError

    def test_empty_store(self):
        s = self.make(cfg())
        assert s.n_items() == 0
        assert s.neighbours(["a"], 5, T0) == {"a": []}
        assert s.popular(5, T0) == []
        assert s.item_count("a", T0) == 0.0
        assert s.pair_count("a", "b", T0) == 0.0

    def test_pairs_are_symmetric_and_cosine_normalised(self):
        s = self.make(cfg())
        s.apply(pair_batch(T0, [("a", "b", 2.0), ("a", "c", 1.0)], items={"a": 4.0, "b": 1.0, "c": 4.0}))
        assert s.pair_count("a", "b", T0) == s.pair_count("b", "a", T0) == 2.0
        nb = s.neighbours(["a", "b"], 5, T0)
        assert [x for x, _ in nb["a"]] == ["b", "c"]
        assert nb["a"][0][1] == pytest.approx(2.0 / math.sqrt(4.0 * 1.0))
        assert nb["a"][1][1] == pytest.approx(1.0 / math.sqrt(4.0 * 4.0))
        assert nb["b"] == [("a", pytest.approx(1.0))]

    def test_counts_decay_with_the_half_life(self):
        s = self.make(cfg())
        s.apply(pair_batch(T0, [("a", "b", 2.0)]))
        assert s.item_count("a", T0 + HL) == pytest.approx(0.5)
        assert s.pair_count("a", "b", T0 + 2 * HL) == pytest.approx(0.5)
        # an increment later adds at full weight; older mass has decayed
        s.apply(pair_batch(T0 + HL // 2, [("a", "b", 1.0)]))
        assert s.pair_count("a", "b", T0 + HL // 2) == pytest.approx(2.0 * 2 ** -0.5 + 1.0)

    def test_rescaling_keeps_values_and_prunes_faded_pairs(self):
        s = self.make(cfg(min_score=0.3))
        s.apply(pair_batch(T0, [("a", "b", 1.0), ("a", "c", 4.0)]))
        later = T0 + 3 * HL  # factor 1/8: a-b falls to 0.125 < 0.3 and is pruned, a-c to 0.5 stays
        s.apply(pair_batch(later, [("a", "d", 1.0)]))
        assert s.pair_count("a", "b", later) == 0.0
        assert s.pair_count("a", "c", later) == pytest.approx(0.5)
        assert s.item_count("a", later) == pytest.approx(2 / 8 + 1.0)
        assert [x for x, _ in s.neighbours(["a"], 5, later)["a"]] == ["c", "d"]

    def test_neighbour_cap_keeps_the_largest_and_drops_smallest_ids_on_ties(self):
        s = self.make(cfg(max_neighbours=2))
        s.apply(pair_batch(T0, [("a", "b", 1.0), ("a", "c", 1.0), ("a", "d", 3.0), ("a", "e", 1.0)]))
        kept = sorted(b for b, _ in s.neighbours(["a"], 10, T0)["a"])
        assert kept == ["d", "e"]  # b, c (smaller ids among the tied 1.0) dropped, as a Redis sorted set does

    def test_item_cap_deletes_the_oldest_items(self):
        s = self.make(cfg(max_items=3))
        for k, it in enumerate(["a", "b", "c", "d", "e"]):
            s.apply(ItemBatch(ts=T0 + k, items=[it], item_inc=[1.0]))
        assert s.n_items() == 3
        assert s.item_count("a", T0 + 5) == 0.0 and s.item_count("b", T0 + 5) == 0.0
        assert s.item_count("e", T0 + 5) > 0

    def test_memory_cap_lowers_the_item_and_popularity_caps(self):
        base = cfg(max_items=1000, max_popular=1000)
        budget = 10 * base.bytes_per_item()
        c = cfg(max_items=1000, max_popular=1000, memory_cap_bytes=budget)
        assert c.popular_cap() == int(0.1 * budget / 200) < 1000
        assert c.item_cap() == (budget - 2 * c.popular_cap() * 100) // base.bytes_per_item() < 10
        s = self.make(c)
        s.apply(ItemBatch(ts=T0, items=[f"i{k}" for k in range(100)], item_inc=[1.0 + k for k in range(100)]))
        assert s.n_items() == c.item_cap()
        assert len(s.popular(1000, T0)) == c.popular_cap()

    def test_neighbours_of_deleted_items_are_skipped(self):
        s = self.make(cfg(max_items=2))
        s.apply(pair_batch(T0, [("a", "b", 1.0)]))
        s.apply(ItemBatch(ts=T0 + 1, items=["c"], item_inc=[1.0]))  # deletes a (oldest, smallest id)
        assert s.neighbours(["b"], 5, T0 + 1) == {"b": []}

    def test_popularity_is_recency_weighted_and_trimmed(self):
        s = self.make(cfg(max_popular=2))
        s.apply(ItemBatch(ts=T0, items=["old"], item_inc=[3.0]))
        s.apply(ItemBatch(ts=T0 + 2 * HL, items=["new", "x"], item_inc=[1.0, 0.5]))
        top = s.popular(3, T0 + 2 * HL)
        assert [i for i, _ in top] == ["new", "old", "x"]
        assert top[1][1] == pytest.approx(3.0 / 4)
        s.apply(ItemBatch(ts=T0 + 2 * HL, items=["y", "z"], item_inc=[0.1, 0.2]))  # 5 items > 2 * 2: trim to 2
        assert [i for i, _ in s.popular(10, T0 + 2 * HL)] == ["new", "old"]

    def test_batches_are_additive(self):
        pairs = [("a", "b", 1.0), ("b", "c", 2.0), ("a", "c", 0.5)]
        one, two = self.make(cfg()), self.make(cfg())
        one.apply(pair_batch(T0, pairs + pairs))
        two.apply(pair_batch(T0, pairs))
        two.apply(pair_batch(T0, pairs))
        assert one.neighbours(["a", "b", "c"], 5, T0) == two.neighbours(["a", "b", "c"], 5, T0)
        assert one.popular(5, T0) == two.popular(5, T0)

    def test_clear(self):
        s = self.make(cfg())
        s.apply(pair_batch(T0, [("a", "b", 1.0)]))
        s.clear()
        assert s.n_items() == 0 and s.popular(5, T0) == [] and s.neighbours(["a"], 3, T0) == {"a": []}

    def test_prefetched_reads_answer_as_the_store_without_reading_it_again(self):
        rng = random.Random(7)
        s = self.make(cfg(max_items=40, max_neighbours=6))  # the caps delete items some neighbours point to
        items = [f"i{k}" for k in range(60)]
        for b in range(6):
            pairs = [(rng.choice(items), rng.choice(items), rng.choice([0.5, 1.0, 2.0])) for _ in range(40)]
            s.apply(pair_batch(T0 + b * HL // 4, [(a, c, w) for a, c, w in pairs if a != c]))
        now = T0 + 2 * HL
        seeds = rng.sample(items, 12) + ["never-seen"]

        async def fetch():
            try:
                return await s.prefetch(seeds, 5, popular_k=8)
            finally:
                client = getattr(s, "_aclient", None)  # the Redis store's asyncio client belongs to this loop
                if client is not None:
                    await client.aclose()

        reads = run(fetch())
        for some in (seeds, seeds[:3], seeds[5:] + seeds[:1]):
            for k in (5, 2):
                assert reads.neighbours(some, k, now) == s.neighbours(some, k, now)
        for k in (8, 3, 1):
            assert reads.popular(k, now) == s.popular(k, now)
        assert reads.misses == 0
        assert reads.neighbours(["i59", "i58"], 9, now) == s.neighbours(["i59", "i58"], 9, now)  # not fetched
        assert reads.misses >= 1, "a read it was not given goes to the store, counted"


# --- the budget store ------------------------------------------------------------------------------------------
def req(did: str, amount: float = 5.0, budget: float = 20.0, offer: str = "c", open_until: int = 1000,
        forget_at: int = 10_000) -> ReserveRequest:
    return ReserveRequest(offer, did, amount, budget, open_until, forget_at)


class BudgetStoreContract:
    """Behaviour every BudgetStore implementation must have. Subclasses provide ``store`` (a fixture)."""

    def run(self, coro):
        return asyncio.run(coro)

    def test_reserve_until_budget_then_refuse(self, store):
        res = self.run(store.reserve([req(f"d{i}") for i in range(6)]))
        assert [r.ok for r in res] == [True] * 4 + [False] * 2
        assert [r.spent for r in res] == [5.0, 10.0, 15.0, 20.0, 20.0, 20.0]
        sp = self.run(store.spend(["c", "other"]))
        assert (sp["c"].spent, sp["c"].reserved, sp["c"].committed, sp["c"].n) == (20.0, 20.0, 0.0, 4)
        assert sp["other"].spent == 0.0 and sp["other"].n == 0

    def test_idempotent_per_decision(self, store):
        a = self.run(store.reserve([req("d1"), req("d1"), req("d1")]))
        assert [r.ok for r in a] == [True] * 3 and self.run(store.spend(["c"]))["c"].spent == 5.0
        # a refused decision stays refused even if budget frees up later (same answer on redelivery)
        self.run(store.reserve([req(f"x{i}") for i in range(3)]))
        assert self.run(store.reserve([req("late")]))[0].ok is False
        self.run(store.settle([("c", "x0", 0.0)]))
        assert self.run(store.reserve([req("late")]))[0].ok is False
        assert self.run(store.reserve([req("new")]))[0].ok is True

    def test_settle_charges_at_most_the_reservation_once(self, store):
        self.run(store.reserve([req("a"), req("b"), req("c2")]))
        out = self.run(store.settle([("c", "a", 2.5), ("c", "a", 2.5), ("c", "b", 99.0), ("c", "zz", 1.0),
                                     ("c", "c2", -3.0)]))
        assert out == [2.5, None, 5.0, None, 0.0]
        sp = self.run(store.spend(["c"]))["c"]
        assert (sp.spent, sp.reserved, sp.committed) == (7.5, 0.0, 7.5)
        # freed budget can be reserved again
        assert [r.ok for r in self.run(store.reserve([req(f"n{i}") for i in range(3)]))] == [True, True, False]

    def test_settle_answers_in_order_over_campaigns_and_large_batches(self, store):
        """A batch's settlements mix campaigns and can be many (the Redis store makes one call per campaign and
        chunk): each answer stays at its item's place."""
        ids = [f"m{i}" for i in range(1_200)]
        self.run(store.reserve([req(d, amount=1.0, budget=10_000.0, offer="c" if i % 2 else "d")
                                for i, d in enumerate(ids)]))
        items = [("c" if i % 2 else "d", d, 0.5 if i % 3 else 0.0) for i, d in enumerate(ids)]
        items.insert(7, ("c", "never-reserved", 1.0))
        out = self.run(store.settle(items + [("d", "m0", 1.0)]))  # m0 again: settled already, earlier in the call
        assert out == [None if d == "never-reserved" else cost for _, d, cost in items] + [None]
        sp = self.run(store.spend(["c", "d"]))
        assert sp["c"].reserved == sp["d"].reserved == 0.0
        assert sp["c"].committed + sp["d"].committed == sum(c for _, d, c in items if d != "never-reserved")

    def test_sweep_releases_lapsed_reservations_and_forgets_old_ids(self, store):
        self.run(store.reserve([req("early", open_until=100, forget_at=500), req("later", open_until=900)]))
        assert self.run(store.sweep(["c"], 99)) == {"c": 0}
        assert self.run(store.sweep(["c"], 100)) == {"c": 1}
        sp = self.run(store.spend(["c"]))["c"]
        assert (sp.spent, sp.reserved, sp.committed) == (5.0, 5.0, 0.0)
        assert self.run(store.settle([("c", "early", 1.0)])) == [None]  # already released
        assert self.run(store.settle([("c", "later", 1.0)])) == [1.0]
        self.run(store.sweep(["c"], 600))  # "early" forgotten: its id could be reserved anew
        assert self.run(store.reserve([req("early", open_until=700)]))[0].ok is True

    def test_fractional_amounts_do_not_drift(self, store):
        reqs = [req(f"f{i}", amount=0.1, budget=1.0) for i in range(12)]
        res = self.run(store.reserve(reqs))
        assert sum(r.ok for r in res) == 10
        assert self.run(store.spend(["c"]))["c"].spent == pytest.approx(1.0, abs=1e-9)

    def test_random_sequences_never_exceed_budget(self, store):
        rnd = random.Random(3)
        budget = 50.0
        open_ids = []
        for step in range(300):
            if open_ids and rnd.random() < 0.4:
                did = open_ids.pop(rnd.randrange(len(open_ids)))
                self.run(store.settle([("c", did, rnd.uniform(0, 8))]))
            else:
                did = f"r{step}"
                r = self.run(store.reserve([req(did, amount=rnd.uniform(0.5, 7.0), budget=budget)]))[0]
                if r.ok:
                    open_ids.append(did)
            sp = self.run(store.spend(["c"]))["c"]
            assert sp.spent <= budget + 1e-9
            assert sp.spent == pytest.approx(sp.reserved + sp.committed, abs=1e-6)
