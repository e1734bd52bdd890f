-- Prelude: a level's set of messages never started, and the count of answers waiting in it.
-- A start, of a job or of a batch's chunk, takes the member off its level's set of jobs never started, with its
-- answers from the waiting count, and moves the level's mark (the latest enqueue time of a job started) forward: see
-- worker/reaper.py. The admission check reads that count (contract.keys.waiting_answers_key).
--
-- The constants below are spelled in Python too; tests/unit/test_scripts.py checks that they agree.

local WAITING = 'blipq:waiting-answers'  -- contract.keys.WAITING_ANSWERS_KEY
local ARRIVED_PREFIX = 'arrived:'  -- contract.keys.ARRIVED_FIELD_PREFIX
-- Added to the score of a member held in its API key's line (lib/fair.lua); never a mark.
local HELD_SCORE = 10000000000  -- contract.keys.HELD_SCORE
-- The waiting-answers hash's fields of the answers released to the workers and not yet started, per level: the window
-- release.lua fills (moved here as members leave the set, recounted by release.lua when it may have drifted).
local RELEASED_PREFIX = 'released:'  -- contract.keys.RELEASED_FIELD_PREFIX

-- A released member (scored below HELD_SCORE) leaves its level's set: its answers leave the released count.
local function leave_released(unstarted, score, answers)
  if score and tonumber(score) < HELD_SCORE then
    redis.call('hincrby', WAITING, RELEASED_PREFIX .. unstarted, -answers)
  end
end

-- Answers join a level's queue at its tail: counted waiting, and arrived (a field of the same hash). Returns the
-- level's count of answers ever arrived, these included: their ticket, where they stand in line (first in, first out
-- within a level).
local function join_queue(unstarted, answers)
  redis.call('hincrby', WAITING, unstarted, answers)
  return redis.call('hincrby', WAITING, ARRIVED_PREFIX .. unstarted, answers)
end

local function take_from_queue(unstarted, mark, member, answers)
  local enqueued = redis.call('zscore', unstarted, member)
  if not enqueued then return end
  redis.call('zrem', unstarted, member)
  redis.call('hincrby', WAITING, unstarted, -answers)
  leave_released(unstarted, enqueued, answers)
  local latest = redis.call('get', mark)
  if tonumber(enqueued) >= HELD_SCORE then return end
  if (not latest) or tonumber(enqueued) > tonumber(latest) then redis.call('set', mark, enqueued) end
end
