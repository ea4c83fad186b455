-- Reads the schedules of one shard whose next tick falls before now +
-- lookahead. Only reads: the fire script re-checks everything it relies on.
-- KEYS[1] next zset (id -> next tick), KEYS[2] definition hash, KEYS[3]
-- state hash. ARGV[1] lookahead ms, ARGV[2] batch size.
-- Returns {now, earliest later tick or -1, full 0/1, id1, next1, digest1,
-- last1, id2, ...}; last = last tick fired, -1 for none; digest = SHA-1 of
-- the definition ('' if missing). The definition itself stays here: a
-- scheduler that parsed it before needs only to know it is the same, and
-- asks for it (`sched_defs.lua`) when it is not.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now + tonumber(ARGV[1])
local batch = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', horizon),
  'WITHSCORES', 'LIMIT', 0, batch)
local out = {now, -1, 0}
for i = 1, #due, 2 do
  local id = due[i]
  out[#out + 1] = id
  out[#out + 1] = tonumber(due[i + 1])
  local def = redis.call('HGET', KEYS[2], id)
  out[#out + 1] = def and redis.sha1hex(def) or ''
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[3], id .. '\tlast') or '-1')
end
if #due / 2 >= batch then
  out[3] = 1
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', horizon), '+inf',
  'WITHSCORES', 'LIMIT', 0, 1)
if later[2] ~= nil then
  out[2] = tonumber(later[2])
end
return out
