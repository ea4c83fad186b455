-- Saves a task's checkpoint, expiring with its status.
-- KEYS[1] the task's hash, KEYS[2] its checkpoint; ARGV[1] the bytes,
-- ARGV[2] TTL s (used when the status has no expiry of its own).
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', pttl)
else
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
end
return 1
