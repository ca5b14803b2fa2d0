"""Item similarity state: decayed item counts, neighbour counts, and recency-weighted popularity.

One interface, :class:`ItemStore`, two implementations with the same semantics (``tests/unit/test_item_store.py``
runs one test mixin against both): :class:`MemoryItemStore` (offline evaluation, benchmarks, tests) and
:class:`RedisItemStore` (the worker).

Semantics of :meth:`ItemStore.apply` (one call per batch, an :class:`ItemBatch` of already aggregated
increments, all at the batch time ``ts``):

* every item has a count ``n`` and a neighbour map ``{other item: pair count}``, both stored relative to the
  item's own epoch ``t``: the value at time ``now`` is ``stored * 2**(-(now - t) / half_life_ms)``. An increment
  at ``ts`` is added as ``inc * 2**((ts - t) / half_life_ms)``; when ``ts - t`` exceeds ``rescale_after_ms``
  the item is rescaled to ``t = ts`` first, and neighbours whose pair count fell below ``min_score`` are
  dropped (old counts decay away);
* each pair ``(a, b)`` increments both ``a``'s and ``b``'s neighbour maps; a map keeps its
  ``max_neighbours`` largest entries (ties: the smallest member ids are dropped first, as Redis sorted sets do);
* popularity is a forward-decayed score (half-life ``pop_half_life_ms``) per item over one global epoch; it
  is trimmed back to the :meth:`SimilarityConfig.popular_cap` best items when it holds twice as many
  (amortised);
* an index of items by last update time bounds the number of items to :meth:`SimilarityConfig.item_cap`
  (the oldest items are deleted). With ``memory_cap_bytes`` set, both caps derive from size estimates
  (popularity gets 10 % of the budget, items the rest), so the similarity state stays under the configured
  memory.

Similarity is cosine-style: ``pair(a, b) / sqrt(n(a) * n(b))`` with all three decayed to the same time.

Two writers, one layout. :meth:`ItemStore.apply` takes a batch's aggregated increments at the batch time (offline
evaluation, benchmarks, an engine without Redis state). The live worker does not call it: each user's commit
parks the user's own increments at their event times, on epochs of a fixed grid (:mod:`models.learning.contrib`), and a
script of :class:`models.state.engine_redis.RedisStore` applies them once, keeping a per-user record that
:meth:`RedisItemStore.forget_user` subtracts in bounded steps (at most ``FORGET_CHUNK_FIELDS`` record fields per
Lua call, each step idempotent); the item cap is then kept by :meth:`RedisItemStore.enforce_item_cap` from the
worker's maintenance timer. Reads are the same for both.

Redis layout (one hash tag per item, ``{i:<item>}``; :meth:`RedisItemStore.apply` sends ONE pipeline with one
Lua call per touched item, one for popularity and one ``ZADD`` to the index)::

    <prefix>:sim:{i:<item>}      hash: n (count), t (epoch ms)
    <prefix>:sim:{i:<item>}:nb   sorted set: neighbour -> pair count (listpack-encoded while <= 128 entries)
    <prefix>:sim:{pop}:z         sorted set: item -> forward-decayed popularity
    <prefix>:sim:{pop}:t         string: popularity epoch ms
    <prefix>:sim:idx             sorted set: item -> last update ms (the item cap)

Examples
--------
>>> from models.state.item_memory import MemoryItemStore
>>> store = MemoryItemStore()
>>> store.apply(ItemBatch(ts=0, items=["a", "b", "c"], item_inc=[2.0, 2.0, 1.0],
...                       pair_a=["a"], pair_b=["b"], pair_inc=[2.0]))
>>> store.neighbours(["a"], k=5, now_ms=0)
{'a': [('b', 1.0)]}
>>> [i for i, _ in store.popular(2, now_ms=0)]
['b', 'a']
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.state.item_reads import PrefetchedItems


def _pow2(x: float) -> float:
    """``2 ** x`` that saturates instead of raising ``OverflowError`` (an event dated hundreds of half-lives
    before an item's epoch is valid input; its weight relative to the epoch is simply huge or tiny).

    >>> _pow2(1.0), _pow2(5000.0) == 2.0 ** 1023, _pow2(-5000.0)
    (2.0, True, 0.0)
    """
    return 2.0 ** min(x, 1023.0)


HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_POP_RESCALE_HALF_LIVES = 40.0  # forward-decay exponent at which popularity is renormalised


@dataclass(frozen=True)
class SimilarityConfig:
    """Bounds and decay of the similarity state (see the module docstring)."""

    max_neighbours: int = 50
    max_items: int = 500_000
    half_life_ms: int = 7 * DAY_MS
    rescale_after_ms: int = HOUR_MS
    min_score: float = 0.05
    pop_half_life_ms: int = 6 * HOUR_MS
    max_popular: int = 10_000
    memory_cap_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_neighbours < 1 or self.max_items < 1 or self.max_popular < 1:
            raise ValueError(f"SimilarityConfig caps must be >= 1, got {self}")
        if self.half_life_ms <= 0 or self.pop_half_life_ms <= 0 or self.rescale_after_ms < 0:
            raise ValueError(f"SimilarityConfig half-lives must be > 0, got {self}")

    def bytes_per_item(self, id_len: int = 12) -> int:
        """Upper estimate of the Redis memory of one item at full neighbour cap (listpack encodings,
        ``id_len``-byte ids): two keys with their overhead, the count hash, the neighbour set, the index entry."""
        per_neighbour = id_len + 24 + 4  # member + score as text + entry headers
        return 2 * (90 + id_len + 16) + 96 + self.max_neighbours * per_neighbour + 2 * (id_len + 40)

    POPULAR_ENTRY_BYTES = 100  # one member of a large (skiplist-encoded) sorted set, id included
    POPULAR_SHARE = 0.1  # share of memory_cap_bytes kept for popularity

    def popular_cap(self) -> int:
        """Effective ``max_popular``: lowered so popularity (up to twice this many members between trims)
        takes at most :attr:`POPULAR_SHARE` of ``memory_cap_bytes``."""
        if self.memory_cap_bytes is None:
            return self.max_popular
        fit = int(self.POPULAR_SHARE * self.memory_cap_bytes / (2 * self.POPULAR_ENTRY_BYTES))
        return max(1, min(self.max_popular, fit))

    def item_cap(self, id_len: int = 12) -> int:
        """Effective maximum number of items: ``max_items``, lowered to fit ``memory_cap_bytes`` (after the
        popularity share) if set."""
        if self.memory_cap_bytes is None:
            return self.max_items
        rest = self.memory_cap_bytes - 2 * self.popular_cap() * self.POPULAR_ENTRY_BYTES
        return max(1, min(self.max_items, int(rest // self.bytes_per_item(id_len))))


@dataclass
class ItemBatch:
    """Aggregated increments of one batch: item weights and canonical pairs (each pair once)."""

    ts: int
    items: list[str] = field(default_factory=list)
    item_inc: list[float] = field(default_factory=list)
    pair_a: list[str] = field(default_factory=list)
    pair_b: list[str] = field(default_factory=list)
    pair_inc: list[float] = field(default_factory=list)

    def per_item(self) -> dict[str, tuple[float, dict[str, float]]]:
        """``{item: (count increment, {neighbour: pair increment})}`` over every touched item."""
        out: dict[str, tuple[float, dict[str, float]]] = {}
        for it, w in zip(self.items, self.item_inc):
            if w > 0:
                out[it] = (float(w), {})
        for a, b, w in zip(self.pair_a, self.pair_b, self.pair_inc):
            if w <= 0 or a == b:
                continue
            for x, y in ((a, b), (b, a)):
                cur = out.get(x)
                if cur is None:
                    cur = out[x] = (0.0, {})
                cur[1][y] = cur[1].get(y, 0.0) + float(w)
        return out


def unloaded_neighbours(loaded: dict[str, tuple[float, int, list[tuple[str, float]]]]) -> list[str]:
    """The neighbours of ``loaded`` items (``_load`` results) that are not loaded themselves, sorted: the items
    whose counts normalise the similarities (the second read of :meth:`ItemReads.neighbours`).

    >>> unloaded_neighbours({"a": (1.0, 0, [("c", 1.0), ("b", 2.0)]), "b": (1.0, 0, [("a", 2.0)])})
    ['c']
    """
    return sorted({b for _, _, nb in loaded.values() for b, _ in nb} - loaded.keys())


class ItemReads(ABC):
    """What recommendations read: item counts, neighbours and popularity (see the module docstring for the exact
    semantics), built on two primitive reads each implementation provides. :class:`ItemStore` adds the writes;
    :class:`models.state.item_reads.PrefetchedItems` answers from reads fetched ahead."""

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        self.config = config or SimilarityConfig()

    # --- primitive reads (implementations) ---------------------------------------------------------
    @abstractmethod
    def _load(self, items: list[str], k: int | None) -> dict[str, tuple[float, int, list[tuple[str, float]]]]:
        """``{item: (n, t, top-k neighbours by stored pair count)}`` for the known items among ``items``
        (all neighbours if ``k`` is None); neighbours in Redis ``ZREVRANGE`` order."""

    @abstractmethod
    def _popular_raw(self, k: int) -> tuple[int, list[tuple[str, float]]]:
        """``(epoch, top-k (item, stored score))`` in Redis ``ZREVRANGE`` order."""

    @abstractmethod
    def n_items(self) -> int:
        """Number of items with a count."""

    # --- reads --------------------------------------------------------------------------------------
    def item_count(self, item: str, now_ms: int) -> float:
        """Decayed count of ``item`` at ``now_ms`` (0 if unknown)."""
        got = self._load([item], 0).get(item)
        return 0.0 if got is None else got[0] * self._decay(now_ms - got[1])

    def pair_count(self, a: str, b: str, now_ms: int) -> float:
        """Decayed pair count of ``(a, b)`` as held in ``a``'s neighbour map (0 if absent)."""
        got = self._load([a], None).get(a)
        if got is None:
            return 0.0
        return dict(got[2]).get(b, 0.0) * self._decay(now_ms - got[1])

    def neighbours(self, items: list[str], k: int, now_ms: int) -> dict[str, list[tuple[str, float]]]:
        """Up to ``k`` neighbours per item with their cosine similarity, best first (ties: smaller id first).

        Candidates are the ``k`` largest pair counts of each item; unknown items map to ``[]``.
        """
        seeds = list(dict.fromkeys(items))
        loaded = self._load(seeds, k)
        counts = self._load(unloaded_neighbours(loaded), 0)
        counts.update(loaded)
        out: dict[str, list[tuple[str, float]]] = {}
        for a in seeds:
            got = loaded.get(a)
            if got is None:
                out[a] = []
                continue
            n_a, t_a, nb = got
            res = []
            for b, s in nb:
                cb = counts.get(b)
                if cb is None or n_a <= 0 or cb[0] <= 0:
                    continue  # b was deleted by the item cap: no count to normalise with
                n_b = cb[0] * self._decay(t_a - cb[1])  # b's count as of a's epoch
                res.append((b, s / math.sqrt(n_a * n_b)))
            res.sort(key=lambda x: (-x[1], x[0]))
            out[a] = res
        return out

    def popular(self, k: int, now_ms: int) -> list[tuple[str, float]]:
        """The ``k`` most popular items with their decayed score at ``now_ms``, best first."""
        epoch, top = self._popular_raw(k)
        f = _pow2(-(now_ms - epoch) / self.config.pop_half_life_ms)
        return [(i, s * f) for i, s in top]

    def _decay(self, dt_ms: float) -> float:
        return _pow2(-dt_ms / self.config.half_life_ms)


class ItemStore(ItemReads):
    """Item counts, neighbours and popularity, read and written; see the module docstring for the exact semantics."""

    # --- writes -----------------------------------------------------------------------------------
    @abstractmethod
    def apply(self, batch: ItemBatch) -> None:
        """Apply one batch of aggregated increments."""

    @abstractmethod
    def clear(self) -> None:
        """Delete all similarity state."""

    async def prefetch(self, seeds: list[str], k: int, popular_k: int) -> "PrefetchedItems":
        """Everything :meth:`neighbours` of ``seeds`` (``k`` each) and :meth:`popular` (up to ``popular_k``) will
        read, fetched now (:mod:`models.state.item_reads`). Here through the synchronous reads (in memory);
        stores behind a network override it with asynchronous round trips."""
        from models.state.item_reads import PrefetchedItems

        asked = list(dict.fromkeys(seeds))
        loaded = self._load(asked, k)
        counts = self._load(unloaded_neighbours(loaded), 0)
        return PrefetchedItems.build(self, loaded, k, asked, counts, self._popular_raw(popular_k), popular_k)

    def contribution_header(self) -> dict | None:
        """The header of the users' contribution payloads (:mod:`models.learning.contrib`) that the engine
        store's apply script reads to write this store's keys, when this store lives on the same server (Redis);
        None when contributions cannot be applied to it through the users' commits (in memory)."""
        return None

    def enforce_item_cap(self) -> int:
        """Delete the least recently updated items beyond :meth:`SimilarityConfig.item_cap` when items arrive other
        than through :meth:`apply` (which keeps the cap itself); returns how many were deleted."""
        return 0

    # --- contract helpers -------------------------------------------------------------------------
    def clone(self) -> "ItemStore":
        """A new, empty store of the same kind and configuration (in-memory)."""
        from models.state.item_memory import MemoryItemStore

        return MemoryItemStore(self.config)
