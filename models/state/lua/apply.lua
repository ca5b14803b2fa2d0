-- KEYS: [the user's record {u:<user>}:c]; ARGV: [parked field w:<version>, pending set, most record fields
-- (0: no cap)]. Applies the parked payload to the item statistics (keys of models.item_store: outside the user's
-- hash slot, so one Redis, not Cluster), adds it to the record's totals (fields ``<i|p|q>:<grid epoch>:<item or
-- a\x1fb>``, values relative to that epoch: what ``promo forget`` subtracts), deletes the field. Returns 0 when
-- the field is gone (applied). The record is capped: a payload that would take it past the most fields marks the
-- record ``capped``, and from then on no payload of the user is applied (each is deleted unapplied, returning 2)
-- until the record is deleted (forget, or idle expiry with the profile). So what the statistics hold of a user is
-- always in the record, forget stays exact, and one hot user or bot neither grows an unbounded record nor keeps
-- adding to the statistics.
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
-- the payload's header names its item store (payloads parked by versions before 0.2 used short keys)
local P = c.prefix or c.P
local hl, phl = c.half_life_ms or c.hl, c.pop_half_life_ms or c.phl
local minsc, maxnb, maxpop = c.min_score or c.minsc, c.max_neighbours or c.maxnb, c.max_popular or c.maxpop
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
  rec('p', g, a .. '\31' .. b, v)
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
