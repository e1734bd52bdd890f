-- Ends a queued job `expired` if it is past its deadline (a read by the API, the reaper's look at due deadlines).
-- prelude: lib/queue.lua lib/job.lua
--
-- KEYS[1] job        the job's hash
-- KEYS[2] upload     its uploaded image
-- KEYS[3] outbox     the webhook outbox
-- KEYS[4] unstarted  its level's set of jobs never started
-- KEYS[5] deadlines  its queue's set of deadlines
-- ARGV[1] now (epoch s)
-- ARGV[2] finished_at (ISO 8601)
-- ARGV[3] job id
-- ARGV[4] the message of a job past its deadline
-- Returns 1 when it expired the job, 0 when not, -1 when the job is missing.

local job_key, upload_key, outbox_key, unstarted_key, deadlines_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, finished_at, job_id, deadline_message = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('exists', job_key) == 0 then
  redis.call('zrem', deadlines_key, job_id)
  return -1
end
if redis.call('hget', job_key, 'status') ~= 'queued' then
  redis.call('zrem', deadlines_key, job_id)
  return 0
end
if not overdue(job_key, now) then return 0 end
expire(job_key, upload_key, outbox_key, unstarted_key, deadlines_key, job_id, now, finished_at, deadline_message)
return 1
