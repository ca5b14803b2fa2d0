-- KEYS: campaign hash, res hash, open zset, gc zset
-- ARGV: now_ms, limit
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, d in ipairs(due) do
  local st = redis.call('HGET', KEYS[2], d)
  if st and string.sub(st, 1, 1) == 'A' then
    local amt = tonumber(string.sub(st, 2))
    redis.call('HINCRBY', KEYS[1], 'spent', -amt)
    redis.call('HINCRBY', KEYS[1], 'reserved', -amt)
    redis.call('HSET', KEYS[2], d, 'S0')
  end
  redis.call('ZREM', KEYS[3], d)
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, d in ipairs(old) do
  local st = redis.call('HGET', KEYS[2], d)
  if (not st) or string.sub(st, 1, 1) ~= 'A' then redis.call('HDEL', KEYS[2], d) end
  redis.call('ZREM', KEYS[4], d)
end
return #due
