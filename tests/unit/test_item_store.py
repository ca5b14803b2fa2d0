"""The item similarity store: one test mixin, run against the in-memory store and a real Redis.

Redis is the real redis-server of the session stack (``redis_url`` from ``tests/conftest.py``); every test gets
its own key prefix.
"""

from __future__ import annotations

import math
import random
import uuid

import pytest

from models.state.item_memory import MemoryItemStore
from models.state.item_redis import RedisItemStore
from models.state.item_store import HOUR_MS, ItemBatch, ItemStore, SimilarityConfig

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


class TestMemoryItemStore(ItemStoreContract):
    def make(self, config):
        return MemoryItemStore(config)


class TestRedisItemStore(ItemStoreContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_client):
        self.client = redis_client
        self.prefix = "tis" + uuid.uuid4().hex[:8]
        yield
        for key in redis_client.scan_iter(match=f"{self.prefix}*", count=1000):
            redis_client.delete(key)

    def make(self, config):
        return RedisItemStore(self.client, self.prefix, config)

    def test_one_pipeline_per_batch_and_cluster_ready_keys(self):
        s = self.make(cfg(max_items=1000))
        executes = []
        real = self.client.pipeline

        def counting_pipeline(*a, **kw):
            p = real(*a, **kw)
            orig = p.execute

            def execute(*ea, **ekw):
                executes.append(len(p.command_stack))
                return orig(*ea, **ekw)

            p.execute = execute
            return p

        self.client.pipeline = counting_pipeline
        try:
            s.apply(pair_batch(T0, [("a", "b", 1.0), ("b", "c", 1.0), ("a", "c", 1.0)]))
        finally:
            del self.client.pipeline
        assert len(executes) == 1, f"expected one pipeline round trip for the batch, got {executes}"
        keys = sorted(k.decode() for k in self.client.scan_iter(match=f"{self.prefix}*"))
        assert keys == sorted([f"{self.prefix}:sim:{{i:{x}}}" for x in "abc"] + [f"{self.prefix}:sim:{{i:{x}}}:nb" for x in "abc"]
                              + [f"{self.prefix}:sim:{{pop}}:z", f"{self.prefix}:sim:{{pop}}:t", f"{self.prefix}:sim:idx"])

    def test_matches_the_memory_store_on_random_batches(self):
        rng = random.Random(3)
        config = cfg(max_neighbours=3, max_items=12, max_popular=4, min_score=0.2)
        mem, red = MemoryItemStore(config), self.make(config)
        items = [f"i{k}" for k in range(15)]
        ts = T0
        for _ in range(30):
            ts += rng.choice([1, 60_000, HOUR_MS, 3 * HOUR_MS])
            pairs = []
            for _ in range(rng.randint(0, 6)):
                a, b = rng.sample(items, 2)
                pairs.append((min(a, b), max(a, b), rng.choice([0.5, 1.0, 3.0])))
            agg: dict = {}
            for a, b, w in pairs:
                agg[(a, b)] = agg.get((a, b), 0.0) + w
            touched = {x: float(rng.randint(1, 3)) for x in rng.sample(items, rng.randint(1, 5))}
            batch = ItemBatch(ts=ts, items=list(touched), item_inc=list(touched.values()),
                              pair_a=[k[0] for k in agg], pair_b=[k[1] for k in agg], pair_inc=list(agg.values()))
            mem.apply(batch)
            red.apply(batch)
        assert red.n_items() == mem.n_items()
        for got, want in ((red.neighbours(items, 5, ts), mem.neighbours(items, 5, ts)),
                          (red.popular(10, ts), mem.popular(10, ts))):
            assert repr(_r(got)) == repr(_r(want))

    def test_survives_a_script_flush(self):
        s = self.make(cfg())
        s.apply(pair_batch(T0, [("a", "b", 1.0)]))
        self.client.script_flush()  # what a Redis restart does to the script cache
        s.apply(pair_batch(T0, [("a", "b", 1.0)]))
        assert s.pair_count("a", "b", T0) == 2.0 and s.item_count("a", T0) == 2.0

    def test_pickles_as_a_reference_to_the_same_keys(self):
        import pickle

        s = self.make(cfg())
        s.apply(pair_batch(T0, [("a", "b", 1.0)]))
        copy = pickle.loads(pickle.dumps(s))
        assert copy.prefix == s.prefix and copy.pair_count("a", "b", T0) == 1.0


def _r(x):
    if isinstance(x, float):
        return float(f"{x:.9g}")
    if isinstance(x, (list, tuple)):
        return [_r(v) for v in x]
    if isinstance(x, dict):
        return {k: _r(v) for k, v in x.items()}
    return x


def test_config_is_validated():
    with pytest.raises(ValueError, match="caps"):
        SimilarityConfig(max_neighbours=0)
    with pytest.raises(ValueError, match="half-lives"):
        SimilarityConfig(half_life_ms=0)


def test_events_far_older_than_the_epoch_do_not_overflow():
    """A valid 2000-era event after 2019 data: popularity and similarity stay finite (no OverflowError)."""
    from models.state.item_memory import MemoryItemStore
    from models.state.item_store import ItemBatch

    store = MemoryItemStore()
    y2019, y2001 = 1_569_888_000_000, 978_307_200_000
    store.apply(ItemBatch(ts=y2019, items=["a", "b"], item_inc=[1.0, 1.0], pair_a=["a"], pair_b=["b"], pair_inc=[1.0]))
    store.apply(ItemBatch(ts=y2001, items=["a", "c"], item_inc=[1.0, 1.0], pair_a=["a"], pair_b=["c"], pair_inc=[1.0]))
    assert [i for i, _ in store.popular(3, y2001)][:1] in (["a"], ["b"])
    assert store.neighbours(["a"], k=5, now_ms=y2001)["a"]
