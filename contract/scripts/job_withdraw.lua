-- Withdraws a job whose submission failed (its message could not be published, or too few replicas acknowledged
-- it): deleted with its upload, unless a worker started it already (it then runs, and the API answers 202).
-- prelude: lib/queue.lua lib/job.lua
--
-- KEYS[1] job        the job's hash
-- KEYS[2] upload     its uploaded image
-- KEYS[3] unstarted  its level's set of jobs never started
-- KEYS[4] deadlines  its queue's set of deadlines
-- ARGV[1] job id
-- Returns 1 when withdrawn, 0 when a worker had started it, -1 when the job is missing.

local job_key, upload_key, unstarted_key, deadlines_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id = ARGV[1]

local status = redis.call('hget', job_key, 'status')
if not status then return -1 end
if status ~= 'queued' then return 0 end
leave_queue(unstarted_key, job_id)
redis.call('zrem', deadlines_key, job_id)
redis.call('del', job_key, upload_key)
return 1
