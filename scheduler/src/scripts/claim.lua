-- Claims a batch of due tasks from one shard into its lease set.
-- KEYS[1] due zset, KEYS[2] record hash, KEYS[3] lease zset (member -> expiry)
-- ARGV[1] batch size, ARGV[2] lease ms
-- Returns {now, next due or -1, member1, due1, record1, member2, ...}.
-- Expired leases (an instance died between claim and delete) go back to the
-- due set first, so they are claimed again right here.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local batch = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, batch)
if #expired > 0 then
  local args = {}
  for i, m in ipairs(expired) do
    args[#args + 1] = now
    args[#args + 1] = m
  end
  redis.call('ZADD', KEYS[1], unpack(args))
  redis.call('ZREM', KEYS[3], unpack(expired))
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, batch)
local out = {now, -1}
if #due > 0 then
  local members = {}
  local lease = {}
  local until_ms = now + tonumber(ARGV[2])
  for i = 1, #due, 2 do
    members[#members + 1] = due[i]
    lease[#lease + 1] = until_ms
    lease[#lease + 1] = due[i]
  end
  redis.call('ZREM', KEYS[1], unpack(members))
  local records = redis.call('HMGET', KEYS[2], unpack(members))
  local live = {}
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
  if #live > 0 then
    redis.call('ZADD', KEYS[3], unpack(live))
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if head[2] ~= nil then
  out[2] = tonumber(head[2])
end
return out
