-- KEYS: [decision hash]. Flags a stored decision as sent to the decisions topic, unless its hash is gone: a
-- ``promo forget`` (or the decision's expiry) between the commit and the send deleted it, and a plain HSET would
-- create it again, with no TTL and the user's id in its key.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sent', '1')
return 1
