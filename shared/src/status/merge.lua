-- Merges status updates of tasks of one shard (see status.lua, prepended).
-- KEYS[1] the shard's recent set, then per update the task's hash and its
-- checkpoint (KEYS[2i], KEYS[2i+1]); ARGV[1] the shard's wait-set prefix
-- (NS:st{S}:wait:), ARGV[2] TTL s, then per update: id, state or '',
-- rank, '1' when fresh ('2' for a run again), the count of field values F, then F values
-- (field, value, field, value...). Returns how many changed state.
-- A call carries a bounded number of updates (the writer's chunk), so it
-- holds Redis for about a millisecond at most.
local fresh_of = {['1'] = true, ['2'] = 'again'}
local now = st_now()
local ttl = tonumber(ARGV[2])
local a = 3
local changed = 0
for i = 1, (#KEYS - 1) / 2 do
  local n = tonumber(ARGV[a + 4])
  local fields = {}
  for j = 1, n do
    fields[j] = ARGV[a + 4 + j]
  end
  changed = changed + st_merge(KEYS[2 * i], KEYS[1], ARGV[1], KEYS[2 * i + 1], ARGV[a], ttl,
    ARGV[a + 1], tonumber(ARGV[a + 2]) or 0, fresh_of[ARGV[a + 3]] or false, fields, now)
  a = a + 5 + n
end
st_trim(KEYS[1], ttl, now)
return changed
