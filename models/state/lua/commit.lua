-- KEYS: [profile, marker_1..marker_n, decision_1..decision_m]
-- ARGV: [n, marker_ttl, profile_ttl, decision_ttl, nfields, f1, v1, ..., json_1..json_m, ctx_1..ctx_m,
--        ledger_max, nl, record_1..record_nl,
--        policy_hash, nc, (count field, increment) x nc, k, (cell field, alpha if new, beta if new, d_alpha,
--        d_beta) x k,
--        open_index, user_id, open_until ('' for none), had_open ('1'/'0'), contrib, pending_set, expected_version]
-- (RedisStore writes one field, ``v``; the script takes any number). Refused (0) when the profile's ``ver``
-- is not the version the commit was planned from, or when any marker exists: nothing is written then. The
-- sweep's index of users with open decisions (a sorted set by earliest expiry) is updated in the same call, so
-- a crash can neither leave an open decision out of it (it would never expire) nor list a closed one.
-- ``contrib`` ('' for none) is a models.contrib payload: the user's item, pair and popularity increments. The
-- commit only parks it in the user's record ``{u:<user>}:c`` as field ``w:<new version>`` (and the record in
-- the ``pending_set``), atomically with the markers; :data:`_APPLY_LUA` adds it to the item statistics after
-- the decisions are sent (off the decision's critical path), exactly once: the field is deleted in the script
-- that applies it, and what a crash leaves parked is applied by :meth:`RedisStore.apply_parked`.
-- What the user's decisions and closed decisions teach is added to ``policy_hash`` in the same call: integer
-- counts (``n`` outcomes learnt, ``closed:<group>``, ``converted:<group>``) and the policy's posterior updates
-- (fields ``a:<cell>``/``b:<cell>``, created with the given prior if missing). So each is applied exactly when
-- the commit that holds the decision or its closing is.
-- ``ctx_j`` ('' for none) is the context decision j was made in, kept in its hash for ``promo explain``; the
-- ledger records (closed decisions, models.policy.ledger) are appended to the user's ledger ``{u:<user>}:l``,
-- which keeps the last ``ledger_max`` (0: no ledger) and expires with the profile.
local n = tonumber(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'ver') or ''
if cur ~= ARGV[#ARGV] then return 0 end
for i = 2, n + 1, 1000 do  -- one EXISTS per thousand markers (it counts the keys that exist)
  if redis.call('EXISTS', unpack(KEYS, i, math.min(i + 999, n + 1))) > 0 then return 0 end
end
for i = 1, n do
  redis.call('SET', KEYS[1 + i], '1', 'EX', ARGV[2])
end
local nf = tonumber(ARGV[5])
local pos = 6
local fields = {'ver', tostring((tonumber(cur) or 0) + 1)}  -- the version and the fields in one HSET
for j = pos, pos + 2 * nf - 1 do fields[#fields + 1] = ARGV[j] end
redis.call('HSET', KEYS[1], unpack(fields))
pos = pos + 2 * nf
redis.call('EXPIRE', KEYS[1], ARGV[3])
local m = #KEYS - 1 - n
for j = 1, m do
  local ctx = ARGV[pos + m + j - 1]
  if ctx ~= '' then
    redis.call('HSET', KEYS[1 + n + j], 'json', ARGV[pos + j - 1], 'sent', '0', 'ctx', ctx)
  else
    redis.call('HSET', KEYS[1 + n + j], 'json', ARGV[pos + j - 1], 'sent', '0')
  end
  redis.call('EXPIRE', KEYS[1 + n + j], ARGV[4])
end
pos = pos + 2 * m
local lmax = tonumber(ARGV[pos])
local nl = tonumber(ARGV[pos + 1])
if nl > 0 and lmax > 0 then
  local lk = string.sub(KEYS[1], 1, -2) .. 'l'
  for j = 1, nl do redis.call('RPUSH', lk, ARGV[pos + 1 + j]) end
  redis.call('LTRIM', lk, -lmax, -1)
end
pos = pos + 2 + nl
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
  redis.call('SADD', ARGV[#ARGV - 1], rk)
end
-- the user's ledger and contribution record live as long as the profile, whatever this commit adds to them: a
-- commit without contributions (a timer, a closing, a cart removal) keeps the user active, and a record expired
-- before the profile would leave its contributions in the item statistics after a forget (EXPIRE of a key that
-- does not exist does nothing)
local base = string.sub(KEYS[1], 1, -2)
redis.call('EXPIRE', base .. 'l', ARGV[3])
redis.call('EXPIRE', base .. 'c', ARGV[3])
if ARGV[#ARGV - 4] ~= '' then
  redis.call('ZADD', ARGV[#ARGV - 6], ARGV[#ARGV - 4], ARGV[#ARGV - 5])
elseif ARGV[#ARGV - 3] == '1' then
  redis.call('ZREM', ARGV[#ARGV - 6], ARGV[#ARGV - 5])
end
return 1
