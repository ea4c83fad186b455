-- The task status's Lua library, prepended to merge.lua (the status
-- writer's script, kairos_shared::status) and to the scheduler's
-- cancel.lua. Keys of one task, all under the hash tag {S} of its
-- delay-queue shard: NS:st{S}:t:ID (hash), NS:st{S}:cp:ID (checkpoint),
-- NS:st{S}:recent (zset id -> updated_at ms), NS:st{S}:wait:QUEUE (zset id
-- -> due_at ms, tasks scheduled or retrying).
--
-- Ordering across processes: an update's rank is attempt * 16 + phase
-- (scheduled/retrying 1, ready 2, running 3); finished states rank
-- ST_TERMINAL. An update changes the state only if its rank is higher than
-- the stored one (equal allowed below ST_TERMINAL); one that loses only
-- fills fields that are missing. A field-only update (no state: an error,
-- progress, a result) overwrites its fields of a task that has a status,
-- and creates none.
local ST_TERMINAL = 1099511627776

-- Redis's clock (ms).
local function st_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function st_waiting(state)
  return state == 'scheduled' or state == 'retrying'
end

-- Merges one update. fields is a flat list {name, value, ...}; fresh: a
-- new submission (the intake added the task): a finished status of an
-- earlier submission of the same id is forgotten first, unless it holds
-- the same due_at (then it is this very submission, finished before its
-- `scheduled` update arrived); fresh == 'again' (a replayed dead letter)
-- forgets a finished status whatever its due_at. Returns 1 when the state
-- changed.
local function st_merge(hash, recent, wait_prefix, cp, id, ttl, state, rank, fresh, fields, now)
  local due_in, queue_in = nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'due_at' then
      due_in = fields[i + 1]
    elseif fields[i] == 'queue' then
      queue_in = fields[i + 1]
    end
  end
  local cur = redis.call('HMGET', hash, 'state', 'rank', 'due_at', 'queue')
  if fresh and cur[1] and (tonumber(cur[2]) or 0) >= ST_TERMINAL
      and (fresh == 'again' or cur[3] ~= due_in) then
    redis.call('DEL', hash, cp)
    cur = {false, false, false, false}
  end
  local cur_rank = tonumber(cur[2]) or -1
  local wins = false
  if state ~= '' then
    wins = rank > cur_rank or (rank == cur_rank and rank < ST_TERMINAL)
  elseif not cur[1] then
    -- Fields only, of a task without a status (expired, or status off).
    return 0
  end
  if wins or state == '' then
    local args = {}
    for i = 1, #fields do
      args[#args + 1] = fields[i]
    end
    if wins then
      args[#args + 1] = 'state'
      args[#args + 1] = state
      args[#args + 1] = 'rank'
      args[#args + 1] = rank
    end
    args[#args + 1] = 'updated_at'
    args[#args + 1] = now
    redis.call('HSET', hash, unpack(args))
  else
    for i = 1, #fields, 2 do
      redis.call('HSETNX', hash, fields[i], fields[i + 1])
    end
    redis.call('HSET', hash, 'updated_at', now)
  end
  local due = tonumber(cur[3] or due_in)
  if wins then
    if due_in then
      due = tonumber(due_in)
    end
    local queue = queue_in or cur[4]
    if queue and st_waiting(state) and due then
      local wk = wait_prefix .. queue
      redis.call('ZADD', wk, due, id)
      -- Entries due more than a TTL ago are left over (an update lost
      -- while Redis was down).
      redis.call('ZREMRANGEBYSCORE', wk, '-inf', now - ttl * 1000)
    elseif queue and st_waiting(cur[1]) then
      redis.call('ZREM', wait_prefix .. queue, id)
    end
  end
  -- The caller trims the recent set once per call (st_trim).
  redis.call('ZADD', recent, now, id)
  local keep = ttl
  local final_rank = cur_rank
  if wins then
    final_rank = rank
  end
  if final_rank < ST_TERMINAL and due then
    keep = math.max(ttl, math.floor((due - now) / 1000) + ttl)
  end
  redis.call('EXPIRE', hash, keep)
  redis.call('EXPIRE', cp, keep)
  if wins then
    return 1
  end
  return 0
end

-- Forgets recent entries older than the TTL: once per script run.
local function st_trim(recent, ttl, now)
  redis.call('ZREMRANGEBYSCORE', recent, '-inf', now - ttl * 1000)
end
