"""The engine store on Redis (production): the key layout is in :mod:`models.state.engine_store`, the scripts
in ``models/state/lua/`` (``commit``, ``apply``, ``reindex``, ``clock``, ``mark_sent``)."""

from __future__ import annotations

from models import jsoncodec
from models.keys import user_tag
from models.state.engine_store import EngineStore, UserLoad
from models.state.redis_async import Scripts, async_client

SCRIPTS = Scripts("commit", "apply", "reindex", "clock", "mark_sent")


def forgotten_key(prefix: str) -> str:
    """The count of users forgotten (:meth:`RedisStore.forgotten_total`)."""
    return f"{prefix}:forgotten"


def user_profile_key(prefix: str, user_id: str) -> str:
    """The key of a user's profile, ``<prefix>:{u:<id>}:p`` (the id escaped, :func:`models.keys.escape_user_id`)."""
    return f"{user_tag(prefix, user_id)}:p"


class RedisStore(EngineStore):
    """The production store on redis-py's asyncio client; one round trip per phase of a batch."""

    def __init__(
        self,
        client,
        prefix: str = "promo",
        dedup_ttl_s: int = 7 * 86400,
        profile_ttl_s: int = 90 * 86400,
        decision_ttl_s: int = 2 * 86400,
        max_record_fields: int = 0,
        ledger_max: int = 50,
    ) -> None:
        self.r = client
        self.prefix = prefix
        # cap of a user's contribution record (see lua/apply.lua; 0: none); contributions left unapplied by it
        self.max_record_fields = int(max_record_fields)
        self.contributions_capped = 0
        self.dedup_ttl_s = dedup_ttl_s
        self.profile_ttl_s = profile_ttl_s
        self.decision_ttl_s = decision_ttl_s
        self.ledger_max = int(ledger_max)  # closed decisions kept per user (``{u:<user>}:l``; 0: none)
        self.scripts = SCRIPTS  # called by SHA1, loaded on each new connection (models.state.redis_async)

    applies_contributions = True
    """Commits carry the users' item-statistics contributions (:mod:`models.learning.contrib`) and apply them."""

    @classmethod
    def from_settings(cls, settings) -> "RedisStore":
        kw = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "health_check_interval": 10}
        if settings.redis_ssl_ca_certs:
            kw["ssl_ca_certs"] = settings.redis_ssl_ca_certs
        client = async_client(settings.redis_url, SCRIPTS, **kw)
        return cls(
            client,
            prefix=settings.redis_prefix,
            dedup_ttl_s=settings.dedup_ttl_s,
            profile_ttl_s=settings.profile_ttl_s,
            decision_ttl_s=settings.attribution_window_s * 2,
            max_record_fields=settings.contrib_record_max_fields,
            ledger_max=settings.ledger_per_user,
        )

    # keys ------------------------------------------------------------------------------------
    def user_tag(self, user_id: str) -> str:
        """``<prefix>:{u:<id>}``, the id escaped (:func:`models.keys.escape_user_id`): no other user's keys
        start with it."""
        return user_tag(self.prefix, user_id)

    def profile_key(self, user_id: str) -> str:
        return user_profile_key(self.prefix, user_id)

    def marker_key(self, user_id: str, event_id: str) -> str:
        return f"{self.user_tag(user_id)}:e:{event_id}"

    def decision_key(self, user_id: str, event_id: str) -> str:
        return f"{self.user_tag(user_id)}:d:{event_id}"

    def ledger_key(self, user_id: str) -> str:
        """The user's last closed decisions, oldest first (:mod:`models.policy.ledger`)."""
        return f"{self.user_tag(user_id)}:l"

    @property
    def open_key(self) -> str:
        return f"{self.prefix}:open"

    @property
    def policy_key(self) -> str:
        """What the decisions taught, shared by all workers: the policy's posteriors (fields ``a:<cell>``,
        ``b:<cell>``) and counts (``n``, ``closed:<group>``, ``converted:<group>``)."""
        return f"{self.prefix}:policy"

    async def policy_state(self) -> dict:
        return await self.r.hgetall(self.policy_key)

    @property
    def clock_key(self) -> str:
        """Every partition's event-time watermark and the wall time of its last event (:mod:`models.clock`)."""
        return f"{self.prefix}:clock"

    async def sync_clock(self, state):
        from models.clock import EventClock

        args: list = []
        for key, (mark, seen) in state.items():
            args += [key, int(mark), int(seen)]
        flat = await self.scripts.call(self.r, "clock", [self.clock_key], args)
        return EventClock.decode(dict(zip(flat[::2], flat[1::2])))

    @property
    def parked_key(self) -> str:
        """The set of users' records holding contributions committed but not yet applied."""
        return f"{self.prefix}:sim:parked"

    def _applied(self, results) -> int:
        """How many apply scripts applied their payload; those the record cap left out are counted in
        :attr:`contributions_capped`."""
        codes = [int(x) for x in results]
        self.contributions_capped += codes.count(2)
        return codes.count(1)

    async def apply_contributions(self, parked: list[tuple[str, str]]) -> int:
        """Apply parked contributions ``(user id, field)`` to the item statistics, one script each, in one
        pipeline; already applied ones are skipped, and those of a user whose record is at
        :attr:`max_record_fields` are deleted unapplied. Returns how many were applied."""
        if not parked:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for uid, fld in parked:
            self.scripts.queue(pipe, "apply", [f"{self.user_tag(uid)}:c"],
                               [fld, self.parked_key, self.max_record_fields])
        return self._applied(await self.scripts.execute(self.r, pipe))

    async def apply_parked(self, limit: int = 1000) -> int:
        """Apply what commits parked and nobody applied (a worker died between commit and apply): up to
        ``limit`` records per call. Returns how many contributions were applied."""
        keys = await self.r.srandmember(self.parked_key, limit)
        if not keys:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.hkeys(k)
        todo, stale = [], []
        for k, fields in zip(keys, await pipe.execute()):
            parked = [(k, f.decode() if isinstance(f, bytes) else f) for f in fields]
            parked = [(key, f) for key, f in parked if f.startswith("w:")]
            if parked:
                todo += parked
            else:
                stale.append(k)
        if stale:  # nothing parked any more (the record expired or was forgotten)
            await self.r.srem(self.parked_key, *stale)
        if not todo:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for k, fld in todo:
            self.scripts.queue(pipe, "apply", [k], [fld, self.parked_key, self.max_record_fields])
        return self._applied(await self.scripts.execute(self.r, pipe))

    async def due_users(self, now_ms: int, limit: int = 1000) -> list[str]:
        return [u.decode() for u in await self.r.zrangebyscore(self.open_key, "-inf", now_ms, start=0, num=limit)]

    async def reindex(self, entries):
        if not entries:
            return
        pipe = self.r.pipeline(transaction=False)
        for uid, until, version in entries:
            self.scripts.queue(pipe, "reindex", [self.profile_key(uid)],
                               [self.open_key, uid, "" if until is None else int(until), version])
        await self.scripts.execute(self.r, pipe)

    # interface -------------------------------------------------------------------------------
    async def load(self, event_ids, triggers):
        # one EXISTS per user counts the batch's markers it holds (one hash tag: one slot); only users where some
        # exist (a redelivery) are asked event by event, in a second round trip
        pipe = self.r.pipeline(transaction=False)
        plan = []
        for uid, eids in event_ids.items():
            pipe.hmget(self.profile_key(uid), "v", "ver", "tok")
            if eids:
                pipe.exists(*(self.marker_key(uid, e) for e in eids))
            trig = triggers.get(uid, ())
            for t in trig:
                pipe.hmget(self.decision_key(uid, t), "json", "sent")
            plan.append((uid, eids, trig))
        res = await pipe.execute()
        out, i, recheck = {}, 0, []
        for uid, eids, trig in plan:
            packed, ver, tok = res[i]
            load = UserLoad(profile=jsoncodec.loads(packed) if packed else {}, version=ver.decode() if ver else "",
                            token=tok.decode() if tok else "", packed=packed)
            i += 1
            if eids:
                if res[i] == len(eids):
                    load.seen.update(eids)
                elif res[i]:
                    recheck.append((uid, load, eids))
                i += 1
            for t in trig:
                js, sent = res[i]
                i += 1
                if js is not None:
                    load.stored[t] = (js, sent == b"1")
            out[uid] = load
        if recheck:
            pipe = self.r.pipeline(transaction=False)
            for uid, _load, eids in recheck:
                for e in eids:
                    pipe.exists(self.marker_key(uid, e))
            flags = iter(await pipe.execute())
            for _uid, load, eids in recheck:
                load.seen.update([e for e in eids if next(flags)])
        return out

    async def commit(self, commits):
        if not commits:
            return []
        pipe = self.r.pipeline(transaction=False)
        for c in commits:
            keys = [self.profile_key(c.user_id)]
            keys += [self.marker_key(c.user_id, e) for e in c.event_ids]
            keys += [self.decision_key(c.user_id, t) for t, _ in c.decisions]
            packed = jsoncodec.dumps(c.profile)
            fields = ["v", packed] + (["tok", c.token] if c.token else [])
            args: list = [len(c.event_ids), self.dedup_ttl_s, self.profile_ttl_s, self.decision_ttl_s,
                          len(fields) // 2, *fields]
            args += [js for _, js in c.decisions]
            args += [c.contexts.get(t, "") for t, _ in c.decisions]
            args += [self.ledger_max, len(c.ledger), *c.ledger]
            args += [self.policy_key, len(c.counts)]
            for f, n in c.counts.items():
                args += [f, int(n)]
            args.append(len(c.policy))
            for f, a0, b0, da, db in c.policy:
                args += [f, repr(float(a0)), repr(float(b0)), repr(float(da)), repr(float(db))]
            # the sweep's index of users with open decisions, in the same atomic call (most users never had an
            # open decision: no index entry to remove)
            args += [self.open_key, c.user_id, "" if c.open_until is None else int(c.open_until),
                     "1" if c.had_open else "0"]
            args.append(c.contrib)
            args.append(self.parked_key)
            args.append(c.version)
            self.scripts.queue(pipe, "commit", keys, args)
        # per-commit error replies come back in place (a full Redis refuses some scripts, not the pipeline)
        replies = await self.scripts.execute(self.r, pipe, raise_on_error=False)
        return [x if isinstance(x, Exception) else bool(x) for x in replies]

    async def mark_sent(self, sent):
        if not sent:
            return
        pipe = self.r.pipeline(transaction=False)
        for uid, trig in sent:  # a decision forgotten or expired meanwhile is not created again
            self.scripts.queue(pipe, "mark_sent", [self.decision_key(uid, trig)], [])
        await self.scripts.execute(self.r, pipe)

    async def ledger(self, user_id: str, n: int = 0) -> list[str]:
        return [r.decode() for r in await self.r.lrange(self.ledger_key(user_id), -n if n > 0 else 0, -1)]

    async def decision_context(self, user_id: str, trigger_event_id: str) -> str | None:
        ctx = await self.r.hget(self.decision_key(user_id, trigger_event_id), "ctx")
        return ctx.decode() if ctx is not None else None

    @property
    def forgotten_key(self) -> str:
        """The count every forget path adds to (``promo forget``, the forget topic), in the same atomic step."""
        return forgotten_key(self.prefix)

    async def forgotten_total(self) -> int:
        return int(await self.r.get(self.forgotten_key) or 0)

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except Exception:  # a health probe: any failure to answer (timeout, connection, error reply) is "no"
            return False

    async def close(self) -> None:
        await self.r.aclose()
