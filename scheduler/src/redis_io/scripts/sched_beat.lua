-- A scheduler's heartbeat, shared by all the schedulers of a namespace: it
-- tells a tick missed while no scheduler ran (the misfire policy applies)
-- from a tick that a running scheduler reached late (it fires, late).
-- KEYS[1] beat hash {last, since}. ARGV[1] gap ms: a beat more than this
-- after the previous one starts a new live period.
-- Returns since: the start of the live period (Redis's clock, ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gap = tonumber(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'last', 'since')
local last, since = tonumber(st[1]), tonumber(st[2])
if last == nil or since == nil or now - last > gap or last > now then
  since = now
end
redis.call('HSET', KEYS[1], 'last', string.format('%d', now), 'since', string.format('%d', since))
-- A beat older than the gap means the same as none: the key may go, a
-- margin after that.
local keep_ms = 60000
redis.call('PEXPIRE', KEYS[1], gap + keep_ms)
return since
