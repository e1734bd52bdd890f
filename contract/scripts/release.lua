-- Releases held jobs and chunks to the workers: at each level, in priority order, while the answers released and not
-- yet started are fewer than the window, the next member is taken from the API keys' lines in deficit round robin.
-- The key at the head of the ring gets QUANTUM x its weight answers when its turn begins, releases members while their
-- answers fit in what it has, then goes to the back of the ring; a key whose line is empty leaves the ring. So with k
-- keys holding work at a level, each gets about its weight's share of the workers, whatever the size of its backlog.
-- A released member is scored with the time of its release in the never-started set; the caller publishes its
-- message, stamped with that time (contract/fair_share.py). A member that will never run is dropped from its line,
-- free of its key's share: a job that left the set while it was held (withdrawn, canceled, expired), or a chunk of a
-- batch closed since (canceled, past its deadline), which leaves the set and the answers waiting here.
-- The window grows with the fleet: `per worker` answers for each worker of the queue in its index (workers_key). The
-- answers released and not started are a count the scripts keep (lib/queue.lua RELEASED_PREFIX); it is recounted from
-- the set when no member is released (a cheap look), and at each call with `recount` (the reaper's sweep), so that a
-- path that missed it (a reaper's call from Python) costs the window at most until then.
-- prelude: lib/queue.lua lib/fair.lua
--
-- KEYS[1]    workers  the queue's index of workers
-- KEYS[2...] levels   for each level, highest first: its set of messages never started, its ring, its fair-share counts
-- ARGV[1] now (epoch s)
-- ARGV[2] answers released ahead of the workers per worker (at least one worker's worth)
-- ARGV[3] QUANTUM: the answers a key of weight 1 may release per turn
-- ARGV[4] recount: 1 to recount the answers released and not started from the set, else 0
-- ARGV[5...] for each level, the prefix of its lines' keys (contract.keys.line_prefix)
-- Returns the members released, each after its level's number (1: the first level given): {level, member, ...}.

local workers_key = KEYS[1]
local now, per_worker, quantum, recount = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'

local STEPS_MAX = 1000  -- steps one call takes per level, whatever the lines hold: a call stays short
local RECOUNT_MAX = 100000  -- members a recount reads at most
local window = per_worker * math.max(1, redis.call('zcard', workers_key))
local released = {}

-- The answers a level has released that no worker has started: the count kept, or recounted from the set.
local function released_ahead(unstarted)
  local field = RELEASED_PREFIX .. unstarted
  if recount or redis.call('zcount', unstarted, '-inf', '(' .. HELD_SCORE) == 0 then
    local total = 0
    for _, member in ipairs(redis.call('zrangebyscore', unstarted, '-inf', '(' .. HELD_SCORE, 'limit', 0,
                                       RECOUNT_MAX)) do
      total = total + member_answers(member)
    end
    redis.call('hset', WAITING, field, total)
    return total
  end
  return math.max(0, tonumber(redis.call('hget', WAITING, field)) or 0)
end

for level = 1, (#KEYS - 1) / 3 do
  local unstarted, ring, shares = KEYS[3 * level - 1], KEYS[3 * level], KEYS[3 * level + 1]
  local prefix = ARGV[4 + level]
  -- No key holds work at the level (the common case with one key and room to spare): nothing to count.
  local room = redis.call('exists', ring) == 1 and window - released_ahead(unstarted) or 0
  local steps = 0
  while room > 0 and steps < STEPS_MAX do
    steps = steps + 1
    local key = redis.call('lindex', ring, 0)
    if not key then break end
    local line = prefix .. key
    local member = redis.call('lindex', line, 0)
    if not member then  -- its line is empty: it leaves the ring, and what it had left of its turn
      redis.call('lpop', ring)
      redis.call('hdel', shares, 'deficit:' .. key)
      if redis.call('hget', shares, 'turn') == key then redis.call('hdel', shares, 'turn') end
    else
      local answers = member_answers(member)
      local score = redis.call('zscore', unstarted, member)
      if score and tonumber(score) < HELD_SCORE then  -- released already (by a requeue): no longer this line's
        redis.call('lpop', line)
        redis.call('hincrby', shares, 'taken:' .. key, answers)
      elseif never_runs(member, score) then  -- dropped, free of charge
        redis.call('lpop', line)
        redis.call('hincrby', shares, 'taken:' .. key, answers)
        if score and redis.call('zrem', unstarted, member) == 1 then
          redis.call('hincrby', WAITING, unstarted, -answers)
        end
      else
        if redis.call('hget', shares, 'turn') ~= key then  -- its turn begins
          local weight = tonumber(redis.call('hget', shares, 'weight:' .. key)) or 1
          redis.call('hincrbyfloat', shares, 'deficit:' .. key, quantum * weight)
          redis.call('hset', shares, 'turn', key)
        end
        if tonumber(redis.call('hget', shares, 'deficit:' .. key)) >= answers then
          redis.call('lpop', line)
          redis.call('hincrbyfloat', shares, 'deficit:' .. key, -answers)
          redis.call('hincrby', shares, 'taken:' .. key, answers)
          redis.call('zadd', unstarted, now, member)
          redis.call('hincrby', WAITING, RELEASED_PREFIX .. unstarted, answers)
          released[#released + 1] = level
          released[#released + 1] = member
          room = room - answers
        else  -- its turn ends: what it has left carries to its next
          redis.call('lmove', ring, ring, 'LEFT', 'RIGHT')
          redis.call('hdel', shares, 'turn')
        end
      end
    end
  end
end
return released
