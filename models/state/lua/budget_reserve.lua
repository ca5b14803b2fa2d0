-- KEYS: campaign hash, res hash, open zset, gc zset
-- ARGV: amount units, budget units, open_until_ms, forget_at_ms, decision_id
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local st = redis.call('HGET', KEYS[2], ARGV[5])
if st then
  if string.sub(st, 1, 1) == 'R' then return {0, spent} end
  return {1, spent}
end
local amt = tonumber(ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
if spent + amt > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[5], 'R')
  return {0, spent}
end
redis.call('HINCRBY', KEYS[1], 'spent', amt)
redis.call('HINCRBY', KEYS[1], 'reserved', amt)
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[2], ARGV[5], 'A' .. amt)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
return {1, spent + amt}
