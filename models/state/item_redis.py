"""Item statistics in Redis: :class:`~models.state.item_store.ItemStore` for the worker; key layout in
:mod:`models.state.item_store`, scripts in ``models/state/lua/`` (``item_apply``, ``item_popularity``,
``forget_record``)."""

from __future__ import annotations

import hashlib

from models.keys import user_tag
from models.state.item_store import (_POP_RESCALE_HALF_LIVES, ItemBatch, ItemStore, SimilarityConfig,
                                     unloaded_neighbours)
from models.state.scripts import lua


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
        self._item_lua = lua("item_apply").replace("{half_life_ms}", str(int(cfg.half_life_ms))).replace(
            "{rescale_after_ms}", str(int(cfg.rescale_after_ms))).replace(
            "{min_score}", repr(float(cfg.min_score))).replace("{max_neighbours}", str(int(cfg.max_neighbours)))
        self._pop_lua = lua("item_popularity").replace("{pop_half_life_ms}", str(int(cfg.pop_half_life_ms))).replace(
            "{max_popular}", str(int(cfg.popular_cap()))).replace("{rescale_half_lives}", repr(_POP_RESCALE_HALF_LIVES))
        self._item_sha = hashlib.sha1(self._item_lua.encode()).hexdigest()
        self._pop_sha = hashlib.sha1(self._pop_lua.encode()).hexdigest()
        self._scripts_loaded = False
        self._forget_script = None
        self.pop_key = f"{prefix}:sim:{{pop}}:z"
        self.pop_epoch_key = f"{prefix}:sim:{{pop}}:t"
        self.idx_key = f"{prefix}:sim:idx"
        self._aclient = self._aclient_loop = None
        self.on_new_client = None  # called with each client the store makes (the worker's epoch guard watches it)

    @classmethod
    def from_url(cls, url: str, prefix: str = "promo", config: SimilarityConfig | None = None,
                 socket_timeout: float = 5.0, connect_timeout: float = 2.0) -> "RedisItemStore":
        """A store on a new client. The timeouts bound every call: this client is synchronous (the worker reads
        it for each decision's recommendations), so a hung Redis raises a timeout - a transient error the batch
        loop retries while /readyz answers 503 - instead of blocking the worker for ever."""
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout),
                   prefix, config)

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
        """The user's contribution record (:mod:`models.learning.contrib`), under the user's hash tag (the id escaped as in
        every user key: :func:`models.keys.escape_user_id`)."""
        return f"{user_tag(self.prefix, user_id)}:c"

    def _forget_call(self, key: str, args: list, stats: dict) -> list:
        import time

        if self._forget_script is None:
            self._forget_script = self.r.register_script(lua("forget_record"))
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

    def contribution_header(self) -> dict:
        cfg = self.config
        return {"prefix": self.prefix, "half_life_ms": int(cfg.half_life_ms),
                "pop_half_life_ms": int(cfg.pop_half_life_ms), "min_score": float(cfg.min_score),
                "max_neighbours": int(cfg.max_neighbours), "max_popular": int(cfg.popular_cap())}

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
        self._queue_load(pipe, items, k)
        return self._parse_load(items, k, pipe.execute())

    def _queue_load(self, pipe, items: list[str], k: int | None) -> None:
        for it in items:
            pipe.hmget(self.item_key(it), "n", "t")
            if k != 0:
                pipe.zrevrange(self.nb_key(it), 0, -1 if k is None else k - 1, withscores=True)

    @staticmethod
    def _parse_load(items: list[str], k: int | None, res: list) -> dict:
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
        self._queue_popular(pipe, k)
        return self._parse_popular(pipe.execute())

    def _queue_popular(self, pipe, k: int) -> None:
        pipe.get(self.pop_epoch_key)
        pipe.zrevrange(self.pop_key, 0, k - 1, withscores=True)

    @staticmethod
    def _parse_popular(res: list) -> tuple[int, list[tuple[str, float]]]:
        epoch, top = res
        return (int(float(epoch)) if epoch is not None else 0), [(_s(i), float(s)) for i, s in top]

    # --- the worker's reads: asynchronous -----------------------------------------------------------
    @property
    def aclient(self):
        """A ``redis.asyncio`` client on the same server and settings as :attr:`r` (timeouts included), made on
        first use in the running event loop (asyncio connections belong to the loop that opened them)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient, self._aclient_loop = _async_twin(self.r), loop
            if self.on_new_client is not None:
                self.on_new_client(self._aclient)
        return self._aclient

    async def prefetch(self, seeds, k, popular_k):
        """Two pipelined asynchronous round trips: the seeds' counts and top ``k`` neighbours with the popular
        items, then the counts of the neighbours (:mod:`models.state.item_reads`)."""
        from models.state.item_reads import PrefetchedItems

        asked = list(dict.fromkeys(seeds))
        r = self.aclient
        pipe = r.pipeline(transaction=False)
        self._queue_load(pipe, asked, k)
        self._queue_popular(pipe, popular_k)
        res = await pipe.execute()
        loaded = self._parse_load(asked, k, res[:-2])
        popular = self._parse_popular(res[-2:])
        cands = unloaded_neighbours(loaded)
        counts = {}
        if cands:
            pipe = r.pipeline(transaction=False)
            self._queue_load(pipe, cands, 0)
            counts = self._parse_load(cands, 0, await pipe.execute())
        return PrefetchedItems.build(self, loaded, k, asked, counts, popular, popular_k)

    def n_items(self) -> int:
        return int(self.r.zcard(self.idx_key))


_CONNECTION_KEYS = frozenset({
    "host", "port", "db", "username", "password", "path", "socket_timeout", "socket_connect_timeout",
    "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "decode_responses",
    "client_name", "health_check_interval",
})


def _async_twin(client):
    """A ``redis.asyncio`` client with the connection settings of the synchronous ``client``."""
    import redis.asyncio as aioredis

    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _CONNECTION_KEYS}
    from models.state.redis_async import connection_class as hiredis_packing

    connection_class = hiredis_packing(
        getattr(aioredis.connection, pool.connection_class.__name__, aioredis.connection.Connection))
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool(connection_class=connection_class, **kwargs))


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x
