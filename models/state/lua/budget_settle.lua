-- KEYS: campaign hash, res hash, open zset
-- ARGV: (cost units, decision_id) pairs: every settlement of one campaign in a batch is one call
-- returns per pair the charge, or -1 where no reservation is open (refused, unknown or already settled: a
-- decision id settled twice, in this call or an earlier one, is charged once)
local out = {}
local released, charged = 0, 0
for i = 1, #ARGV, 2 do
  local did = ARGV[i + 1]
  local st = redis.call('HGET', KEYS[2], did)
  if (not st) or string.sub(st, 1, 1) ~= 'A' then
    out[#out + 1] = -1
  else
    local amt = tonumber(string.sub(st, 2))
    local charge = math.min(tonumber(ARGV[i]), amt)
    released = released + amt
    charged = charged + charge
    redis.call('HSET', KEYS[2], did, 'S' .. charge)
    redis.call('ZREM', KEYS[3], did)
    out[#out + 1] = charge
  end
end
if released > 0 then
  redis.call('HINCRBY', KEYS[1], 'spent', charged - released)
  redis.call('HINCRBY', KEYS[1], 'reserved', -released)
  redis.call('HINCRBY', KEYS[1], 'committed', charged)
end
return out
