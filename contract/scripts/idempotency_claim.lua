-- Claims an idempotency key for a request that is about to store its job, or returns the claim that holds it.
--
-- KEYS[1] key    the idempotency key
-- ARGV[1] claim
-- ARGV[2] seconds the claim holds before the job is stored
-- Returns the claim that holds the key, or false when this one claimed it.

local idempotency_key = KEYS[1]
local claim, pending_s = ARGV[1], ARGV[2]

local held = redis.call('get', idempotency_key)
if held then return held end
redis.call('set', idempotency_key, claim, 'EX', pending_s)
return false
