-- Forgets tasks whose publish was confirmed by the broker.
-- KEYS[1] due index, KEYS[2] record hash, KEYS[3] lease zset; ARGV members.
-- A member is either leased or in the index: one whose lease expired went
-- back to the index while the confirm was on its way, and leaves it here.
-- One removal for all leases; the index is searched only when some member
-- was not leased, which a healthy pump never sees.
if redis.call('ZREM', KEYS[3], unpack(ARGV)) < #ARGV then
  for _, m in ipairs(ARGV) do
    dq_remove(KEYS[1], m)
  end
end
return redis.call('HDEL', KEYS[2], unpack(ARGV))
