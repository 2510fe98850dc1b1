#!lua name=charging_baseline
--[[
FROZEN, for `charging bench` only: the settling path of lua/charging.lua as it was at
b2349ea, before the work to cut Redis's cost per charge, so every bench run can measure
today's library against it on the same server and load (baseline.py, beside it).
The bench loads it under its own library name with its functions prefixed baseline_, into
its own namespace; the engine never loads or calls it. Do not edit, except to keep it
loadable: below this comment the code is b2349ea's, with only the registrations changed.
]]
--[[
The only place where a balance changes. Loaded with FUNCTION LOAD REPLACE by every
process that talks to Redis (Redis >= 7.0) and is allowed to (deploy/users.acl). Redis
checks every command a function runs against the caller's ACL, so each role in that file
holds the commands of the functions it calls (README, "Security").

Keys. <ns> is the namespace (CHARGING_NAMESPACE, default "ch"); {pN} is the partition
hash tag, so every key one call touches lives in one Redis Cluster slot. Every key a
function touches is passed to it in KEYS, none is made up inside.

  <ns>:{pN}:balances       hash    account -> balance in minor units (held funds included:
                                   available = balance - held). Written by charge, commit,
                                   top_up, set_balances. Lives forever.
  <ns>:{pN}:held           hash    account -> total held by its open reservations; no field
                                   when nothing is held. Written by reserve, extend, commit,
                                   release and every expiry. Lives forever.
  <ns>:{pN}:reservations   hash    reservation id -> open reservation, packed (see
                                   write_reservation): account, amount held, expires_at
                                   (ms, server time), unit price, ttl ms. The field goes
                                   when the reservation is committed, released or expired.
                                   A reservation id is <account>/<request id of the reserve>.
  <ns>:{pN}:expiries       zset    reservation id -> expires_at; the index the expiry
                                   release walks (lazily in every call, and the worker's
                                   sweep, expire_reservations). Same lifetime as the field.
  <ns>:{pN}:seen:<rid>     string  outcome of request id <rid>, packed (see record()).
                                   Written by charge and the reservation operations.
                                   Expires after the dedupe window.
  <ns>:{pN}:requests       stream  charge and reservation requests, XADDed by producers,
                                   read by the worker group; acked by the settling
                                   function (or settle_batch, which runs it per entry) or
                                   dead_letter; trimmed by trim to what every group has acked.
  <ns>:{pN}:results        stream  one outcome per settled request. Written by the settling
                                   functions. Trimmed by trim (worker maintenance) to about
                                   CHARGING_RESULTS_MAXLEN, never past an entry a group
                                   in CHARGING_RESULTS_GROUPS has not read and acked.
  <ns>:{pN}:deadletter     stream  entries that could not be read, with the reason.
                                   Written by dead_letter. Trimmed with MAXLEN ~.
  <ns>:{pN}:deadletter:reasons
                           hash    reason -> number of entries ever dead-lettered with
                                   it. Written by dead_letter. Lives forever (one field
                                   per reason code), so status never scans the stream.
  <ns>:{pN}:reply:<id>     stream  one producer's replies. Written by the settling
                                   functions; expires CHARGING_REPLY_TTL after the last reply.
  <ns>:partitions          string  the partition count, recorded by the first process
                                   (charging/connection.py); no hash tag, never touched here.

Reservations live in two partition-wide structures (a hash and a zset) rather than a key
each, because the expiry release finds them through the zset: a key per reservation would
be a key the function was not given.
]]
local SEP = '\31'
-- Expired reservations every settling call releases before its own work, oldest first:
-- bounded work per call; the worker's sweep (expire_reservations) releases the rest.
local LAZY_RELEASE = 16

local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- Whole numbers as digits: Lua's own tostring (used by table.concat) keeps only 14
-- significant digits, so a balance of 10^15 - 1 would be written as 1e+15.
local function digits(n)
  if type(n) == 'number' then return string.format('%d', n) end
  return n
end

local function pack(values)
  local parts = {}
  for i, v in ipairs(values) do parts[i] = digits(v) end
  return table.concat(parts, SEP)
end

local function split(packed)
  local parts = {}
  for part in string.gmatch(packed .. SEP, '(.-)' .. SEP) do
    parts[#parts + 1] = part
  end
  return parts
end

-- A whole number >= 1 (what every amount, unit count, price and ttl must be), or nil.
local function whole(value)
  local n = tonumber(value)
  if n and n >= 1 and n == math.floor(n) and n < 2 ^ 53 then return n end
  return nil
end

-- Acks entry_id unless it or group is '' (a synchronous call, or a dead letter recorded
-- for an entry that is no longer pending). Returns false when the entry was no longer
-- pending: another consumer settled it (this one was stalled or its reply was lost), so
-- this call must change nothing.
local function ack(requests, group, entry_id)
  if entry_id == '' or group == '' then return true end
  return redis.call('XACK', requests, group, entry_id) == 1
end

-- ---- reservations --------------------------------------------------------------------

local function read_reservation(k, id)
  local packed = redis.call('HGET', k.reservations, id)
  if not packed then return nil end
  local p = split(packed)
  return {account = p[1], amount = tonumber(p[2]), expires_at = tonumber(p[3]),
          unit_price = tonumber(p[4]), ttl_ms = tonumber(p[5])}
end

local function write_reservation(k, id, r)
  redis.call('HSET', k.reservations, id, pack({r.account, r.amount, r.expires_at, r.unit_price, r.ttl_ms}))
  redis.call('ZADD', k.expiries, r.expires_at, id)
end

-- Changes an account's held total; returns the new total. A total that reaches 0 loses
-- its field. A negative total is left visible on purpose: it could only come from a
-- release applied twice, and the audit reports it.
local function hold(k, account, delta)
  local held = redis.call('HINCRBY', k.held, account, delta)
  if held == 0 then redis.call('HDEL', k.held, account) end
  return held
end

-- Ends a reservation: what it held is available again. Returns the account's held total.
local function close(k, id, r)
  redis.call('HDEL', k.reservations, id)
  redis.call('ZREM', k.expiries, id)
  return hold(k, r.account, -r.amount)
end

-- Releases up to limit reservations whose expiry has passed (expires_at <= now), oldest
-- first, charging none of them, except keep: the one a commit, extend or release acts
-- on, which its own call releases and answers reservation_expired. Returns how many it
-- released.
local function release_expired(k, now, limit, keep)
  local released = 0
  for _, id in ipairs(redis.call('ZRANGE', k.expiries, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    if id ~= keep then
      local r = read_reservation(k, id)
      if r then
        close(k, id, r)
        released = released + 1
      else
        redis.call('ZREM', k.expiries, id)
      end
    end
  end
  return released
end

-- ---- deciding one request ------------------------------------------------------------
-- Each decide function judges a request that has no dedupe record yet, applies it, and
-- returns its outcome: status, reason, charged, balance, and for the reservation
-- operations held (the account's total after), reserved and expires_at (the reservation
-- as this request left it, or as it was when it closed).

local function funds(k, account)
  local balance = redis.call('HGET', k.balances, account)
  return balance and tonumber(balance), tonumber(redis.call('HGET', k.held, account) or 0)
end

local function outcome(status, reason, charged, balance, held, r)
  return {status = status, reason = reason, charged = charged, balance = balance or 0, held = held,
          reserved = r and r.amount or 0, expires_at = r and r.expires_at or ''}
end

local function decide_charge(k, a)
  local balance, held = funds(k, a.account)
  if not balance then return outcome('rejected', 'unknown_account', 0, 0, held) end
  if balance - held < a.amount then return outcome('rejected', 'insufficient_funds', 0, balance, held) end
  balance = redis.call('HINCRBY', k.balances, a.account, -a.amount)
  return outcome('approved', '', a.amount, balance, held)
end

local function decide_reserve(k, a, now)
  local balance, held = funds(k, a.account)
  if not balance then return outcome('rejected', 'unknown_account', 0, 0, held) end
  -- Only when the reserve's dedupe record expired while extends kept it open.
  local open = read_reservation(k, a.reservation)
  if open then return outcome('rejected', 'reservation_exists', 0, balance, held, open) end
  if balance - held < a.amount then return outcome('rejected', 'insufficient_funds', 0, balance, held) end
  local r = {account = a.account, amount = a.amount, expires_at = now + a.ttl_ms, unit_price = a.unit_price,
             ttl_ms = a.ttl_ms}
  write_reservation(k, a.reservation, r)
  return outcome('approved', '', 0, balance, hold(k, a.account, a.amount), r)
end

-- The open reservation a commit, extend or release acts on; else nil and the rejection.
-- One found past its expiry is released here, like the sweep would.
local function open_reservation(k, a, now)
  local r = read_reservation(k, a.reservation)
  if not r or r.account ~= a.account then return nil, 'unknown_reservation' end
  if r.expires_at <= now then
    close(k, a.reservation, r)
    return nil, 'reservation_expired', r
  end
  return r
end

-- What a commit or extend is worth: its amount, or its units at the reservation's unit
-- price (the tariff in force when the reservation was made).
local function worth(a, r)
  return a.amount or a.units * r.unit_price
end

local function not_open(k, a, reason, r)
  local balance, held = funds(k, a.account)
  return outcome('rejected', reason, 0, balance, held, r)
end

local function decide_commit(k, a, now)
  local r, reason, closed = open_reservation(k, a, now)
  if not r then return not_open(k, a, reason, closed) end
  local used = worth(a, r)
  local balance, held = funds(k, a.account)
  if used > r.amount then return outcome('rejected', 'exceeds_reservation', 0, balance, held, r) end
  -- Cannot happen through the engine (a hold is always covered); an operator's
  -- set_balances can lower a balance under its holds, and no balance goes below zero.
  if not balance or balance < used then return outcome('rejected', 'insufficient_funds', 0, balance, held, r) end
  balance = redis.call('HINCRBY', k.balances, a.account, -used)
  return outcome('approved', '', used, balance, close(k, a.reservation, r), r)
end

local function decide_extend(k, a, now)
  local r, reason, closed = open_reservation(k, a, now)
  if not r then return not_open(k, a, reason, closed) end
  local more = worth(a, r)
  local balance, held = funds(k, a.account)
  if not balance or balance - held < more then
    return outcome('rejected', 'insufficient_funds', 0, balance, held, r)
  end
  r.amount = r.amount + more
  r.expires_at = now + (a.ttl_ms or r.ttl_ms)
  write_reservation(k, a.reservation, r)
  return outcome('approved', '', 0, balance, hold(k, a.account, more), r)
end

local function decide_release(k, a, now)
  local r, reason, closed = open_reservation(k, a, now)
  if not r then return not_open(k, a, reason, closed) end
  local held = close(k, a.reservation, r)
  local balance = funds(k, a.account)
  return outcome('approved', '', 0, balance, held, r)
end

-- ---- the one settling path: ack, dedupe, decide, record, post -------------------------

-- Per operation: how to decide, and which numeric arguments it needs ('usage' is exactly
-- one of amount and units). Checked before anything is written, so no caller allowed to
-- FCALL directly can, say, extend by a negative amount.
local OPS = {
  charge = {decide = decide_charge, needs = {amount = true}},
  reserve = {decide = decide_reserve, needs = {amount = true, unit_price = true, ttl_ms = true, reservation = true}},
  commit = {decide = decide_commit, needs = {usage = true, reservation = true}},
  extend = {decide = decide_extend, needs = {usage = true, reservation = true}},
  release = {decide = decide_release, needs = {reservation = true}},
}
local NUMBERS = {amount = 'invalid_amount', units = 'invalid_units', unit_price = 'invalid_unit_price',
                 ttl_ms = 'invalid_ttl'}

local function read_args(op, args)
  local a = {op = op, request_id = args[1], account = args[2], fingerprint = args[3], entry_id = args[4],
             group = args[5], window_ms = args[6], submitted_at = args[7], reply_ttl_ms = args[8],
             reservation = args[12] ~= '' and args[12] or nil}
  local raw = {amount = args[9], units = args[10], unit_price = args[11], ttl_ms = args[13]}
  local needs = OPS[op].needs
  for name, err in pairs(NUMBERS) do
    local given = raw[name] ~= nil and raw[name] ~= ''
    a[name] = given and whole(raw[name]) or nil
    if (given and not a[name]) or (needs[name] and not given) then return nil, err end
  end
  if needs.usage and (a.amount == nil) == (a.units == nil) then return nil, 'invalid_amount' end
  if needs.reservation and not a.reservation then return nil, 'invalid_reservation' end
  return a
end

-- A dedupe record: the request's fingerprint, then its outcome. One short string per
-- request id, because there is one per request for the whole dedupe window.
local function record(a, o)
  local values = {a.fingerprint, o.status, o.reason, o.charged, o.balance}
  if a.op ~= 'charge' then
    for _, v in ipairs({o.held, o.reserved, o.expires_at}) do values[#values + 1] = v end
  end
  return pack(values)
end

-- The stored outcome of a request id already settled, marked duplicate; nil if none.
local function replay(k, a)
  local stored = redis.call('GET', k.seen)
  if not stored then return nil end
  local r = split(stored)
  if r[1] ~= a.fingerprint then
    local balance, held = funds(k, a.account)
    local o = outcome('rejected', 'idempotency_conflict', 0, balance, held)
    o.duplicate = 1
    return o
  end
  return {status = r[2], reason = r[3], charged = tonumber(r[4]), balance = tonumber(r[5]), duplicate = 1,
          held = tonumber(r[6] or 0), reserved = tonumber(r[7] or 0), expires_at = r[8] or ''}
end

local function post(k, a, o, now)
  local fields = {
    'request_id', a.request_id, 'account', a.account, 'status', o.status, 'reason', o.reason,
    'charged', o.charged, 'balance', o.balance, 'duplicate', o.duplicate,
    'submitted_at', a.submitted_at, 'processed_at', now, 'entry_id', a.entry_id,
  }
  if a.op ~= 'charge' then
    for _, v in ipairs({'op', a.op, 'reservation', a.reservation, 'held', o.held, 'reserved', o.reserved,
                        'expires_at', o.expires_at}) do
      fields[#fields + 1] = v
    end
  end
  for i, v in ipairs(fields) do fields[i] = digits(v) end
  -- No MAXLEN here: trim (maintenance) keeps what subscriber groups have not read.
  redis.call('XADD', k.results, '*', unpack(fields))
  if k.reply_to then
    redis.call('XADD', k.reply_to, 'MAXLEN', '~', 10000, '*', unpack(fields))
    redis.call('PEXPIRE', k.reply_to, a.reply_ttl_ms)
  end
end

--[[
charge, reserve, commit, extend, release: settle one request exactly once.
KEYS: balances, seen, results, requests, held, reservations, expiries, [reply_to]
ARGV: request_id, account, fingerprint, entry_id ('' for a synchronous call), group,
      window_ms, submitted_at, reply_ttl_ms, amount, units, unit_price, reservation, ttl_ms
      ('' for what an operation does not use):
  charge   amount                      takes amount from the available funds
  reserve  amount, unit_price, ttl_ms, reservation (<account>/<request_id>)
                                       holds amount until now + ttl_ms
  commit   amount or units, reservation
                                       charges it (units at the reservation's unit price),
                                       at most what the reservation holds; the rest is
                                       released
  extend   amount or units, reservation, [ttl_ms]
                                       holds that much more, until now + ttl_ms (default:
                                       the reserve's ttl)
  release  reservation                 releases all of it
Returns {status, reason, charged, balance, duplicate, processed_at}, then for the
reservation operations {held, reserved, expires_at}; or {'stale'} when the entry had
already been settled by another consumer.
]]
local function settle(op, keys, args)
  -- A caller of another layout (a process of an older version during an upgrade) is
  -- refused before anything is written: nothing acked, so its entry stays pending.
  if #keys < 7 or #keys > 8 or #args ~= 13 then
    return redis.error_reply('wrong_arguments: ' .. op .. ' takes 7 or 8 keys and 13 arguments')
  end
  local k = {balances = keys[1], seen = keys[2], results = keys[3], requests = keys[4], held = keys[5],
             reservations = keys[6], expiries = keys[7], reply_to = keys[8]}
  -- Callers validate; this guards the balances against any client allowed to FCALL
  -- directly, for whom a negative amount would be a top-up.
  local a, err = read_args(op, args)
  if not a then return redis.error_reply(err) end

  if not ack(k.requests, a.group, a.entry_id) then return {'stale'} end

  local now = now_ms()
  local o = replay(k, a)
  if not o then
    release_expired(k, now, LAZY_RELEASE, op ~= 'reserve' and a.reservation or nil)
    o = OPS[op].decide(k, a, now)
    o.duplicate = 0
    redis.call('SET', k.seen, record(a, o), 'PX', a.window_ms)
  end
  post(k, a, o, now)
  local reply = {o.status, o.reason, o.charged, o.balance, o.duplicate, now}
  if op ~= 'charge' then
    for _, v in ipairs({o.held, o.reserved, o.expires_at}) do reply[#reply + 1] = v end
  end
  return reply
end

--[[
settle_batch: settle many entries of one partition in one call, each exactly as its own
function (charge, reserve, commit, extend, release) would: the same settle, given the same
keys and the same 13 arguments, in the given order. An entry that fails gets its own error
reply and the others go on, as in a pipeline of per-entry calls. One call settling many
costs Redis and the worker far less than one call each; the worker keeps each call short
(a bounded number of entries), since Redis serves no one else while a function runs.
KEYS: balances, results, requests, held, reservations, expiries, then per entry: seen, and
      reply_to if it has one
ARGV: per entry 15 values: op, has_reply ('1' or '0'), then its 13 arguments of settle
Returns one reply per entry, in order: what the entry's own function returns, or an error.
]]
local BATCH_SHARED_KEYS, BATCH_ENTRY_ARGS = 6, 15

local function settle_batch(keys, args)
  local entries, replies_to = #args / BATCH_ENTRY_ARGS, 0
  for a = 2, #args, BATCH_ENTRY_ARGS do
    if args[a] == '1' then replies_to = replies_to + 1 end
  end
  if entries ~= math.floor(entries) or #keys ~= BATCH_SHARED_KEYS + entries + replies_to then
    return redis.error_reply('wrong_arguments: settle_batch takes 15 arguments and 1 or 2 keys per entry')
  end
  local replies, k = {}, BATCH_SHARED_KEYS + 1
  for a = 1, #args, BATCH_ENTRY_ARGS do
    local op = args[a]
    local entry_keys = {keys[1], keys[k], keys[2], keys[3], keys[4], keys[5], keys[6]}
    k = k + 1
    if args[a + 1] == '1' then
      entry_keys[8] = keys[k]
      k = k + 1
    end
    local reply
    if OPS[op] then
      local ok, result = pcall(settle, op, entry_keys, {unpack(args, a + 2, a + BATCH_ENTRY_ARGS - 1)})
      reply = ok and result or {err = type(result) == 'table' and result.err or tostring(result)}
    else
      reply = redis.error_reply('unknown_op: ' .. tostring(op))
    end
    replies[#replies + 1] = reply
  end
  return replies
end

--[[
expire_reservations: the worker's sweep. Releases up to limit reservations whose expiry
has passed, oldest first, charging none; every settling call also releases a few
(LAZY_RELEASE) before its own work. A commit racing the sweep is safe: each call is
atomic, and whichever runs second finds the reservation gone.
KEYS: held, reservations, expiries. ARGV: limit. Returns how many it released.
]]
local function expire_reservations(keys, args)
  local limit = whole(args[1])
  if not limit then return redis.error_reply('invalid_limit') end
  local k = {held = keys[1], reservations = keys[2], expiries = keys[3]}
  return release_expired(k, now_ms(), limit)
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

redis.register_function('baseline_charge', function(keys, args) return settle('charge', keys, args) end)
redis.register_function('baseline_settle_batch', settle_batch)
