"""The item store contract over the in-memory store and Redis (the session's real redis-server, a key prefix per
test), plus what only the Redis store must show: one pipeline per batch, Cluster-ready keys, the same answers as
the in-memory store on random batches."""

from __future__ import annotations

import random
import uuid

import pytest

from models.state.item_memory import MemoryItemStore
from models.state.item_redis import RedisItemStore
from models.state.item_store import HOUR_MS, ItemBatch
from tests.contracts.mixins import T0, ItemStoreContract, cfg, pair_batch


class TestMemoryItemStore(ItemStoreContract):
    def make(self, config):
        return MemoryItemStore(config)


@pytest.mark.integration
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
