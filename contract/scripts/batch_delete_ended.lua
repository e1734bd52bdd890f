-- Deletes a batch whose items all ended, with its results (a client that saved them frees Redis before the TTL).
--
-- KEYS[1]    batch  the batch's hash
-- KEYS[2...] its other keys
-- Returns 1 when deleted, 0 when an item has not ended (nothing deleted).

local batch_key = KEYS[1]

local fields = redis.call('hmget', batch_key, 'ended', 'count')
if not fields[1] or fields[1] ~= fields[2] then return 0 end
redis.call('del', unpack(KEYS))
return 1
