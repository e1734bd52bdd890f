-- Prelude of the scripts that end a job (after lib/queue.lua).
-- `end_job` writes the final fields, deletes the upload and, when the job names a webhook, puts its delivery in the
-- outbox, due now: in the same script, so an ended job's webhook is never lost. A job's end is also pushed on its
-- `ended` list, which wakes the API's reads waiting for it.
-- A job leaves its level's set of jobs never started, and the count of answers waiting in the queue with it
-- (`leave_queue`, or `take_from_queue` of lib/queue.lua), once per time it joined it (it joins again only when the
-- reaper publishes it again after its worker died mid-run: requeue.lua).
--
-- The constants below are spelled in Python too; tests/unit/test_scripts.py checks that they agree.

-- contract.states.ENDED_STATUSES
local ENDED = {canceled = true, expired = true, failed = true, succeeded = true}
local ENDED_KEY_PREFIX = 'blipq:ended:'  -- contract.keys.ENDED_KEY_PREFIX
local ENDED_KEY_TTL = 120  -- contract.transitions.ENDED_KEY_TTL_S

local function end_job(job, upload, outbox, now, fields)
  redis.call('hset', job, unpack(fields))
  redis.call('del', upload)
  local running = redis.call('hget', job, 'running_set')
  if running then redis.call('zrem', running, redis.call('hget', job, 'id')) end
  local webhook = redis.call('hget', job, 'webhook')
  if webhook and webhook ~= '' then
    redis.call('hset', job, 'webhook_status', 'pending')
    redis.call('zadd', outbox, now, redis.call('hget', job, 'id'))
  end
  -- wake the API's reads that wait for this job to end (GET /v1/jobs/<id>?wait=S)
  local ended = ENDED_KEY_PREFIX .. redis.call('hget', job, 'id')
  redis.call('rpush', ended, '1')
  redis.call('expire', ended, ENDED_KEY_TTL)
end
local function leave_queue(unstarted, id)
  local score = redis.call('zscore', unstarted, id)
  if redis.call('zrem', unstarted, id) == 1 then
    redis.call('hincrby', WAITING, unstarted, -1)
    leave_released(unstarted, score, 1)
  end
end
local function overdue(job, now)
  local deadline = redis.call('hget', job, 'deadline_at')
  return deadline and deadline ~= '' and tonumber(now) >= tonumber(deadline)
end
local function expire(job, upload, outbox, unstarted, deadlines, id, now, finished_at, message)
  leave_queue(unstarted, id)
  redis.call('zrem', deadlines, id)
  end_job(job, upload, outbox, now, {'status', 'expired', 'error_code', 'deadline_exceeded', 'error_message', message,
                                     'finished_at', finished_at})
end
