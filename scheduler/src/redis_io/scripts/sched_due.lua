-- Reads the schedules of one shard whose next tick falls before now +
-- lookahead: ids and next ticks only. A scheduler that fired a schedule's
-- last tick knows its definition digest and last tick already; it asks
-- for them (`sched_meta.lua`) only for the others. Only reads: the fire
-- script re-checks everything it relies on.
-- KEYS[1] next zset (id -> next tick). ARGV[1] lookahead ms, ARGV[2] batch
-- size. Returns {now, earliest later tick or -1, full 0/1, id1, next1,
-- id2, next2, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = string.format('%d', now + tonumber(ARGV[1]))
local batch = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon, 'WITHSCORES', 'LIMIT', 0, batch)
local out = {now, -1, 0}
for i = 1, #due, 2 do
  out[#out + 1] = due[i]
  out[#out + 1] = tonumber(due[i + 1])
end
if #due / 2 >= batch then
  out[3] = 1
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. horizon, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if later[2] ~= nil then
  out[2] = tonumber(later[2])
end
return out
