-- KEYS: campaign hash, res hash, open zset
-- ARGV: cost units, decision_id
local st = redis.call('HGET', KEYS[2], ARGV[2])
if (not st) or string.sub(st, 1, 1) ~= 'A' then return -1 end
local amt = tonumber(string.sub(st, 2))
local charge = math.min(tonumber(ARGV[1]), amt)
redis.call('HINCRBY', KEYS[1], 'spent', charge - amt)
redis.call('HINCRBY', KEYS[1], 'reserved', -amt)
redis.call('HINCRBY', KEYS[1], 'committed', charge)
redis.call('HSET', KEYS[2], ARGV[2], 'S' .. charge)
redis.call('ZREM', KEYS[3], ARGV[2])
return charge
