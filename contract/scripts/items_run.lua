-- The model is about to answer these items of one batch: each that has no outcome becomes running; one already
-- running (its worker died) runs again, unless its cancel was asked meanwhile (the worker then reports it skipped,
-- and it ends canceled); one that ended, or any of a closed batch, is not answered.
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1] batch   the batch's hash
-- KEYS[2] out     its outcome hash
-- KEYS[3] items   its item list
-- KEYS[4] outbox  the webhook outbox
-- KEYS[5] ended   its `ended` channel
-- ARGV[1] now (epoch s)
-- ARGV[2...] the items' indices
-- Returns the indices to answer.

local batch_key, out_key, items_key, outbox_key, ended_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = ARGV[1]

if not meta(batch_key).count then return {} end
if close_if_overdue(batch_key, out_key, items_key, outbox_key, ended_key, now) then return {} end
local current = redis.call('hmget', out_key, unpack(ARGV, 2))
local run, fields = {}, {}
for k, cur in ipairs(current) do
  local index = ARGV[k + 1]
  if not cur then
    fields[#fields + 1] = index
    fields[#fields + 1] = RUNNING
    run[#run + 1] = index
  elseif cur == RUNNING and not cancel_asked(batch_key, index) then
    run[#run + 1] = index
  end
end
if #fields > 0 then
  redis.call('hset', out_key, unpack(fields))
  expire_with(batch_key, out_key)
  redis.call('hincrby', batch_key, 'queued', -#fields / 2)
  redis.call('hincrby', batch_key, 'running', #fields / 2)
end
return run
