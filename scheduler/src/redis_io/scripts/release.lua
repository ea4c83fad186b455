-- Returns leased tasks whose publish failed to the due index at once, so a
-- broker outage delays them by the reconnect, not by the lease.
-- KEYS[1] due index, KEYS[3] lease zset; ARGV[1] the least delay in ms from
-- now (Redis TIME) before the task falls due again, 0 for none (a refused
-- publish is paced so the pump does not claim and publish it again at
-- once); then member1, due1, member2, due2...
-- Only members still in this lease are moved: another instance may own them;
-- so a repeat after a lost reply moves nothing twice. Run with allow-oom:
-- each moves a due time back where the claim took it from.
local moved = 0
local delay = tonumber(ARGV[1])
local floor = 0
if delay > 0 then
  floor = dq_now() + delay
end
for i = 2, #ARGV, 2 do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
    dq_add(KEYS[1], ARGV[i], math.max(tonumber(ARGV[i + 1]), floor))
    moved = moved + 1
  end
end
return moved
