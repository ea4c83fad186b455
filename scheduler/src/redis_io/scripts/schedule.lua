-- Holds one task in a delay-queue shard unless its key is already there.
-- KEYS[1] due index, KEYS[2] record hash (member -> record)
-- ARGV[1] member, ARGV[2] run_at ms or '' , ARGV[3] delay ms (used when no
-- run_at), ARGV[4] record, ARGV[5] wake channel, ARGV[6] '1' to rewrite an
-- already held record unchanged (the caller then WAITs for replicas on this
-- connection, and WAIT covers only this connection's own writes).
-- Returns {added 0/1, due ms, head 0/1}: head = it is now the shard's earliest.
-- Due times use Redis TIME so every scheduler shares one clock.
local now = dq_now()
local due
if ARGV[2] ~= '' then
  due = tonumber(ARGV[2])
else
  due = now + tonumber(ARGV[3])
end
-- First submission wins while the key waits (or is leased for publishing).
-- Its first write adds memory: at maxmemory (noeviction) it is refused
-- before anything changed, and intake returns the batch to RabbitMQ.
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[4]) == 0 then
  if ARGV[6] == '1' then
    redis.call('HSET', KEYS[2], ARGV[1], redis.call('HGET', KEYS[2], ARGV[1]))
  end
  return {0, due, 0}
end
local head = dq_head(KEYS[1])
dq_add(KEYS[1], ARGV[1], due)
if head == nil or due < head then
  -- Wake other scheduler instances sleeping past this due time.
  redis.call('PUBLISH', ARGV[5], due)
  return {1, due, 1}
end
return {1, due, 0}
