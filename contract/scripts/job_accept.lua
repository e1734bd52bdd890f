-- Makes a job stored `pending` (by the API) one that runs: it joins its level's set of jobs never started (the
-- reaper's watch), held (lib/fair.lua), and the count of answers waiting, and its API key's line at that level, from
-- which release.lua gives it to the workers in its key's turn. Until then no worker starts it (job_start.lua answers
-- START_PENDING) and the reaper does not see it: a job whose submission fails is never run.
-- The job records its tickets: where it stands in its level's line (lib/queue.lua join_queue) and in its key's
-- (lib/fair.lua join_line), for its end estimate.
-- prelude: lib/queue.lua lib/fair.lua
--
-- KEYS[1] job        the job's hash
-- KEYS[2] unstarted  its level's set of jobs never started
-- KEYS[3] ring       its level's ring of API keys
-- KEYS[4] shares     its level's fair-share counts
-- KEYS[5] line       its API key's line at its level
-- ARGV[1] job id
-- ARGV[2] now (epoch s)
-- ARGV[3] its API key's name in the lines (contract.fair_share.share_name)
-- ARGV[4] that key's weight
-- Returns 1 when accepted, 0 when it was not pending.

local job_key, unstarted_key, ring_key, shares_key, line_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_id, now, share, weight = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('hget', job_key, 'pending') ~= '1' then return 0 end
redis.call('hdel', job_key, 'pending')
if redis.call('hget', job_key, 'status') == 'queued' then
  redis.call('zadd', unstarted_key, HELD_SCORE + tonumber(now), job_id)
  redis.call('hset', job_key, 'ticket', join_queue(unstarted_key, 1),
             'line_ticket', join_line(ring_key, shares_key, line_key, share, weight, {job_id}, 1))
end
return 1
