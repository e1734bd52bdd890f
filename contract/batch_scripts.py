"""The Lua scripts that move a batch's items, a chunk at a time, and keep the batch's counts as they go.

A batch's items are not jobs of their own: an item is an entry of the batch's item list (its image number and text)
and, once it reached the model, a field of the batch's outcome hash (`["running"]`, then its outcome). An item with
no outcome is queued, unless its batch is closed (canceled or past its deadline): then it ended so, without running.
A cancel of one item is as a job's (contract/transitions.py): it is recorded in the batch's set of items whose
cancel was asked; a queued item ends `canceled` at once, a running one runs to its end, and one whose chunk is
delivered again (its worker died) is not run again but ends `canceled`.
The batch's hash keeps the counts by status (`queued`, `running`, `succeeded`, ...), which these scripts move in the
same call as the items: a summary is one read, whatever the batch's size. Each call that ends items publishes on the
batch's `ended` channel (contract.jobs.ended_key of the batch's id), which wakes the API's reads waiting for an
item.

Each script runs a handful of Redis commands per chunk (variadic HMGET/HSET over the chunk's items), not per item.
`contract.batches.BatchStore` registers and calls them.
"""

from __future__ import annotations

import json

from contract.transitions import BATCH_OUTBOX_PREFIX, CANCELED_RERUN_MESSAGE, TAKE_FROM_QUEUE_LUA

RUNNING = '["running"]'  # an item's outcome field while the model answers it (its worker may die meanwhile)
ITEM_OUTBOX_PREFIX = "item:"  # an outbox member for a batch item's own webhook (`item:<batch id>.<index>`)
ITEM_WEBHOOK_PREFIX = "blipq:item-webhook:"  # the hash of a batch item's webhook delivery (contract.batches)
SKIPPED = "skipped"  # what a worker reports for an item the model did not answer (RUN_ITEMS_LUA did not let it run)

UPLOADS_LEFT_PREFIX = "blipq:batch-left:"  # contract.batches.uploads_left_key
CANCELS_PREFIX = "blipq:batch-cancels:"  # contract.batches.cancels_key
# The outcome of a running item whose cancel was asked and whose worker died: it is not run again.
CANCELED_RERUN = json.dumps(["canceled", CANCELED_RERUN_MESSAGE], separators=(",", ":"))
UNPACK_MAX = 1000  # arguments a script passes to one command at most (Lua's unpack stops near 8,000)

_LIBRARY = (
    TAKE_FROM_QUEUE_LUA + f"local RUNNING, SKIPPED = '{RUNNING}', '{SKIPPED}'\n"
    f"local UPLOADS_LEFT_PREFIX, UNPACK_MAX = '{UPLOADS_LEFT_PREFIX}', {UNPACK_MAX}\n"
    f"local BATCH_OUTBOX_PREFIX, ITEM_OUTBOX_PREFIX = '{BATCH_OUTBOX_PREFIX}', '{ITEM_OUTBOX_PREFIX}'\n"
    f"local ITEM_WEBHOOK_PREFIX, CANCELS_PREFIX = '{ITEM_WEBHOOK_PREFIX}', '{CANCELS_PREFIX}'\n"
    f"local CANCELED_RERUN = '{CANCELED_RERUN}'\n"
    + """
-- The batch's fields a script needs, read once per call (one HMGET); `count` is false when the batch is gone.
local M
local function meta(batch)
  if not M then
    local f = redis.call('hmget', batch, 'id', 'count', 'closed', 'deadline_at', 'webhook_items', 'webhook', 'model',
                         'pending', 'task')
    M = {id = f[1], count = f[2], closed = f[3], deadline = f[4], webhook_items = f[5], webhook = f[6], model = f[7],
         pending = f[8], task = f[9]}
  end
  return M
end
local function closed_as(batch)
  local closed = meta(batch).closed
  if closed and closed ~= '' then return closed end
  return nil
end
-- A key a script makes for a batch (its outcome hash) expires with the batch.
local function expire_with(batch, key)
  if redis.call('ttl', key) == -1 then
    local ttl = redis.call('ttl', batch)
    if ttl > 0 then redis.call('expire', key, ttl) end
  end
end
-- Whether a cancel of this item (its index, a string) was asked.
local function cancel_asked(batch, index)
  return redis.call('sismember', CANCELS_PREFIX .. meta(batch).id, index) == 1
end
local function wake(ended)
  redis.call('publish', ended, '1')
end
-- A batch's chunks by the never-started set of their queue (a batch that also captions has two), as ARGV lists them
-- from `first` on: for each set, its chunks' answers, how many chunks, then their members.
-- Returns {{answers = n, members = {...}}, ...}, one per set, in order, and the members of all of them.
local function chunk_groups(first, sets)
  local groups, all, at = {}, {}, first
  for s = 1, sets do
    local count = tonumber(ARGV[at + 1])
    local members = {}
    for k = at + 2, at + 1 + count do
      members[#members + 1] = ARGV[k]
      all[#all + 1] = ARGV[k]
    end
    groups[s] = {answers = tonumber(ARGV[at]), members = members}
    at = at + 2 + count
  end
  return groups, all
end
-- A chunk ended (or will never run): its record and its place in the queue's running set go.
local function drop_chunk(chunks, number, running, member)
  redis.call('hdel', chunks, number, number .. ':a', number .. ':w')
  redis.call('zrem', running, member)
end
local function item_webhooks(batch, outbox, now, indices)
  if meta(batch).webhook_items ~= '1' or #indices == 0 then return end
  local id, ttl = meta(batch).id, redis.call('ttl', batch)
  local members = {}
  for _, index in ipairs(indices) do
    local item = id .. '.' .. index
    local record = ITEM_WEBHOOK_PREFIX .. item
    redis.call('hset', record, 'webhook_status', 'pending', 'webhook_attempts', 0)
    if ttl > 0 then redis.call('expire', record, ttl) end
    members[#members + 1] = now
    members[#members + 1] = ITEM_OUTBOX_PREFIX .. item
  end
  redis.call('zadd', outbox, unpack(members))
end
local function count_ended(batch, outbox, now, ended_now)
  if ended_now == 0 then return end
  local ended = redis.call('hincrby', batch, 'ended', ended_now)
  if ended ~= tonumber(meta(batch).count) then return end
  local webhook = meta(batch).webhook
  if webhook and webhook ~= '' then
    redis.call('hset', batch, 'webhook_status', 'pending')
    redis.call('zadd', outbox, now, BATCH_OUTBOX_PREFIX .. meta(batch).id)
  end
end
-- An uploaded image goes as soon as the last item that needs it ended: `freed` counts the items that ended now.
local function free_uploads(batch, freed)
  if next(freed) == nil then return end
  local left = UPLOADS_LEFT_PREFIX .. meta(batch).id
  for upload, count in pairs(freed) do
    if redis.call('hincrby', left, upload, -count) <= 0 then
      redis.call('del', upload)
      redis.call('hdel', left, upload)
    end
  end
end
-- Close the batch: every item that has not reached the model ends `why` (canceled | expired) at once, counted here;
-- an item's read derives it from the closed batch. Items the model is answering run to their end (their images are
-- loaded already): every uploaded image goes now.
local function close(batch, out, items, outbox, ended, now, why)
  local queued = tonumber(redis.call('hget', batch, 'queued'))
  redis.call('hset', batch, 'closed', why, 'queued', 0)
  meta(batch).closed = why
  local id = meta(batch).id
  local left = redis.call('hkeys', UPLOADS_LEFT_PREFIX .. id)
  for first = 1, #left, UNPACK_MAX do
    redis.call('del', unpack(left, first, math.min(#left, first + UNPACK_MAX - 1)))
  end
  redis.call('del', UPLOADS_LEFT_PREFIX .. id)
  if queued > 0 then
    redis.call('hincrby', batch, why, queued)
    if meta(batch).webhook_items == '1' then
      local has = {}
      for _, index in ipairs(redis.call('hkeys', out)) do has[index] = true end
      local closed = {}
      for index = 0, redis.call('llen', items) - 1 do
        if not has[tostring(index)] then closed[#closed + 1] = tostring(index) end
      end
      item_webhooks(batch, outbox, now, closed)
    end
    count_ended(batch, outbox, now, queued)
  end
  wake(ended)
  return queued
end
local function close_if_overdue(batch, out, items, outbox, ended, now)
  local closed = closed_as(batch)
  if closed then return closed end
  local deadline = meta(batch).deadline
  if deadline and deadline ~= '' and tonumber(now) >= tonumber(deadline) then
    close(batch, out, items, outbox, ended, now, 'expired')
    return 'expired'
  end
  return nil
end
-- End items with their outcomes: entries of {index, status, code, value, upload key or ''}; an item already ended
-- keeps its outcome.
-- A `skipped` item (not answered: its batch closed, or its cancel was asked before it ran again) ends as its batch
-- closed, or canceled, if it was running; else it stays as it is.
local function end_items(batch, out, outbox, ended, outcomes, now, entries)
  if #entries == 0 then return 0 end
  local closed = closed_as(batch)
  local indices = {}
  for k, entry in ipairs(entries) do indices[k] = entry[1] end
  local current = redis.call('hmget', out, unpack(indices))
  local fields, written, counts, from_running, from_queued, freed = {}, {}, {}, 0, 0, {}
  for k, entry in ipairs(entries) do
    local cur, status, code, value = current[k], entry[2], entry[3], entry[4]
    if status == SKIPPED then
      status = nil
      if cur == RUNNING and closed then
        status, code, value = closed, closed, '["' .. closed .. '"]'
        if closed == 'expired' then code = 'deadline_exceeded' end
      elseif cur == RUNNING and cancel_asked(batch, entry[1]) then
        status, code, value = 'canceled', 'canceled', CANCELED_RERUN
      end
    end
    local fresh = (not cur) and not closed
    if status and (cur == RUNNING or fresh) then
      if cur == RUNNING then from_running = from_running + 1 else from_queued = from_queued + 1 end
      fields[#fields + 1] = entry[1]
      fields[#fields + 1] = value
      written[#written + 1] = entry[1]
      if entry[5] and entry[5] ~= '' then freed[entry[5]] = (freed[entry[5]] or 0) + 1 end
      counts[status] = (counts[status] or 0) + 1
      if code ~= '' and code ~= status then counts['err:' .. code] = (counts['err:' .. code] or 0) + 1 end
      local outcome = status .. ':' .. (code == status and '' or code)
      counts['@' .. outcome] = (counts['@' .. outcome] or 0) + 1
    end
  end
  if #written == 0 then return 0 end
  redis.call('hset', out, unpack(fields))
  expire_with(batch, out)
  if from_running > 0 then redis.call('hincrby', batch, 'running', -from_running) end
  if from_queued > 0 then redis.call('hincrby', batch, 'queued', -from_queued) end
  for name, count in pairs(counts) do
    if string.sub(name, 1, 1) == '@' then
      redis.call('hincrby', outcomes, string.sub(name, 2), count)
    else
      redis.call('hincrby', batch, name, count)
    end
  end
  free_uploads(batch, freed)
  item_webhooks(batch, outbox, now, written)
  count_ended(batch, outbox, now, #written)
  wake(ended)
  return #written
end
"""
)

# A worker received a chunk. Takes it off its level's set of messages never started (`take_from_queue`, as a job's
# start does), then counts the attempt, records the worker and puts the chunk in the queue's running set (the
# reaper's watch). A batch closed (or past its deadline) runs nothing; a chunk started too many times without ending
# ends its items `worker_lost`.
# KEYS = batch, chunks, never-started set, mark, running set, stats, outcome hash, item list, outbox, ended list,
# outcomes; ARGV = member, number, now, worker, max attempts, gave-up message, answers, model, the chunk's task (its
# model is the batch's `model`, or `model:<task>` for the captions of a vqa batch that captions its images too).
# Returns the attempt number (>= 1) or a START_* code of contract/transitions.py (START_PENDING while the batch's
# submission is not accepted yet, as for a job).
START_CHUNK_LUA = (
    _LIBRARY
    + """
if meta(KEYS[1]).pending == '1' then return -5 end
take_from_queue(KEYS[3], KEYS[4], ARGV[1], tonumber(ARGV[7]))
if not meta(KEYS[1]).count then
  redis.call('zrem', KEYS[5], ARGV[1])
  return -1
end
local closed = close_if_overdue(KEYS[1], KEYS[7], KEYS[8], KEYS[9], KEYS[10], ARGV[3])
if closed and tonumber(redis.call('hget', KEYS[1], 'running')) == 0 then
  drop_chunk(KEYS[2], ARGV[2], KEYS[5], ARGV[1])
  if closed == 'expired' then return -4 end
  return -3
end
local attempt = redis.call('hincrby', KEYS[2], ARGV[2] .. ':a', 1)
if attempt > tonumber(ARGV[5]) then
  local payload = redis.call('hget', KEYS[2], ARGV[2])
  local entries = {}
  local lost_before = tonumber(redis.call('hget', KEYS[1], 'err:worker_lost') or 0)  -- counted: not the canceled
  if payload then
    local value = cjson.encode({'failed', 'worker_lost', ARGV[6]})
    for _, image in ipairs(cjson.decode(payload)['images']) do
      for _, item in ipairs(image['items']) do
        local index = tostring(item[1])
        if cancel_asked(KEYS[1], index) then  -- as a job whose cancel was asked: canceled, not worker_lost
          entries[#entries + 1] = {index, 'canceled', 'canceled', CANCELED_RERUN, image['upload'] or ''}
        else
          entries[#entries + 1] = {index, 'failed', 'worker_lost', value, image['upload'] or ''}
        end
      end
    end
  end
  end_items(KEYS[1], KEYS[7], KEYS[9], KEYS[10], KEYS[11], ARGV[3], entries)
  local lost = tonumber(redis.call('hget', KEYS[1], 'err:worker_lost') or 0) - lost_before
  redis.call('hincrby', KEYS[6], 'worker_lost', lost)
  drop_chunk(KEYS[2], ARGV[2], KEYS[5], ARGV[1])
  return -2
end
redis.call('hset', KEYS[2], ARGV[2] .. ':w', ARGV[4])
redis.call('zadd', KEYS[5], ARGV[3], ARGV[1])
local model_field = 'model'
local chunk_task = ARGV[9] or ''
if chunk_task ~= '' and chunk_task ~= meta(KEYS[1]).task then model_field = 'model:' .. chunk_task end
if model_field ~= 'model' or meta(KEYS[1]).model ~= ARGV[8] then redis.call('hset', KEYS[1], model_field, ARGV[8]) end
redis.call('hincrby', KEYS[6], 'executions', tonumber(ARGV[7]))
if attempt > 1 then redis.call('hincrby', KEYS[6], 'reruns', tonumber(ARGV[7])) end
return attempt
"""
)

# The model is about to answer these items of one batch: each that has no outcome becomes running; one already
# running (its worker died) runs again, unless its cancel was asked meanwhile (the worker then reports it skipped, and
# it ends canceled); one that ended, or any of a closed batch, is not answered.
# KEYS = batch, outcome hash, item list, outbox, ended list; ARGV = now, index, index, ...
# Returns the indices to answer.
RUN_ITEMS_LUA = (
    _LIBRARY
    + """
if not meta(KEYS[1]).count then return {} end
if close_if_overdue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1]) then return {} end
local current = redis.call('hmget', KEYS[2], unpack(ARGV, 2))
local run, fields = {}, {}
for k, cur in ipairs(current) do
  local index = ARGV[k + 1]
  if not cur then
    fields[#fields + 1] = index
    fields[#fields + 1] = RUNNING
    run[#run + 1] = index
  elseif cur == RUNNING and not cancel_asked(KEYS[1], index) then
    run[#run + 1] = index
  end
end
if #fields > 0 then
  redis.call('hset', KEYS[2], unpack(fields))
  expire_with(KEYS[1], KEYS[2])
  redis.call('hincrby', KEYS[1], 'queued', -#fields / 2)
  redis.call('hincrby', KEYS[1], 'running', #fields / 2)
end
return run
"""
)

# A chunk's items end, together: answers, failures and counts in one call. With ARGV[4] = '1' the chunk is done: its
# record and its place in the running set go.
# KEYS = batch, outcome hash, chunks, running set, outbox, ended list, outcomes; ARGV = now, number, member, done,
# then index, status, code, value, upload key for each item. Returns how many items it ended (an ended one is never
# changed).
END_CHUNK_LUA = (
    _LIBRARY
    + """
if not meta(KEYS[1]).count then return -1 end
local entries = {}
for k = 5, #ARGV, 5 do entries[#entries + 1] = {ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[k + 3], ARGV[k + 4]} end
local written = end_items(KEYS[1], KEYS[2], KEYS[5], KEYS[6], KEYS[7], ARGV[1], entries)
if ARGV[4] == '1' then drop_chunk(KEYS[3], ARGV[2], KEYS[4], ARGV[3]) end
return written
"""
)

# Cancels a batch (or ends it `expired` when a read finds it past its deadline, ARGV[2] = 'expired'): see `close`.
# KEYS = batch, outcome hash, item list, outbox, ended list; ARGV = now, why.
# Returns {items closed now, items running, items ended before}; {-1} when the batch is gone, {-2} when it was closed.
CLOSE_BATCH_LUA = (
    _LIBRARY
    + """
if not meta(KEYS[1]).count then return {-1} end
if closed_as(KEYS[1]) then return {-2} end
local ended_before = tonumber(redis.call('hget', KEYS[1], 'ended'))
local closed = close(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2])
return {closed, tonumber(redis.call('hget', KEYS[1], 'running')), ended_before}
"""
)

# Cancels one item of a batch as CANCEL_LUA cancels a job: the cancel is recorded (the item shows cancel_requested);
# a queued item ends `canceled` and never runs; a running one runs to its end (and is not run again: RUN_ITEMS_LUA).
# KEYS = batch, outcome hash, item list, outbox, ended list, outcomes; ARGV = now, index, its image's upload key.
# Returns a CANCEL_* code of contract/transitions.py.
CANCEL_ITEM_LUA = (
    _LIBRARY
    + """
if not meta(KEYS[1]).count then return -1 end
if close_if_overdue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1]) then return 0 end
local cur = redis.call('hget', KEYS[2], ARGV[2])
if cur and cur ~= RUNNING then return 0 end
local cancels = CANCELS_PREFIX .. meta(KEYS[1]).id
redis.call('sadd', cancels, ARGV[2])
expire_with(KEYS[1], cancels)
if cur == RUNNING then return 2 end
local entry = {ARGV[2], 'canceled', 'canceled', '["canceled"]', ARGV[3]}
end_items(KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6], ARGV[1], {entry})
return 1
"""
)

# Accepts a batch stored `pending` once its chunks are published (see ACCEPT_LUA of transitions.py): its chunks
# join their level's set of chunks never started (one per queue: a batch that also captions has two), and their
# answers the count of answers waiting there.
# KEYS = batch, then each never-started set; ARGV = now, then each set's chunks (chunk_groups). Returns 1, or 0 when
# not pending.
ACCEPT_BATCH_LUA = (
    _LIBRARY
    + """
if meta(KEYS[1]).pending ~= '1' then return 0 end
redis.call('hdel', KEYS[1], 'pending')
local groups = chunk_groups(2, #KEYS - 1)
for s, group in ipairs(groups) do
  local unstarted, members = KEYS[s + 1], group.members
  for first = 1, #members, UNPACK_MAX do
    local scored = {}
    for k = first, math.min(#members, first + UNPACK_MAX - 1) do
      scored[#scored + 1] = ARGV[1]
      scored[#scored + 1] = members[k]
    end
    redis.call('zadd', unstarted, unpack(scored))
  end
  redis.call('hincrby', WAITING, unstarted, group.answers)
end
return 1
"""
)

# Withdraws a batch whose submission failed (see WITHDRAW_LUA of transitions.py): deleted, with its uploads,
# unless a worker started one of its chunks already (it then runs, and the API answers 202). A chunk names its worker
# in the chunks hash while it runs (`<number>:w`) and leaves the hash when it ended: a hash that holds a worker's name,
# or fewer chunks than the batch was made of, tells of a chunk started, perhaps ended already (a worker may answer a
# whole chunk while the API waits for its replicas).
# KEYS = batch, chunks, then for each of its queues its never-started set and its deadlines set, then the keys to
# delete (the batch's and its uploads); ARGV = deadline member, how many queues, then each never-started set's chunks
# (chunk_groups). Returns 1 when withdrawn, 0 when a chunk had started, -1 when the batch is missing.
WITHDRAW_BATCH_LUA = (
    _LIBRARY
    + """
if not meta(KEYS[1]).count then return -1 end
local queues = tonumber(ARGV[2])
local groups, all = chunk_groups(3, queues)
local fields = redis.call('hkeys', KEYS[2])
if #fields < #all then return 0 end
for _, field in ipairs(fields) do
  if string.sub(field, -2) == ':w' then return 0 end
end
for s, group in ipairs(groups) do
  local unstarted, deadlines = KEYS[1 + 2 * s], KEYS[2 + 2 * s]
  if meta(KEYS[1]).pending ~= '1' then
    for first = 1, #group.members, UNPACK_MAX do
      redis.call('zrem', unstarted, unpack(group.members, first, math.min(#group.members, first + UNPACK_MAX - 1)))
    end
    redis.call('hincrby', WAITING, unstarted, -group.answers)
  end
  redis.call('zrem', deadlines, ARGV[1])
end
for first = 3 + 2 * queues, #KEYS, UNPACK_MAX do
  redis.call('del', unpack(KEYS, first, math.min(#KEYS, first + UNPACK_MAX - 1)))
end
return 1
"""
)

# Deletes a batch whose items all ended, with its results (a client that saved them frees Redis before the TTL).
# KEYS = batch, then its other keys. Returns 1 when deleted, 0 when an item has not ended (nothing deleted).
DELETE_ENDED_LUA = """
local fields = redis.call('hmget', KEYS[1], 'ended', 'count')
if not fields[1] or fields[1] ~= fields[2] then return 0 end
redis.call('del', unpack(KEYS))
return 1
"""
