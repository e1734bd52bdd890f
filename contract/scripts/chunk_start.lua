-- A worker received a chunk. Takes it off its level's set of messages never started (`take_from_queue`, as a job's
-- start does), then counts the attempt, records the worker and puts the chunk in the queue's running set (the
-- reaper's watch). A batch closed (or past its deadline) runs nothing; a chunk started too many times without ending
-- ends its items `worker_lost`.
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1]  batch      the batch's hash
-- KEYS[2]  chunks     its chunks not yet ended
-- KEYS[3]  unstarted  the level's set of messages never started
-- KEYS[4]  mark       the level's mark (the latest enqueue time of a message started)
-- KEYS[5]  running    the queue's running set
-- KEYS[6]  stats      the fleet's counters
-- KEYS[7]  out        the batch's outcome hash
-- KEYS[8]  items      the batch's item list
-- KEYS[9]  outbox     the webhook outbox
-- KEYS[10] ended      the batch's `ended` channel
-- KEYS[11] outcomes   the queue's counts of outcomes
-- ARGV[1] member        the chunk's member in the never-started and running sets
-- ARGV[2] number        the chunk's number
-- ARGV[3] now (epoch s)
-- ARGV[4] worker
-- ARGV[5] max attempts
-- ARGV[6] the message of a chunk given up (started too many times)
-- ARGV[7] answers       how many answers the chunk holds
-- ARGV[8] model
-- ARGV[9] the chunk's task (its model is the batch's `model`, or `model:<task>` for the captions of a vqa batch that
--         captions its images too)
-- Returns the attempt number (>= 1) or a START_* code of contract/transitions.py (START_PENDING while the batch's
-- submission is not accepted yet, as for a job).

local batch_key, chunks_key, unstarted_key, mark_key, running_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local stats_key, out_key, items_key, outbox_key, ended_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local outcomes_key = KEYS[11]
local member, number, now, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_attempts, gave_up_message, answers, model = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
local chunk_task = ARGV[9] or ''

if meta(batch_key).pending == '1' then return -5 end
take_from_queue(unstarted_key, mark_key, member, answers)
if not meta(batch_key).count then
  redis.call('zrem', running_key, member)
  return -1
end
local closed = close_if_overdue(batch_key, out_key, items_key, outbox_key, ended_key, now)
if closed and tonumber(redis.call('hget', batch_key, 'running')) == 0 then
  drop_chunk(chunks_key, number, running_key, member)
  if closed == 'expired' then return -4 end
  return -3
end
local attempt = redis.call('hincrby', chunks_key, number .. ':a', 1)
if attempt > max_attempts then
  local payload = redis.call('hget', chunks_key, number)
  local entries = {}
  local lost_before = tonumber(redis.call('hget', batch_key, 'err:worker_lost') or 0)  -- counted: not the canceled
  if payload then
    local value = cjson.encode({'failed', 'worker_lost', gave_up_message})
    for _, image in ipairs(cjson.decode(payload)['images']) do
      for _, item in ipairs(image['items']) do
        local index = tostring(item[1])
        if cancel_asked(batch_key, index) then  -- as a job whose cancel was asked: canceled, not worker_lost
          entries[#entries + 1] = {index, 'canceled', 'canceled', CANCELED_RERUN, image['upload'] or ''}
        else
          entries[#entries + 1] = {index, 'failed', 'worker_lost', value, image['upload'] or ''}
        end
      end
    end
  end
  end_items(batch_key, out_key, outbox_key, ended_key, outcomes_key, now, entries)
  local lost = tonumber(redis.call('hget', batch_key, 'err:worker_lost') or 0) - lost_before
  redis.call('hincrby', stats_key, 'worker_lost', lost)
  drop_chunk(chunks_key, number, running_key, member)
  return -2
end
redis.call('hset', chunks_key, number .. ':w', worker)
redis.call('zadd', running_key, now, member)
local model_field = 'model'
if chunk_task ~= '' and chunk_task ~= meta(batch_key).task then model_field = 'model:' .. chunk_task end
if model_field ~= 'model' or meta(batch_key).model ~= model then redis.call('hset', batch_key, model_field, model) end
redis.call('hincrby', stats_key, 'executions', answers)
if attempt > 1 then redis.call('hincrby', stats_key, 'reruns', answers) end
return attempt
