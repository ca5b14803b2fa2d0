local function f17(x) return string.format('%.17g', x) end
local hl = {half_life_ms}
local resc = {rescale_after_ms}
local minsc = {min_score}
local maxnb = {max_neighbours}
local ts = tonumber(ARGV[1])
local ninc = tonumber(ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'n', 't')
local n = tonumber(cur[1]) or 0
local t = tonumber(cur[2]) or ts
if ts - t > resc then
  local f = 2 ^ (-(ts - t) / hl)
  n = n * f
  local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local add, del = {}, {}
  for i = 1, #all, 2 do
    local s = tonumber(all[i + 1]) * f
    if s < minsc then del[#del + 1] = all[i] else add[#add + 1] = f17(s); add[#add + 1] = all[i] end
  end
  if #del > 0 then redis.call('ZREM', KEYS[2], unpack(del)) end
  if #add > 0 then redis.call('ZADD', KEYS[2], unpack(add)) end
  t = ts
end
local g = 2 ^ ((ts - t) / hl)
redis.call('HSET', KEYS[1], 'n', f17(n + ninc * g), 't', f17(t))
if #ARGV < 3 then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[2], f17(tonumber(ARGV[i + 1]) * g), ARGV[i])
end
local card = redis.call('ZCARD', KEYS[2])
if card > maxnb then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, card - maxnb - 1) end
return card
