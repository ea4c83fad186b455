-- The schedulers of a namespace that split its shards: each one calls this
-- every third of its shard lease (scheduler/src/shards).
-- KEYS[1] members sorted set: instance id -> expiry (Redis's clock, ms).
-- ARGV[1] this instance's id, ARGV[2] lease ms, ARGV[3] '1' to leave (a
-- graceful stop), else '0'.
-- Returns the live members (expiry after now), in any order: this one is
-- among them unless it leaves. Expiries come from Redis's clock, so the
-- instances' own clocks never decide who is alive.
-- Run with allow-oom: at maxmemory a scheduler must still know its shards,
-- or nobody claims and memory never comes back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
-- A namespace whose schedulers are all gone leaves nothing behind.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], lease * 2)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
