-- Cancels one item of a batch as job_cancel.lua cancels a job: the cancel is recorded (the item shows
-- cancel_requested); a queued item ends `canceled` and never runs; a running one runs to its end (and is not run
-- again: items_run.lua).
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1] batch     the batch's hash
-- KEYS[2] out       its outcome hash
-- KEYS[3] items     its item list
-- KEYS[4] outbox    the webhook outbox
-- KEYS[5] ended     its `ended` channel
-- KEYS[6] outcomes  the queue's counts of outcomes
-- ARGV[1] now (epoch s)
-- ARGV[2] index   the item's index
-- ARGV[3] upload  its image's upload key ('' for none)
-- Returns a CANCEL_* code of contract/transitions.py.

local batch_key, out_key, items_key, outbox_key, ended_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local outcomes_key = KEYS[6]
local now, index, upload_key = ARGV[1], ARGV[2], ARGV[3]

if not meta(batch_key).count then return -1 end
if close_if_overdue(batch_key, out_key, items_key, outbox_key, ended_key, now) then return 0 end
local cur = redis.call('hget', out_key, index)
if cur and cur ~= RUNNING then return 0 end
local cancels = CANCELS_PREFIX .. meta(batch_key).id
redis.call('sadd', cancels, index)
expire_with(batch_key, cancels)
if cur == RUNNING then return 2 end
local entry = {index, 'canceled', 'canceled', '["canceled"]', upload_key}
end_items(batch_key, out_key, outbox_key, ended_key, outcomes_key, now, {entry})
return 1
