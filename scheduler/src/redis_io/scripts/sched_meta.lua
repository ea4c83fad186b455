-- Reads what the fire script's compare-and-set needs of schedules this
-- scheduler did not fire last: the definition's SHA-1 digest ('' if
-- missing; the definition itself comes with `sched_defs.lua` only when the
-- digest is new to the scheduler) and the last tick fired (-1 for none).
-- KEYS[1] definition hash, KEYS[2] state hash; ARGV ids.
-- Returns {digest1, last1, digest2, last2, ...}.
local out = {}
for _, id in ipairs(ARGV) do
  local def = redis.call('HGET', KEYS[1], id)
  out[#out + 1] = def and redis.sha1hex(def) or ''
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[2], id .. '\tlast') or '-1')
end
return out
