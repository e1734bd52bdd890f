-- A chunk's items end, together: answers, failures and counts in one call. When `done`, the chunk is done: its
-- record and its place in the running set go.
-- prelude: lib/queue.lua lib/batch.lua
--
-- KEYS[1] batch     the batch's hash
-- KEYS[2] out       its outcome hash
-- KEYS[3] chunks    its chunks not yet ended
-- KEYS[4] running   the queue's running set
-- KEYS[5] outbox    the webhook outbox
-- KEYS[6] ended     the batch's `ended` channel
-- KEYS[7] outcomes  the queue's counts of outcomes
-- ARGV[1] now (epoch s)
-- ARGV[2] number  the chunk's number
-- ARGV[3] member  the chunk's member in the running set
-- ARGV[4] done    '1' when the chunk is done
-- ARGV[5...] index, status, code, value, upload key, for each item
-- Returns how many items it ended (an ended one is never changed), -1 when the batch is gone.

local batch_key, out_key, chunks_key, running_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local outbox_key, ended_key, outcomes_key = KEYS[5], KEYS[6], KEYS[7]
local now, number, member, done = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'

if not meta(batch_key).count then return -1 end
local entries = {}
for k = 5, #ARGV, 5 do entries[#entries + 1] = {ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[k + 3], ARGV[k + 4]} end
local written = end_items(batch_key, out_key, outbox_key, ended_key, outcomes_key, now, entries)
if done then drop_chunk(chunks_key, number, running_key, member) end
return written
