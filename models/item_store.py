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
parks the user's own increments at their event times, on epochs of a fixed grid (:mod:`models.contrib`), and a
script of :class:`models.state.RedisStore` applies them once, keeping a per-user record that
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
>>> store = MemoryItemStore()
>>> store.apply(ItemBatch(ts=0, items=["a", "b", "c"], item_inc=[2.0, 2.0, 1.0],
...                       pair_a=["a"], pair_b=["b"], pair_inc=[2.0]))
>>> store.neighbours(["a"], k=5, now_ms=0)
{'a': [('b', 1.0)]}
>>> [i for i, _ in store.popular(2, now_ms=0)]
['b', 'a']
"""

from __future__ import annotations

import hashlib
import heapq
import math

import numpy as np
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from models.keys import escape_user_id

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


class ItemStore(ABC):
    """Item counts, neighbours and popularity; see the module docstring for the exact semantics."""

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        self.config = config or SimilarityConfig()

    # --- writes -----------------------------------------------------------------------------------
    @abstractmethod
    def apply(self, batch: ItemBatch) -> None:
        """Apply one batch of aggregated increments."""

    @abstractmethod
    def clear(self) -> None:
        """Delete all similarity state."""

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
        cands = {b for _, _, nb in loaded.values() for b, _ in nb}
        counts = self._load([b for b in cands if b not in loaded], 0)
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

    # --- contract helpers -------------------------------------------------------------------------
    def clone(self) -> "ItemStore":
        """A new, empty store of the same kind and configuration (in-memory)."""
        return MemoryItemStore(self.config)


# --- in memory -----------------------------------------------------------------------------------------
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


# --- Redis ------------------------------------------------------------------------------------------------
_ITEM_LUA = """
local function f17(x) return string.format('%.17g', x) end
local hl = {half_life_ms}
local resc = {rescale_after_ms}
local minsc = {min_score}
local maxnb = {max_neighbours}
local ts = tonumber(ARGV[1])
local ninc = tonumber(ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'n', 't')
local n = tonumber(cur[1]) or 0
local t = tonumber(cur[2]) or ts
if ts - t > resc then
  local f = 2 ^ (-(ts - t) / hl)
  n = n * f
  local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local add, del = {}, {}
  for i = 1, #all, 2 do
    local s = tonumber(all[i + 1]) * f
    if s < minsc then del[#del + 1] = all[i] else add[#add + 1] = f17(s); add[#add + 1] = all[i] end
  end
  if #del > 0 then redis.call('ZREM', KEYS[2], unpack(del)) end
  if #add > 0 then redis.call('ZADD', KEYS[2], unpack(add)) end
  t = ts
end
local g = 2 ^ ((ts - t) / hl)
redis.call('HSET', KEYS[1], 'n', f17(n + ninc * g), 't', f17(t))
if #ARGV < 3 then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[2], f17(tonumber(ARGV[i + 1]) * g), ARGV[i])
end
local card = redis.call('ZCARD', KEYS[2])
if card > maxnb then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, card - maxnb - 1) end
return card
"""

_POP_LUA = """
local function f17(x) return string.format('%.17g', x) end
local hl = {pop_half_life_ms}
local maxpop = {max_popular}
local ts = tonumber(ARGV[1])
local e = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
if (ts - e) / hl > {rescale_half_lives} then
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', f17(2 ^ (-(ts - e) / hl)))
  e = ts
end
redis.call('SET', KEYS[2], f17(e))
local g = 2 ^ ((ts - e) / hl)
for i = 2, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], f17(tonumber(ARGV[i + 1]) * g), ARGV[i])
end
local card = redis.call('ZCARD', KEYS[1])
if card > 2 * maxpop then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, card - maxpop - 1) end
return card
"""


# A user's contribution record (models.contrib) is subtracted in bounded steps. Each call handles the fields it is
# given (or, finishing, the whole record when it is small) and deletes exactly the fields it subtracted, in the
# same call: a forget interrupted anywhere leaves every field either subtracted and gone or untouched and still
# there, so running it again finishes it exactly. Values are converted to the target's current epoch when
# subtracted; a value left at most 1e-9 of what it was (rounding of the user's own share) is removed, and an item
# whose count is gone loses its keys. Pairs and popularity of a call are subtracted before its item counts. The
# item keys are outside the record's hash slot (one Redis, not Cluster, as for the apply script).
# KEYS: [the user's record <prefix>:{u:<user>}:c]
# ARGV: [prefix, half_life_ms, pop_half_life_ms, mode, ...]
#   mode 'fields': ARGV[5..] are field names (from HSCAN); returns {items, pairs, popularity entries, fields}
#   mode 'finish': ARGV[5] = most fields to handle, ARGV[6] = parked set ('' none), ARGV[7] = open-decision index
#     ('' none), ARGV[8] = the user's member in it, ARGV[9] = forgotten-users counter ('' none), ARGV[10] = '1' if
#     the caller found something of the user. With more than ARGV[5] fields left returns {-1} and does nothing;
#     otherwise subtracts what is left (contributions applied meanwhile), deletes the record (parked, never
#     applied contributions with it), its parked-set entry and the user's index entry, counts the user in the
#     counter if anything was found, and returns {items, pairs, popularity, fields, had record, index entries
#     removed, counter value (-1: no counter), counted}.
_FORGET_LUA = """
local function f17(x) return string.format('%.17g', x) end
local rk = KEYS[1]
local P, hl, phl, mode = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local function ikey(item) return P .. ':sim:{i:' .. item .. '}' end
local function epoch(item) return tonumber(redis.call('HGET', ikey(item), 't')) end
local function zsub(key, member, amount)
  local cur = tonumber(redis.call('ZSCORE', key, member))
  if cur == nil then return 0 end
  local left = cur - amount
  if left <= 1e-9 * math.abs(cur) then redis.call('ZREM', key, member) else redis.call('ZADD', key, f17(left), member) end
  return 1
end
local function subtract(fields)
  local ni, np, nq = 0, 0, 0
  local items, done = {}, {}
  local pe = false
  for _, f in ipairs(fields) do
    local kind = string.sub(f, 1, 1)
    if string.sub(f, 2, 2) == ':' and (kind == 'p' or kind == 'q' or kind == 'i') then
      local v = tonumber(redis.call('HGET', rk, f))
      if v ~= nil then  -- nil: subtracted by an earlier call (HSCAN may return a field twice)
        done[#done + 1] = f
        local sp = string.find(f, ':', 3, true)
        local g, rest = tonumber(string.sub(f, 3, sp - 1)), string.sub(f, sp + 1)
        if kind == 'p' then
          local sep = string.find(rest, '\\31', 1, true)
          local a, b = string.sub(rest, 1, sep - 1), string.sub(rest, sep + 1)
          local ea, eb = epoch(a), epoch(b)
          if ea then np = np + zsub(ikey(a) .. ':nb', b, v * 2 ^ ((g - ea) / hl)) end
          if eb then zsub(ikey(b) .. ':nb', a, v * 2 ^ ((g - eb) / hl)) end
        elseif kind == 'q' then
          if pe == false then pe = tonumber(redis.call('GET', P .. ':sim:{pop}:t')) end
          if pe then nq = nq + zsub(P .. ':sim:{pop}:z', rest, v * 2 ^ ((g - pe) / phl)) end
        else
          items[#items + 1] = {rest, g, v}
        end
      end
    end
  end
  for _, x in ipairs(items) do
    local k = ikey(x[1])
    local cur = redis.call('HMGET', k, 'n', 't')
    local n, e = tonumber(cur[1]), tonumber(cur[2])
    if n ~= nil then
      ni = ni + 1
      local left = n - x[3] * 2 ^ ((x[2] - e) / hl)
      if left <= 1e-9 * math.abs(n) then
        redis.call('DEL', k, k .. ':nb')
        redis.call('ZREM', P .. ':sim:idx', x[1])
      else
        redis.call('HSET', k, 'n', f17(left))
      end
    end
  end
  for i = 1, #done, 1000 do redis.call('HDEL', rk, unpack(done, i, math.min(i + 999, #done))) end
  return ni, np, nq, #done
end
if mode == 'fields' then
  local fields = {}
  for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
  local ni, np, nq, nf = subtract(fields)
  return {ni, np, nq, nf}
end
if redis.call('HLEN', rk) > tonumber(ARGV[5]) then return {-1} end
local had = redis.call('EXISTS', rk)
local ni, np, nq, nf = subtract(redis.call('HKEYS', rk))
redis.call('DEL', rk)
if ARGV[6] ~= '' then redis.call('SREM', ARGV[6], rk) end
local zr = 0
if ARGV[7] ~= '' then zr = redis.call('ZREM', ARGV[7], ARGV[8]) end
local total, counted = -1, 0
if ARGV[9] ~= '' then
  if ARGV[10] == '1' or had == 1 or zr == 1 then
    total, counted = redis.call('INCR', ARGV[9]), 1
  else
    total = tonumber(redis.call('GET', ARGV[9]) or '0')
  end
end
return {ni, np, nq, nf, had, zr, total, counted}
"""

FORGET_CHUNK_FIELDS = 500
"""Record fields one forget call subtracts (about 2-5 ms of Redis time; see ``load_tests/forget_hot_user.py``)."""


class RedisItemStore(ItemStore):
    """:class:`ItemStore` in Redis (synchronous redis-py client); keys in the module docstring.

    Parameters
    ----------
    client
        A ``redis.Redis`` (``decode_responses`` either way).
    prefix
        Key prefix (``Settings.redis_prefix``).
    config
        Bounds and decay.
    """

    def __init__(self, client, prefix: str = "promo", config: SimilarityConfig | None = None) -> None:
        super().__init__(config)
        self.r = client
        self.prefix = prefix
        cfg = self.config
        self._item_lua = _ITEM_LUA.replace("{half_life_ms}", str(int(cfg.half_life_ms))).replace(
            "{rescale_after_ms}", str(int(cfg.rescale_after_ms))).replace(
            "{min_score}", repr(float(cfg.min_score))).replace("{max_neighbours}", str(int(cfg.max_neighbours)))
        self._pop_lua = _POP_LUA.replace("{pop_half_life_ms}", str(int(cfg.pop_half_life_ms))).replace(
            "{max_popular}", str(int(cfg.popular_cap()))).replace("{rescale_half_lives}", repr(_POP_RESCALE_HALF_LIVES))
        self._item_sha = hashlib.sha1(self._item_lua.encode()).hexdigest()
        self._pop_sha = hashlib.sha1(self._pop_lua.encode()).hexdigest()
        self._scripts_loaded = False
        self._forget_script = None
        self.pop_key = f"{prefix}:sim:{{pop}}:z"
        self.pop_epoch_key = f"{prefix}:sim:{{pop}}:t"
        self.idx_key = f"{prefix}:sim:idx"

    @classmethod
    def from_url(cls, url: str, prefix: str = "promo", config: SimilarityConfig | None = None) -> "RedisItemStore":
        import redis

        return cls(redis.Redis.from_url(url), prefix, config)

    def clone(self) -> "RedisItemStore":
        """A new, empty store of the same configuration on the same Redis, under a fresh key prefix."""
        import uuid

        return RedisItemStore(self.r, f"{self.prefix}~{uuid.uuid4().hex[:8]}", self.config)

    def __getstate__(self) -> dict:
        """Pickles as a reference to the same Redis keys (connection settings, prefix, configuration)."""
        pool = self.r.connection_pool
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _CONNECTION_KEYS}
        return {"connection_class": pool.connection_class, "connection_kwargs": kwargs,
                "prefix": self.prefix, "config": self.config}

    def __setstate__(self, state: dict) -> None:
        import redis

        pool = redis.ConnectionPool(connection_class=state["connection_class"], **state["connection_kwargs"])
        self.__init__(redis.Redis(connection_pool=pool), state["prefix"], state["config"])

    def item_key(self, item: str) -> str:
        return f"{self.prefix}:sim:{{i:{item}}}"

    def nb_key(self, item: str) -> str:
        return f"{self.prefix}:sim:{{i:{item}}}:nb"

    def _load_scripts(self) -> None:
        self.r.script_load(self._item_lua)
        self.r.script_load(self._pop_lua)
        self._scripts_loaded = True

    def apply(self, batch: ItemBatch) -> None:
        """One pipeline: a Lua call per touched item (its two keys share the ``{i:<item>}`` tag), one for
        popularity, one ``ZADD`` to the index. A Redis error is raised (nothing is retried but a missing
        script, which Redis rejects before running anything)."""
        from redis.exceptions import NoScriptError

        cfg = self.config
        ts = int(batch.ts)
        per_item = batch.per_item()
        if not per_item:
            return
        if not self._scripts_loaded:
            self._load_scripts()
        cmds: list[tuple] = []
        item_sha = self._item_sha
        for it, (n_inc, incs) in per_item.items():
            args = ["EVALSHA", item_sha, 2, self.item_key(it), self.nb_key(it), ts, repr(n_inc)]
            for b, w in incs.items():
                args.append(b)
                args.append(repr(w))
            cmds.append(args)
        pop_args = ["EVALSHA", self._pop_sha, 2, self.pop_key, self.pop_epoch_key, ts]
        for it, w in zip(batch.items, batch.item_inc):
            if w > 0:
                pop_args.append(it)
                pop_args.append(repr(float(w)))
        if len(pop_args) > 6:
            cmds.append(pop_args)
        pipe = self.r.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        pipe.zadd(self.idx_key, {it: ts for it in per_item})
        pipe.zcard(self.idx_key)
        res = pipe.execute(raise_on_error=False)
        missing = [i for i, r in enumerate(res[: len(cmds)]) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted or flushed its scripts: none of these ran; load and send them again
            self._load_scripts()
            pipe = self.r.pipeline(transaction=False)
            for i in missing:
                pipe.execute_command(*cmds[i])
            for i, r in zip(missing, pipe.execute(raise_on_error=False)):
                res[i] = r
        for r in res:
            if isinstance(r, Exception):
                raise r
        card = res[-1]
        cap = cfg.item_cap()
        if card > cap:
            self._prune(card - cap)

    def record_key(self, user_id: str) -> str:
        """The user's contribution record (:mod:`models.contrib`), under the user's hash tag (the id escaped as in
        every user key: :func:`models.keys.escape_user_id`)."""
        return f"{self.prefix}:{{u:{escape_user_id(user_id)}}}:c"

    def _forget_call(self, key: str, args: list, stats: dict) -> list:
        import time

        if self._forget_script is None:
            self._forget_script = self.r.register_script(_FORGET_LUA)
        cfg = self.config
        t0 = time.perf_counter()
        res = self._forget_script(keys=[key], args=[self.prefix, int(cfg.half_life_ms), int(cfg.pop_half_life_ms),
                                                      *args])
        ms = (time.perf_counter() - t0) * 1000
        stats["calls"] += 1
        stats["max_call_ms"] = max(stats["max_call_ms"], round(ms, 3))
        return [int(x) for x in res]

    @staticmethod
    def _forget_stats() -> dict:
        return {"items": 0, "pairs": 0, "popularity": 0, "fields": 0, "calls": 0, "max_call_ms": 0.0}

    def subtract_record(self, user_id: str, chunk_fields: int = FORGET_CHUNK_FIELDS, stats: dict | None = None) -> dict:
        """Subtract the user's recorded contributions from the item statistics, ``chunk_fields`` record fields per
        Lua call (pairs and popularity first, then item counts), each call deleting the fields it subtracted.

        Idempotent and resumable: interrupted anywhere, running it again subtracts exactly what is left. Returns
        (adds to ``stats``) how many items, pairs and popularity entries were reduced, fields handled, Lua calls
        and the longest call in ms. The record's bookkeeping (parked contributions) stays: :meth:`drop_record`
        deletes it."""
        stats = stats if stats is not None else self._forget_stats()
        key = self.record_key(user_id)
        for match in ("[pq]:*", "i:*"):  # an item whose count is gone loses its keys: its pairs go first
            cursor = 0
            while True:
                cursor, found = self.r.hscan(key, cursor, match=match, count=chunk_fields)
                fields = list(found)
                for i in range(0, len(fields), chunk_fields):  # HSCAN's COUNT is a hint
                    ni, np_, nq, nf = self._forget_call(key, ["fields", *fields[i : i + chunk_fields]], stats)
                    stats["items"] += ni
                    stats["pairs"] += np_
                    stats["popularity"] += nq
                    stats["fields"] += nf
                if int(cursor) == 0:
                    break
        return stats

    def drop_record(self, user_id: str, *, limit: int = FORGET_CHUNK_FIELDS, parked_key: str = "",
                    open_index: tuple[str, str] | None = None, counter_key: str = "", found: bool = False,
                    stats: dict | None = None) -> dict | None:
        """The last step of forgetting the user, one atomic call: when the record holds at most ``limit`` fields,
        subtract what contributions were applied since :meth:`subtract_record`, delete the record (parked,
        never applied contributions with it) and its entry in ``parked_key``, remove the user's member from the
        ``open_index`` ``(key, member)``, and count the user in ``counter_key`` if ``found`` or the record or the
        index entry existed. Returns ``None`` (and does nothing) when the record is larger: subtract again first.
        Otherwise ``stats`` with ``record`` (1 if the record existed here), ``open_index`` (entries removed),
        ``forgotten_total`` (the counter after, -1 without one) and ``counted``."""
        stats = stats if stats is not None else self._forget_stats()
        index_key, member = open_index if open_index is not None else ("", "")
        res = self._forget_call(self.record_key(user_id), [
            "finish", int(limit), parked_key, index_key, member, counter_key, "1" if found else "0"], stats)
        if res[0] == -1:
            return None
        ni, np_, nq, nf, had, zr, total, counted = res
        stats["items"] += ni
        stats["pairs"] += np_
        stats["popularity"] += nq
        stats["fields"] += nf
        stats.update(record=had, open_index=zr, forgotten_total=total, counted=counted)
        return stats

    def forget_user(self, user_id: str, chunk_fields: int = FORGET_CHUNK_FIELDS, max_rounds: int = 20) -> dict:
        """Subtract the user's recorded contributions from the item statistics and delete the record, in bounded
        steps (:meth:`subtract_record`, then :meth:`drop_record`; again while the user's contributions keep
        arriving). Returns how many items, pairs and popularity entries were reduced, ``record`` (1 if the user
        had a record), Lua calls and the longest one in ms."""
        stats = self._forget_stats()
        had = bool(self.r.exists(self.record_key(user_id)))
        for _ in range(max_rounds):
            self.subtract_record(user_id, chunk_fields, stats)
            if self.drop_record(user_id, limit=chunk_fields, stats=stats) is not None:
                stats["record"] = int(had or stats["record"])
                return stats
        raise RuntimeError(f"the contribution record kept growing during {max_rounds} rounds of forgetting "
                           "(contributions of the user arrive faster than they are subtracted); run it again")

    def enforce_item_cap(self) -> int:
        """Delete the least recently updated items beyond :meth:`SimilarityConfig.item_cap` (the worker's
        maintenance timer calls this when the users' commits write the statistics); returns how many."""
        excess = self.n_items() - self.config.item_cap()
        if excess > 0:
            self._prune(excess)
        return max(0, excess)

    def _prune(self, excess: int) -> None:
        old = [_s(x) for x in self.r.zrange(self.idx_key, 0, excess - 1)]
        pipe = self.r.pipeline(transaction=False)
        for it in old:
            pipe.delete(self.item_key(it), self.nb_key(it))  # one hash tag: Cluster-safe
        pipe.zrem(self.idx_key, *old)
        pipe.execute()

    def clear(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for key in self.r.scan_iter(match=f"{self.prefix}:sim:*", count=1000):
            pipe.delete(key)
        pipe.execute()

    def _load(self, items, k):
        if not items:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.hmget(self.item_key(it), "n", "t")
            if k != 0:
                pipe.zrevrange(self.nb_key(it), 0, -1 if k is None else k - 1, withscores=True)
        res = pipe.execute()
        out = {}
        step = 1 if k == 0 else 2
        for i, it in enumerate(items):
            n, t = res[i * step]
            if n is None:
                continue
            nb = [(_s(b), float(s)) for b, s in res[i * step + 1]] if k != 0 else []
            out[it] = (float(n), int(float(t)), nb)
        return out

    def _popular_raw(self, k):
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.pop_epoch_key)
        pipe.zrevrange(self.pop_key, 0, k - 1, withscores=True)
        epoch, top = pipe.execute()
        return (int(float(epoch)) if epoch is not None else 0), [(_s(i), float(s)) for i, s in top]

    def n_items(self) -> int:
        return int(self.r.zcard(self.idx_key))


_CONNECTION_KEYS = frozenset({
    "host", "port", "db", "username", "password", "path", "socket_timeout", "socket_connect_timeout",
    "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "decode_responses",
    "client_name", "health_check_interval",
})


def _top_k(d: dict[str, float], k: int) -> dict[str, float]:
    """The ``k`` largest values of ``d``; ties broken as Redis sorted sets do (the largest members are kept)."""
    vals = np.fromiter(d.values(), np.float64, len(d))
    thr = float(np.partition(vals, len(vals) - k)[len(vals) - k])
    out = {m: v for m, v in d.items() if v > thr}
    ties = sorted((m for m, v in d.items() if v == thr), key=str.encode, reverse=True)
    for m in ties[: k - len(out)]:
        out[m] = thr
    return out


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x
