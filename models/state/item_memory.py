"""Item statistics in process memory: :class:`~models.state.item_store.ItemStore` for offline evaluation,
benchmarks and tests, with the same semantics as the Redis store (one contract suite runs over both)."""

from __future__ import annotations

import heapq

import numpy as np

from models.state.item_store import _POP_RESCALE_HALF_LIVES, ItemBatch, ItemStore, SimilarityConfig, _pow2


class MemoryItemStore(ItemStore):
    """:class:`ItemStore` in process memory (dicts). Same semantics as :class:`RedisItemStore`.

    >>> s = MemoryItemStore(SimilarityConfig(max_items=2))
    >>> for t, it in enumerate(["a", "b", "c"]):
    ...     s.apply(ItemBatch(ts=t, items=[it], item_inc=[1.0]))
    >>> s.n_items(), s.item_count("a", 2)
    (2, 0.0)
    """

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        super().__init__(config)
        self.clear()

    def clear(self) -> None:
        # flat dicts of numbers (and dicts of numbers): not tracked by the cyclic garbage collector
        self.n: dict[str, float] = {}  # item -> count (as of its epoch)
        self.t: dict[str, int] = {}  # item -> epoch ms
        self.nb: dict[str, dict[str, float]] = {}
        self.last: dict[str, int] = {}
        self.pop: dict[str, float] = {}
        self.pop_epoch: int | None = None
        self._pop_top: list[tuple[float, str]] = []  # cached top (score, item), valid with _pop_dirty
        self._pop_dirty: set[str] = set()
        self._pop_cache_k = 0

    def apply(self, batch: ItemBatch) -> None:
        cfg = self.config
        ts = int(batch.ts)
        hl = cfg.half_life_ms
        counts, epochs, nbs, last = self.n, self.t, self.nb, self.last
        resc = cfg.rescale_after_ms
        minsc = cfg.min_score
        scale: dict[str, float] = {}  # touched item -> forward-decay factor of this batch

        def touch(it: str) -> float:
            n = counts.get(it)
            if n is None:
                counts[it] = 0.0
                epochs[it] = ts
                nbs[it] = {}
                g = 1.0
            else:
                t = epochs[it]
                if ts - t > resc:  # rescale to the batch time, drop faded neighbours
                    f = _pow2(-(ts - t) / hl)
                    counts[it] = n * f
                    nb = nbs[it]
                    for b in list(nb):
                        v = nb[b] * f
                        if v < minsc:
                            del nb[b]
                        else:
                            nb[b] = v
                    epochs[it] = ts
                    g = 1.0
                else:
                    g = _pow2((ts - t) / hl) if ts != t else 1.0
            scale[it] = g
            last[it] = ts
            return g

        for it, w in zip(batch.items, batch.item_inc):
            if w > 0:
                g = scale.get(it)
                if g is None:
                    g = touch(it)
                counts[it] += w * g
        for a, b, w in zip(batch.pair_a, batch.pair_b, batch.pair_inc):
            if w <= 0 or a == b:
                continue
            ga = scale.get(a)
            if ga is None:
                ga = touch(a)
            gb = scale.get(b)
            if gb is None:
                gb = touch(b)
            nb = nbs[a]
            nb[b] = nb.get(b, 0.0) + w * ga
            nb = nbs[b]
            nb[a] = nb.get(a, 0.0) + w * gb
        maxnb = cfg.max_neighbours
        for it in scale:
            nb = nbs[it]
            if len(nb) > maxnb:
                drop = sorted(nb.items(), key=lambda kv: (kv[1], kv[0].encode()))[: len(nb) - maxnb]
                for b, _ in drop:
                    del nb[b]
        self._apply_popularity(batch, ts)
        cap = cfg.item_cap()
        if len(last) > cap:
            old = heapq.nsmallest(len(last) - cap, last.items(), key=lambda kv: (kv[1], kv[0].encode()))
            for it, _ in old:
                del last[it], counts[it], epochs[it], nbs[it]

    def _apply_popularity(self, batch: ItemBatch, ts: int) -> None:
        cfg = self.config
        hl = cfg.pop_half_life_ms
        if self.pop_epoch is None:
            self.pop_epoch = ts
        if (ts - self.pop_epoch) / hl > _POP_RESCALE_HALF_LIVES:
            f = _pow2(-(ts - self.pop_epoch) / hl)
            self.pop = {k: v * f for k, v in self.pop.items()}
            self.pop_epoch = ts
            self._pop_top = []
            self._pop_cache_k = 0
        g = _pow2((ts - self.pop_epoch) / hl)
        pop = self.pop
        dirty = self._pop_dirty
        for it, w in zip(batch.items, batch.item_inc):
            if w > 0:
                pop[it] = pop.get(it, 0.0) + float(w) * g
                dirty.add(it)
        cap = cfg.popular_cap()
        if len(pop) > 2 * cap:
            self.pop = _top_k(pop, cap)
            self._pop_top = []
            self._pop_cache_k = 0
            self._pop_dirty = set()

    def _popular_raw(self, k: int) -> tuple[int, list[tuple[str, float]]]:
        # scores only grow between renormalisations, so the new top-k is within the old top-k and the items
        # updated since: refresh the cache from those alone (exact, and cheap per call)
        key = lambda kv: (kv[1], kv[0].encode())  # noqa: E731  (Redis ZREVRANGE order)
        if k > self._pop_cache_k:
            top = heapq.nlargest(k, self.pop.items(), key=key)
            self._pop_cache_k = k
        else:
            cand = {i: self.pop[i] for i, _ in self._pop_top if i in self.pop}
            for i in self._pop_dirty:
                if i in self.pop:
                    cand[i] = self.pop[i]
            top = heapq.nlargest(self._pop_cache_k, cand.items(), key=key)
        self._pop_top = top
        self._pop_dirty = set()
        return (self.pop_epoch or 0), top[:k]

    def _load(self, items, k):
        out = {}
        for it in items:
            n = self.n.get(it)
            if n is None:
                continue
            if k == 0:
                nb = []
            else:
                allnb = self.nb[it].items()
                key = lambda kv: (kv[1], kv[0].encode())  # noqa: E731
                nb = heapq.nlargest(k, allnb, key=key) if k is not None else sorted(allnb, key=key, reverse=True)
            out[it] = (n, self.t[it], nb)
        return out

    def n_items(self) -> int:
        return len(self.n)


def _top_k(d: dict[str, float], k: int) -> dict[str, float]:
    """The ``k`` largest values of ``d``; ties broken as Redis sorted sets do (the largest members are kept)."""
    vals = np.fromiter(d.values(), np.float64, len(d))
    thr = float(np.partition(vals, len(vals) - k)[len(vals) - k])
    out = {m: v for m, v in d.items() if v > thr}
    ties = sorted((m for m, v in d.items() if v == thr), key=str.encode, reverse=True)
    for m in ties[: k - len(out)]:
        out[m] = thr
    return out
