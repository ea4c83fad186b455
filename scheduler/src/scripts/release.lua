-- Returns leased tasks whose publish failed to the due index at once, so a
-- broker outage delays them by the reconnect, not by the lease.
-- KEYS[1] due index, KEYS[3] lease zset; ARGV member1, due1, member2, due2...
-- Only members still in this lease are moved: another instance may own them;
-- so a repeat after a lost reply moves nothing twice. Run with allow-oom:
-- each moves a due time back where the claim took it from.
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
    dq_add(KEYS[1], ARGV[i], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
