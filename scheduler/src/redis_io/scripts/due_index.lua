-- The delay queue's Lua library, prepended to every script that touches a
-- shard's due times or records (see redis_io/scripts.rs). Scripts of other
-- features (schedules) hold and withdraw tasks only through dq_hold,
-- dq_held, dq_withdraw and dq_head, with the delay-queue keys the delay
-- queue gave them (its OccurrenceHold): the key layout and the record
-- encoding stay the delay queue's.
--
-- A shard's due times live in DQ_BUCKETS small sorted sets, `IDX:<b>`, the
-- bucket chosen by a hash of the member. Each stays small enough for Redis's
-- compact listpack encoding (at most zset-max-listpack-entries, 128 by
-- default), which costs about a third of a big sorted set per member. The
-- index `IDX` holds, per non-empty bucket, a due time no later than the
-- bucket's earliest: lower only while a removal has not been noticed yet,
-- which dq_take repairs. All the keys share the shard's hash tag.
--
-- Tasks due within DQ_NEAR_MS of being added skip the buckets: they go to
-- one plain sorted set, `IDX:near`, which a claim empties with one range
-- and one removal for a whole batch. Through the buckets a stream of tasks
-- due soon (schedule ticks, short delays, retries) cost each task its own
-- bucket read, removal and index update, since a small backlog leaves about
-- one task per bucket; the buckets are for memory, which a large backlog
-- due later needs, and a backlog due within seconds does not.
-- A prime, as is the modulus below: a power of two would keep only the
-- low bits, which for ids made of hex digits and dashes use half the buckets.
local DQ_BUCKETS = 2039
local DQ_NEAR_MS = 10000

-- Redis's clock (ms), read once per script run; dq_time_us is the same
-- reading in microseconds (exact in a Lua double until the year 2255).
local dq_time = nil
local dq_time_us = nil
local function dq_now()
  if dq_time == nil then
    local t = redis.call('TIME')
    dq_time_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    dq_time = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return dq_time
end

local function dq_bucket(member)
  local h = 5381
  for i = 1, #member do
    -- Below 2^38: exact in Lua's doubles.
    h = (h * 33 + string.byte(member, i)) % 4294967291
  end
  return h % DQ_BUCKETS
end

-- Holds member (not held yet) at due.
local function dq_add(idx, member, due)
  if tonumber(due) <= dq_now() + DQ_NEAR_MS then
    redis.call('ZADD', idx .. ':near', due, member)
    return
  end
  local b = dq_bucket(member)
  redis.call('ZADD', idx .. ':' .. b, due, member)
  redis.call('ZADD', idx, 'LT', due, b)
end

-- Forgets member's due time; returns 1 when it was there.
local function dq_remove(idx, member)
  if redis.call('ZREM', idx .. ':near', member) == 1 then
    return 1
  end
  return redis.call('ZREM', idx .. ':' .. dq_bucket(member), member)
end

-- The shard's earliest due time, or nil.
local function dq_head(idx)
  local far = tonumber(redis.call('ZRANGE', idx, 0, 0, 'WITHSCORES')[2])
  local near = tonumber(redis.call('ZRANGE', idx .. ':near', 0, 0, 'WITHSCORES')[2])
  if far == nil or (near ~= nil and near < far) then
    return near
  end
  return far
end

-- Moves up to limit members of sorted set key due by now onto out, as
-- member, due, member, due...
local function dq_pop(key, now, limit, out)
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  if #due > 0 then
    local members = {}
    for i = 1, #due, 2 do
      members[#members + 1] = due[i]
      out[#out + 1] = due[i]
      out[#out + 1] = due[i + 1]
    end
    redis.call('ZREM', key, unpack(members))
  end
end

-- Removes and returns up to limit members due by now, as a flat list
-- {member1, due1, member2, due2, ...}: the near set's first, then the
-- earliest buckets'. (Only a claimer that falls behind a stream of tasks due
-- soon leaves tasks in the buckets waiting behind later ones.)
local function dq_take(idx, now, limit)
  local out = {}
  dq_pop(idx .. ':near', now, limit, out)
  if #out / 2 >= limit then
    return out
  end
  local buckets = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, limit)
  for _, b in ipairs(buckets) do
    local left = limit - #out / 2
    if left <= 0 then
      break
    end
    local key = idx .. ':' .. b
    dq_pop(key, now, left, out)
    local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if head[2] then
      redis.call('ZADD', idx, head[2], b)
    else
      redis.call('ZREM', idx, b)
    end
  end
  return out
end

-- The hold API. IDX is the shard's due index, REC its record hash.

-- Holds member at due with record unless member is already held (waiting
-- or leased: first submission wins). Returns 1 when it was added.
local function dq_hold(idx, rec, member, due, record)
  if redis.call('HSETNX', rec, member, record) == 0 then
    return 0
  end
  dq_add(idx, member, due)
  return 1
end

-- True while member is held (waiting or leased for publishing).
local function dq_held(rec, member)
  return redis.call('HEXISTS', rec, member) == 1
end

-- Forgets member if it still waits for its due time; one already leased
-- for publishing stays (it is on its way).
local function dq_withdraw(idx, rec, member)
  if dq_remove(idx, member) == 1 then
    redis.call('HDEL', rec, member)
  end
end
