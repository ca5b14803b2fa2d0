"""What the item store's configuration and arithmetic must do whatever the store (the contract over every store
is in tests/contracts/)."""

from __future__ import annotations

import pytest

from models.state.item_memory import MemoryItemStore
from models.state.item_store import ItemBatch, SimilarityConfig


def test_config_is_validated():
    with pytest.raises(ValueError, match="caps"):
        SimilarityConfig(max_neighbours=0)
    with pytest.raises(ValueError, match="half-lives"):
        SimilarityConfig(half_life_ms=0)


def test_events_far_older_than_the_epoch_do_not_overflow():
    """A valid 2000-era event after 2019 data: popularity and similarity stay finite (no OverflowError)."""
    store = MemoryItemStore()
    y2019, y2001 = 1_569_888_000_000, 978_307_200_000
    store.apply(ItemBatch(ts=y2019, items=["a", "b"], item_inc=[1.0, 1.0], pair_a=["a"], pair_b=["b"], pair_inc=[1.0]))
    store.apply(ItemBatch(ts=y2001, items=["a", "c"], item_inc=[1.0, 1.0], pair_a=["a"], pair_b=["c"], pair_inc=[1.0]))
    assert [i for i, _ in store.popular(3, y2001)][:1] in (["a"], ["b"])
    assert store.neighbours(["a"], k=5, now_ms=y2001)["a"]


def test_the_workers_item_store_client_has_timeouts():
    """The worker reads the item store synchronously for each decision: a hung Redis must raise (a transient
    error, retried with /readyz 503), not block the worker for ever."""
    from models.state.item_redis import RedisItemStore

    kw = RedisItemStore.from_url("redis://127.0.0.1:1/0").r.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == 5.0 and kw["socket_connect_timeout"] == 2.0
