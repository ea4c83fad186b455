-- Forgets tasks whose publish was confirmed by the broker.
-- KEYS[1] due zset, KEYS[2] record hash, KEYS[3] lease zset; ARGV members.
-- Removing from the due set too covers a lease that expired and was
-- returned there while the confirm was on its way.
redis.call('ZREM', KEYS[3], unpack(ARGV))
redis.call('ZREM', KEYS[1], unpack(ARGV))
return redis.call('HDEL', KEYS[2], unpack(ARGV))
