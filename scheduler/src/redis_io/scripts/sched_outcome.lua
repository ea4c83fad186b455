-- Records what became of an occurrence, from the workers' events.
-- KEYS[1] state hash. ARGV[1] schedule id, ARGV[2] occurrence id (task
-- id), ARGV[3] its tick, ARGV[4] '1' when the occurrence is over
-- (succeeded or dead), ARGV[5] outcome JSON.
-- An older occurrence's late event never hides a newer one's outcome.
local f = ARGV[1] .. '\t'
local tick = tonumber(ARGV[3])
if ARGV[4] == '1' and redis.call('HGET', KEYS[1], f .. 'run') == ARGV[2] then
  redis.call('HDEL', KEYS[1], f .. 'run', f .. 'run_until')
end
local prev = redis.call('HGET', KEYS[1], f .. 'outcome')
if prev then
  local ok, old = pcall(cjson.decode, prev)
  if ok and type(old) == 'table' and tonumber(old.tick or 0) > tick then
    return 0
  end
end
redis.call('HSET', KEYS[1], f .. 'outcome', ARGV[5])
return 1
