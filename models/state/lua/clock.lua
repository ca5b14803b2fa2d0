-- KEYS: [clock hash]; ARGV: [partition, watermark, seen] x n. Each field ("<watermark> <seen>") keeps the larger
-- of each, so a worker that lost a partition in a rebalance cannot move its entry back; returns the whole hash.
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
