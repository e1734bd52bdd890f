-- Accepts a batch stored `pending` (see job_accept.lua): its chunks join their level's set of chunks never started
-- (one per queue: a batch that also captions has two), held (lib/fair.lua), and their answers the count of answers
-- waiting there; and its API key's line in each queue, from which release.lua gives them to the workers in its key's
-- turn. The batch records its tickets per set: `ticket:<set>` (lib/queue.lua join_queue) and `line_ticket:<set>`
-- (lib/fair.lua join_line), for its end estimate.
-- prelude: lib/queue.lua lib/batch.lua lib/fair.lua
--
-- KEYS[1]    batch   the batch's hash
-- KEYS[2...] queues  for each queue: its level's set of messages never started, ring of API keys, fair-share counts,
--                    and the batch's API key's line there
-- ARGV[1] now (epoch s)
-- ARGV[2] the batch's API key's name in the lines (contract.fair_share.share_name)
-- ARGV[3] that key's weight
-- ARGV[4...] each set's chunks (`chunk_groups`: its chunks' answers, how many chunks, their members)
-- Returns 1, or 0 when not pending.

local batch_key = KEYS[1]
local now, share, weight = ARGV[1], ARGV[2], ARGV[3]

if meta(batch_key).pending ~= '1' then return 0 end
redis.call('hdel', batch_key, 'pending')
local groups = chunk_groups(4, (#KEYS - 1) / 4)
local held = HELD_SCORE + tonumber(now)
for s, group in ipairs(groups) do
  local unstarted, ring, shares, line = KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s], KEYS[4 * s + 1]
  local members = group.members
  for first = 1, #members, UNPACK_MAX do
    local scored = {}
    for k = first, math.min(#members, first + UNPACK_MAX - 1) do
      scored[#scored + 1] = held
      scored[#scored + 1] = members[k]
    end
    redis.call('zadd', unstarted, unpack(scored))
  end
  redis.call('hset', batch_key, 'ticket:' .. unstarted, join_queue(unstarted, group.answers),
             'line_ticket:' .. unstarted, join_line(ring, shares, line, share, weight, members, group.answers))
end
return 1
