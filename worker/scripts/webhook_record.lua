-- Records a webhook attempt's outcome: `pending` (due again), `delivered` or `failed` (out of the outbox).
--
-- KEYS[1] outbox  the webhook outbox
-- KEYS[2] record  the delivery's record (a job's hash, a batch's, or a batch item's delivery hash)
-- ARGV[1] member  the outbox member
-- ARGV[2] status  pending | delivered | failed
-- ARGV[3] due     when a pending delivery is due again (epoch s)
-- ARGV[4] error code
-- ARGV[5] error message
-- Returns 1, or -1 when the record is gone.

local outbox_key, record_key = KEYS[1], KEYS[2]
local member, status, due, error_code, error_message = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('exists', record_key) == 0 then
  redis.call('zrem', outbox_key, member)
  return -1
end
redis.call('hset', record_key, 'webhook_status', status, 'webhook_error_code', error_code,
           'webhook_error_message', error_message)
if status == 'pending' then
  redis.call('zadd', outbox_key, due, member)
else
  redis.call('zrem', outbox_key, member)
end
return 1
