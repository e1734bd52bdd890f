-- Cancels a job: a queued one ends `canceled` at once (its message, when a worker takes it, is refused by
-- job_start.lua); a running one is marked `cancel_requested` and runs to its end. A queued job already past its
-- deadline ends `expired` instead, as its next read would show.
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
-- ARGV[5] the message of a job canceled
-- Returns one of the CANCEL_* codes of contract/transitions.py.

local job_key, upload_key, outbox_key, unstarted_key, deadlines_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, finished_at, job_id, deadline_message, canceled_message = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('exists', job_key) == 0 then return -1 end
local status = redis.call('hget', job_key, 'status')
if ENDED[status] then return 0 end
if status == 'queued' and overdue(job_key, now) then
  expire(job_key, upload_key, outbox_key, unstarted_key, deadlines_key, job_id, now, finished_at, deadline_message)
  return 0
end
redis.call('hset', job_key, 'cancel_requested', '1')
if status ~= 'queued' then return 2 end
leave_queue(unstarted_key, job_id)
redis.call('zrem', deadlines_key, job_id)
end_job(job_key, upload_key, outbox_key, now, {'status', 'canceled', 'error_code', 'canceled',
                                               'error_message', canceled_message, 'finished_at', finished_at})
return 1
