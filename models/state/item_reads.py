"""One batch's item reads, fetched before the batch is planned.

Planning is plain synchronous Python, and a recommendation reads the item store three times (the seeds' counts
and neighbour lists, the candidates' counts, the popular items). Against Redis those reads were synchronous
round trips inside the worker's event loop, per decision: a slow or paused Redis froze the loop (health
endpoints included). Instead the engine asks :meth:`ItemStore.prefetch` for every seed the batch's decisions
can use - known before planning: a user's recommendation seeds are among the last ``n_seeds`` items of the
loaded profile and the items of the user's events in the batch - in at most two asynchronous round trips per
batch; planning then reads this :class:`PrefetchedItems`, which answers exactly what the store would have
answered at that moment.

A read it cannot answer (a seed it was not given, more neighbours or popular items than were fetched) goes to
the store it came from, synchronously, and is counted in :attr:`PrefetchedItems.misses`: a bug in the seed
computation costs latency, never a different recommendation.

Examples
--------
>>> import asyncio
>>> from models.state.item_memory import MemoryItemStore
>>> from models.state.item_store import ItemBatch
>>> store = MemoryItemStore()
>>> store.apply(ItemBatch(ts=0, items=["a", "b", "c"], item_inc=[2.0, 2.0, 1.0],
...                       pair_a=["a", "a"], pair_b=["b", "c"], pair_inc=[2.0, 1.0]))
>>> reads = asyncio.run(store.prefetch(["a", "x"], k=5, popular_k=3))
>>> reads.neighbours(["a", "x"], 5, now_ms=0) == store.neighbours(["a", "x"], 5, now_ms=0)
True
>>> [i for i, _ in reads.popular(2, now_ms=0)], reads.misses
(['b', 'a'], 0)
>>> reads.neighbours(["c"], 5, now_ms=0)["c"][0][0], reads.misses  # not prefetched: read from the store
('a', 1)
"""

from __future__ import annotations

from models.state.item_store import ItemReads, ItemStore

Loaded = dict[str, tuple[float, int, list[tuple[str, float]]]]


class PrefetchedItems(ItemReads):
    """The :class:`ItemReads` of an :class:`ItemStore`, answered from what was fetched for one batch (see the
    module docstring).

    Parameters
    ----------
    source
        The store the reads came from (answers what was not fetched).
    seeds
        ``{item: (n, t, neighbours)}`` of the seeds that exist, their top ``k`` neighbours each.
    k
        Neighbours fetched per seed.
    counts
        ``{item: (n, t)}`` of every item whose count is known (the seeds and their neighbours).
    absent
        Items asked for that the store does not hold.
    popular
        ``(epoch, top popular_k (item, stored score))``.
    popular_k
        How many popular items were fetched (the store may hold fewer).
    """

    def __init__(self, source: ItemStore, seeds: Loaded, k: int, counts: dict[str, tuple[float, int]],
                 absent: set[str], popular: tuple[int, list[tuple[str, float]]], popular_k: int) -> None:
        super().__init__(source.config)
        self.source = source
        self._seeds, self._k = seeds, k
        self._counts = counts
        self._absent = absent
        self._popular, self._popular_k = popular, popular_k
        self.misses = 0

    @classmethod
    def build(cls, source: ItemStore, seeds: Loaded, k: int, asked: list[str], counts: Loaded,
              popular: tuple[int, list[tuple[str, float]]], popular_k: int) -> "PrefetchedItems":
        """From the two reads: ``seeds`` (``_load(asked, k)``) and ``counts`` (``_load(candidates, 0)``)."""
        known = {i: (n, t) for i, (n, t, _) in counts.items()}
        known.update((i, (n, t)) for i, (n, t, _) in seeds.items())
        absent = {i for i in asked if i not in seeds}
        absent.update(b for _, _, nb in seeds.values() for b, _ in nb if b not in known)
        return cls(source, seeds, k, known, absent, popular, popular_k)

    def _load(self, items: list[str], k: int | None) -> Loaded:
        if k == 0 and all(i in self._counts or i in self._absent for i in items):
            return {i: (*self._counts[i], []) for i in items if i in self._counts}
        if k is not None and 0 < k <= self._k and all(i in self._seeds or i in self._absent for i in items):
            # the top k of a top-K list in the store's order is the store's top k
            return {i: (n, t, nb[:k]) for i in items if i in self._seeds for n, t, nb in (self._seeds[i],)}
        self.misses += 1
        return self.source._load(items, k)

    def _popular_raw(self, k: int) -> tuple[int, list[tuple[str, float]]]:
        epoch, top = self._popular
        if k <= self._popular_k:
            return epoch, top[:k]
        self.misses += 1
        return self.source._popular_raw(k)

    def n_items(self) -> int:
        self.misses += 1
        return self.source.n_items()
