-- Puts a job or chunk whose message the reaper publishes again in its level's never-started set, scored now (its
-- wait starts again: it is not published a third time unless this message is lost too). A member still waiting
-- keeps its place in the count of answers waiting; one that had started (its worker died while running it) joins
-- both again. A worker's start may take the member off just before: the reaper then finds it started and takes it
-- off again (worker/reaper.py).
-- prelude: lib/queue.lua
--
-- KEYS[1] unstarted  the level's set of messages never started
-- ARGV[1] member     a job id or a chunk's member
-- ARGV[2] now (epoch s)
-- ARGV[3] answers    how many answers the member holds
-- Returns 1 when the member joined the set, else 0.

local unstarted_key = KEYS[1]
local member, now, answers = ARGV[1], ARGV[2], tonumber(ARGV[3])

local before = redis.call('zscore', unstarted_key, member)
local joined = redis.call('zadd', unstarted_key, now, member)
if joined == 1 then join_queue(unstarted_key, answers) end  -- at the tail again
if (not before) or tonumber(before) >= HELD_SCORE then  -- released now: counted in the window
  redis.call('hincrby', WAITING, RELEASED_PREFIX .. unstarted_key, answers)
end
return joined
