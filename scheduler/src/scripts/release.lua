-- Returns leased tasks whose publish failed to the due set at once, so a
-- broker outage delays them by the reconnect, not by the lease.
-- KEYS[1] due zset, KEYS[3] lease zset; ARGV member1, due1, member2, due2...
-- Only members still in this lease are moved: another instance may own them.
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    moved = moved + 1
  end
end
return moved
