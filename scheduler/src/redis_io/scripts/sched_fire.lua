-- Fires schedules of one shard: for each, a compare-and-set on its next
-- tick and definition (by its SHA-1 digest), then its occurrences into the
-- delay queue and the next tick, all in one atomic step. Of N schedulers that read the same
-- tick, exactly one passes the compare; the others change nothing.
-- KEYS[1] next zset, KEYS[2] definition hash, KEYS[3] state hash,
-- KEYS[4], KEYS[5] the delay-queue shard's hold keys (same slot; passed on
-- to the delay queue's library unchanged).
-- ARGV[1] wake channel, ARGV[2] item count, then per item:
--   id, expected next, the definition's digest as read ('' = it was
--   missing), new next ('' = none), overlap skip '1'/'0', max run ms, n,
--   then n x (member, tick, record).
-- Returns per item {fired 0/1, enqueued, skipped for overlap}.
local head_due = dq_head(KEYS[4]) or -1
local earliest = nil
local out = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local id, expected, digest_read, new_next = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local skip_overlap, run_ms, n = ARGV[i + 4] == '1', tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local first = i + 7
  i = first + 3 * n
  local cur = redis.call('ZSCORE', KEYS[1], id)
  local def = redis.call('HGET', KEYS[2], id)
  local digest = def and redis.sha1hex(def) or ''
  if cur and tonumber(cur) == tonumber(expected) and (not def) and digest_read == '' then
    -- A next tick without a definition (deleted meanwhile): drop it.
    redis.call('ZREM', KEYS[1], id)
    out[#out + 1] = {1, 0, 0}
  elseif (not cur) or tonumber(cur) ~= tonumber(expected) or digest ~= digest_read then
    out[#out + 1] = {0, 0, 0}
  else
    local f = id .. '\t'
    -- One call for the state: this runs for every tick of every schedule.
    -- The overlap hold is read only where it is used (most schedules
    -- overlap freely): each field costs Redis a lookup.
    local st
    if skip_overlap then
      st = redis.call('HMGET', KEYS[3], f .. 'last', f .. 'pending', f .. 'run', f .. 'run_until')
    else
      st = redis.call('HMGET', KEYS[3], f .. 'last', f .. 'pending')
    end
    local last = tonumber(st[1] or '-1')
    local running = st[3]
    local run_until = tonumber(st[4] or '0')
    -- Occurrences handed over earlier and still waiting: pause removes them.
    local pending = {}
    for m in string.gmatch(st[2] or '', '%S+') do
      if dq_held(KEYS[5], m) then
        pending[#pending + 1] = m
      end
    end
    local added, skipped = 0, 0
    for j = first, first + 3 * n - 1, 3 do
      local member, tick, record = ARGV[j], tonumber(ARGV[j + 1]), ARGV[j + 2]
      -- Never fire a tick twice, even after the schedule was replaced.
      if tick > last then
        last = tick
        if skip_overlap and running and run_until > tick then
          skipped = skipped + 1
          redis.call('HSET', KEYS[3], f .. 'skipped', string.format('%d', tick))
        elseif dq_hold(KEYS[4], KEYS[5], member, tick, record) == 1 then
          added = added + 1
          pending[#pending + 1] = member
          if earliest == nil or tick < earliest then
            earliest = tick
          end
          if skip_overlap then
            running, run_until = member, tick + run_ms
            redis.call('HSET', KEYS[3], f .. 'run', member, f .. 'run_until', string.format('%d', run_until))
          end
        end
      end
    end
    redis.call('HSET', KEYS[3], f .. 'last', string.format('%d', last), f .. 'pending', table.concat(pending, ' '))
    if new_next == '' then
      redis.call('ZREM', KEYS[1], id)
    else
      redis.call('ZADD', KEYS[1], new_next, id)
    end
    out[#out + 1] = {1, added, skipped}
  end
end
if earliest ~= nil and (head_due < 0 or earliest < head_due) then
  -- Wake every scheduler's pump: a new earliest task in this shard.
  redis.call('PUBLISH', ARGV[1], string.format('%d', earliest))
end
return out
