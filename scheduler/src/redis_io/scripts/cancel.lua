-- Cancels a task that waits in the delay queue, and marks it `cancelled`
-- in its status, in one atomic step (the delay queue's and the task
-- status's Lua libraries are prepended).
-- KEYS[1] due index, KEYS[2] record hash, KEYS[3] lease zset (the task's
-- delay-queue shard), KEYS[4] the task's status hash, KEYS[5] the shard's
-- recent set, KEYS[6] the task's checkpoint (same hash tag).
-- ARGV[1] id, ARGV[2] the shard's wait-set prefix, ARGV[3] status TTL s,
-- ARGV[4] '1' when task status is on.
-- Tries the members of the stored attempt A: `ID` (attempt 1), `ID<TAB>A`
-- and `ID<TAB>A+1` (a retry held while the status still shows attempt A).
-- Returns {outcome, stored state or ''}: outcome `cancelled` (withdrawn),
-- `leased` (claimed by a pump, being published: too late) or `absent`
-- (not waiting in the delay queue).
local id = ARGV[1]
local cur = redis.call('HMGET', KEYS[4], 'state', 'attempt')
local stored = cur[1] or ''
local attempt = tonumber(cur[2]) or 1
local members = {id}
if attempt >= 2 then
  members[#members + 1] = id .. '\t' .. attempt
end
members[#members + 1] = id .. '\t' .. (attempt + 1)
for _, m in ipairs(members) do
  if redis.call('ZSCORE', KEYS[3], m) then
    return {'leased', stored}
  end
end
for _, m in ipairs(members) do
  if dq_held(KEYS[2], m) then
    local due = redis.call('ZSCORE', KEYS[1] .. ':near', m)
    if not due then
      due = redis.call('ZSCORE', KEYS[1] .. ':' .. dq_bucket(m), m)
    end
    dq_withdraw(KEYS[1], KEYS[2], m)
    if ARGV[4] == '1' then
      local now = st_now()
      local fields = {'finished_at', now}
      if due then
        fields[#fields + 1] = 'due_at'
        fields[#fields + 1] = due
      end
      st_merge(KEYS[4], KEYS[5], ARGV[2], KEYS[6], id, tonumber(ARGV[3]), 'cancelled',
        ST_TERMINAL, false, fields, now)
      st_trim(KEYS[5], tonumber(ARGV[3]), now)
    end
    return {'cancelled', 'cancelled'}
  end
end
return {'absent', stored}
