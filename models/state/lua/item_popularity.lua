local function f17(x) return string.format('%.17g', x) end
local hl = {pop_half_life_ms}
local maxpop = {max_popular}
local ts = tonumber(ARGV[1])
local e = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
if (ts - e) / hl > {rescale_half_lives} then
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', f17(2 ^ (-(ts - e) / hl)))
  e = ts
end
redis.call('SET', KEYS[2], f17(e))
local g = 2 ^ ((ts - e) / hl)
for i = 2, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], f17(tonumber(ARGV[i + 1]) * g), ARGV[i])
end
local card = redis.call('ZCARD', KEYS[1])
if card > 2 * maxpop then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, card - maxpop - 1) end
return card
