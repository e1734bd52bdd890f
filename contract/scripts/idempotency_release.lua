-- Frees an idempotency key, only if it still holds this claim.
--
-- KEYS[1] key  the idempotency key
-- ARGV[1] claim
-- Returns 1 when freed, else 0.

local idempotency_key = KEYS[1]
local claim = ARGV[1]

if redis.call('get', idempotency_key) == claim then return redis.call('del', idempotency_key) end
return 0
