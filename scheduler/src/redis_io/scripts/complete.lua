-- Forgets tasks whose publish was confirmed by the broker.
-- KEYS[1] due index, KEYS[2] record hash, KEYS[3] lease zset; ARGV[1] '1'
-- when this repeats a call whose outcome is unknown (its reply was lost),
-- then the members.
-- A member is either leased or in the index: one whose lease expired went
-- back to the index while the confirm was on its way, and leaves it here.
-- One removal for all leases; the index is searched only when some member
-- was not leased, which a healthy pump never sees.
-- A repeat forgets only members still leased: if the first call ran, a
-- member no longer leased may since have been submitted again under the
-- same id, and that new task must stay.
-- Run with allow-oom: it only frees memory.
local members = {unpack(ARGV, 2)}
if ARGV[1] == '1' then
  local gone = {}
  for _, m in ipairs(members) do
    if redis.call('ZREM', KEYS[3], m) == 1 then
      gone[#gone + 1] = m
    end
  end
  if #gone == 0 then
    return 0
  end
  return redis.call('HDEL', KEYS[2], unpack(gone))
end
if redis.call('ZREM', KEYS[3], unpack(members)) < #members then
  for _, m in ipairs(members) do
    dq_remove(KEYS[1], m)
  end
end
return redis.call('HDEL', KEYS[2], unpack(members))
