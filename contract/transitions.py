"""The Lua scripts that move a job from state to state in Redis, and what they return.

Every change of a job's state is one of these scripts, run atomically by Redis: a job that ended never changes
again, two runs of one job publish one answer, and a job that names a webhook gets its delivery queued by the very
script that ends it (worker/webhooks.py sends it). `contract.jobs.JobStore` registers and calls them.
"""

from __future__ import annotations

from contract.states import ENDED_STATUSES

DEADLINE_MESSAGE = "the job was still queued at its deadline; it was not run"
CANCELED_MESSAGE = "the job was canceled before it started; it was not run"
CANCELED_RERUN_MESSAGE = "the job was canceled while it ran and its worker died; it is not run again"
BATCH_KEY_PREFIX = "blipq:batch:"  # a batch's hash (jobs.batch_key)
WAITING_ANSWERS_KEY = "blipq:waiting-answers"  # answers waiting per queue level (jobs.waiting_answers_key)
BATCH_OUTBOX_PREFIX = "batch:"  # an outbox member for a batch's webhook, beside the job ids (which have no ':')
ENDED_KEY_PREFIX = "blipq:ended:"  # a job's end, pushed for the API's long polls (jobs.ended_key)
ENDED_KEY_TTL_S = 120  # long enough for any waiting read to see it

# What every script below starts with. `end_job` writes the final fields, deletes the upload and, when the job names
# a webhook, puts its delivery in the outbox, due now: in the same script, so an ended job's webhook is never lost.
# A job's end is also pushed on its `ended` list, which wakes the API's reads waiting for it.
# A job leaves its level's set of jobs never started, and the count of answers waiting in the queue with it
# (`leave_queue`, or `take_from_queue` below: the admission check reads that count,
# contract.jobs.waiting_answers_key), once per time it joined it (it joins again only when the reaper publishes
# it again after its worker died mid-run: REQUEUE_LUA).
#
# A start, of a job or of a batch's chunk (batch_scripts.py uses this too), takes the member off its level's
# set of jobs never started, with its answers from the waiting count, and moves the level's mark (the latest
# enqueue time of a job started) forward: see worker/reaper.py.
TAKE_FROM_QUEUE_LUA = (
    f"local WAITING = '{WAITING_ANSWERS_KEY}'\n"
    + """
local function take_from_queue(unstarted, mark, member, answers)
  local enqueued = redis.call('zscore', unstarted, member)
  if not enqueued then return end
  redis.call('zrem', unstarted, member)
  redis.call('hincrby', WAITING, unstarted, -answers)
  local latest = redis.call('get', mark)
  if (not latest) or tonumber(enqueued) > tonumber(latest) then redis.call('set', mark, enqueued) end
end
"""
)
_LUA_LIBRARY = (
    TAKE_FROM_QUEUE_LUA
    + "local ENDED = {"
    + ", ".join(f"{status}=true" for status in sorted(ENDED_STATUSES))
    + "}\n"
    + f"local ENDED_KEY_PREFIX, ENDED_KEY_TTL = '{ENDED_KEY_PREFIX}', {ENDED_KEY_TTL_S}"
    + """
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
  if redis.call('zrem', unstarted, id) == 1 then redis.call('hincrby', WAITING, unstarted, -1) end
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
"""
)

# Makes a job stored `pending` (by the API, before its message was published) one that runs: it joins its level's set
# of jobs never started (the reaper's watch) and the count of answers waiting. Until then no worker starts it (the
# start script answers START_PENDING) and the reaper does not see it: a job whose submission fails is never run.
# KEYS = job hash, never-started set; ARGV = job id, now (epoch s). Returns 1 when accepted, 0 when it was not pending.
ACCEPT_LUA = (
    TAKE_FROM_QUEUE_LUA
    + """
if redis.call('hget', KEYS[1], 'pending') ~= '1' then return 0 end
redis.call('hdel', KEYS[1], 'pending')
if redis.call('hget', KEYS[1], 'status') == 'queued' then
  redis.call('zadd', KEYS[2], ARGV[2], ARGV[1])
  redis.call('hincrby', WAITING, KEYS[2], 1)
end
return 1
"""
)

# Puts a job or chunk whose message the reaper publishes again in its level's never-started set, scored now (its
# wait starts again: it is not published a third time unless this message is lost too). A member still waiting keeps
# its place in the count of answers waiting; one that had started (its worker died while running it) joins both
# again. A worker's start may take the member off just before: the reaper then finds it started and takes it off
# again (worker/reaper.py).
# KEYS = never-started set; ARGV = member, now (epoch s), answers. Returns 1 when the member joined the set, else 0.
REQUEUE_LUA = (
    f"local WAITING = '{WAITING_ANSWERS_KEY}'\n"
    + """
local joined = redis.call('zadd', KEYS[1], ARGV[2], ARGV[1])
if joined == 1 then redis.call('hincrby', WAITING, KEYS[1], tonumber(ARGV[3])) end
return joined
"""
)

# Withdraws a job whose submission failed (its message could not be published, or too few replicas acknowledged
# it): deleted with its upload, unless a worker started it already (it then runs, and the API answers 202).
# KEYS = job hash, upload, never-started set, deadlines set; ARGV = job id.
# Returns 1 when withdrawn, 0 when a worker had started it, -1 when the job is missing.
WITHDRAW_LUA = (
    _LUA_LIBRARY
    + """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'queued' then return 0 end
leave_queue(KEYS[3], ARGV[1])
redis.call('zrem', KEYS[4], ARGV[1])
redis.call('del', KEYS[1], KEYS[2])
return 1
"""
)

# Starts a run of a job, unless it expired, ended or was canceled; counts its attempts and gives up after too many.
# It also takes the job off its level's set of jobs never started (`take_from_queue`). A job still queued at its
# deadline ends `expired` here, and one whose cancel was asked while it ran (its worker died since) ends `canceled`:
# neither runs.
# A job that runs is in its queue's running set (until it ends), for the reaper to notice a worker that died with it.
# A job still pending (its submission not yet accepted) is not started: the worker asks again shortly.
# KEYS = job hash, stats hash, never-started set, mark, upload, webhook outbox, deadlines set, running set;
# ARGV = max attempts, started_at, model, worker, gave-up message, job id, now (epoch s), deadline message,
# canceled-rerun message. Returns the attempt number (>= 1) or one of the START_* codes below.
START_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('hget', KEYS[1], 'pending') == '1' then return -5 end
take_from_queue(KEYS[3], KEYS[4], ARGV[6], 1)
redis.call('zrem', KEYS[7], ARGV[6])
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if status == 'canceled' then return -3 end
if status == 'expired' then return -4 end
if ENDED[status] then
  redis.call('hincrby', KEYS[2], 'duplicate_deliveries', 1)
  return 0
end
if status == 'queued' and overdue(KEYS[1], ARGV[7]) then
  expire(KEYS[1], KEYS[5], KEYS[6], KEYS[3], KEYS[7], ARGV[6], ARGV[7], ARGV[2], ARGV[8])
  return -4
end
if status ~= 'queued' and redis.call('hget', KEYS[1], 'cancel_requested') == '1' then
  end_job(KEYS[1], KEYS[5], KEYS[6], ARGV[7], {'status', 'canceled', 'error_code', 'canceled', 'error_message', ARGV[9],
                                               'finished_at', ARGV[2]})
  return -3
end
local attempt = redis.call('hincrby', KEYS[1], 'attempts', 1)
if attempt > tonumber(ARGV[1]) then
  end_job(KEYS[1], KEYS[5], KEYS[6], ARGV[7], {'status', 'failed', 'error_code', 'worker_lost',
                                               'error_message', ARGV[5], 'finished_at', ARGV[2]})
  redis.call('hincrby', KEYS[2], 'worker_lost', 1)
  return -2
end
redis.call('hset', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'model', ARGV[3], 'worker', ARGV[4],
           'running_set', KEYS[8])
redis.call('zadd', KEYS[8], ARGV[7], ARGV[6])
redis.call('hincrby', KEYS[2], 'executions', 1)
if attempt > 1 then redis.call('hincrby', KEYS[2], 'reruns', 1) end
return attempt
"""
)

# Ends a job with its outcome unless it already ended: an answer, once written, never changes. Two runs of one job
# (a redelivery racing a slow worker) publish one answer; the later one is counted as a duplicate execution.
# KEYS = job hash, stats hash, upload, webhook outbox; ARGV = now (epoch s), then field, value, ...
# Returns 1 when written, 0 when the job had ended, -1 when it is missing (expired).
FINISH_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
if ENDED[redis.call('hget', KEYS[1], 'status')] then
  redis.call('hincrby', KEYS[2], 'duplicate_executions', 1)
  return 0
end
end_job(KEYS[1], KEYS[3], KEYS[4], ARGV[1], {unpack(ARGV, 2)})
return 1
"""
)

# Cancels a job: a queued one ends `canceled` at once (its message, when a worker takes it, is refused by the start
# script); a running one is marked `cancel_requested` and runs to its end. A queued job already past its deadline
# ends `expired` instead, as its next read would show. KEYS and ARGV: as EXPIRE_LUA's, then the cancel message.
# Returns one of the CANCEL_* codes below.
CANCEL_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if ENDED[status] then return 0 end
if status == 'queued' and overdue(KEYS[1], ARGV[1]) then
  expire(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
  return 0
end
redis.call('hset', KEYS[1], 'cancel_requested', '1')
if status ~= 'queued' then return 2 end
leave_queue(KEYS[4], ARGV[3])
redis.call('zrem', KEYS[5], ARGV[3])
end_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], {'status', 'canceled', 'error_code', 'canceled', 'error_message', ARGV[5],
                                             'finished_at', ARGV[2]})
return 1
"""
)

# Ends a queued job `expired` if it is past its deadline (a read by the API, the reaper's look at due deadlines).
# KEYS = job hash, upload, webhook outbox, never-started set, deadlines set; ARGV = now (epoch s), finished_at, job id,
# deadline message. Returns 1 when it expired the job, 0 when not, -1 when the job is missing.
EXPIRE_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('exists', KEYS[1]) == 0 then
  redis.call('zrem', KEYS[5], ARGV[3])
  return -1
end
if redis.call('hget', KEYS[1], 'status') ~= 'queued' then
  redis.call('zrem', KEYS[5], ARGV[3])
  return 0
end
if not overdue(KEYS[1], ARGV[1]) then return 0 end
expire(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
return 1
"""
)

# Claims an idempotency key for a request that is about to store its job, or returns the claim that holds it.
# KEYS = the key; ARGV = claim, seconds it holds before the job is stored.
CLAIM_KEY_LUA = """
local held = redis.call('get', KEYS[1])
if held then return held end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
# Frees an idempotency key, only if it still holds this claim. KEYS = the key; ARGV = claim.
RELEASE_KEY_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Replaces an idempotency key's claim (marks it: its submission was withdrawn), only if it still holds this claim; the
# key keeps its TTL. KEYS = the key; ARGV = claim, replacement.
REPLACE_KEY_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL') end
return false
"""

START_ENDED = 0  # the job had already ended: its answer stands, the model is not run again
START_MISSING = -1  # the job expired (or was never issued)
START_GAVE_UP = -2  # the job started too many times without ending (it kills its worker): failed `worker_lost`
START_CANCELED = -3  # the job was canceled: it is not run
START_EXPIRED = -4  # the job was still queued at its deadline: it is (now) `expired`, not run
START_PENDING = -5  # the job's submission is not accepted yet (the API is still publishing it): ask again shortly
CANCEL_MISSING = -1  # no such job (expired)
CANCEL_ENDED = 0  # the job had ended (or just expired at its deadline): nothing to cancel
CANCEL_DONE = 1  # the job was queued: it is now `canceled` and will never run
CANCEL_REQUESTED = 2  # the job is running: it runs to its end, with `cancel_requested` set
