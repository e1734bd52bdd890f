-- Accepts a batch stored `pending` once its chunks are published (see job_accept.lua): its chunks join their level's
-- set of chunks never started (one per queue: a batch that also captions has two), and their answers the count of
-- answers waiting there; the batch records a ticket per set, `ticket:<set>` (lib/queue.lua join_queue), for its end
-- estimate.
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1]    batch      the batch's hash
-- KEYS[2...] unstarted  each queue's set of messages never started
-- ARGV[1] now (epoch s)
-- ARGV[2...] each set's chunks (`chunk_groups`: its chunks' answers, how many chunks, their members)
-- Returns 1, or 0 when not pending.

local batch_key = KEYS[1]
local now = ARGV[1]

if meta(batch_key).pending ~= '1' then return 0 end
redis.call('hdel', batch_key, 'pending')
local groups = chunk_groups(2, #KEYS - 1)
for s, group in ipairs(groups) do
  local unstarted, members = KEYS[s + 1], group.members
  for first = 1, #members, UNPACK_MAX do
    local scored = {}
    for k = first, math.min(#members, first + UNPACK_MAX - 1) do
      scored[#scored + 1] = now
      scored[#scored + 1] = members[k]
    end
    redis.call('zadd', unstarted, unpack(scored))
  end
  redis.call('hset', batch_key, 'ticket:' .. unstarted, join_queue(unstarted, group.answers))
end
return 1
