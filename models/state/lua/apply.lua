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
local got = redis.call('HMGET', rk, ARGV[1], 'capped')
local cj = got[1]
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
if cap > 0 and (got[2] or redis.call('HLEN', rk) + #c.i + #c.p + #c.q > cap) then
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
      redis.call('HSET', k, 'n', '0', 't', e)
      -- an item created here only as a pair's partner (the cap pruned it while a user's window held it) is
      -- indexed too, or the item cap, which prunes by the index, would never see it again; as the least recently
      -- updated (0: the order payloads are applied in does not change the index)
      redis.call('ZADD', P .. ':sim:idx', 'NX', 0, item)
    end
  end
  if g > e then
    local f = 2 ^ (-(g - e) / hl)
    local n = tonumber(redis.call('HGET', k, 'n')) or 0
    redis.call('HSET', k, 'n', (n * f), 't', g)
    local all = redis.call('ZRANGE', k .. ':nb', 0, -1, 'WITHSCORES')
    local add, del = {}, {}
    for i = 1, #all, 2 do
      local v = tonumber(all[i + 1]) * f
      if v < minsc then del[#del + 1] = all[i] else add[#add + 1] = v; add[#add + 1] = all[i] end
    end
    if #del > 0 then redis.call('ZREM', k .. ':nb', unpack(del)) end
    if #add > 0 then redis.call('ZADD', k .. ':nb', unpack(add)) end
    e = g
  end
  eps[item] = e
  return e
end
local gname = {}  -- a payload's entries share one or two grid epochs: format each once
local function rec(kind, g, name, v)
  local gs = gname[g]
  if gs == nil then gs = f17(g); gname[g] = gs end
  redis.call('HINCRBYFLOAT', rk, kind .. ':' .. gs .. ':' .. name, v)
end
local idx = P .. ':sim:idx'
for _, x in ipairs(c.i) do
  local item, g, v = x[1], x[2], x[3]
  local e = epoch(item, g)
  redis.call('HINCRBYFLOAT', ikey(item), 'n', (v * 2 ^ (-(e - g) / hl)))
  redis.call('ZADD', idx, 'GT', x[4], item)
  rec('i', g, item, v)
end
-- a neighbour set grows only by a new member, whose score is then the increment itself (no member scores 0:
-- rescaling drops scores under min_score); only such sets can be past max_neighbours, and are trimmed at the end
local grown = {}
local function zinc(item, inc, other)
  if tonumber(redis.call('ZINCRBY', ikey(item) .. ':nb', inc, other)) == inc then grown[item] = true end
end
for _, x in ipairs(c.p) do
  local a, b, g, v = x[1], x[2], x[3], x[4]
  local ea, eb = epoch(a, g), epoch(b, g)
  zinc(a, v * 2 ^ (-(ea - g) / hl), b)
  zinc(b, v * 2 ^ (-(eb - g) / hl), a)
  rec('p', g, a .. '\31' .. b, v)
end
for item, _ in pairs(grown) do
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
    redis.call('SET', pt, pe)
  elseif gmax > pe then
    redis.call('ZUNIONSTORE', pz, 1, pz, 'WEIGHTS', (2 ^ (-(gmax - pe) / phl)))
    pe = gmax
    redis.call('SET', pt, pe)
  end
  local new = false  -- as for the neighbour sets: only a new member can take the set past its bound
  for _, x in ipairs(c.q) do
    local inc = x[3] * 2 ^ (-(pe - x[2]) / phl)
    if tonumber(redis.call('ZINCRBY', pz, inc, x[1])) == inc then new = true end
    rec('q', x[2], x[1], x[3])
  end
  if new then
    local card = redis.call('ZCARD', pz)
    if card > 2 * maxpop then redis.call('ZREMRANGEBYRANK', pz, 0, card - maxpop - 1) end
  end
end
unpark()
return 1
