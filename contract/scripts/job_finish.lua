-- Ends a job with its outcome unless it already ended: an answer, once written, never changes. Two runs of one job
-- (a redelivery racing a slow worker) publish one answer; the later one is counted as a duplicate execution.
-- prelude: lib/queue.lua lib/job.lua
--
-- KEYS[1] job     the job's hash
-- KEYS[2] stats   the fleet's counters
-- KEYS[3] upload  its uploaded image
-- KEYS[4] outbox  the webhook outbox
-- ARGV[1] now (epoch s)
-- ARGV[2...] field, value, ... to write
-- Returns 1 when written, 0 when the job had ended, -1 when it is missing (expired).

local job_key, stats_key, upload_key, outbox_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = ARGV[1]

if redis.call('exists', job_key) == 0 then return -1 end
if ENDED[redis.call('hget', job_key, 'status')] then
  redis.call('hincrby', stats_key, 'duplicate_executions', 1)
  return 0
end
end_job(job_key, upload_key, outbox_key, now, {unpack(ARGV, 2)})
return 1
