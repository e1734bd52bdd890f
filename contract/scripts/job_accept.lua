-- Makes a job stored `pending` (by the API, before its message was published) one that runs: it joins its level's
-- set of jobs never started (the reaper's watch) and the count of answers waiting. Until then no worker starts it
-- (job_start.lua answers START_PENDING) and the reaper does not see it: a job whose submission fails is never run.
-- The job records its ticket (lib/queue.lua join_queue): where it stands in its level's line, for its end estimate.
-- prelude: lib/queue.lua
--
-- KEYS[1] job        the job's hash
-- KEYS[2] unstarted  its level's set of jobs never started
-- ARGV[1] job id
-- ARGV[2] now (epoch s)
-- Returns 1 when accepted, 0 when it was not pending.

local job_key, unstarted_key = KEYS[1], KEYS[2]
local job_id, now = ARGV[1], ARGV[2]

if redis.call('hget', job_key, 'pending') ~= '1' then return 0 end
redis.call('hdel', job_key, 'pending')
if redis.call('hget', job_key, 'status') == 'queued' then
  redis.call('zadd', unstarted_key, now, job_id)
  redis.call('hset', job_key, 'ticket', join_queue(unstarted_key, 1))
end
return 1
