-- Withdraws a batch whose submission failed (see job_withdraw.lua): deleted, with its uploads, unless a worker
-- started one of its chunks already (it then runs, and the API answers 202). A chunk names its worker in the chunks
-- hash while it runs (`<number>:w`) and leaves the hash when it ended: a hash that holds a worker's name, or fewer
-- chunks than the batch was made of, tells of a chunk started, perhaps ended already (a worker may answer a whole
-- chunk while the API waits for its replicas).
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1]    batch   the batch's hash
-- KEYS[2]    chunks  its chunks not yet ended
-- then, for each of its queues: its set of messages never started, its set of deadlines
-- then the keys to delete (the batch's and its uploads)
-- ARGV[1] the batch's member in the deadlines sets
-- ARGV[2] how many queues
-- ARGV[3...] each never-started set's chunks (`chunk_groups`)
-- Returns 1 when withdrawn, 0 when a chunk had started, -1 when the batch is missing.

local batch_key, chunks_key = KEYS[1], KEYS[2]
local deadline_member, queues = ARGV[1], tonumber(ARGV[2])

if not meta(batch_key).count then return -1 end
local groups, all = chunk_groups(3, queues)
local fields = redis.call('hkeys', chunks_key)
if #fields < #all then return 0 end
for _, field in ipairs(fields) do
  if string.sub(field, -2) == ':w' then return 0 end
end
for s, group in ipairs(groups) do
  local unstarted, deadlines = KEYS[1 + 2 * s], KEYS[2 + 2 * s]
  if meta(batch_key).pending ~= '1' then
    for first = 1, #group.members, UNPACK_MAX do
      redis.call('zrem', unstarted, unpack(group.members, first, math.min(#group.members, first + UNPACK_MAX - 1)))
    end
    redis.call('hincrby', WAITING, unstarted, -group.answers)
  end
  redis.call('zrem', deadlines, deadline_member)
end
for first = 3 + 2 * queues, #KEYS, UNPACK_MAX do
  redis.call('del', unpack(KEYS, first, math.min(#KEYS, first + UNPACK_MAX - 1)))
end
return 1
