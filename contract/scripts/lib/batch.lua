-- Prelude of the scripts that move a batch's items (after lib/queue.lua): see contract/batch_scripts.py.
-- Each script runs a handful of Redis commands per chunk (variadic HMGET/HSET over the chunk's items), not per item.
--
-- The constants below are spelled in Python too; tests/unit/test_scripts.py checks that they agree.

local RUNNING = '["running"]'  -- contract.batch_scripts.RUNNING
local SKIPPED = 'skipped'  -- contract.batch_scripts.SKIPPED
local UPLOADS_LEFT_PREFIX = 'blipq:batch-left:'  -- contract.keys.UPLOADS_LEFT_PREFIX
local UNPACK_MAX = 1000  -- contract.batch_scripts.UNPACK_MAX
local BATCH_OUTBOX_PREFIX = 'batch:'  -- contract.transitions.BATCH_OUTBOX_PREFIX
local ITEM_OUTBOX_PREFIX = 'item:'  -- contract.batch_scripts.ITEM_OUTBOX_PREFIX
local ITEM_WEBHOOK_PREFIX = 'blipq:item-webhook:'  -- contract.keys.ITEM_WEBHOOK_PREFIX
local CANCELS_PREFIX = 'blipq:batch-cancels:'  -- contract.keys.CANCELS_PREFIX
-- contract.batch_scripts.CANCELED_RERUN
local CANCELED_RERUN = '["canceled","the job was canceled while it ran and its worker died; it is not run again"]'
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
