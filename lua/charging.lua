#!lua name=charging
--[[
The only place where a balance changes. Loaded with FUNCTION LOAD REPLACE by every
process that talks to Redis (Redis >= 7.0) and is allowed to (deploy/users.acl). Redis
checks every command a function runs against the caller's ACL, so each role in that file
holds the commands of the functions it calls (README, "Security").

Keys. <ns> is the namespace (CHARGING_NAMESPACE, default "ch"); {pN} is the partition
hash tag, so every key one call touches lives in one Redis Cluster slot.

  <ns>:{pN}:balances       hash    account -> balance in minor units.
                                   Written by charge, top_up, set_balances. Lives forever.
  <ns>:{pN}:seen:<rid>     string  outcome of request id <rid>, packed (see pack()).
                                   Written by charge. Expires after the dedupe window.
  <ns>:{pN}:requests       stream  charge requests, XADDed by producers, read by the
                                   worker group; acked by charge / dead_letter; trimmed
                                   by trim to what every group has acked.
  <ns>:{pN}:results        stream  one outcome per settled request. Written by charge.
                                   Trimmed by trim (worker maintenance) to about
                                   CHARGING_RESULTS_MAXLEN, never past an entry a group
                                   in CHARGING_RESULTS_GROUPS has not read and acked.
  <ns>:{pN}:deadletter     stream  entries that could not be read, with the reason.
                                   Written by dead_letter. Trimmed with MAXLEN ~.
  <ns>:{pN}:deadletter:reasons
                           hash    reason -> number of entries ever dead-lettered with
                                   it. Written by dead_letter. Lives forever (one field
                                   per reason code), so status never scans the stream.
  <ns>:{pN}:reply:<id>     stream  one producer's replies. Written by charge; expires
                                   CHARGING_REPLY_TTL after the last reply.
  <ns>:partitions          string  the partition count, recorded by the first process
                                   (charging/connection.py); no hash tag, never touched here.

"Written by charge" includes charge_batch: it runs the same per-entry settle.
]]

local SEP = '\31'

local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- A dedupe record: fingerprint of the request, then its outcome. One short string
-- per request id, because there is one per charge for the whole dedupe window.
local function pack(fingerprint, status, reason, charged, balance)
  return table.concat({fingerprint, status, reason, charged, balance}, SEP)
end

local function unpack_record(record)
  local parts = {}
  for part in string.gmatch(record .. SEP, '(.-)' .. SEP) do
    parts[#parts + 1] = part
  end
  return parts
end

-- Acks entry_id unless it or group is '' (a synchronous authorize, or a dead letter
-- recorded for an entry that is no longer pending). Returns false when the entry was
-- no longer pending: another consumer settled it (this one was stalled or its reply
-- was lost), so this call must change nothing.
local function ack(requests, group, entry_id)
  if entry_id == '' or group == '' then return true end
  return redis.call('XACK', requests, group, entry_id) == 1
end

local function judge(balances, seen, account, amount, fingerprint, window_ms)
  local record = redis.call('GET', seen)
  if record then
    local r = unpack_record(record)
    if r[1] ~= fingerprint then
      return 'rejected', 'idempotency_conflict', 0, tonumber(redis.call('HGET', balances, account) or 0), 1
    end
    return r[2], r[3], tonumber(r[4]), tonumber(r[5]), 1
  end
  local status, reason, charged, balance = 'approved', '', 0, 0
  local current = redis.call('HGET', balances, account)
  if not current then
    status, reason = 'rejected', 'unknown_account'
  elseif tonumber(current) < amount then
    status, reason, balance = 'rejected', 'insufficient_funds', tonumber(current)
  else
    charged = amount
    balance = redis.call('HINCRBY', balances, account, -amount)
  end
  redis.call('SET', seen, pack(fingerprint, status, reason, charged, balance), 'PX', window_ms)
  return status, reason, charged, balance, 0
end

-- The whole of one charge: ack, dedupe, balance check, deduct, outcome. Shared by
-- charge (one entry, and authorize) and charge_batch (many entries of one partition).
local function settle(balances, seen, results, requests, reply_to, request_id, account, amount, fingerprint,
                      entry_id, group, window_ms, submitted_at, reply_ttl_ms)
  -- Callers validate amounts; this guards the balance against any client allowed to
  -- FCALL directly, for whom a negative amount would be a top-up.
  if not amount or amount < 1 or amount ~= math.floor(amount) then
    return redis.error_reply('invalid_amount')
  end

  if not ack(requests, group, entry_id) then return {'stale'} end

  local status, reason, charged, balance, duplicate =
    judge(balances, seen, account, amount, fingerprint, window_ms)
  local processed_at = now_ms()
  local outcome = {
    'request_id', request_id, 'account', account, 'status', status, 'reason', reason,
    'charged', charged, 'balance', balance, 'duplicate', duplicate,
    'submitted_at', submitted_at, 'processed_at', processed_at, 'entry_id', entry_id,
  }
  -- No MAXLEN here: trim (maintenance) keeps what subscriber groups have not read.
  redis.call('XADD', results, '*', unpack(outcome))
  if reply_to then
    redis.call('XADD', reply_to, 'MAXLEN', '~', 10000, '*', unpack(outcome))
    redis.call('PEXPIRE', reply_to, reply_ttl_ms)
  end
  return {status, reason, charged, balance, duplicate, processed_at}
end

--[[
charge: settle one charge request exactly once.
KEYS: balances, seen, results, requests, [reply_to]
ARGV: request_id, account, amount, fingerprint, entry_id ('' for authorize), group,
      window_ms, submitted_at, reply_ttl_ms
Returns {status, reason, charged, balance, duplicate, processed_at}, or {'stale'} when
the entry had already been settled by another consumer.
]]
local function charge(keys, args)
  return settle(keys[1], keys[2], keys[3], keys[4], keys[5], args[1], args[2], tonumber(args[3]), args[4],
                args[5], args[6], args[7], args[8], args[9])
end

--[[
charge_batch: settle many entries of one partition in one call, each exactly as charge
would (the same settle, in the given order). An entry that fails gets its own error
reply and the others go on, as in a pipeline of charge calls. The worker keeps each call
short (a bounded number of entries), since Redis serves no one else while it runs.
KEYS: balances, results, requests, then per entry: seen, and reply_to if it has one
ARGV: group, window_ms, reply_ttl_ms, then per entry 7 values:
      request_id, account, amount, fingerprint, entry_id, submitted_at, has_reply ('1'/'0')
Returns one reply per entry, in order, each what charge returns (or an error).
]]
local function charge_batch(keys, args)
  local balances, results, requests = keys[1], keys[2], keys[3]
  local group, window_ms, reply_ttl_ms = args[1], args[2], args[3]
  local replies, k = {}, 4
  for a = 4, #args, 7 do
    local seen, reply_to = keys[k], nil
    k = k + 1
    if args[a + 6] == '1' then
      reply_to = keys[k]
      k = k + 1
    end
    local ok, reply = pcall(settle, balances, seen, results, requests, reply_to, args[a], args[a + 1],
                            tonumber(args[a + 2]), args[a + 3], args[a + 4], group, window_ms, args[a + 5],
                            reply_ttl_ms)
    if not ok then
      reply = {err = type(reply) == 'table' and reply.err or tostring(reply)}
    end
    replies[#replies + 1] = reply
  end
  return replies
end

--[[
dead_letter: move an entry that cannot be read to the dead-letter stream and ack it,
atomically, so a bad entry is never lost and never blocks the group, and count it
by reason.
KEYS: deadletter, requests, reasons
ARGV: entry_id, group ('' to record without acking), error, detail, maxlen, then the
      entry's own field/value pairs
Returns 1, or 0 when another consumer had already settled the entry.
]]
local function dead_letter(keys, args)
  if not ack(keys[2], args[2], args[1]) then return 0 end
  local fields = {}
  for i = 6, #args do fields[#fields + 1] = args[i] end
  for _, v in ipairs({'error', args[3], 'detail', args[4], 'entry_id', args[1]}) do
    fields[#fields + 1] = v
  end
  redis.call('XADD', keys[1], 'MAXLEN', '~', args[5], '*', unpack(fields))
  redis.call('HINCRBY', keys[3], args[3], 1)
  return 1
end

--[[
top_up: add to an existing account. KEYS: balances. ARGV: account, amount, max_balance.
Returns the new balance, or an error for an unknown account or a balance over the cap.
]]
local function top_up(keys, args)
  local current = redis.call('HGET', keys[1], args[1])
  if not current then return redis.error_reply('unknown_account') end
  if tonumber(current) + tonumber(args[2]) > tonumber(args[3]) then
    return redis.error_reply('balance_too_large')
  end
  return redis.call('HINCRBY', keys[1], args[1], args[2])
end

--[[
set_balances: create or overwrite accounts (operator reset).
KEYS: balances. ARGV: account, balance, account, balance, ...  Returns the count set.
]]
local function set_balances(keys, args)
  redis.call('HSET', keys[1], unpack(args))
  return #args / 2
end

local function stream_id_less(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- The lowest id a group still needs: its oldest pending id, else its last-delivered id.
local function group_bound(stream, info)
  local bound = info['last-delivered-id']
  local pending = redis.call('XPENDING', stream, info['name'])
  if pending[1] > 0 and stream_id_less(pending[2], bound) then bound = pending[2] end
  return bound
end

-- The lowest bound over the named groups (every group when none is named), or nil
-- when there is no group or a named group does not exist yet (it will read from the
-- start, so nothing may go).
local function groups_bound(stream, names)
  local wanted, missing = nil, #names
  if missing > 0 then
    wanted = {}
    for _, name in ipairs(names) do wanted[name] = true end
  end
  local bound = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if wanted == nil or wanted[info['name']] then
      missing = missing - 1
      local candidate = group_bound(stream, info)
      if bound == nil or stream_id_less(candidate, bound) then bound = candidate end
    end
  end
  if missing > 0 then return nil end
  return bound
end

--[[
trim: drop stream entries that the groups that matter have read and acked. Redis 7
trimming ignores consumer groups, so the bound is computed here: the oldest pending id
and the lowest last-delivered id over the groups. Maintenance only, never per entry.
KEYS: stream.
ARGV: maxlen, then group names.
  maxlen 0 (request streams): drop everything every group on the stream has acked.
  maxlen > 0 (results streams): keep about maxlen entries; with group names, never
  drop an entry one of those groups has not read and acked (other groups are not
  protected), so the stream can stay longer than maxlen while a named group is behind.
Returns the number of entries removed.
]]
local function trim(keys, args)
  local stream, maxlen = keys[1], tonumber(args[1])
  local names = {}
  for i = 2, #args do names[#names + 1] = args[i] end
  if redis.call('EXISTS', stream) == 0 then return 0 end
  local excess = 0
  if maxlen > 0 then
    excess = redis.call('XLEN', stream) - maxlen
    if excess <= 0 then return 0 end
    if #names == 0 then return redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen) end
  end
  local bound = groups_bound(stream, names)
  if bound == nil then return 0 end
  if maxlen > 0 then
    -- '~' drops whole radix-tree nodes only, never past the bound, at most excess entries.
    return redis.call('XTRIM', stream, 'MINID', '~', bound, 'LIMIT', excess)
  end
  return redis.call('XTRIM', stream, 'MINID', bound)
end

redis.register_function('charge', charge)
redis.register_function('charge_batch', charge_batch)
redis.register_function('dead_letter', dead_letter)
redis.register_function('top_up', top_up)
redis.register_function('set_balances', set_balances)
redis.register_function('trim', trim)
