-- Shared by every script that touches a shard's due times (prepended at
-- build time, see delay_queue.rs).
--
-- A shard's due times live in DQ_BUCKETS small sorted sets, `IDX:<b>`, the
-- bucket chosen by a hash of the member. Each stays small enough for Redis's
-- compact listpack encoding (at most zset-max-listpack-entries, 128 by
-- default), which costs about a third of a big sorted set per member. The
-- index `IDX` holds, per non-empty bucket, a due time no later than the
-- bucket's earliest: lower only while a removal has not been noticed yet,
-- which dq_take repairs. All the keys share the shard's hash tag.
-- A prime, as is the modulus below: a power of two would keep only the
-- low bits, which for ids made of hex digits and dashes use half the buckets.
local DQ_BUCKETS = 2039

local function dq_bucket(member)
  local h = 5381
  for i = 1, #member do
    -- Below 2^38: exact in Lua's doubles.
    h = (h * 33 + string.byte(member, i)) % 4294967291
  end
  return h % DQ_BUCKETS
end

-- Holds member at due (or moves it there).
local function dq_add(idx, member, due)
  local b = dq_bucket(member)
  redis.call('ZADD', idx .. ':' .. b, due, member)
  redis.call('ZADD', idx, 'LT', due, b)
end

-- Forgets member's due time; returns 1 when it was there.
local function dq_remove(idx, member)
  return redis.call('ZREM', idx .. ':' .. dq_bucket(member), member)
end

-- The shard's earliest due time, or nil.
local function dq_head(idx)
  local head = redis.call('ZRANGE', idx, 0, 0, 'WITHSCORES')
  return tonumber(head[2])
end

-- Removes and returns up to limit members due by now, as a flat list
-- {member1, due1, member2, due2, ...}, earliest buckets first.
local function dq_take(idx, now, limit)
  local out = {}
  local buckets = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, limit)
  for _, b in ipairs(buckets) do
    local left = limit - #out / 2
    if left <= 0 then
      break
    end
    local key = idx .. ':' .. b
    local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, left)
    if #due > 0 then
      local members = {}
      for i = 1, #due, 2 do
        members[#members + 1] = due[i]
        out[#out + 1] = due[i]
        out[#out + 1] = due[i + 1]
      end
      redis.call('ZREM', key, unpack(members))
    end
    local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if head[2] then
      redis.call('ZADD', idx, head[2], b)
    else
      redis.call('ZREM', idx, b)
    end
  end
  return out
end
