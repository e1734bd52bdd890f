-- Replaces an idempotency key's claim (marks it: its submission was withdrawn), only if it still holds this claim;
-- the key keeps its TTL.
--
-- KEYS[1] key  the idempotency key
-- ARGV[1] claim
-- ARGV[2] replacement
-- Returns OK when replaced, else false.

local idempotency_key = KEYS[1]
local claim, replacement = ARGV[1], ARGV[2]

if redis.call('get', idempotency_key) == claim then
  return redis.call('set', idempotency_key, replacement, 'KEEPTTL')
end
return false
