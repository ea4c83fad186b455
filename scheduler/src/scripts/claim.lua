-- Claims a batch of due tasks from one shard into its lease set.
-- KEYS[1] due index, KEYS[2] record hash, KEYS[3] lease zset (member ->
-- expiry), KEYS[4] the single due zset of Kairos before the index (drained)
-- ARGV[1] batch size, ARGV[2] lease ms, ARGV[3] ahead ms: tasks due up to
-- this long after now are claimed too (the pump holds them until due).
-- ARGV[4] byte budget: the claim stops taking records once their summed
-- size reaches it (it always takes the first), so a batch of big bodies
-- stays within the pump's memory; the rest go back to the due index, due
-- as they were, and the head reported below makes the pump claim again.
-- Returns {now (microseconds), next due or -1, member1, due1, record1,
-- member2, ...}: the pump times publishes from it to the microsecond.
-- Expired leases (an instance died between claim and delete) go back to the
-- due index first, so they are claimed again right here.
local now = dq_now()
local batch = tonumber(ARGV[1])
-- Due times an older version left in one sorted set move into the index, a
-- batch per claim, so an upgrade (even a rolling one) loses nothing.
local legacy = redis.call('ZRANGE', KEYS[4], 0, batch - 1, 'WITHSCORES')
if #legacy > 0 then
  local members = {}
  for i = 1, #legacy, 2 do
    dq_add(KEYS[1], legacy[i], legacy[i + 1])
    members[#members + 1] = legacy[i]
  end
  redis.call('ZREM', KEYS[4], unpack(members))
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, batch)
if #expired > 0 then
  for _, m in ipairs(expired) do
    dq_add(KEYS[1], m, now)
  end
  redis.call('ZREM', KEYS[3], unpack(expired))
end
local due = dq_take(KEYS[1], now + tonumber(ARGV[3]), batch)
local out = {dq_time_us, -1}
if #due > 0 then
  local members = {}
  for i = 1, #due, 2 do
    members[#members + 1] = due[i]
  end
  -- Sizes first (HSTRLEN is O(1)): only what fits the budget is read.
  local budget = tonumber(ARGV[4])
  local bytes = 0
  local take = #members
  for i, m in ipairs(members) do
    if bytes >= budget then
      take = i - 1
      break
    end
    bytes = bytes + redis.call('HSTRLEN', KEYS[2], m)
  end
  for i = take + 1, #members do
    dq_add(KEYS[1], members[i], due[i * 2])
  end
  for i = #members, take + 1, -1 do
    members[i] = nil
  end
  local records = redis.call('HMGET', KEYS[2], unpack(members))
  local live = {}
  local until_ms = now + tonumber(ARGV[2])
  for i, m in ipairs(members) do
    -- A member without a record was already published and deleted by an
    -- instance whose lease had expired: nothing left to do for it.
    if records[i] then
      live[#live + 1] = until_ms
      live[#live + 1] = m
      out[#out + 1] = m
      out[#out + 1] = tonumber(due[i * 2])
      out[#out + 1] = records[i]
    end
  end
  -- In slices: Lua unpacks at most about 8,000 values, and a full batch
  -- of 5,000 leases is 10,000.
  for i = 1, #live, 4000 do
    redis.call('ZADD', KEYS[3], unpack(live, i, math.min(i + 3999, #live)))
  end
end
local head = dq_head(KEYS[1])
if head ~= nil then
  out[2] = head
end
return out
