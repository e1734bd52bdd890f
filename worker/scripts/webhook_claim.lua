-- Claims a due webhook delivery: its score moves to the end of the lease, and the attempt is counted on its record.
--
-- KEYS[1] outbox  the webhook outbox
-- KEYS[2] record  the delivery's record (a job's hash, a batch's, or a batch item's delivery hash)
-- ARGV[1] member     the outbox member (a job id, `batch:<id>` or `item:<batch id>.<index>`)
-- ARGV[2] now (epoch s)
-- ARGV[3] lease end  (epoch s)
-- Returns the attempt number, 0 when the delivery is not due (another sender holds it), -1 when there is nothing to
-- deliver any more (the job expired, or it was delivered).

local outbox_key, record_key = KEYS[1], KEYS[2]
local member, now, lease_end = ARGV[1], ARGV[2], ARGV[3]

local due = redis.call('zscore', outbox_key, member)
if (not due) or tonumber(due) > tonumber(now) then return 0 end
if redis.call('hget', record_key, 'webhook_status') ~= 'pending' then
  redis.call('zrem', outbox_key, member)
  return -1
end
redis.call('zadd', outbox_key, lease_end, member)
return redis.call('hincrby', record_key, 'webhook_attempts', 1)
