-- Cancels a batch (or ends it `expired` when a read finds it past its deadline): see `close` in lib/batch.lua.
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1] batch   the batch's hash
-- KEYS[2] out     its outcome hash
-- KEYS[3] items   its item list
-- KEYS[4] outbox  the webhook outbox
-- KEYS[5] ended   its `ended` channel
-- ARGV[1] now (epoch s)
-- ARGV[2] why  'canceled' or 'expired'
-- Returns {items closed now, items running, items ended before}; {-1} when the batch is gone, {-2} when it was closed.

local batch_key, out_key, items_key, outbox_key, ended_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, why = ARGV[1], ARGV[2]

if not meta(batch_key).count then return {-1} end
if closed_as(batch_key) then return {-2} end
local ended_before = tonumber(redis.call('hget', batch_key, 'ended'))
local closed = close(batch_key, out_key, items_key, outbox_key, ended_key, now, why)
return {closed, tonumber(redis.call('hget', batch_key, 'running')), ended_before}
