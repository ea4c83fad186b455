-- One shard's lease: who serves it (scheduler/src/shards).
-- KEYS[1] the shard's owner key NS:own{S} (same hash tag as the shard).
-- ARGV[1] this instance's id, ARGV[2] the shard's desired owner as this
-- instance sees the members ('' for nobody: this instance leaves),
-- ARGV[3] lease ms.
-- Returns 0: held by another instance, or free and not this one's to take;
-- 1: acquired; 2: renewed; 3: handed off to the desired owner (it renews
-- it as its own on its next round); 4: released (nobody to hand it to).
-- Only the holder moves a held lease: two instances never both think they
-- hold it. An instance that died stops renewing and its lease expires.
-- Run with allow-oom, as own_members.lua.
local me, want, lease = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('GET', KEYS[1])
if not owner then
  if want == me then
    redis.call('SET', KEYS[1], me, 'PX', lease)
    return 1
  end
  return 0
end
if owner ~= me then
  return 0
end
if want == me then
  redis.call('PEXPIRE', KEYS[1], lease)
  return 2
end
if want == '' then
  redis.call('DEL', KEYS[1])
  return 4
end
redis.call('SET', KEYS[1], want, 'PX', lease)
return 3
