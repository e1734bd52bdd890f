-- Starts a run of a job, unless it expired, ended or was canceled; counts its attempts and gives up after too many.
-- It also takes the job off its level's set of jobs never started (`take_from_queue`). A job still queued at its
-- deadline ends `expired` here, and one whose cancel was asked while it ran (its worker died since) ends `canceled`:
-- neither runs.
-- A job that runs is in its queue's running set (until it ends), for the reaper to notice a worker that died with it.
-- A job still pending (its submission not yet accepted) is not started: the worker asks again shortly.
-- prelude: lib/queue.lua lib/job.lua
--
-- KEYS[1] job        the job's hash
-- KEYS[2] stats      the fleet's counters
-- KEYS[3] unstarted  its level's set of jobs never started
-- KEYS[4] mark       its level's mark (the latest enqueue time of a job started)
-- KEYS[5] upload     its uploaded image
-- KEYS[6] outbox     the webhook outbox
-- KEYS[7] deadlines  its queue's set of deadlines
-- KEYS[8] running    its queue's set of running jobs
-- ARGV[1] max attempts
-- ARGV[2] started_at (ISO 8601)
-- ARGV[3] model
-- ARGV[4] worker
-- ARGV[5] the message of a job given up (started too many times)
-- ARGV[6] job id
-- ARGV[7] now (epoch s)
-- ARGV[8] the message of a job past its deadline
-- ARGV[9] the message of a job canceled while it ran, whose worker died
-- Returns the attempt number (>= 1) or one of the START_* codes of contract/transitions.py.

local job_key, stats_key, unstarted_key, mark_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local upload_key, outbox_key, deadlines_key, running_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local max_attempts, started_at, model, worker, gave_up_message = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local job_id, now, deadline_message, canceled_rerun_message = ARGV[6], ARGV[7], ARGV[8], ARGV[9]

if redis.call('hget', job_key, 'pending') == '1' then return -5 end
take_from_queue(unstarted_key, mark_key, job_id, 1)
redis.call('zrem', deadlines_key, job_id)
if redis.call('exists', job_key) == 0 then return -1 end
local status = redis.call('hget', job_key, 'status')
if status == 'canceled' then return -3 end
if status == 'expired' then return -4 end
if ENDED[status] then
  redis.call('hincrby', stats_key, 'duplicate_deliveries', 1)
  return 0
end
if status == 'queued' and overdue(job_key, now) then
  expire(job_key, upload_key, outbox_key, unstarted_key, deadlines_key, job_id, now, started_at, deadline_message)
  return -4
end
if status ~= 'queued' and redis.call('hget', job_key, 'cancel_requested') == '1' then
  end_job(job_key, upload_key, outbox_key, now, {'status', 'canceled', 'error_code', 'canceled',
                                                 'error_message', canceled_rerun_message, 'finished_at', started_at})
  return -3
end
local attempt = redis.call('hincrby', job_key, 'attempts', 1)
if attempt > max_attempts then
  end_job(job_key, upload_key, outbox_key, now, {'status', 'failed', 'error_code', 'worker_lost',
                                                 'error_message', gave_up_message, 'finished_at', started_at})
  redis.call('hincrby', stats_key, 'worker_lost', 1)
  return -2
end
redis.call('hset', job_key, 'status', 'running', 'started_at', started_at, 'model', model, 'worker', worker,
           'running_set', running_key)
redis.call('zadd', running_key, now, job_id)
redis.call('hincrby', stats_key, 'executions', 1)
if attempt > 1 then redis.call('hincrby', stats_key, 'reruns', 1) end
return attempt
