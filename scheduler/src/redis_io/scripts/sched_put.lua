-- Creates, replaces, pauses, resumes or deletes one schedule.
-- KEYS[1] next zset, KEYS[2] definition hash, KEYS[3] state hash,
-- KEYS[4], KEYS[5] the delay-queue shard's hold keys (passed on to the
-- delay queue's library unchanged).
-- ARGV[1] id, ARGV[2] definition JSON ('' = delete), ARGV[3] next tick
-- ('' = none), ARGV[4] '1' to withdraw occurrences handed to the delay
-- queue ahead of their tick and not yet claimed for publishing.
-- The last fired tick is kept even on delete, so a schedule deleted and
-- created again never fires a tick twice.
local id = ARGV[1]
local f = id .. '\t'
if ARGV[4] == '1' then
  for m in string.gmatch(redis.call('HGET', KEYS[3], f .. 'pending') or '', '%S+') do
    dq_withdraw(KEYS[4], KEYS[5], m)
  end
  redis.call('HDEL', KEYS[3], f .. 'pending')
end
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[3], f .. 'outcome', f .. 'skipped', f .. 'run', f .. 'run_until', f .. 'pending', f .. 'failed')
  return redis.call('HDEL', KEYS[2], id)
end
-- A new definition starts without the failure the ticker noted for the old.
redis.call('HDEL', KEYS[3], f .. 'failed')
local existed = redis.call('HSET', KEYS[2], id, ARGV[2]) == 0
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], id)
else
  redis.call('ZADD', KEYS[1], ARGV[3], id)
end
if existed then return 0 end
return 1
