-- Writes answers to the answer cache, each with the TTL, indexes them, and drops the oldest entries past the bound.
-- The entries' keys come as arguments: they are made from the answers' digests.
--
-- KEYS[1] index  every entry, scored by when it was written
-- ARGV[1] now (epoch s)
-- ARGV[2] ttl (s)
-- ARGV[3] max entries
-- ARGV[4...] key, answer, key, answer, ...
-- Returns how many of the oldest entries it dropped.

local index_key = KEYS[1]
local now, ttl, max_entries = ARGV[1], ARGV[2], tonumber(ARGV[3])

local index = {}
for k = 4, #ARGV, 2 do
  redis.call('set', ARGV[k], ARGV[k + 1], 'EX', ttl)
  index[#index + 1] = now
  index[#index + 1] = ARGV[k]
end
redis.call('zadd', index_key, unpack(index))
local over = math.min(redis.call('zcard', index_key) - max_entries, 1000)  -- at most this many per write
if over > 0 then
  local oldest = redis.call('zrange', index_key, 0, over - 1)
  redis.call('del', unpack(oldest))
  redis.call('zremrangebyrank', index_key, 0, over - 1)
end
return over
