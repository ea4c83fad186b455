-- Reads schedule definitions with their digests, so that the pair is
-- consistent even when a definition changes between reads.
-- KEYS[1] definition hash; ARGV ids.
-- Returns {digest1, def1, digest2, ...}; '' and '' for a missing one.
local out = {}
for _, id in ipairs(ARGV) do
  local def = redis.call('HGET', KEYS[1], id)
  out[#out + 1] = def and redis.sha1hex(def) or ''
  out[#out + 1] = def or ''
end
return out
