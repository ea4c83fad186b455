-- Claims a batch of due tasks from one shard into its lease set.
-- KEYS[1] due index, KEYS[2] record hash, KEYS[3] lease zset (member ->
-- expiry), KEYS[4] this claimer's last claim (see below)
-- ARGV[1] batch size, ARGV[2] lease ms, ARGV[3] ahead ms: tasks due up to
-- this long after now are claimed too (the pump holds them until due),
-- ARGV[4] the claim's round: the claimer's count of claims answered so far,
-- ARGV[5] byte budget: the claim stops taking records once their summed
-- size reaches it (it always takes the first), so a batch of big bodies
-- stays within the pump's memory; the rest go back to the due index, due
-- as they were, and the head reported below makes the pump claim again.
-- Returns {now (microseconds), next due or -1, member1, due1, record1,
-- member2, ...}: the pump times publishes from it to the microsecond.
-- Expired leases (an instance died between claim and delete) go back to the
-- due index first, so they are claimed again right here.
--
-- A claim whose reply is lost (the client timed out while Redis was
-- stalled) has still leased its tasks: the claimer would find them only
-- when the lease expires. So each claim that leases tasks keeps their
-- members and due times under KEYS[4] with its round, for as long as the
-- lease; a claimer that did not get its reply sends the same round again
-- and gets the same tasks back (those still leased), and nothing else.
-- Run with allow-oom (the flags line is prepended, see redis_io/scripts.rs): a
-- claim moves tasks out and its memory is freed by complete; refusing it at
-- maxmemory would stop the only way memory comes back.
-- The claim's record is one string, round, member, due, member, due...
-- separated by newlines (ids are printable ASCII, members add a tab: no
-- newline): a single SET, and due times of 13 digits survive Lua's
-- number formatting (14 significant digits).
-- The reply's second value: the earliest due time left in the index.
local function with_head(out)
  local head = dq_head(KEYS[1])
  if head ~= nil then
    out[2] = head
  end
  return out
end

local kept = redis.call('GET', KEYS[4])
if kept and string.sub(kept, 1, #ARGV[4] + 1) == ARGV[4] .. '\n' then
  local last = {}
  for part in string.gmatch(kept, '[^\n]+') do
    last[#last + 1] = part
  end
  dq_now()
  local out = {dq_time_us, -1}
  for i = 2, #last - 1, 2 do
    local m, due = last[i], tonumber(last[i + 1])
    if due and redis.call('ZSCORE', KEYS[3], m) then
      local record = redis.call('HGET', KEYS[2], m)
      if record then
        out[#out + 1] = m
        out[#out + 1] = due
        out[#out + 1] = record
      end
    end
  end
  return with_head(out)
end
local now = dq_now()
local batch = tonumber(ARGV[1])
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
  local budget = tonumber(ARGV[5])
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
  -- of 5,000 leases is 10,000 (an even slice keeps score-member pairs).
  local slice = 4000
  for i = 1, #live, slice do
    redis.call('ZADD', KEYS[3], unpack(live, i, math.min(i + slice - 1, #live)))
  end
end
if #out > 2 then
  local last = {ARGV[4]}
  for i = 3, #out, 3 do
    last[#last + 1] = out[i]
    last[#last + 1] = out[i + 1]
  end
  redis.call('SET', KEYS[4], table.concat(last, '\n'), 'PX', ARGV[2])
elseif kept then
  redis.call('DEL', KEYS[4])
end
return with_head(out)
