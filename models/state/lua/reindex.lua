-- KEYS: [profile]; ARGV: [open_index, user_id, earliest expiry ('' for none open), expected_version]. The sweep's
-- correction of a user's index entry, unless the user committed since (that commit wrote the entry).
if (redis.call('HGET', KEYS[1], 'ver') or '') ~= ARGV[4] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', ARGV[1], ARGV[2])
else
  redis.call('ZADD', ARGV[1], ARGV[3], ARGV[2])
end
return 1
