"""Engine state: a typed interface with an in-memory and a Redis implementation.

Per user the engine keeps (all under the user's hash tag ``{u:<user>}``, so one Lua call is atomic; ``<user>`` is
the id escaped by :func:`models.keys.escape_user_id`, so that no other user's keys start with a user's tag):

* ``<prefix>:{u:<user>}:p``             the profile hash (field ``v``: the profile's fields as one JSON object,
  absolute values; one field instead of one per profile field keeps a batch's load and commit small), idle TTL
* ``<prefix>:{u:<user>}:e:<event_id>``  de-duplication marker, ``SET`` with TTL
* ``<prefix>:{u:<user>}:d:<event_id>``  the decision a trigger event produced, ``json`` + ``sent`` flag
* ``<prefix>:{u:<user>}:c``             item-statistics contributions: parked (``w:<version>``) until applied,
  and the applied totals ``promo forget`` subtracts (:mod:`models.contrib`)

and, shared by all users, ``<prefix>:open``: the expiry sweep's index of users with open decisions (a sorted set
by earliest expiry), and ``<prefix>:clock``: every partition's event-time watermark and when it last had an event
(:mod:`models.clock`; workers combine them, and a restarted worker starts from them). Applying contributions and
writing that index touch keys outside the user's slot: the engine needs one Redis, not Cluster.

:meth:`EngineStore.commit` writes a user's markers, profile, decisions and index entry in one atomic step, and
refuses if any marker already exists (another worker got there first during a rebalance): a batch is applied
once, even when Kafka redelivers it after a crash.

Examples
--------
>>> import asyncio
>>> store = MemoryStore()
>>> c = UserCommit("u1", {"n": "1"}, ["e1"], [("e1", b"{}")])
>>> asyncio.run(store.commit([c]))
[True]
>>> asyncio.run(store.commit([c]))  # e1 already applied: refused, nothing written twice
[False]
>>> load = asyncio.run(store.load({"u1": ["e1", "e2"]}, {"u1": ["e1"]}))["u1"]
>>> sorted(load.seen), load.profile, load.stored
(['e1'], {'n': '1'}, {'e1': (b'{}', False)})
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from models.keys import escape_user_id


@dataclass(slots=True)
class UserLoad:
    """What the store knows about one user of a batch, read before planning."""

    profile: dict
    seen: set[str] = field(default_factory=set)
    stored: dict[str, tuple[bytes, bool]] = field(default_factory=dict)  # trigger event id -> (json, sent)
    version: str = ""  # the profile version read; a commit succeeds only if it is still current
    token: str = ""  # the token of the user's last commit (models.engine.BatchProgress: a commit in doubt)


@dataclass(slots=True)
class UserCommit:
    """Everything a batch changes for one user, written atomically."""

    user_id: str
    profile: dict  # the profile's fields as plain JSON values (models.profile.Profile.to_dict), encoded once
    event_ids: list[str]
    decisions: list[tuple[str, bytes]]  # (trigger event id, decision json)
    version: str = ""  # the version the commit was planned from (optimistic concurrency)
    open_until: int | None = None  # earliest expiry of the user's open decisions (None: none open)
    had_open: bool = True  # whether the store's index may list the user (False: nothing to remove from it)
    contrib: str = ""  # the user's item-statistics contributions (models.contrib payload JSON), or ""
    # what the user's decisions and closed decisions teach, added to the store's shared hash (``shares_policy``):
    # posterior updates (cell field, alpha if new, beta if new, d_alpha, d_beta) as models.bandit.ThompsonPolicy
    # builds them, and integer counts by field (outcomes learnt ``n``; ``closed:<group>``, ``converted:<group>``)
    policy: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    # unique per commit; stored with the profile (hash field ``tok``) so that a writer whose commit pipeline
    # failed as a whole can tell, by reading it back, whether its commit landed
    token: str = ""


def parked_field(version: str) -> str:
    """The record field a commit planned from profile ``version`` parks its contributions in (the commit script
    names it ``w:<new version>``)."""
    return f"w:{int(version or 0) + 1}"


class EngineStore(Protocol):
    async def load(self, event_ids: dict[str, list[str]], triggers: dict[str, list[str]]) -> dict[str, UserLoad]:
        """Profiles, already-applied event ids and stored decisions for the users of a batch."""

    async def commit(self, commits: list[UserCommit]) -> list[bool | Exception]:
        """Apply each user's commit atomically: ``True`` where it was applied, ``False`` where it was refused (a
        marker already existed or the profile changed since it was loaded: nothing written), or the exception
        the store answered for that commit (nothing written: Redis scripts are atomic, and a full Redis refuses
        a script at its first write). An exception raised instead of the list means the outcome of every commit
        is unknown (the connection dropped): read the users' tokens back (:attr:`UserLoad.token`)."""

    async def mark_sent(self, sent: list[tuple[str, str]]) -> None:
        """Flag stored decisions (user id, trigger event id) as delivered to the decisions topic."""

    async def due_users(self, now_ms: int, limit: int = 1000) -> list[str]:
        """Users whose earliest open decision expires at or before event time ``now_ms``."""

    async def reindex(self, entries: list[tuple[str, int | None, str]]) -> None:
        """Correct the index of users with open decisions: (user id, earliest expiry or None when none open,
        the profile version it was computed from). An entry whose user committed since is skipped: that commit
        wrote the index itself."""

    async def policy_state(self) -> dict:
        """What the commits taught (``shares_policy`` stores): ``{field: value}``, posteriors and counts."""

    async def sync_clock(self, state: dict[str, list[int]]) -> dict[str, list[int]]:
        """Publish this worker's partition watermarks (``models.clock.EventClock.state``; each entry only ever
        rises) and return every partition's, as published by all workers."""

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class MemoryStore:
    """In-process store for tests, offline evaluation and benchmarks. No TTLs."""

    def __init__(self) -> None:
        self.profiles: dict[str, str] = {}  # user -> the profile document, JSON (as RedisStore keeps it)
        self.versions: dict[str, int] = {}
        self.seen: set[tuple[str, str]] = set()
        self.decisions: dict[tuple[str, str], list] = {}
        self.open_until: dict[str, int] = {}
        self.policy: dict[str, float] = {}
        self.tokens: dict[str, str] = {}
        self.clock: dict[str, list[int]] = {}

    shares_policy = True
    """Commits carry what decisions teach (:class:`UserCommit` ``policy`` and ``counts``); see ``policy_state``."""

    def _apply_policy(self, updates: list, counts: dict) -> None:
        pol = self.policy
        for f, n in counts.items():
            pol[f] = pol.get(f, 0) + int(n)
        for f, a0, b0, da, db in updates:
            pol.setdefault("a:" + f, float(a0))
            pol.setdefault("b:" + f, float(b0))
            pol["a:" + f] += da
            pol["b:" + f] += db

    async def policy_state(self) -> dict:
        return dict(self.policy)

    async def sync_clock(self, state):
        for key, (mark, seen) in state.items():
            old = self.clock.get(key, [mark, seen])
            self.clock[key] = [max(old[0], int(mark)), max(old[1], int(seen))]
        return {k: list(v) for k, v in self.clock.items()}

    async def load(self, event_ids, triggers):
        out = {}
        for uid, eids in event_ids.items():
            out[uid] = UserLoad(
                profile=json.loads(self.profiles.get(uid, "{}")),  # a fresh copy, as from Redis
                version=str(self.versions[uid]) if uid in self.versions else "",
                token=self.tokens.get(uid, ""),
                seen={e for e in eids if (uid, e) in self.seen},
                stored={
                    t: (d[0], d[1]) for t in triggers.get(uid, ()) if (d := self.decisions.get((uid, t))) is not None
                },
            )
        return out

    async def commit(self, commits):
        ok = []
        for c in commits:
            current = str(self.versions[c.user_id]) if c.user_id in self.versions else ""
            if current != c.version or any((c.user_id, e) in self.seen for e in c.event_ids):
                ok.append(False)
                continue
            self.versions[c.user_id] = self.versions.get(c.user_id, 0) + 1
            if c.token:
                self.tokens[c.user_id] = c.token
            self.seen.update((c.user_id, e) for e in c.event_ids)
            stored = json.loads(self.profiles.get(c.user_id, "{}"))
            stored.update(c.profile)
            self.profiles[c.user_id] = json.dumps(stored)
            if c.open_until is None:
                self.open_until.pop(c.user_id, None)
            else:
                self.open_until[c.user_id] = c.open_until
            for trig, js in c.decisions:
                self.decisions[(c.user_id, trig)] = [js, False]
            self._apply_policy(c.policy, c.counts)
            ok.append(True)
        return ok

    async def mark_sent(self, sent):
        for key in sent:
            if key in self.decisions:
                self.decisions[key][1] = True

    async def due_users(self, now_ms: int, limit: int = 1000) -> list[str]:
        return sorted(u for u, t in self.open_until.items() if t <= now_ms)[:limit]

    async def reindex(self, entries):
        for uid, until, version in entries:
            if (str(self.versions[uid]) if uid in self.versions else "") != version:
                continue
            if until is None:
                self.open_until.pop(uid, None)
            else:
                self.open_until[uid] = until

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


# KEYS: [profile, marker_1..marker_n, decision_1..decision_m]
# ARGV: [n, marker_ttl, profile_ttl, decision_ttl, nfields, f1, v1, ..., json_1..json_m,
#        policy_hash, nc, (count field, increment) x nc, k, (cell field, alpha if new, beta if new, d_alpha,
#        d_beta) x k,
#        open_index, user_id, open_until ('' for none), had_open ('1'/'0'), contrib, pending_set, expected_version]
# (RedisStore writes one field, ``v``; the script takes any number). Refused (0) when the profile's ``ver``
# is not the version the commit was planned from, or when any marker exists: nothing is written then. The
# sweep's index of users with open decisions (a sorted set by earliest expiry) is updated in the same call, so
# a crash can neither leave an open decision out of it (it would never expire) nor list a closed one.
# ``contrib`` ('' for none) is a models.contrib payload: the user's item, pair and popularity increments. The
# commit only parks it in the user's record ``{u:<user>}:c`` as field ``w:<new version>`` (and the record in
# the ``pending_set``), atomically with the markers; :data:`_APPLY_LUA` adds it to the item statistics after
# the decisions are sent (off the decision's critical path), exactly once: the field is deleted in the script
# that applies it, and what a crash leaves parked is applied by :meth:`RedisStore.apply_parked`.
# What the user's decisions and closed decisions teach is added to ``policy_hash`` in the same call: integer
# counts (``n`` outcomes learnt, ``closed:<group>``, ``converted:<group>``) and the policy's posterior updates
# (fields ``a:<cell>``/``b:<cell>``, created with the given prior if missing). So each is applied exactly when
# the commit that holds the decision or its closing is.
# KEYS: [the user's record {u:<user>}:c]; ARGV: [parked field w:<version>, pending set, most record fields
# (0: no cap)]. Applies the parked payload to the item statistics (keys of models.item_store: outside the user's
# hash slot, so one Redis, not Cluster), adds it to the record's totals (fields ``<i|p|q>:<grid epoch>:<item or
# a\x1fb>``, values relative to that epoch: what ``promo forget`` subtracts), deletes the field. Returns 0 when
# the field is gone (applied). The record is capped: a payload that would take it past the most fields marks the
# record ``capped``, and from then on no payload of the user is applied (each is deleted unapplied, returning 2)
# until the record is deleted (forget, or idle expiry with the profile). So what the statistics hold of a user is
# always in the record, forget stays exact, and one hot user or bot neither grows an unbounded record nor keeps
# adding to the statistics.
_APPLY_LUA = """
local function f17(x) return string.format('%.17g', x) end
local rk = KEYS[1]
local cj = redis.call('HGET', rk, ARGV[1])
if not cj then return 0 end
local function unpark()  -- the parked field goes in the same call that applies (or skips) it: exactly once
  redis.call('HDEL', rk, ARGV[1])
  if redis.call('HINCRBY', rk, 'parked', -1) <= 0 then
    redis.call('HDEL', rk, 'parked')
    redis.call('SREM', ARGV[2], rk)
  end
end
local c = cjson.decode(cj)
local cap = tonumber(ARGV[3]) or 0
if cap > 0 and (redis.call('HEXISTS', rk, 'capped') == 1
                or redis.call('HLEN', rk) + #c.i + #c.p + #c.q > cap) then
  redis.call('HSET', rk, 'capped', '1')
  unpark()
  return 2
end
local P, hl, phl, minsc, maxnb, maxpop = c.P, c.hl, c.phl, c.minsc, c.maxnb, c.maxpop
local eps = {}
local function ikey(item) return P .. ':sim:{i:' .. item .. '}' end
local function epoch(item, g)
  local k = ikey(item)
  local e = eps[item]
  if e == nil then
    e = tonumber(redis.call('HGET', k, 't'))
    if e == nil then
      e = g
      redis.call('HSET', k, 'n', '0', 't', f17(e))
    end
  end
  if g > e then
    local f = 2 ^ (-(g - e) / hl)
    local n = tonumber(redis.call('HGET', k, 'n')) or 0
    redis.call('HSET', k, 'n', f17(n * f), 't', f17(g))
    local all = redis.call('ZRANGE', k .. ':nb', 0, -1, 'WITHSCORES')
    local add, del = {}, {}
    for i = 1, #all, 2 do
      local v = tonumber(all[i + 1]) * f
      if v < minsc then del[#del + 1] = all[i] else add[#add + 1] = f17(v); add[#add + 1] = all[i] end
    end
    if #del > 0 then redis.call('ZREM', k .. ':nb', unpack(del)) end
    if #add > 0 then redis.call('ZADD', k .. ':nb', unpack(add)) end
    e = g
  end
  eps[item] = e
  return e
end
local function rec(kind, g, name, v)
  redis.call('HINCRBYFLOAT', rk, kind .. ':' .. f17(g) .. ':' .. name, f17(v))
end
local idx = P .. ':sim:idx'
for _, x in ipairs(c.i) do
  local item, g, v = x[1], x[2], x[3]
  local e = epoch(item, g)
  redis.call('HINCRBYFLOAT', ikey(item), 'n', f17(v * 2 ^ (-(e - g) / hl)))
  redis.call('ZADD', idx, 'GT', f17(x[4]), item)
  rec('i', g, item, v)
end
local touched = {}
for _, x in ipairs(c.p) do
  local a, b, g, v = x[1], x[2], x[3], x[4]
  local ea, eb = epoch(a, g), epoch(b, g)
  redis.call('ZINCRBY', ikey(a) .. ':nb', f17(v * 2 ^ (-(ea - g) / hl)), b)
  redis.call('ZINCRBY', ikey(b) .. ':nb', f17(v * 2 ^ (-(eb - g) / hl)), a)
  touched[a] = true
  touched[b] = true
  rec('p', g, a .. '\\31' .. b, v)
end
for item, _ in pairs(touched) do
  local card = redis.call('ZCARD', ikey(item) .. ':nb')
  if card > maxnb then redis.call('ZREMRANGEBYRANK', ikey(item) .. ':nb', 0, card - maxnb - 1) end
end
if #c.q > 0 then
  local pz, pt = P .. ':sim:{pop}:z', P .. ':sim:{pop}:t'
  local gmax = c.q[1][2]
  for _, x in ipairs(c.q) do if x[2] > gmax then gmax = x[2] end end
  local pe = tonumber(redis.call('GET', pt))
  if pe == nil then
    pe = gmax
    redis.call('SET', pt, f17(pe))
  elseif gmax > pe then
    redis.call('ZUNIONSTORE', pz, 1, pz, 'WEIGHTS', f17(2 ^ (-(gmax - pe) / phl)))
    pe = gmax
    redis.call('SET', pt, f17(pe))
  end
  for _, x in ipairs(c.q) do
    redis.call('ZINCRBY', pz, f17(x[3] * 2 ^ (-(pe - x[2]) / phl)), x[1])
    rec('q', x[2], x[1], x[3])
  end
  local card = redis.call('ZCARD', pz)
  if card > 2 * maxpop then redis.call('ZREMRANGEBYRANK', pz, 0, card - maxpop - 1) end
end
unpark()
return 1
"""

_COMMIT_LUA = """
local n = tonumber(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'ver') or ''
if cur ~= ARGV[#ARGV] then return 0 end
for i = 1, n do
  if redis.call('EXISTS', KEYS[1 + i]) == 1 then return 0 end
end
redis.call('HSET', KEYS[1], 'ver', tostring((tonumber(cur) or 0) + 1))
for i = 1, n do
  redis.call('SET', KEYS[1 + i], '1', 'EX', ARGV[2])
end
local nf = tonumber(ARGV[5])
local pos = 6
for j = 0, nf - 1 do
  redis.call('HSET', KEYS[1], ARGV[pos + 2 * j], ARGV[pos + 2 * j + 1])
end
pos = pos + 2 * nf
redis.call('EXPIRE', KEYS[1], ARGV[3])
local m = #KEYS - 1 - n
for j = 1, m do
  redis.call('HSET', KEYS[1 + n + j], 'json', ARGV[pos + j - 1], 'sent', '0')
  redis.call('EXPIRE', KEYS[1 + n + j], ARGV[4])
end
pos = pos + m
local ph = ARGV[pos]
local nc = tonumber(ARGV[pos + 1])
for j = 0, nc - 1 do
  redis.call('HINCRBY', ph, ARGV[pos + 2 + 2 * j], ARGV[pos + 3 + 2 * j])
end
pos = pos + 2 + 2 * nc
for j = 0, tonumber(ARGV[pos]) - 1 do
  local q = pos + 1 + 5 * j
  local fa, fb = 'a:' .. ARGV[q], 'b:' .. ARGV[q]
  redis.call('HSETNX', ph, fa, ARGV[q + 1])
  redis.call('HSETNX', ph, fb, ARGV[q + 2])
  if tonumber(ARGV[q + 3]) ~= 0 then redis.call('HINCRBYFLOAT', ph, fa, ARGV[q + 3]) end
  if tonumber(ARGV[q + 4]) ~= 0 then redis.call('HINCRBYFLOAT', ph, fb, ARGV[q + 4]) end
end
if ARGV[#ARGV - 2] ~= '' then
  local rk = string.sub(KEYS[1], 1, -2) .. 'c'
  redis.call('HSET', rk, 'w:' .. tostring((tonumber(cur) or 0) + 1), ARGV[#ARGV - 2])
  redis.call('HINCRBY', rk, 'parked', 1)
  redis.call('EXPIRE', rk, ARGV[3])
  redis.call('SADD', ARGV[#ARGV - 1], rk)
end
if ARGV[#ARGV - 4] ~= '' then
  redis.call('ZADD', ARGV[#ARGV - 6], ARGV[#ARGV - 4], ARGV[#ARGV - 5])
elseif ARGV[#ARGV - 3] == '1' then
  redis.call('ZREM', ARGV[#ARGV - 6], ARGV[#ARGV - 5])
end
return 1
"""


# KEYS: [profile]; ARGV: [open_index, user_id, earliest expiry ('' for none open), expected_version]. The sweep's
# correction of a user's index entry, unless the user committed since (that commit wrote the entry).
_REINDEX_LUA = """
if (redis.call('HGET', KEYS[1], 'ver') or '') ~= ARGV[4] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', ARGV[1], ARGV[2])
else
  redis.call('ZADD', ARGV[1], ARGV[3], ARGV[2])
end
return 1
"""


# KEYS: [clock hash]; ARGV: [partition, watermark, seen] x n. Each field ("<watermark> <seen>") keeps the larger
# of each, so a worker that lost a partition in a rebalance cannot move its entry back; returns the whole hash.
_CLOCK_LUA = """
for i = 1, #ARGV, 3 do
  local mark, seen = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local m, s = string.match(cur, '^(%-?%d+) (%-?%d+)$')
    if m then
      mark = math.max(mark, tonumber(m))
      seen = math.max(seen, tonumber(s))
    end
  end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.0f %.0f', mark, seen))
end
return redis.call('HGETALL', KEYS[1])
"""


class RedisStore:
    """The production store on redis-py's asyncio client; one round trip per phase of a batch."""

    def __init__(
        self,
        client,
        prefix: str = "promo",
        dedup_ttl_s: int = 7 * 86400,
        profile_ttl_s: int = 90 * 86400,
        decision_ttl_s: int = 2 * 86400,
        max_record_fields: int = 0,
    ) -> None:
        self.r = client
        self.prefix = prefix
        # cap of a user's contribution record (see _APPLY_LUA; 0: none); contributions left unapplied by it
        self.max_record_fields = int(max_record_fields)
        self.contributions_capped = 0
        self.dedup_ttl_s = dedup_ttl_s
        self.profile_ttl_s = profile_ttl_s
        self.decision_ttl_s = decision_ttl_s
        self._commit = client.register_script(_COMMIT_LUA)
        self._apply = client.register_script(_APPLY_LUA)
        self._reindex = client.register_script(_REINDEX_LUA)
        self._clock = client.register_script(_CLOCK_LUA)

    applies_contributions = True
    """Commits carry the users' item-statistics contributions (:mod:`models.contrib`) and apply them."""

    shares_policy = True
    """Commits carry what decisions teach into :attr:`policy_key`, read back by ``policy_state``."""

    @classmethod
    def from_settings(cls, settings) -> "RedisStore":
        import redis.asyncio as aioredis

        kw = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "health_check_interval": 10}
        if settings.redis_ssl_ca_certs:
            kw["ssl_ca_certs"] = settings.redis_ssl_ca_certs
        client = aioredis.Redis.from_url(settings.redis_url, **kw)
        return cls(
            client,
            prefix=settings.redis_prefix,
            dedup_ttl_s=settings.dedup_ttl_s,
            profile_ttl_s=settings.profile_ttl_s,
            decision_ttl_s=settings.attribution_window_s * 2,
            max_record_fields=settings.contrib_record_max_fields,
        )

    # keys ------------------------------------------------------------------------------------
    def user_tag(self, user_id: str) -> str:
        """``<prefix>:{u:<id>}``, the id escaped (:func:`models.keys.escape_user_id`): no other user's keys
        start with it."""
        return f"{self.prefix}:{{u:{escape_user_id(user_id)}}}"

    def profile_key(self, user_id: str) -> str:
        return f"{self.user_tag(user_id)}:p"

    def marker_key(self, user_id: str, event_id: str) -> str:
        return f"{self.user_tag(user_id)}:e:{event_id}"

    def decision_key(self, user_id: str, event_id: str) -> str:
        return f"{self.user_tag(user_id)}:d:{event_id}"

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
        flat = await self._clock(keys=[self.clock_key], args=args)
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
            await self._apply(keys=[f"{self.user_tag(uid)}:c"], args=[fld, self.parked_key, self.max_record_fields],
                              client=pipe)
        return self._applied(await pipe.execute())

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
            await self._apply(keys=[k], args=[fld, self.parked_key, self.max_record_fields], client=pipe)
        return self._applied(await pipe.execute())

    async def due_users(self, now_ms: int, limit: int = 1000) -> list[str]:
        return [u.decode() for u in await self.r.zrangebyscore(self.open_key, "-inf", now_ms, start=0, num=limit)]

    async def reindex(self, entries):
        if not entries:
            return
        pipe = self.r.pipeline(transaction=False)
        for uid, until, version in entries:
            await self._reindex(keys=[self.profile_key(uid)],
                                args=[self.open_key, uid, "" if until is None else int(until), version], client=pipe)
        await pipe.execute()

    # interface -------------------------------------------------------------------------------
    async def load(self, event_ids, triggers):
        pipe = self.r.pipeline(transaction=False)
        plan = []
        for uid, eids in event_ids.items():
            pipe.hmget(self.profile_key(uid), "v", "ver", "tok")
            for e in eids:
                pipe.exists(self.marker_key(uid, e))
            trig = triggers.get(uid, ())
            for t in trig:
                pipe.hmget(self.decision_key(uid, t), "json", "sent")
            plan.append((uid, eids, trig))
        res = await pipe.execute()
        out, i = {}, 0
        for uid, eids, trig in plan:
            packed, ver, tok = res[i]
            load = UserLoad(profile=json.loads(packed) if packed else {}, version=ver.decode() if ver else "",
                            token=tok.decode() if tok else "")
            i += 1
            for e in eids:
                if res[i]:
                    load.seen.add(e)
                i += 1
            for t in trig:
                js, sent = res[i]
                i += 1
                if js is not None:
                    load.stored[t] = (js, sent == b"1")
            out[uid] = load
        return out

    async def commit(self, commits):
        if not commits:
            return []
        pipe = self.r.pipeline(transaction=False)
        for c in commits:
            keys = [self.profile_key(c.user_id)]
            keys += [self.marker_key(c.user_id, e) for e in c.event_ids]
            keys += [self.decision_key(c.user_id, t) for t, _ in c.decisions]
            packed = json.dumps(c.profile, separators=(",", ":"))
            fields = ["v", packed] + (["tok", c.token] if c.token else [])
            args: list = [len(c.event_ids), self.dedup_ttl_s, self.profile_ttl_s, self.decision_ttl_s,
                          len(fields) // 2, *fields]
            args += [js for _, js in c.decisions]
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
            await self._commit(keys=keys, args=args, client=pipe)
        # per-commit error replies come back in place (a full Redis refuses some scripts, not the pipeline)
        return [x if isinstance(x, Exception) else bool(x) for x in await pipe.execute(raise_on_error=False)]

    async def mark_sent(self, sent):
        if not sent:
            return
        pipe = self.r.pipeline(transaction=False)
        for uid, trig in sent:
            pipe.hset(self.decision_key(uid, trig), "sent", "1")
        await pipe.execute()

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.r.aclose()
