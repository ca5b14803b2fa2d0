-- A user's contribution record (models.contrib) is subtracted in bounded steps. Each call handles the fields it is
-- given (or, finishing, the whole record when it is small) and deletes exactly the fields it subtracted, in the
-- same call: a forget interrupted anywhere leaves every field either subtracted and gone or untouched and still
-- there, so running it again finishes it exactly. Values are converted to the target's current epoch when
-- subtracted; a value left at most 1e-9 of what it was (rounding of the user's own share) is removed, and an item
-- whose count is gone loses its keys. Pairs and popularity of a call are subtracted before its item counts. The
-- item keys are outside the record's hash slot (one Redis, not Cluster, as for the apply script).
-- KEYS: [the user's record <prefix>:{u:<user>}:c]
-- ARGV: [prefix, half_life_ms, pop_half_life_ms, mode, ...]
--   mode 'fields': ARGV[5..] are field names (from HSCAN); returns {items, pairs, popularity entries, fields}
--   mode 'finish': ARGV[5] = most fields to handle, ARGV[6] = parked set ('' none), ARGV[7] = open-decision index
--     ('' none), ARGV[8] = the user's member in it, ARGV[9] = forgotten-users counter ('' none), ARGV[10] = '1' if
--     the caller found something of the user. With more than ARGV[5] fields left returns {-1} and does nothing;
--     otherwise subtracts what is left (contributions applied meanwhile), deletes the record (parked, never
--     applied contributions with it), its parked-set entry and the user's index entry, counts the user in the
--     counter if anything was found, and returns {items, pairs, popularity, fields, had record, index entries
--     removed, counter value (-1: no counter), counted}.
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
          local sep = string.find(rest, '\31', 1, true)
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
