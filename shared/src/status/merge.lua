-- Merges one status update (see status.lua, prepended).
-- KEYS[1] the task's hash, KEYS[2] the shard's recent set, KEYS[3] the
-- task's checkpoint; ARGV[1] the shard's wait-set prefix (NS:st{S}:wait:),
-- ARGV[2] id, ARGV[3] TTL s, ARGV[4] state or '', ARGV[5] rank, ARGV[6]
-- '1' when fresh, ARGV[7..] field, value, field, value...
return st_merge(KEYS[1], KEYS[2], ARGV[1], KEYS[3], ARGV[2], tonumber(ARGV[3]),
  ARGV[4], tonumber(ARGV[5]) or 0, ARGV[6] == '1', {unpack(ARGV, 7)}, st_now())
