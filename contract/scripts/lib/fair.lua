-- Prelude: fair share between API keys within a queue level (contract/fair_share.py); after lib/queue.lua.
-- An accepted job or chunk joins its level's never-started set scored HELD_SCORE + its acceptance time, above every
-- release time: the reaper, which looks for lost messages only below what has left the broker's list, never takes a
-- held member for lost. Its member also joins its API key's line, and the key joins the level's ring. release.lua
-- moves members from the lines to the workers, a key at a time in deficit round robin, and scores them with their
-- release time: from then on they are watched as every published message is.
--
-- The constants below are spelled in Python too; tests/unit/test_scripts.py checks that they agree.

local CHUNK_PREFIX = 'chunk:'  -- contract.batches.CHUNK_MEMBER_PREFIX
local PUSH_MAX = 1000  -- members pushed by one RPUSH (unpack's limit is a few thousand)
local BATCH_PREFIX = 'blipq:batch:'  -- contract.keys.BATCH_KEY_PREFIX

-- Whether a held member will never run: a job no longer in its level's set (canceled, expired, withdrawn: `score`
-- nil), or a chunk of a batch closed (canceled or past its deadline).
local function never_runs(member, score)
  if not score then return true end
  if string.sub(member, 1, #CHUNK_PREFIX) ~= CHUNK_PREFIX then return false end
  local closed = redis.call('hget', BATCH_PREFIX .. string.match(member, '^chunk:([^:]+):'), 'closed')
  return closed ~= false and closed ~= ''
end

-- The answers a never-started member stands for: a chunk's are the last field of its name, a job's is one.
local function member_answers(member)
  if string.sub(member, 1, #CHUNK_PREFIX) ~= CHUNK_PREFIX then return 1 end
  return tonumber(string.match(member, ':(%d+)$'))
end

-- Members accepted into an API key's line at a level, and its weight written. A key that held nothing there joins
-- the ring at its front: its turn comes next, as a new flow's does in FQ-CoDel, so that a key with little to ask waits
-- for no other key's turn (one whose line never empties stays in the ring, and takes its turns in order). Returns the
-- key's count of answers ever arrived in that line, these included: their ticket there.
local function join_line(ring, shares, line, key, weight, members, answers)
  for first = 1, #members, PUSH_MAX do
    redis.call('rpush', line, unpack(members, first, math.min(#members, first + PUSH_MAX - 1)))
  end
  if redis.call('hsetnx', shares, 'deficit:' .. key, 0) == 1 then redis.call('lpush', ring, key) end
  redis.call('hset', shares, 'weight:' .. key, weight)
  return redis.call('hincrby', shares, 'arrived:' .. key, answers)
end
