#!lua name=charging
--[[
The only place where a balance changes. Loaded with FUNCTION LOAD REPLACE by every
process that talks to Redis (Redis >= 7.0) and is allowed to (in deploy/users.acl only
the maintainer is). Redis checks every command a function runs against the caller's ACL,
so each role in that file holds the commands of the functions it calls, each on the keys
it runs it on (docs/security.md; tests/test_acl_needs.py says which rule is missing
when a function here changes).

Keys. <ns> is the namespace (CHARGING_NAMESPACE, default "ch"); {pN} is the partition
hash tag, so every key one call touches lives in one Redis Cluster slot. Every key a
function touches is passed to it in KEYS (but the dedupe buckets, below, and the reply
streams pump reads from its entries), none is made up inside; each is checked against the name its role gives it before anything is written.

  <ns>:{pN}:balances       hash    account -> its main balance in minor units (held funds
                                   included: available = balance - held). Written by charge,
                                   commit, top_up, set_balances. Lives forever.
  <ns>:{pN}:held           hash    account -> what its open reservations hold of its main
                                   balance; no field when nothing is held. Written by
                                   reserve, extend, commit, release and every expiry. Lives
                                   forever.
  <ns>:{pN}:wallets        hash    account -> its wallet: its plan, its breakage and its
                                   credit lots, packed (see parse_wallet); no field for an
                                   account with none. Written by the settling functions,
                                   grant, assign_plan and the sweep.
  <ns>:{pN}:lot_expiries   zset    <account>/<lot> -> the lot's expiry, for the sweep; an
                                   entry goes when the lot does, or when the sweep finds it.
  <ns>:{pN}:plans          hash    plan name -> unit prices of sms, voice and data; every
                                   partition keeps every plan (set_plan, one partition a
                                   call). Lives forever.
  <ns>:{pN}:reservations   hash    reservation id -> open reservation, packed (see
                                   write_reservation): account, amount held, expires_at
                                   (ms, server time), unit price, ttl ms, and when it pins
                                   lots its service and draws. The field goes
                                   when the reservation is committed, released or expired.
                                   A reservation id is <account>/<request id of the reserve>.
  <ns>:{pN}:expiries       zset    reservation id -> expires_at; the index the worker's
                                   sweep (expire_reservations) walks, oldest first. Same
                                   lifetime as the field.
  <ns>:{pN}:holds          zset    reservation id, every score 0: ordered by name, so an
                                   account's reservations (<account>/...) sit side by side
                                   and one ZRANGE BYLEX finds them. Every settling call
                                   releases the expired ones of its own account through it
                                   before it decides, so an expired hold never counts.
                                   Same lifetime as the field.
  <ns>:{pN}:dedupe:<slice>:<slot>
                           hash    request id -> when it was settled and its outcome,
                                   packed (see record()), for the requests settled in one
                                   slice of time (a quarter to a half of the window;
                                   slot x slice is when it starts, in ms). Written
                                   by charge and the reservation operations; expires whole
                                   once its last record has (see bucket()); the field ''
                                   holds that expiry (write_bucket). The only keys
                                   named here rather than passed in KEYS: made from the
                                   partition's tag and the time, so in its slot.
  <ns>:{pN}:requests       stream  charge and reservation requests, XADDed by producers,
                                   read by the worker group inside pump (XREADGROUP,
                                   XAUTOCLAIM; the worker's own read only waits); acked
                                   by the settling path (settle_entry) or a dead letter; trimmed by trim to what every group has acked;
                                   repair finds entries removed unread and rewinds ids a
                                   client pushed into the future.
  <ns>:{pN}:results        stream  one outcome per settled request. Written by the settling
                                   functions. Trimmed by trim (the maintainer) to about
                                   CHARGING_RESULTS_MAXLEN, never past an entry a group
                                   in CHARGING_RESULTS_GROUPS has not read and acked.
  <ns>:{pN}:deadletter     stream  entries that could not be read, with the reason.
                                   Written by pump (and repair: entries removed
                                   before they were read). Trimmed with MAXLEN ~.
  <ns>:{pN}:deadletter:reasons
                           hash    reason -> number of entries ever dead-lettered with
                                   it. Written with each dead letter. Lives forever (one field
                                   per reason code), so status never scans the stream.
  <ns>:{pN}:reply:<id>     stream  one producer's replies. Written by the settling
                                   functions; expires CHARGING_REPLY_TTL after the last reply.
  <ns>:partitions          string  the partition count, recorded by the first process
                                   (charging/connection.py); no hash tag, never touched here.

Reservations live in partition-wide structures (two hashes and two zsets) rather than
keys of their own, because the sweep finds them through the expiries zset: a key per
reservation or per account would be a key the function was not given.

Nothing after the first write can fail. A function that errors half way keeps every write
it made (there is no rollback, and pump's per-entry pcall only hides the error), so each one
first reads and checks every argument and every stored value its decision needs, and
every other stream it will post to (postable: of its type, not exhausted), then writes: a
request's outcome first, an XADD to the results stream that refuses the request by failing
before anything of it is written (first_post), then its ack and only commands that cannot
fail on what was checked. A call that is refused writes nothing and its entry stays pending.
]]
local SEP = '\31'

-- The library's limits, the same for every caller (never an argument). Balances, held
-- totals, amounts, unit prices and unit counts stay within MAX_BALANCE, so every sum of
-- two stays exact (Lua numbers are exact below 2^53); durations (ttls, the dedupe
-- window, the reply ttl) within ten years; timestamps below 10^14 ms (year 5138).
local MAX_BALANCE = 1000000000000000
local MAX_DURATION_MS = 315360000000
local MAX_TIME_MS = 100000000000000
local MAX_BATCH = 1000 -- entries per pump call
local MAX_SWEEP = 100000 -- reservations per expire_reservations call
local READ_CHUNK = 500 -- reservation ids per HMGET

local REQUEST_ID = '^[\33-\126]+$' -- visible ASCII, as on the wire
local ACCOUNT = '^[A-Za-z0-9_.:%-]+$'
local NAME = '^[A-Za-z0-9_.%-]+$' -- a consumer group, a reply stream id
local ENTRY_ID = '^[0-9]+%-[0-9]+$'
local REASON = '^[a-z_]+$'
local FINGERPRINT = '^[^' .. SEP .. ']+$' -- it opens the packed dedupe record
local SERVICES = {sms = true, voice = true, data = true}

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

local function split_on(packed, sep)
  local parts = {}
  for part in string.gmatch(packed .. sep, '(.-)' .. sep) do parts[#parts + 1] = part end
  return parts
end

local function split(packed) return split_on(packed, SEP) end

-- ---- checking ------------------------------------------------------------------------

-- A count: decimal digits alone (tonumber would also take '1e3', '0x10', ' 5', 'inf' and
-- '1.5') whose value lies within low..high, as a number; else nil. For arguments and for
-- stored values alike.
local function count(value, low, high)
  if type(value) ~= 'string' or #value < 1 or #value > 16 or not string.find(value, '^[0-9]+$') then
    return nil
  end
  local n = tonumber(value)
  if n < low or n > high then return nil end
  return n
end

-- A stored balance, checked: a count as HINCRBY reads one too. '0100' is a count, but
-- HINCRBY refuses it, so a charge on it would fail after its ack (nil: corrupt).
local function stored_balance(value)
  if #value > 1 and string.sub(value, 1, 1) == '0' then return nil end
  return count(value, 0, MAX_BALANCE)
end

local function text(value, pattern, longest)
  return type(value) == 'string' and #value >= 1 and #value <= longest and string.find(value, pattern) ~= nil
end

local function refuse(reason, detail)
  return redis.error_reply(reason .. (detail and (': ' .. detail) or ''))
end

-- The partition's keys, each the name its role gives it (roles in order, the first one
-- gives the partition's tag): a caller of another layout (an older version during an
-- upgrade) or one mixing partitions is refused before anything is written.
local function partition_keys(names, roles)
  local tag = type(names[1]) == 'string' and string.match(names[1], '^(.+):' .. roles[1] .. '$')
  if not tag then return nil end
  local k = {tag = tag}
  for i, role in ipairs(roles) do
    if names[i] ~= tag .. ':' .. role then return nil end
    k[role] = names[i]
  end
  return k
end

-- A key another client made of another type would fail the write after the ack.
local function wrong_type(key, wanted)
  local found = redis.call('TYPE', key)['ok']
  if found ~= wanted and found ~= 'none' then
    return refuse('WRONGTYPE', key .. ' holds a ' .. found .. ', not a ' .. wanted)
  end
  return nil, found
end

local function wrong_types(k, wanted)
  for role, kind in pairs(wanted) do
    local err = wrong_type(k[role], kind)
    if err then return err end
  end
  return nil
end

-- XADD * fails for good once a stream's last id has the largest milliseconds there are, and
-- any client allowed to XADD there can put it there (an explicit id). A call posts an
-- outcome or a dead letter after writes it cannot undo (the ack, the charge), so it checks
-- every stream it will post to first and is refused before it writes (stream_exhausted);
-- its entry stays pending. (Refused from the first such id on, not only at the very last:
-- nothing the library writes ever comes near it. The results stream is not checked: the
-- outcome is a request's first write, refused by the XADD itself at the very last id.)
local EXHAUSTED_MS = '18446744073709551615-'

local function exhausted(stream)
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      if string.sub(info[i + 1], 1, #EXHAUSTED_MS) == EXHAUSTED_MS then
        return refuse('stream_exhausted', stream .. ' has reached the last possible id')
      end
      return nil
    end
  end
  return nil
end

-- A stream a call will post to without reading it, checked before the call writes: of
-- another type, or exhausted, it refuses the call. cache: what a batch found of each stream
-- (false: fine), so each is checked once per call.
local function postable(stream, cache)
  local found = cache and cache[stream]
  if found == nil then
    local err, kind = wrong_type(stream, 'stream')
    found = err or (kind == 'stream' and exhausted(stream)) or false
    if cache then cache[stream] = found end
  end
  return found or nil
end

-- Acks an entry pump read in this same call: pending to its consumer, so this cannot fail
-- and the entry cannot have been settled by another (no worker holds an entry between calls).
local function ack(requests, group, entry_id)
  redis.call('XACK', requests, group, entry_id)
end

-- ---- wallets: an account's plan, breakage and credit lots -----------------------------
-- <ns>:{pN}:wallets, account -> its wallet, packed: records split by RS, fields by SEP.
-- The first record: the plan ('' the default plan), then the breakage ever recorded, in
-- money and in units of sms, voice and data. Then one record per lot, in the order granted:
-- id, kind (money or units), service ('' for money of any service), granted, left, held
-- (what open reservations pin of left), expires_at ('' never), and the expiry as the grant
-- gave it (what a replayed grant must match). An account that has neither plan nor lot has
-- no wallet. The main balance stays in balances; it is the lot 'main' of the spend order.
local RS = '\30'
local LOT_ID = '^[A-Za-z0-9_.%-]+$'
local MAX_LOTS = 32
local MAX_TOTAL = 9007199254740991 -- 2^53 - 1: a breakage total, exact to here, stops here
local KINDS = {money = true, units = true}

-- A stored lot, checked; nil when it is not one the library wrote.
-- A lot's eight fields in one match (nil unless there are exactly eight): it is read at
-- every charge of its account.
local FIELD = '([^' .. SEP .. ']*)'
local LOT_FIELDS = '^' .. FIELD .. SEP .. FIELD .. SEP .. FIELD .. SEP .. FIELD .. SEP .. FIELD .. SEP .. FIELD .. SEP
                   .. FIELD .. SEP .. FIELD .. '$'

local function parse_lot(packed, index)
  local id, kind, service, granted, left, held, expires_at, spec = string.match(packed, LOT_FIELDS)
  if not id then return nil end
  -- packed: as stored, written again as it is while the lot does not change (pack_wallet)
  local lot = {id = id, kind = kind, service = service, granted = count(granted, 1, MAX_BALANCE),
               left = count(left, 0, MAX_BALANCE), held = count(held, 0, MAX_BALANCE),
               expires_at = expires_at ~= '' and count(expires_at, 0, MAX_TIME_MS), spec = spec, index = index,
               packed = packed}
  if not text(lot.id, LOT_ID, 64) or lot.id == 'main' or not KINDS[lot.kind]
      or not (lot.service == '' or SERVICES[lot.service]) or (lot.kind == 'units' and lot.service == '')
      or not (lot.granted and lot.left and lot.held) or lot.held > lot.left or lot.left > lot.granted
      or lot.expires_at == nil then
    return nil
  end
  return lot
end

-- What an account without a wallet reads as; never changed (no lot to change), never written.
local EMPTY_WALLET = {plan = '', broken = {money = 0, sms = 0, voice = 0, data = 0}, lots = {}, by_id = {}}

-- A stored wallet, checked (a fresh one when the account has none); nil when it is not one
-- the library wrote.
local function parse_wallet(packed)
  if not packed then
    return {plan = '', broken = {money = 0, sms = 0, voice = 0, data = 0}, lots = {}, by_id = {}}
  end
  local records = split_on(packed, RS)
  local head = split(records[1])
  local w = {plan = head[1], lots = {}, by_id = {},
             broken = {money = count(head[2], 0, MAX_TOTAL), sms = count(head[3], 0, MAX_TOTAL),
                       voice = count(head[4], 0, MAX_TOTAL), data = count(head[5], 0, MAX_TOTAL)}}
  if #head ~= 5 or not (w.plan == '' or text(w.plan, LOT_ID, 64))
      or not (w.broken.money and w.broken.sms and w.broken.voice and w.broken.data) then
    return nil
  end
  for i = 2, #records do
    local lot = parse_lot(records[i], i - 1)
    if not lot or w.by_id[lot.id] then return nil end
    w.lots[#w.lots + 1], w.by_id[lot.id] = lot, lot
  end
  return w
end

local function pack_wallet(w)
  local b = w.broken
  local records = {pack({w.plan, b.money, b.sms, b.voice, b.data})}
  for _, lot in ipairs(w.lots) do
    records[#records + 1] = lot.packed or pack({lot.id, lot.kind, lot.service, lot.granted, lot.left, lot.held,
                                                lot.expires_at or '', lot.spec})
  end
  return table.concat(records, RS)
end

-- Whether a wallet says nothing a fresh one would not: it need not be stored.
local function blank(w)
  local b = w.broken
  return w.plan == '' and #w.lots == 0 and b.money == 0 and b.sms == 0 and b.voice == 0 and b.data == 0
end

-- A plan's prices as set_plan stores them (<ns>:{pN}:plans, name -> sms, voice, data),
-- checked; nil when they are not the library's.
local function parse_prices(packed)
  local p = split(packed)
  local prices = {sms = count(p[1], 1, MAX_BALANCE), voice = count(p[2], 1, MAX_BALANCE),
                  data = count(p[3], 1, MAX_BALANCE)}
  if #p ~= 3 or not (prices.sms and prices.voice and prices.data) then return nil end
  return prices
end

-- The money left in a wallet's lots, held included. An account's money (its main balance
-- and this) stays within MAX_BALANCE, as a balance does: grant, top_up and set_balances
-- refuse more, and nothing else adds money.
local function lot_money(w)
  local sum = 0
  for _, lot in ipairs(w.lots) do
    if lot.kind == 'money' then sum = sum + lot.left end
  end
  return sum
end

local function live(lot, now) return not lot.expires_at or lot.expires_at > now end

-- Earliest expiry first (no expiry last), then in the order granted.
local function by_expiry(x, y)
  local xe, ye = x.expires_at or MAX_TIME_MS + 1, y.expires_at or MAX_TIME_MS + 1
  if xe ~= ye then return xe < ye end
  return x.index < y.index
end

-- The money lots a charge of service (nil: an amount) may spend, in the spend order: those
-- limited to the service, then those of any service (expiring ones first: see by_expiry).
local function money_lots(lots, service, now)
  local scoped, any = {}, {}
  for _, lot in ipairs(lots) do
    if lot.kind == 'money' and live(lot, now) then
      if lot.service == '' then any[#any + 1] = lot
      elseif lot.service == service then scoped[#scoped + 1] = lot end
    end
  end
  table.sort(scoped, by_expiry)
  table.sort(any, by_expiry)
  for _, lot in ipairs(any) do scoped[#scoped + 1] = lot end
  return scoped
end

-- What a charge or a reserve takes, in the spend order (docs/plans-and-lots.md): units of
-- service (nil: none) at price each, or amount; the main balance last (lot false), what
-- the account's reservations do not hold of it. Returns the draws ({lot, qty, unit}), the
-- money among them; nil when the funds do not cover it all (nothing is taken).
local function plan_draws(s, service, units, price, amount, now)
  local draws, need = {}, amount
  if units then
    local unit_lots = {}
    for _, lot in ipairs(s.wallet.lots) do
      if lot.kind == 'units' and lot.service == service and live(lot, now) then unit_lots[#unit_lots + 1] = lot end
    end
    table.sort(unit_lots, by_expiry)
    local left = units
    for _, lot in ipairs(unit_lots) do
      local take = math.min(left, lot.left - lot.held)
      if take > 0 then
        draws[#draws + 1] = {lot = lot, qty = take, unit = true}
        left = left - take
      end
      if left == 0 then break end
    end
    need = left * price
  end
  local money = need
  if need > 0 and #s.wallet.lots > 0 then
    for _, lot in ipairs(money_lots(s.wallet.lots, service, now)) do
      local take = math.min(need, lot.left - lot.held)
      if take > 0 then
        draws[#draws + 1] = {lot = lot, qty = take}
        need = need - take
      end
      if need == 0 then break end
    end
  end
  if need > 0 then
    if not s.balance or s.balance - s.held < need then return nil end
    draws[#draws + 1] = {lot = false, qty = need}
  end
  return draws, money
end

-- Draws as the outcome and the reservation name them: <lot>:<qty>, u after a unit lot's,
-- main for the main balance. as_outcome: '' when only main gave (a plain account's outcome
-- stays as it was).
local function draws_text(draws, as_outcome)
  local parts, lots = {}, false
  for _, d in ipairs(draws) do
    local id = d.lot and d.lot.id or d.id or 'main'
    if id ~= 'main' then lots = true end
    parts[#parts + 1] = id .. ':' .. digits(d.qty) .. (d.unit and 'u' or '')
  end
  if as_outcome and not lots then return '' end
  return table.concat(parts, ',')
end

-- A reservation's stored draws (<lot>:<qty>[u],...), checked: {id, qty, unit}; nil when not.
local function parse_draws(packed)
  local draws = {}
  for _, part in ipairs(split_on(packed, ',')) do
    local id, qty, unit = string.match(part, '^([A-Za-z0-9_.%-]+):([0-9]+)(u?)$')
    qty = qty and count(qty, 1, MAX_BALANCE)
    if not qty or (unit == 'u' and id == 'main') then return nil end
    draws[#draws + 1] = {id = id, qty = qty, unit = unit == 'u'}
  end
  return #draws > 0 and draws or nil
end

-- ---- reservations --------------------------------------------------------------------

-- A stored reservation, checked; nil when it is not one the library wrote. Five fields
-- (an amount held of the main balance, as written before lots) or seven: then the service
-- it was reserved for ('' an amount) and its draws.
local function parse_reservation(packed, id)
  local p = split(packed)
  local r = {account = p[1], amount = count(p[2], 1, MAX_BALANCE), expires_at = count(p[3], 0, MAX_TIME_MS),
             unit_price = count(p[4], 1, MAX_BALANCE), ttl_ms = count(p[5], 1, MAX_DURATION_MS),
             service = p[6] or '', draws = nil, main = 0}
  if (#p ~= 5 and #p ~= 7) or not text(r.account, ACCOUNT, 64) or string.sub(id, 1, #r.account + 1) ~= r.account .. '/'
      or not (r.amount and r.expires_at and r.unit_price and r.ttl_ms)
      or not (r.service == '' or SERVICES[r.service]) then
    return nil
  end
  r.draws = #p == 7 and parse_draws(p[7]) or {{id = 'main', qty = r.amount}}
  if not r.draws then return nil end
  -- its draws are what it is worth: its money, and its units at its unit price
  local worth = 0
  for _, d in ipairs(r.draws) do
    if d.id == 'main' then r.main = r.main + d.qty end
    worth = worth + (d.unit and d.qty * r.unit_price or d.qty)
  end
  if worth ~= r.amount then return nil end
  return r
end

local function write_reservation(k, id, r)
  local fields = {r.account, r.amount, r.expires_at, r.unit_price, r.ttl_ms}
  local draws = draws_text(r.draws)
  if r.service ~= '' or draws ~= 'main:' .. digits(r.amount) then
    fields[6], fields[7] = r.service, draws
  end
  redis.call('HSET', k.reservations, id, pack(fields))
  redis.call('ZADD', k.expiries, digits(r.expires_at), id)
  redis.call('ZADD', k.holds, 0, id)
end

local function remove_reservation(k, id)
  redis.call('HDEL', k.reservations, id)
  redis.call('ZREM', k.expiries, id)
  redis.call('ZREM', k.holds, id)
end

-- A field of a hash, from what a settling call read ahead (kind: 'balances', 'held' or
-- 'wallets'; false for no field), or read now.
local function field(k, ahead, kind, name)
  local known = ahead and ahead[kind][name]
  if known ~= nil then return known end
  return redis.call('HGET', k[kind], name)
end

-- The stored held total of an account (what its reservations hold of the main balance),
-- checked: 0 when there is no field, nil when the field is not a count.
local function stored_held(k, account, ahead)
  local held = field(k, ahead, 'held', account)
  if not held then return 0 end
  return count(held, 0, MAX_BALANCE)
end

local function write_held(k, account, before, after)
  if after == before then return end
  if after == 0 then
    redis.call('HDEL', k.held, account)
  else
    redis.call('HSET', k.held, account, digits(after))
  end
end

-- Gives a reservation's draws back: to the main balance's held total, and to each lot's
-- held part (a lot that has expired loses it to breakage: settle_lots). Every draw was
-- checked against the wallet by read_account.
local function unpin(s, r)
  for _, d in ipairs(r.draws) do
    if d.id == 'main' then
      s.held = s.held - d.qty
    else
      local lot = s.wallet.by_id[d.id]
      lot.held, lot.packed = lot.held - d.qty, false
      s.wallet_changed = true
    end
  end
end

-- Sorts one stored reservation into the account's open or expired ones.
local function count_reservation(s, id, r, now)
  s.counted = s.counted + r.main
  if r.expires_at <= now then
    s.expired[id] = r
    s.expired_ids[#s.expired_ids + 1] = id
    s.released = s.released + r.main
  else
    s.open[id] = r
  end
end

-- Records breakage: what is left unpinned in each lot that has expired goes, and a lot
-- with nothing left leaves the wallet (and the expiries index). Each lot's breakage of the
-- call is summed in s.broken for its event (breakage_events).
local function settle_lots(s, now)
  local w, kept = s.wallet, nil
  for i, lot in ipairs(w.lots) do
    if not live(lot, now) then
      local lost = lot.left - lot.held
      if lost > 0 then
        lot.left, lot.packed = lot.held, false
        local measure = lot.kind == 'units' and lot.service or 'money'
        w.broken[measure] = math.min(w.broken[measure] + lost, MAX_TOTAL)
        s.broken = s.broken or {order = {}, by = {}}
        local known = s.broken.by[lot.id]
        if known then
          known.qty = known.qty + lost
        else
          s.broken.by[lot.id] = {lot = lot, qty = lost}
          s.broken.order[#s.broken.order + 1] = lot.id
        end
        s.wallet_changed = true
      end
      if lot.left == 0 then
        kept = kept or {unpack(w.lots, 1, i - 1)}
        s.gone_lots = s.gone_lots or {}
        s.gone_lots[#s.gone_lots + 1] = s.account .. '/' .. lot.id
        w.by_id[lot.id] = nil
        s.wallet_changed = true
      elseif kept then
        kept[#kept + 1] = lot
      end
    elseif kept then
      kept[#kept + 1] = lot
    end
  end
  if kept then w.lots = kept end
end

-- What a settling call knows about an account before it writes anything, all of it
-- checked: its balance (false when unknown), its wallet (plan, lots), its open reservations
-- by id, those past their expiry (released by this call, whatever the sweep has reached),
-- and held: what the ones not expired hold of the main balance, the held total this call
-- decides on. O(reservations of the account). Returns nil and a reason for a stored value
-- the library did not write.
local NONE = {} -- what an account that holds nothing has of each kind; never written

-- Tables of its own for an account whose reservations are being read.
local function holding(s)
  if s.open == NONE then s.open, s.expired, s.expired_ids, s.gone = {}, {}, {}, {} end
end

local function read_account(k, account, now, ahead)
  -- every field named here, so the table is made at its size once (no rehash as it fills)
  local s = {account = account, open = NONE, expired = NONE, expired_ids = NONE, gone = NONE, counted = 0,
             released = 0, balance = false, stored_held = 0, held = 0, charge = false, wallet = EMPTY_WALLET,
             wallet_changed = false, broken = false, gone_lots = false, new_lot = false}
  local balance = field(k, ahead, 'balances', account)
  s.balance = balance and stored_balance(balance)
  if balance and not s.balance then return nil, 'corrupt_balance' end
  s.stored_held = stored_held(k, account, ahead)
  if not s.stored_held then return nil, 'corrupt_held' end
  local wallet = field(k, ahead, 'wallets', account)
  if wallet then
    s.wallet = parse_wallet(wallet)
    if not s.wallet then return nil, 'corrupt_wallet' end
  end
  -- The stored total covers every reservation of the account's main balance, and a lot's
  -- held part every draw on it, so an account that holds nothing (most of them, and every
  -- plain charge's) has none to read.
  local pinned = false
  for _, lot in ipairs(s.wallet.lots) do pinned = pinned or lot.held > 0 end
  if s.stored_held == 0 and not pinned then
    s.held = 0
    if wallet then settle_lots(s, now) end
    return s
  end
  holding(s)
  local ids = redis.call('ZRANGE', k.holds, '[' .. account .. '/', '(' .. account .. '0', 'BYLEX')
  for first = 1, #ids, READ_CHUNK do
    local chunk = {unpack(ids, first, math.min(#ids, first + READ_CHUNK - 1))}
    local packed = redis.call('HMGET', k.reservations, unpack(chunk))
    for i, id in ipairs(chunk) do
      if not packed[i] then
        s.gone[#s.gone + 1] = id -- its reservation ended; the index entry goes with this call
      else
        local r = parse_reservation(packed[i], id)
        if not r then return nil, 'corrupt_reservation' end
        count_reservation(s, id, r, now)
      end
    end
  end
  -- The stored total covers every reservation of the account: one smaller than what was
  -- read is not a total the library wrote.
  if s.stored_held < s.counted then return nil, 'corrupt_held' end
  -- Each lot's held part is what the account's reservations pin of it, each draw of a lot
  -- the wallet holds (units of the reservation's own service).
  local pins = {}
  for _, reservations in ipairs({s.open, s.expired}) do
    for _, r in pairs(reservations) do
      for _, d in ipairs(r.draws) do
        if d.id ~= 'main' then
          local lot = s.wallet.by_id[d.id]
          if not lot or (lot.kind == 'units') ~= d.unit or (d.unit and lot.service ~= r.service) then
            return nil, 'corrupt_reservation'
          end
          pins[d.id] = (pins[d.id] or 0) + d.qty
        end
      end
    end
  end
  for _, lot in ipairs(s.wallet.lots) do
    if (pins[lot.id] or 0) ~= lot.held then return nil, 'corrupt_wallet' end
  end
  s.held = s.stored_held
  for _, id in ipairs(s.expired_ids) do unpin(s, s.expired[id]) end
  settle_lots(s, now)
  return s
end

-- The account's money: the main balance, and the money left in its lots (an expired lot
-- keeps only what reservations pin), after this call's charge; and what is held of it.
local function money_of(s)
  local balance, held = s.balance and (s.balance - (s.charge or 0)) or 0, s.held
  for _, lot in ipairs(s.wallet.lots) do
    if lot.kind == 'money' then balance, held = balance + lot.left, held + lot.held end
  end
  return balance, held
end

-- Writes what the decision left in s: the expired reservations released, the index
-- entries of ended ones dropped, the charge, the reservation made, changed or closed, the
-- held total and the wallet. Every value here was checked before the outcome was posted:
-- none of these can fail.
local function apply(k, s, ahead)
  for _, id in ipairs(s.expired_ids) do remove_reservation(k, id) end
  for _, id in ipairs(s.gone) do redis.call('ZREM', k.holds, id) end
  if s.charge then -- written with the others of the call (write_ahead)
    ahead.balances[s.account], ahead.charged[s.account] = digits(s.balance - s.charge), true
  end
  if s.put then write_reservation(k, s.put.id, s.put) end
  if s.close then remove_reservation(k, s.close) end
  write_held(k, s.account, s.stored_held, s.held)
  ahead.held[s.account] = s.held > 0 and digits(s.held) or false
  if s.wallet_changed then
    ahead.wallets[s.account] = not blank(s.wallet) and pack_wallet(s.wallet) or false
    ahead.wallet_written[s.account] = true
    if s.gone_lots then redis.call('ZREM', k.lot_expiries, unpack(s.gone_lots)) end
    if s.new_lot then redis.call('ZADD', k.lot_expiries, unpack(s.new_lot)) end
  end
end

-- ---- deciding one request ------------------------------------------------------------
-- Each decide function judges a request that has no dedupe record yet, against the state
-- read_account gave, and leaves its effect in that state (charge, put, close, held, the
-- lots) for apply. It returns the outcome: status, reason, charged, balance, and for the
-- reservation operations held (the account's total after), reserved and expires_at (the
-- reservation as this request left it, or as it was when it closed); and draws, what each
-- lot gave ('' when only the main balance did).

local function outcome(status, reason, charged, s, r, draws)
  local balance, held = money_of(s)
  return {status = status, reason = reason, charged = charged, balance = balance, held = held,
          reserved = r and r.amount or 0, expires_at = r and r.expires_at or '', draws = draws or ''}
end

-- Takes the draws of a charge from their lots and the main balance.
local function take(s, draws)
  for _, d in ipairs(draws) do
    if d.lot then
      d.lot.left, d.lot.packed = d.lot.left - d.qty, false
      s.wallet_changed = true
    else
      s.charge = (s.charge or 0) + d.qty
    end
  end
end

-- Pins the draws of a reserve or extend in their lots and the main balance's held total.
local function pin(s, draws)
  for _, d in ipairs(draws) do
    if d.lot then
      d.lot.held, d.lot.packed = d.lot.held + d.qty, false
      s.wallet_changed = true
    else
      s.held = s.held + d.qty
    end
  end
end

-- The draws a reservation keeps: {id, qty, unit}, those of one lot merged.
local function kept_draws(before, draws)
  local kept, at = {}, {}
  for _, d in ipairs(before or {}) do
    kept[#kept + 1] = {id = d.id, qty = d.qty, unit = d.unit}
    at[d.id] = kept[#kept]
  end
  for _, d in ipairs(draws) do
    local id = d.lot and d.lot.id or 'main'
    if at[id] then at[id].qty = at[id].qty + d.qty else
      kept[#kept + 1] = {id = id, qty = d.qty, unit = d.unit}
      at[id] = kept[#kept]
    end
  end
  return kept
end

local function decide_charge(s, a, now)
  if not s.balance then return outcome('rejected', 'unknown_account', 0, s) end
  local draws, money = plan_draws(s, a.service, a.units, a.price, a.amount, now)
  if not draws then return outcome('rejected', 'insufficient_funds', 0, s) end
  take(s, draws)
  return outcome('approved', '', money, s, nil, draws_text(draws, true))
end

local function decide_reserve(s, a, now)
  if not s.balance then return outcome('rejected', 'unknown_account', 0, s) end
  -- Only when the reserve's dedupe record expired while extends kept it open.
  local open = s.open[a.reservation]
  if open then return outcome('rejected', 'reservation_exists', 0, s, open) end
  local draws = plan_draws(s, a.service, a.units, a.price, a.amount, now)
  if not draws then return outcome('rejected', 'insufficient_funds', 0, s) end
  pin(s, draws)
  s.put = {id = a.reservation, account = a.account, amount = a.amount or a.units * a.price,
           expires_at = now + a.ttl_ms, unit_price = a.price or a.unit_price, ttl_ms = a.ttl_ms,
           service = a.service or '', draws = kept_draws(nil, draws)}
  return outcome('approved', '', 0, s, s.put, draws_text(draws, true))
end

-- The open reservation a commit, extend or release acts on; else nil and the rejection
-- (reservation_expired, with the reservation, when this call released it).
local function open_reservation(s, a)
  local r = s.open[a.reservation]
  if r then return r end
  if s.expired[a.reservation] then return nil, 'reservation_expired', s.expired[a.reservation] end
  return nil, 'unknown_reservation'
end

-- What each of a reservation's draws gives to a commit of units (its unit draws first,
-- then its money at the reservation's unit price) or of an amount (its money): the money
-- its lots pinned before the main balance's, as a charge spends. By draw, and the money
-- among it; nil when the reservation holds too little.
local function commit_draws(r, units, amount)
  local gives, left = {}, units or 0
  for i, d in ipairs(r.draws) do
    if d.unit and left > 0 then
      gives[i] = math.min(d.qty, left)
      left = left - gives[i]
    end
  end
  local need = amount or left * r.unit_price
  local money = need
  for _, main in ipairs({false, true}) do
    for i, d in ipairs(r.draws) do
      if not d.unit and (d.id == 'main') == main and need > 0 then
        gives[i] = math.min(d.qty, need)
        need = need - gives[i]
      end
    end
  end
  if need > 0 then return nil end
  return gives, money
end

local function decide_commit(s, a, now)
  local r, reason, closed = open_reservation(s, a)
  if not r then return outcome('rejected', reason, 0, s, closed) end
  local gives, money = commit_draws(r, a.units, a.amount)
  if not gives then return outcome('rejected', 'exceeds_reservation', 0, s, r) end
  local main, taken = 0, {}
  for i, d in ipairs(r.draws) do
    if d.id == 'main' then main = main + (gives[i] or 0) end
  end
  -- Cannot happen through the engine (a hold is always covered); an operator's
  -- set_balances can lower a balance under its holds, and no balance goes below zero.
  if not s.balance or s.balance < main then return outcome('rejected', 'insufficient_funds', 0, s, r) end
  unpin(s, r)
  for i, d in ipairs(r.draws) do
    if gives[i] and gives[i] > 0 then
      taken[#taken + 1] = {lot = d.id ~= 'main' and s.wallet.by_id[d.id], qty = gives[i], unit = d.unit}
    end
  end
  take(s, taken)
  s.close = a.reservation
  settle_lots(s, now) -- what went back to a lot that has expired meanwhile
  return outcome('approved', '', money, s, r, draws_text(taken, true))
end

local function decide_extend(s, a, now)
  local r, reason, closed = open_reservation(s, a)
  if not r then return outcome('rejected', reason, 0, s, closed) end
  local service = r.service ~= '' and r.service or nil
  -- Units a lot pays need no money: the reservation's worth must still stay a number the
  -- library can hold.
  local more = a.amount or a.units * r.unit_price
  if r.amount + more > MAX_BALANCE then return outcome('rejected', 'invalid_amount', 0, s, r) end
  local draws = plan_draws(s, service, a.units, r.unit_price, a.amount, now)
  if not draws then return outcome('rejected', 'insufficient_funds', 0, s, r) end
  pin(s, draws)
  s.put = {id = a.reservation, account = r.account, amount = r.amount + more,
           expires_at = now + (a.ttl_ms or r.ttl_ms), unit_price = r.unit_price, ttl_ms = r.ttl_ms,
           service = r.service, draws = kept_draws(r.draws, draws)}
  return outcome('approved', '', 0, s, s.put, draws_text(draws, true))
end

local function decide_release(s, a, now)
  local r, reason, closed = open_reservation(s, a)
  if not r then return outcome('rejected', reason, 0, s, closed) end
  unpin(s, r)
  s.close = a.reservation
  settle_lots(s, now)
  return outcome('approved', '', 0, s, r)
end

-- A grant through the stream: the lot a.lot of a.kind (money of a.amount, optionally of
-- a.service, or a.units of a.service), until a.expires_at (false: never; a.spec: the expiry
-- as given). The same lot again is approved and grants nothing; other content under its id
-- is idempotency_conflict. reserved in the outcome: what was granted now.
local function decide_grant(s, a, now)
  if not s.balance then return outcome('rejected', 'unknown_account', 0, s) end
  local kind, qty = a.units and 'units' or 'money', a.units or a.amount
  local service = a.service or ''
  local expires_at = a.expires_at or (a.expires_in_ms and now + a.expires_in_ms) or false
  local lot = s.wallet.by_id[a.lot]
  if lot then
    if lot.kind ~= kind or lot.service ~= service or lot.granted ~= qty or lot.spec ~= a.spec then
      return outcome('rejected', 'idempotency_conflict', 0, s)
    end
    return outcome('approved', '', 0, s, {amount = 0, expires_at = lot.expires_at or ''})
  end
  if expires_at and expires_at <= now then return outcome('rejected', 'invalid_expiry', 0, s) end
  if #s.wallet.lots >= MAX_LOTS then return outcome('rejected', 'too_many_lots', 0, s) end
  if kind == 'money' and s.balance + lot_money(s.wallet) + qty > MAX_BALANCE then
    return outcome('rejected', 'balance_too_large', 0, s)
  end
  if s.wallet == EMPTY_WALLET then s.wallet = parse_wallet(false) end
  local w = s.wallet
  lot = {id = a.lot, kind = kind, service = service, granted = qty, left = qty, held = 0, expires_at = expires_at,
         spec = a.spec, index = #w.lots > 0 and w.lots[#w.lots].index + 1 or 1}
  w.lots[#w.lots + 1], w.by_id[a.lot] = lot, lot
  s.wallet_changed = true
  if expires_at then s.new_lot = {digits(expires_at), a.account .. '/' .. a.lot} end
  return outcome('approved', '', 0, s, {amount = qty, expires_at = expires_at or ''})
end

-- ---- the one settling path: check, read, decide, ack, write, post ---------------------

-- Per operation: how to decide, and how it uses each optional argument: 'required',
-- 'optional', or absent (the argument must be ''). 'usage' is exactly one of amount and
-- units; 'rated': units are of a service, priced at settling by the account's plan
-- (unit_price: the default plan's price, the caller's tariff); 'own' is a reservation id
-- that must be <account>/<request_id>, 'named' one that must be of the account.
local OPS = {
  charge = {decide = decide_charge, amount = 'optional', units = 'optional', usage = true, rated = true,
            unit_price = 'optional'},
  reserve = {decide = decide_reserve, amount = 'optional', units = 'optional', usage = true, rated = true,
             unit_price = 'required', ttl_ms = 'required', reservation = 'own'},
  commit = {decide = decide_commit, amount = 'optional', units = 'optional', usage = true, reservation = 'named'},
  extend = {decide = decide_extend, amount = 'optional', units = 'optional', usage = true, reservation = 'named',
            ttl_ms = 'optional'},
  release = {decide = decide_release, reservation = 'named'},
  grant = {decide = decide_grant}, -- through the stream only (judge_entry); the function grant is its own
}
-- The numeric arguments an operation may use: position, reason when malformed, range.
local NUMBERS = {
  {name = 'amount', at = 9, err = 'invalid_amount', high = MAX_BALANCE},
  {name = 'units', at = 10, err = 'invalid_units', high = MAX_BALANCE},
  {name = 'unit_price', at = 11, err = 'invalid_unit_price', high = MAX_BALANCE},
  {name = 'ttl_ms', at = 13, err = 'invalid_ttl', high = MAX_DURATION_MS},
}

-- Whether the reservation argument suits the operation; if not, the reason and a detail.
local function reservation_ok(a, rule)
  local value = a.reservation
  if value == '' then return rule.reservation == nil, 'invalid_reservation' end
  if not rule.reservation then return false, 'field_not_allowed', 'reservation' end
  if rule.reservation == 'own' then return value == a.account .. '/' .. a.request_id, 'invalid_reservation' end
  local prefix = a.account .. '/'
  return string.sub(value, 1, #prefix) == prefix and text(string.sub(value, #prefix + 1), REQUEST_ID, 128),
      'invalid_reservation'
end

local function duration_arg(value) return count(value, 1, MAX_DURATION_MS) end

-- The 13 or 14 arguments of a single settling call, every one checked as the wire format would
-- check it: the request (a) it settles, as judge_entry makes one of an entry pump read;
-- nil, a reason and a detail when one is not.
local function read_args(op, args)
  local rule = OPS[op]
  local a = {op = op, request_id = args[1], account = args[2], fingerprint = args[3], entry_id = args[4],
             group = args[5], submitted_at = args[7], reservation = args[12], window_ms = 0,
             reply_ttl_ms = 0, service = nil} -- sized once: see read_account
  if not text(a.request_id, REQUEST_ID, 128) then return nil, 'invalid_request_id' end
  if not text(a.account, ACCOUNT, 64) then return nil, 'invalid_account' end
  if not text(a.fingerprint, FINGERPRINT, 1024) then return nil, 'invalid_fingerprint' end
  if a.entry_id ~= '' then return nil, 'invalid_entry_id', 'a single call settles no stream entry (pump does)' end
  if a.group ~= '' and not text(a.group, NAME, 64) then return nil, 'invalid_group' end
  a.window_ms = duration_arg(args[6])
  if not a.window_ms then return nil, 'invalid_window', 'the dedupe window must be 1..' .. MAX_DURATION_MS .. ' ms' end
  if a.submitted_at ~= '' and not count(a.submitted_at, 0, MAX_TIME_MS) then return nil, 'invalid_submitted_at' end
  a.reply_ttl_ms = duration_arg(args[8])
  if not a.reply_ttl_ms then return nil, 'invalid_reply_ttl' end
  for _, number in ipairs(NUMBERS) do
    local value = args[number.at]
    if value ~= '' then
      if not rule[number.name] then return nil, 'field_not_allowed', number.name end
      a[number.name] = count(value, 1, number.high)
      if not a[number.name] then return nil, number.err end
    elseif rule[number.name] == 'required' then
      return nil, number.err
    end
  end
  if rule.usage and (a.amount == nil) == (a.units == nil) then return nil, 'invalid_amount', 'give amount or units' end
  -- units of a charge or reserve are of a service, with the default plan's price of it
  local service = args[14] or ''
  if service ~= '' then
    if not (rule.rated and a.units) then return nil, 'field_not_allowed', 'service' end
    if not SERVICES[service] then return nil, 'unknown_service', service end
    a.service = service
  elseif rule.rated and a.units then
    return nil, 'missing_field', 'service (units of a charge or reserve are of a service)'
  end
  if rule.rated and a.units and not a.unit_price then return nil, 'invalid_unit_price' end
  if op == 'charge' and a.amount and a.unit_price then return nil, 'field_not_allowed', 'unit_price' end
  local ok, err, detail = reservation_ok(a, rule)
  if not ok then return nil, err, detail end
  if a.reservation == '' then a.reservation = nil end
  return a
end

-- A dedupe record: the request's fingerprint, then its outcome, packed into one short
-- string, because there is one per request for the whole dedupe window.
local function record(a, o)
  local packed = a.fingerprint .. SEP .. o.status .. SEP .. o.reason .. SEP .. digits(o.charged) .. SEP
      .. digits(o.balance)
  if a.op == 'charge' then return packed end
  return packed .. SEP .. digits(o.held) .. SEP .. digits(o.reserved) .. SEP .. digits(o.expires_at)
end

-- A stored record (a bucket's field: the time it was settled, then the record), checked;
-- nil when it is not one the library wrote.
local function parse_record(stored)
  local r = split(stored)
  local at = count(table.remove(r, 1), 0, MAX_TIME_MS)
  if not at then return nil end
  if #r == 5 then r[6], r[7], r[8] = '0', '0', '' end -- a charge's record
  local o = {fingerprint = r[1], status = r[2], reason = r[3], charged = count(r[4], 0, MAX_BALANCE),
             balance = count(r[5], 0, MAX_BALANCE), held = count(r[6], 0, MAX_BALANCE),
             reserved = count(r[7], 0, MAX_BALANCE), expires_at = r[8], duplicate = 1, at = at}
  if #r ~= 8 or not (o.status == 'approved' or o.status == 'rejected') or not (o.reason == '' or text(o.reason, REASON, 64))
      or not (o.charged and o.balance and o.held and o.reserved)
      or not (o.expires_at == '' or count(o.expires_at, 0, MAX_TIME_MS)) then
    return nil
  end
  return o
end

-- Dedupe buckets. A record lives in a hash of its partition, <ns>:{pN}:dedupe:<slice>:<slot>
-- (request id -> the time it was settled, then the record), of the slice of time it was
-- settled in. A hash field costs about 125 bytes where a key with a TTL per request id
-- cost 200. A slice is the power of two of milliseconds that is at least a quarter of the
-- window, so a call looks in at most SLICES + 2 buckets and writes into the one of now,
-- and windows of the same order share buckets: processes of a rolling deploy that changes
-- the window within one find each other's records. The record's own time keeps the window
-- exact; a bucket expires whole (PEXPIREAT) once its last record has. The names are made
-- here from the partition's tag: the same slot as every key the call was given.
local SLICES = 4

local function slice_of(window_ms)
  if window_ms <= SLICES then return 1 end
  local m, e = math.frexp(window_ms / SLICES) -- window_ms / SLICES = m * 2^e, 0.5 <= m < 1
  if m == 0.5 then return 2 ^ (e - 1) end
  return 2 ^ e
end

local function bucket(k, slice, slot)
  return k.tag .. ':dedupe:' .. digits(slice) .. ':' .. digits(slot)
end

-- The slots of the buckets that may hold a record settled within window_ms before now,
-- oldest first, and the one after now's: where a server whose clock was ahead wrote (a
-- failover to a replica behind it, a clock stepped back).
local function slots(slice, window_ms, now)
  return math.floor((now - window_ms) / slice), math.floor(now / slice) + 1
end

-- The record of a request id settled within the window, checked: false when there is
-- none, nil and a detail when one is not a record the library wrote. From what the call
-- read ahead (read_ahead: every bucket of the window, a newer record of an id replacing
-- an older one), where the call's earlier entries also wrote theirs.
local function read_record(a, now, ahead)
  local stored = ahead.records[slice_of(a.window_ms)][a.request_id]
  if not stored then return false end
  local o = parse_record(stored)
  if not o then return nil, 'dedupe record of ' .. a.request_id end
  return o.at + a.window_ms > now and o
end

-- A bucket lives until its last record has expired: the expiry is set when it is made,
-- and only ever pushed later (a record of a longer window of the same slice). The bucket
-- keeps the expiry it was given in its field EXPIRY (no request id is empty), read with its
-- records, so a call that writes into a bucket sets it only when it must: once per bucket,
-- unless a longer window pushes it. known: that field as read (nil: none, a bucket made by
-- this call or by an older version).
local EXPIRY = ''

local function write_bucket(pending, known)
  local expire = not known or pending.expire_at > known
  if expire then
    pending.fields[#pending.fields + 1] = EXPIRY
    pending.fields[#pending.fields + 1] = digits(pending.expire_at)
  end
  redis.call('HSET', pending.name, unpack(pending.fields))
  if not expire then return end
  redis.call('PEXPIREAT', pending.name, digits(pending.expire_at), 'NX')
  redis.call('PEXPIREAT', pending.name, digits(pending.expire_at), 'GT')
end

-- Records the outcome in the bucket of now, which the call has read (so this write cannot
-- fail), in what it read ahead: written with the others of the call in one HSET per bucket.
local function write_record(k, a, o, now, stamp, ahead)
  local slice = slice_of(a.window_ms)
  local slot = math.floor(now / slice)
  local packed, expire_at = stamp .. SEP .. record(a, o), (slot + 1) * slice + a.window_ms
  ahead.records[slice] = ahead.records[slice] or {}
  ahead.records[slice][a.request_id] = packed
  local pending = ahead.writes[slice] -- every entry of a call is settled at the same now
  if not pending then
    pending = {name = bucket(k, slice, slot), expire_at = expire_at, fields = {}}
    ahead.writes[slice] = pending
    ahead.written[#ahead.written + 1] = pending
  end
  pending.expire_at = math.max(pending.expire_at, expire_at)
  pending.fields[#pending.fields + 1] = a.request_id
  pending.fields[#pending.fields + 1] = packed
end

-- The answer to a request id already settled: the stored outcome, marked duplicate, or an
-- idempotency conflict when the request is not the one that was settled.
local function replay(s, a, stored)
  if stored.fingerprint ~= a.fingerprint then
    local o = outcome('rejected', 'idempotency_conflict', 0, s)
    o.duplicate = 1
    return o
  end
  return stored
end

-- A call's first XADD to the results stream, through pcall: failing (a stream of another
-- type, or exhausted: its last id the largest there is), it wrote nothing, and refuses the
-- call. Returns the error.
local function first_post(stream, fields)
  local added = redis.pcall('XADD', stream, '*', unpack(fields))
  if type(added) == 'table' and added.err then
    if string.find(added.err, 'exhausted', 1, true) then
      return refuse('stream_exhausted', stream .. ' has reached the last possible id')
    end
    return redis.error_reply(added.err)
  end
  return nil
end

-- An event posted after a first post of the same call: it cannot fail, but for a first
-- post that took the very last id there is (then the event is lost; the wallet keeps the
-- breakage it tells of).
local function post_after(stream, fields)
  redis.pcall('XADD', stream, '*', unpack(fields))
end

-- Events to the results stream: the call's first XADD through first_post (failing, it
-- refuses the call with nothing written) unless one was posted already (posted), the
-- rest after it. Returns the refusal, or nil and whether one has been posted now.
local function post_events(stream, events, posted)
  for _, fields in ipairs(events) do
    if posted then
      post_after(stream, fields)
    else
      local err = first_post(stream, fields)
      if err then return err end
      posted = true
    end
  end
  return nil, posted
end

local function post(k, a, o, stamp)
  local fields = {
    'request_id', a.request_id, 'account', a.account, 'status', o.status, 'reason', o.reason,
    'charged', digits(o.charged), 'balance', digits(o.balance), 'duplicate', o.duplicate == 1 and '1' or '0',
    'submitted_at', a.submitted_at, 'processed_at', stamp, 'entry_id', a.entry_id,
  }
  if a.op == 'grant' then
    for _, v in ipairs({'op', 'grant', 'lot', a.lot, 'granted', digits(o.reserved), 'expires_at', digits(o.expires_at)}) do
      fields[#fields + 1] = v
    end
  elseif a.op ~= 'charge' then
    for _, v in ipairs({'op', a.op, 'reservation', a.reservation, 'held', digits(o.held),
                        'reserved', digits(o.reserved), 'expires_at', digits(o.expires_at)}) do
      fields[#fields + 1] = v
    end
  end
  if o.draws and o.draws ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'draws', o.draws
  end
  -- No MAXLEN here: trim (maintenance) keeps what subscriber groups have not read. A
  -- request's first write: failing, it has written nothing of the request.
  local err = first_post(k.results, fields)
  if err then return err end
  if k.reply_to then
    redis.call('XADD', k.reply_to, 'MAXLEN', '~', 10000, '*', unpack(fields))
    redis.call('PEXPIRE', k.reply_to, digits(a.reply_ttl_ms))
  end
  return nil
end

-- The breakage a call recorded (settle_lots): one event per lot for the results stream,
-- as lists of fields. The event's balance is the account's after the call.
local function breakage_events(s, stamp)
  if not s.broken then return NONE end
  local balance, events = digits((money_of(s))), {}
  for _, id in ipairs(s.broken.order) do
    local b = s.broken.by[id]
    -- unique: a lot's left only falls, and its id and expiry name one lot
    local event_id = 'expired:' .. s.account .. '/' .. id .. '@' .. digits(b.lot.expires_at) .. ':' .. digits(b.lot.left)
    events[#events + 1] = {'request_id', event_id, 'account', s.account,
                           'status', 'expired', 'reason', 'lot_expired', 'charged', '0', 'balance', balance,
                           'duplicate', '0', 'submitted_at', '', 'processed_at', stamp, 'entry_id', '', 'op', 'expire',
                           'lot', id, 'kind', b.lot.kind, 'service', b.lot.service, 'breakage', digits(b.qty)}
  end
  return events
end

local SETTLE_ROLES = {'balances', 'results', 'requests', 'held', 'reservations', 'expiries', 'holds', 'wallets',
                      'lot_expiries', 'plans'}
-- The keys a settling call may write without having read them first, whose type is checked
-- before anything is written: balances, held, wallets and the dedupe record are read (a
-- read of another type fails before any write), and the results stream's XADD is the first
-- write (failing, it writes nothing).
local RESERVATION_WRITES = {reservations = 'hash', expiries = 'zset', holds = 'zset'}

local function reservations_writable(k, ahead)
  if ahead.reservations_writable == nil then ahead.reservations_writable = wrong_types(k, RESERVATION_WRITES) or false end
  return ahead.reservations_writable or nil
end

local function lots_writable(k, ahead)
  if ahead.lots_writable == nil then ahead.lots_writable = wrong_type(k.lot_expiries, 'zset') or false end
  return ahead.lots_writable or nil
end

-- The price a charge or reserve of units pays: the account's plan's price of its service,
-- or the default plan's (the price it came with). Leaves it in a.price; returns the
-- rejection (unknown_plan, invalid_amount: over the library's limit) or, for a plan
-- the library did not write, nil and the refusal.
local function rate(s, a, ahead)
  if not (a.units and OPS[a.op].rated) then return false end
  a.price = a.unit_price
  local plan = s.wallet.plan
  if plan ~= '' then
    local prices = ahead.plans[plan]
    if prices == 'corrupt' then return nil, refuse('corrupt_plan', plan) end
    if not prices then return 'unknown_plan' end
    a.price = prices[a.service]
  end
  if a.units * a.price > MAX_BALANCE then return 'invalid_amount' end
  return false
end

--[[
charge, reserve, commit, extend, release: settle one request exactly once.
KEYS: balances, results, requests, held, reservations, expiries, holds, wallets,
      lot_expiries, plans, [reply_to]
ARGV: request_id, account, fingerprint, entry_id ('' for a synchronous call), group,
      window_ms, submitted_at, reply_ttl_ms, amount, units, unit_price, reservation, ttl_ms,
      service ('' for what an operation does not use; a value it does not use is refused):
  charge   amount, or units, unit_price and service
                                       takes amount, or units of service at the account
                                       plan's price (unit_price: the default plan's), from
                                       the account's lots and main balance in the spend order
  reserve  amount and unit_price, or units, unit_price and service; ttl_ms, reservation
           (<account>/<request_id>)    pins that much until now + ttl_ms
  commit   amount or units, reservation
                                       charges it (units at the reservation's unit price),
                                       at most what the reservation holds; the rest is
                                       released
  extend   amount or units, reservation, [ttl_ms]
                                       pins that much more, until now + ttl_ms (default:
                                       the reserve's ttl)
  release  reservation                 releases all of it
Every number is decimal digits within the library's limits; request_id, account and
reservation as on the wire. Before deciding, the call releases the account's own
reservations past their expiry and records the breakage of its lots that have expired
(docs/plans-and-lots.md). entry_id and group are '' (a single call settles no stream entry:
pump does; they keep their places for callers of this layout); service may be left out
(13 arguments). Returns {status, reason, charged, balance, duplicate, processed_at}, then
for the reservation operations {held, reserved, expires_at}, then draws ('' when only the
main balance gave). A refused call (an error) writes nothing.
]]
-- One request a, checked (read_args of a single call's arguments, judge_entry of an
-- entry pump read): k, the partition's keys with its reply_to; ahead, what the call read
-- ahead for all of its requests.
local function settle_entry(k, a, ahead)
  local err
  if k.reply_to then
    err = postable(k.reply_to, ahead.streams)
    if err then return err end
  end

  local now, stamp = ahead.now, ahead.stamp -- stamp: now as digits, for the outcome and the record
  local stored, corrupt = read_record(a, now, ahead)
  if stored == nil then return refuse('corrupt_record', corrupt) end
  local s, bad = read_account(k, a.account, now, ahead)
  if not s then return refuse(bad, a.account) end
  local o = stored and replay(s, a, stored)
  if not o then
    local rejected, refusal = rate(s, a, ahead)
    if rejected == nil then return refusal end
    o = rejected and outcome('rejected', rejected, 0, s) or OPS[a.op].decide(s, a, now)
    o.duplicate = 0
  end

  -- Everything is read and checked but the keys written unread: the reservation keys when
  -- this request changes a reservation, the lots' expiries index when a lot goes (each
  -- once per call), and the results stream, whose XADD (the outcome, the first write)
  -- refuses the request by failing. After it nothing can fail.
  err = (s.put or s.close or #s.expired_ids > 0) and reservations_writable(k, ahead)
        or (s.gone_lots or s.new_lot) and lots_writable(k, ahead)
  if err then return err end
  err = post(k, a, o, stamp)
  if err then return err end
  post_events(k.results, breakage_events(s, stamp), true)
  if a.entry_id ~= '' then ack(k.requests, a.group, a.entry_id) end
  apply(k, s, ahead)
  if not stored then write_record(k, a, o, now, stamp, ahead) end
  local reply = {o.status, o.reason, o.charged, o.balance, o.duplicate, now}
  if a.op ~= 'charge' then
    for _, v in ipairs({o.held, o.reserved, o.expires_at}) do reply[#reply + 1] = v end
  end
  reply[#reply + 1] = o.draws or ''
  return reply
end

-- The plans named by the wallets read: name -> prices by service, false when the partition
-- has no such plan, 'corrupt' when the stored value is not one the library wrote.
local function read_plans(k, wallets)
  local names, listed, plans = {}, {}, {}
  for _, packed in pairs(wallets) do
    local plan = packed and string.match(packed, '^([^' .. SEP .. RS .. ']*)')
    if plan and plan ~= '' and not listed[plan] then
      listed[plan] = true
      names[#names + 1] = plan
    end
  end
  if #names == 0 then return plans end
  for i, stored in ipairs(redis.call('HMGET', k.plans, unpack(names))) do
    plans[names[i]] = stored and parse_prices(stored) or (stored and 'corrupt') or false
  end
  return plans
end

-- The balances, held totals and wallets of ahead.accounts, one HMGET each, into ahead: what
-- read_account reads of them.
local function read_accounts(k, ahead)
  local accounts = ahead.accounts
  local balances = redis.call('HMGET', k.balances, unpack(accounts))
  local held = redis.call('HMGET', k.held, unpack(accounts))
  local wallets = redis.call('HMGET', k.wallets, unpack(accounts))
  for i, account in ipairs(accounts) do
    ahead.balances[account], ahead.held[account], ahead.wallets[account] = balances[i], held[i], wallets[i]
  end
end

-- What the entries of a batch read, in a few commands for the whole call instead of a few
-- each: the balances, held totals and wallets of their accounts and the plans these name,
-- their dedupe records (one HMGET per bucket) at now, the call's one server time (every
-- entry of a call is processed at the same millisecond). Entries write through it
-- (apply, write_record), so a later entry of the same account or request id reads what an
-- earlier one wrote; the balances, wallets and records are written at the end, one HSET for
-- the balances, one for the wallets and one per bucket. A key of another type fails its
-- HMGET here, before anything is written.
local function read_ahead(k, accounts, slices, now)
  local ahead = {now = now, stamp = digits(now), accounts = accounts, balances = {}, held = {}, charged = {},
                 wallets = {}, wallet_written = {}, plans = {}, records = {}, writes = {}, written = {}, streams = {},
                 expiries = {}}
  read_accounts(k, ahead)
  ahead.plans = read_plans(k, ahead.wallets)
  for slice, wanted in pairs(slices) do
    local found = {}
    for _, id in ipairs(wanted.ids) do found[id] = false end
    local first, last = slots(slice, wanted.window_ms, ahead.now)
    local now_slot = math.floor(now / slice) -- the bucket written: its expiry is read too
    for slot = first, last do -- oldest first: a newer record of an id replaces an older one
      local name = bucket(k, slice, slot)
      local stored = redis.call('HMGET', name, EXPIRY, unpack(wanted.ids))
      if slot == now_slot then ahead.expiries[name] = count(stored[1], 0, MAX_TIME_MS) end
      for i, id in ipairs(wanted.ids) do
        if stored[i + 1] then found[id] = stored[i + 1] end
      end
    end
    ahead.records[slice] = found
  end
  return ahead
end

-- The balances the entries of a batch charged, the wallets they changed and the records
-- they made: one HSET for the balances, one HSET and one HDEL for the wallets, one per
-- bucket. Each key was read (HMGET) before the first write, so none of these can fail.
local function write_ahead(k, ahead)
  local balances, wallets, blanks = {}, {}, {}
  for _, account in ipairs(ahead.accounts) do
    if ahead.charged[account] then
      balances[#balances + 1] = account
      balances[#balances + 1] = ahead.balances[account]
    end
    if ahead.wallet_written[account] then
      if ahead.wallets[account] then
        wallets[#wallets + 1] = account
        wallets[#wallets + 1] = ahead.wallets[account]
      else
        blanks[#blanks + 1] = account
      end
    end
  end
  if #balances > 0 then redis.call('HSET', k.balances, unpack(balances)) end
  if #wallets > 0 then redis.call('HSET', k.wallets, unpack(wallets)) end
  if #blanks > 0 then redis.call('HDEL', k.wallets, unpack(blanks)) end
  for _, pending in ipairs(ahead.written) do write_bucket(pending, ahead.expiries[pending.name]) end
end

-- The reads a batch shares, planned from its items ({a, reply_to}: a request, checked,
-- and its reply stream): the accounts and dedupe buckets of every item. The keys shared
-- by every entry are checked by the entries (settle_entry), once per call. Returns what
-- read_ahead read.
local function batch_ahead(k, items, now)
  local accounts, listed, slices = {}, {}, {}
  for _, item in ipairs(items) do
    local a = item.a
    -- the buckets of a slice, read over the longest window of its entries
    local slice = slice_of(a.window_ms)
    slices[slice] = slices[slice] or {ids = {}, window_ms = 0}
    table.insert(slices[slice].ids, a.request_id)
    slices[slice].window_ms = math.max(slices[slice].window_ms, a.window_ms)
    if not listed[a.account] then
      listed[a.account] = true
      accounts[#accounts + 1] = a.account
    end
  end
  return read_ahead(k, accounts, slices, now)
end

-- One item of a batch, settled through what the call read ahead. A refused entry wrote
-- nothing (settle_entry checks before it writes); pcall turns an error into that entry's
-- own reply.
local function settle_item(k, item, ahead)
  k.reply_to = item.reply_to
  local ok, result = pcall(settle_entry, k, item.a, ahead)
  return ok and result or {err = type(result) == 'table' and result.err or tostring(result)}
end

local function settle(op, keys, args)
  -- A caller of another layout (a process of an older version during an upgrade) is
  -- refused before anything is written: nothing acked, so its entry stays pending.
  local k = (#keys == #SETTLE_ROLES or #keys == #SETTLE_ROLES + 1) and (#args == 13 or #args == 14)
      and partition_keys(keys, SETTLE_ROLES)
  if not k then
    return refuse('wrong_arguments', op .. ' takes ' .. #SETTLE_ROLES .. ' or ' .. #SETTLE_ROLES + 1
                  .. ' keys of one partition (' .. table.concat(SETTLE_ROLES, ', ') .. ', [reply_to]) and 13 or 14 arguments')
  end
  -- Callers validate; this guards the balances against any client allowed to FCALL
  -- directly, for whom a negative amount would be a top-up.
  local a, err, detail = read_args(op, args)
  if not a then return refuse(err, detail) end
  -- The reply stream as pump's judge takes one (request_rules): this partition's.
  k.reply_to = keys[#SETTLE_ROLES + 1]
  local prefix = k.tag .. ':reply:'
  if k.reply_to and (string.sub(k.reply_to, 1, #prefix) ~= prefix
                     or not text(string.sub(k.reply_to, #prefix + 1), NAME, 64)) then
    return refuse('invalid_reply_to', k.reply_to)
  end
  -- A batch of one: the same read ahead, settle_entry and write ahead as pump's entries.
  local ahead = batch_ahead(k, {{a = a}}, now_ms())
  local reply = settle_entry(k, a, ahead)
  write_ahead(k, ahead)
  return reply
end

--[[
expire_reservations: the worker's sweep, the background cleaner. Ends what has passed its
expiry on accounts nobody touches: up to limit reservations (released, charging none)
and up to limit lots (their breakage recorded), oldest first, and with them every other
expired reservation and lot of the same accounts, exactly as the accounts' next settling
call would (read_account). Settling calls never count either once expired. A commit racing
the sweep is safe: each call is atomic, and whichever runs second finds the reservation
gone.
KEYS: balances, results, held, reservations, expiries, holds, wallets, lot_expiries.
ARGV: limit (1..100000).
Returns how many reservations it released. An account whose stored values are not the
library's leaves both indexes (so the sweep moves on) and stays for the audit to report.
]]
local SWEEP_ROLES = {'balances', 'results', 'held', 'reservations', 'expiries', 'holds', 'wallets', 'lot_expiries'}
local SWEEP_TYPES = {held = 'hash', reservations = 'hash', expiries = 'zset', holds = 'zset', wallets = 'hash',
                     lot_expiries = 'zset'}

-- The accounts of the ids of an index (<account>/<rest>), each once in accounts (seen:
-- those listed), and the ids of each in by_account.
local function accounts_of(ids, accounts, seen, by_account)
  for _, id in ipairs(ids) do
    local account = string.match(id, '^([^/]+)/')
    if account then
      if not seen[account] then
        seen[account] = true
        accounts[#accounts + 1] = account
      end
      by_account[account] = by_account[account] or {}
      table.insert(by_account[account], id)
    end
  end
end

local function expire_reservations(keys, args)
  local k = #keys == #SWEEP_ROLES and #args == 1 and partition_keys(keys, SWEEP_ROLES)
  if not k then return refuse('wrong_arguments', 'expire_reservations takes the keys ' .. table.concat(SWEEP_ROLES, ', ')) end
  local limit = count(args[1], 1, MAX_SWEEP)
  if not limit then return refuse('invalid_limit', '1..' .. MAX_SWEEP) end
  local err = wrong_types(k, SWEEP_TYPES)
  if err then return err end
  local now = now_ms()
  -- Read and check everything first: the accounts with a reservation or a lot due, each as
  -- a settling call reads it.
  local accounts, seen, due_reservations, due_lots = {}, {}, {}, {}
  accounts_of(redis.call('ZRANGE', k.expiries, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit), accounts, seen,
              due_reservations)
  accounts_of(redis.call('ZRANGE', k.lot_expiries, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit), accounts, seen,
              due_lots)
  if #accounts == 0 then return 0 end
  local ahead = {accounts = accounts, balances = {}, held = {}, wallets = {}, charged = {}, wallet_written = {},
                 written = {}}
  read_accounts(k, ahead)
  local read, released = {}, 0
  for _, account in ipairs(accounts) do
    read[#read + 1] = read_account(k, account, now, ahead) -- nil: not the library's, left alone
  end
  -- Then write: the breakage events first (the first XADD refuses the call, nothing written).
  local stamp, posted = digits(now), false
  for _, s in ipairs(read) do
    err, posted = post_events(k.results, breakage_events(s, stamp), posted)
    if err then return err end
  end
  for _, s in ipairs(read) do
    apply(k, s, ahead)
    released = released + #s.expired_ids
  end
  write_ahead(k, ahead)
  -- Every id found due leaves its index: its reservation or lot is gone, or is a lot still
  -- pinned (its breakage comes when its reservation ends), or is of an account left for
  -- the audit.
  for _, ids in pairs(due_reservations) do redis.call('ZREM', k.expiries, unpack(ids)) end
  for _, ids in pairs(due_lots) do redis.call('ZREM', k.lot_expiries, unpack(ids)) end
  return released
end

-- ---- dead letters ------------------------------------------------------------------------
-- An entry that cannot be read goes to the dead-letter stream with its own pairs, acked in
-- the same call (pump), so a bad entry is never lost and never blocks the group; its reason
-- is counted in deadletter:reasons, so status never scans the stream.
local DEAD_TYPES = {deadletter = 'stream', requests = 'stream', ['deadletter:reasons'] = 'hash'}

-- Appends a dead letter (fields, then error, detail and entry_id) and counts its reason.
-- Every argument was checked by the caller: this cannot fail.
local function write_dead_letter(k, entry_id, reason, detail, maxlen, fields)
  for _, v in ipairs({'error', reason, 'detail', detail, 'entry_id', entry_id}) do
    fields[#fields + 1] = v
  end
  redis.call('XADD', k.deadletter, 'MAXLEN', '~', digits(maxlen), '*', unpack(fields))
  redis.call('HINCRBY', k['deadletter:reasons'], reason, 1)
end

-- ---- judging an entry as it arrives ------------------------------------------------------
-- The wire format (docs/wire-format.md), judged here and nowhere else for an entry read
-- from a request stream: the same verdict, reason for reason, as the schema gives
-- (charging/schema.py parse_request, charging/tariff.py price, and the partition rule),
-- in the same order when several things are wrong.

local MAX_FIELDS, MAX_FIELD_BYTES = 16, 256
local DEADLETTER_FIELD_BYTES = 1024 -- a dead letter keeps each name and value up to this
local REPLY_ID = '^[A-Za-z0-9_%-]+$' -- a reply stream's <id>, 1..64 of them
-- The fields of the format, in the order the schema checks them (its fields' order).
local KNOWN_FIELD = {op = true, request_id = true, account = true, service = true, units = true, amount = true,
                     reservation = true, ttl = true, reply_to = true, submitted_at = true, lot = true,
                     expires_at = true, expires_in = true}
-- The fields each operation may carry besides op, request_id, account, reply_to and
-- submitted_at, in the order the schema reports one it does not use.
local OPTIONAL_FIELDS = {'service', 'units', 'amount', 'reservation', 'ttl', 'lot', 'expires_at', 'expires_in'}
local OP_FIELDS = {
  charge = {service = true, units = true, amount = true},
  reserve = {service = true, units = true, amount = true, ttl = true},
  commit = {reservation = true, units = true, amount = true},
  extend = {reservation = true, units = true, amount = true, ttl = true},
  release = {reservation = true},
  grant = {service = true, units = true, amount = true, lot = true, expires_at = true, expires_in = true},
}
local ON_RESERVATION = {commit = true, extend = true, release = true}

-- Whether a string is UTF-8 as a strict decoder reads it: no overlong forms, no
-- surrogates, nothing above U+10FFFF, no sequence cut short.
local function utf8_valid(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len, low, high = 1, 0x80, 0xBF -- the sequence's length, the range of its second byte
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c == 0xE0 then len, low = 3, 0xA0
    elseif c == 0xED then len, high = 3, 0x9F
    elseif c >= 0xE1 and c <= 0xEF then len = 3
    elseif c == 0xF0 then len, low = 4, 0x90
    elseif c >= 0xF1 and c <= 0xF3 then len = 4
    elseif c == 0xF4 then len, high = 4, 0x8F
    elseif c >= 0x80 then return false end
    for j = i + 1, i + len - 1 do
      local b = string.byte(s, j)
      if not b or b < (j == i + 1 and low or 0x80) or b > (j == i + 1 and high or 0xBF) then return false end
    end
    i = i + len
  end
  return true
end

-- CRC-32 (the zlib one), as charging/keys.py partition_of routes an account. Its table is
-- built on the first call after the library is loaded and kept: Redis 7.0 gives a
-- library's load no bit library. The bit library works on signed 32-bit numbers: the
-- result is brought back to 0..2^32-1.
local crc_table = nil

local function build_crc_table()
  local t = {}
  for i = 0, 255 do
    local c = i
    for _ = 1, 8 do
      if bit.band(c, 1) == 1 then c = bit.bxor(bit.rshift(c, 1), 0xEDB88320) else c = bit.rshift(c, 1) end
    end
    t[i] = c
  end
  return t
end

local function crc32(s)
  crc_table = crc_table or build_crc_table()
  local t, band, bxor, rshift, byte = crc_table, bit.band, bit.bxor, bit.rshift, string.byte
  local c = -1
  for i = 1, #s do
    c = bxor(rshift(c, 8), t[band(bxor(c, byte(s, i)), 0xFF)])
  end
  c = bit.bnot(c)
  if c < 0 then c = c + 4294967296 end
  return c
end

-- A whole number as the wire writes it: 1..20 decimal digits, leading zeros allowed, its
-- value within low..high; else nil. (A value of more than 16 digits once its zeros are
-- gone is over every limit: the limits stay within MAX_BALANCE, and tonumber is exact only
-- below 2^53.)
local function wire_number(value, low, high)
  if #value > 20 or not string.find(value, '^[0-9]+$') then return nil end
  local significant = value
  if #value > 16 or string.byte(value) == 48 then significant = string.match(value, '^0*(%d+)$') end -- 48: '0'
  if #significant > 16 then return nil end
  local n = tonumber(significant)
  if n < low or n > high then return nil end
  return n
end

-- <account>/<request id of the reserve>: its account part, or nil.
local function reservation_account(value)
  local account, rest = string.match(value, '^([^/]*)/(.*)$')
  if account and text(account, ACCOUNT, 64) and text(rest, REQUEST_ID, 128) then return account end
  return nil
end

-- The fields of an entry, its flat name/value pairs: a table by name, or nil and the
-- reason. A name is judged before its value, and a repeated name before the names after
-- it (the schema counts them all, and so reports a bad one among them first).
-- A name or value over the size limit or not UTF-8: the reason and a detail. ascii: the
-- entry has no byte above 127 (one scan of it all), so none needs decoding.
local function bad(value, what, ascii)
  if #value > MAX_FIELD_BYTES then
    return 'field_too_long', what .. ' is ' .. #value .. ' bytes, at most ' .. MAX_FIELD_BYTES
  end
  if not ascii and not utf8_valid(value) then return 'invalid_encoding', what .. ' is not valid UTF-8' end
  return nil
end

local function entry_fields(args)
  local first, n = 1, #args / 2
  if n == 0 then return nil, 'entry_deleted', 'the entry has no fields (deleted or trimmed before it was read)' end
  if n > MAX_FIELDS then return nil, 'too_many_fields', n .. ' fields, at most ' .. MAX_FIELDS end
  local joined = table.concat(args, '', first, first + 2 * n - 1)
  local ascii = not string.find(joined, '[\128-\255]')
  local fields = {}
  if ascii and #joined <= MAX_FIELD_BYTES then -- no name or value can be too long or badly encoded
    for i = first, first + 2 * n - 2, 2 do
      if fields[args[i]] then fields = nil break end -- a repeated name: judged below
      fields[args[i]] = args[i + 1]
    end
    if fields then return fields end
    fields = {}
  end
  for i = first, first + 2 * n - 2, 2 do
    local name = args[i]
    local reason, detail = bad(name, 'field name', ascii)
    if reason then return nil, reason, detail end
    if fields[name] then
      local times = 1
      for j = i + 2, first + 2 * n - 2, 2 do
        reason, detail = bad(args[j], 'field name', ascii)
        if reason then return nil, reason, detail end
        if args[j] == name then times = times + 1 end
      end
      for j = first, i - 2, 2 do
        if args[j] == name then times = times + 1 end
      end
      return nil, 'duplicate_field', "field '" .. name .. "' is given " .. times .. ' times'
    end
    reason, detail = bad(args[i + 1], name, ascii)
    if reason then return nil, reason, detail end
    fields[name] = args[i + 1]
  end
  return fields
end

-- Each field on its own, in the schema's order; nil, reason, detail for the first wrong.
local function field_values(f, c)
  local v = {op = f.op or 'charge'}
  if not OP_FIELDS[v.op] then return nil, 'unknown_op', 'op ' .. v.op end
  if not f.request_id then return nil, 'missing_field', "field 'request_id' is required" end
  if not text(f.request_id, REQUEST_ID, 128) then return nil, 'invalid_request_id', 'request_id' end
  if not f.account then return nil, 'missing_field', "field 'account' is required" end
  if not text(f.account, ACCOUNT, 64) then return nil, 'invalid_account', 'account' end
  if f.service and not SERVICES[f.service] then return nil, 'unknown_service', 'service ' .. f.service end
  for _, rule in ipairs(c.numbers) do
    local name, value = rule[1], f[rule[1]]
    if name == 'reservation' then
      if value and not reservation_account(value) then
        return nil, 'invalid_reservation', 'reservation must be <account>/<request id of the reserve>'
      end
    elseif name == 'lot' then
      if value and (not text(value, LOT_ID, 64) or value == 'main') then
        return nil, 'invalid_lot', 'lot must be 1..64 of A-Z a-z 0-9 _ . -, not main'
      end
    elseif value and rule[2] then
      v[name] = wire_number(value, rule[2], rule[3])
      if not v[name] then
        return nil, rule[4], name .. ' must be a whole number ' .. rule[2] .. '..' .. digits(rule[3]) .. ' in digits'
      end
    end
  end
  for name in pairs(f) do
    if not KNOWN_FIELD[name] then return nil, 'unknown_field', "field '" .. name .. "' is not part of the request format" end
  end
  return v
end

-- The request as a whole: the fields its op uses, one of amount or service with units,
-- and a reply stream in the account's partition. nil, or the reason and a detail.
-- A grant's own rules: its lot, money (amount, of any service or one) or units of a
-- service, and at most one expiry, not past by now.
local function grant_rules(f, v, now)
  if not f.lot then return 'missing_field', "field 'lot' is required for op 'grant'" end
  if v.amount and v.units then return 'ambiguous_charge', 'give either amount or service with units, not both' end
  if not (v.amount or v.units) then return 'missing_field', "field 'amount' is required for op 'grant' (or units)" end
  if v.units and not f.service then return 'missing_field', "field 'service' is required with units" end
  if v.expires_at and v.expires_in then return 'invalid_expiry', 'give expires_at or expires_in, not both' end
  if v.expires_at and v.expires_at <= now then return 'invalid_expiry', 'expires_at is not later than now' end
  return nil
end

local function request_rules(f, v, c, partition, now)
  for _, name in ipairs(OPTIONAL_FIELDS) do
    if f[name] and not OP_FIELDS[v.op][name] then
      return 'field_not_allowed', "field '" .. name .. "' is not used by op '" .. v.op .. "'"
    end
  end
  if v.op == 'commit' or v.op == 'extend' then
    if v.amount and v.units then return 'ambiguous_charge', 'give either amount or units, not both' end
    if not (v.amount or v.units) then return 'missing_field', "field 'units' is required for op '" .. v.op .. "'" end
  elseif v.op == 'charge' or v.op == 'reserve' then
    if v.amount and (f.service or v.units) then
      return 'ambiguous_charge', 'give either amount or service with units, not both'
    end
    if not v.amount and not (f.service and v.units) then
      return 'missing_field', "field '" .. (f.service and 'units' or 'service') .. "' is required (or give amount)"
    end
  elseif v.op == 'grant' then
    local reason, detail = grant_rules(f, v, now)
    if reason then return reason, detail end
  end
  if f.reply_to then
    local prefix = c.namespace .. ':{p' .. digits(partition) .. '}:reply:'
    local id = string.sub(f.reply_to, #prefix + 1)
    if string.sub(f.reply_to, 1, #prefix) ~= prefix or not text(id, REPLY_ID, 64) then
      return 'invalid_reply_to', 'reply_to must be a key ' .. prefix .. "<id> in the account's partition"
    end
  end
  return nil
end

-- What a replay of the request id must match to count as the same request (the schema's
-- ChargeRequest.fingerprint, byte for byte): numbers as digits without leading zeros.
local function fingerprint(f, v)
  if v.op == 'charge' then
    if v.amount then return f.account .. '|amount|' .. digits(v.amount) end
    return f.account .. '|' .. f.service .. '|' .. digits(v.units)
  end
  local parts = {f.account, v.op, f.service or '', v.units and digits(v.units) or '',
                 v.amount and digits(v.amount) or '', f.reservation or '', v.ttl and digits(v.ttl) or ''}
  if v.op == 'grant' then
    for _, part in ipairs({f.lot, v.expires_at and digits(v.expires_at) or '',
                           v.expires_in and digits(v.expires_in) or ''}) do
      parts[#parts + 1] = part
    end
  end
  return table.concat(parts, '|')
end

--[[
judge_entry: an entry's raw field/value pairs (flat, as XREADGROUP
gives them) judged against the wire format, with the call's context c: namespace,
partition, partitions, prices (per service), max_units, max_amount, max_ttl_s,
default_ttl_s, group, window_ms, reply_ttl_ms. Returns the request settle_entry settles,
as read_args makes one of a single call's arguments (see settle: amount rated, units only
for a commit or extend in units, unit_price and ttl_ms for a reserve), and its reply
stream; or nil, the dead-letter reason and a detail. Writes nothing, reads nothing.
]]
local function judge_entry(pairs_, entry_id, c, now)
  local f, reason, detail = entry_fields(pairs_)
  if not f then return nil, reason, detail end
  if ON_RESERVATION[f.op] then -- the account is the reservation's own
    if not f.reservation then return nil, 'missing_field', "field 'reservation' is required for op '" .. f.op .. "'" end
    local account = reservation_account(f.reservation)
    if not account then return nil, 'invalid_reservation', 'reservation must be <account>/<request id of the reserve>' end
    if f.account and f.account ~= account then
      return nil, 'invalid_reservation', "reservation '" .. f.reservation .. "' is not of account '" .. f.account .. "'"
    end
    f.account = account
  end
  local v
  v, reason, detail = field_values(f, c)
  if not v then return nil, reason, detail end
  -- the account's, which the reply stream must be in
  local partition = c.partitions == 1 and 0 or crc32(f.account) % c.partitions
  reason, detail = request_rules(f, v, c, partition, now)
  if reason then return nil, reason, detail end
  if partition ~= c.partition then
    return nil, 'wrong_partition', 'account ' .. f.account .. ' does not belong to partition ' .. digits(c.partition)
  end
  -- The maximum charge is judged on the default plan (the tariff), as a client can; the
  -- account's plan prices a charge or reserve of units when it is settled (rate).
  local rated = f.service and (v.op == 'charge' or v.op == 'reserve')
  local amount = v.amount or (rated and c.prices[f.service] * v.units)
  if amount and amount > c.max_amount then
    return nil, 'invalid_amount', digits(v.units) .. ' ' .. f.service .. ' units cost ' .. digits(amount)
        .. ', over the maximum charge of ' .. digits(c.max_amount)
  end
  local reserve = v.op == 'reserve'
  local ttl_s = v.ttl or (reserve and c.default_ttl_s)
  return {
    op = v.op, request_id = f.request_id, account = f.account, fingerprint = fingerprint(f, v), entry_id = entry_id,
    group = c.group, submitted_at = v.submitted_at and v.submitted_at > 0 and digits(v.submitted_at) or '',
    reservation = reserve and (f.account .. '/' .. f.request_id) or f.reservation, window_ms = c.window_ms,
    reply_ttl_ms = c.reply_ttl_ms, amount = v.amount, units = v.units,
    service = (rated or v.op == 'grant') and f.service or nil,
    unit_price = rated and c.prices[f.service] or (reserve and 1 or nil), ttl_ms = ttl_s and ttl_s * 1000 or nil,
    lot = f.lot, expires_at = v.expires_at, expires_in_ms = v.expires_in and v.expires_in * 1000,
    spec = v.expires_at and ('at:' .. digits(v.expires_at)) or v.expires_in and ('in:' .. digits(v.expires_in * 1000))
      or '',
  }, f.reply_to
end

-- ---- settling entries as read -------------------------------------------------------------
-- Entries of one partition's request stream as XREADGROUP gave them, judged here
-- (judge_entry). A good entry is settled exactly as its own function would, through one
-- read ahead, settle_entry and write ahead; a bad one, one delivered more than
-- max_deliveries times or one whose id is more than max_clock_skew_ms ahead of the
-- server's clock is acked and dead-lettered with its own pairs, in the same call. The
-- reply streams (an entry's reply_to, in this partition) are named here, not in KEYS. The context (the header of pump's ARGV): group,
-- window_ms, reply_ttl_ms, partition, partitions, deadletter maxlen, the prices of sms,
-- voice and data, max_units, max_amount, max_reservation_ttl_s, the default reservation
-- ttl (s), max_deliveries, max_clock_skew_ms.
local ENTRIES_ROLES = {'balances', 'results', 'requests', 'held', 'reservations', 'expiries', 'holds', 'wallets',
                       'lot_expiries', 'plans', 'deadletter', 'deadletter:reasons'}
local ENTRIES_HEADER = 15
local MAX_PARTITIONS = 1024

-- The header of a pump call, checked: the context judge_entry takes; nil and the
-- refusal when a value is out of range.
local function entries_context(k, args)
  local namespace, tag_partition = string.match(k.tag, '^(.+):{p(%d+)}$')
  local c = {group = args[1], window_ms = duration_arg(args[2]), reply_ttl_ms = duration_arg(args[3]),
             namespace = namespace,
             partition = count(args[4], 0, MAX_PARTITIONS - 1), partitions = count(args[5], 1, MAX_PARTITIONS),
             maxlen = count(args[6], 1, MAX_BALANCE),
             prices = {sms = count(args[7], 1, MAX_BALANCE), voice = count(args[8], 1, MAX_BALANCE),
                       data = count(args[9], 1, MAX_BALANCE)},
             max_units = count(args[10], 1, MAX_BALANCE), max_amount = count(args[11], 1, MAX_BALANCE),
             max_ttl_s = count(args[12], 1, MAX_DURATION_MS / 1000), default_ttl_s = count(args[13], 1, MAX_DURATION_MS / 1000),
             max_deliveries = count(args[14], 1, MAX_BALANCE), max_skew_ms = count(args[15], 1000, MAX_DURATION_MS)}
  local checks = {
    {text(c.group, NAME, 64), 'invalid_group'}, {c.window_ms, 'invalid_window'},
    {c.reply_ttl_ms, 'invalid_reply_ttl'},
    {c.partitions and c.partition and c.partition < c.partitions and c.partition == tonumber(tag_partition),
     'invalid_partition', 'the partition of the keys, below partitions'},
    {c.maxlen, 'invalid_maxlen'}, {c.prices.sms and c.prices.voice and c.prices.data, 'invalid_price'},
    {c.max_units, 'invalid_max_units'}, {c.max_amount, 'invalid_max_amount'},
    {c.max_ttl_s and c.default_ttl_s and c.default_ttl_s <= c.max_ttl_s, 'invalid_reservation_ttl'},
    {c.max_deliveries, 'invalid_max_deliveries'}, {c.max_skew_ms, 'invalid_max_skew', '1000..' .. MAX_DURATION_MS},
  }
  for _, check in ipairs(checks) do
    if not check[1] then return nil, refuse(check[2], check[3]) end
  end
  -- the numbers of an entry, in the schema's order: name, range, reason (field_values)
  c.numbers = {{'units', 1, c.max_units, 'invalid_units'}, {'amount', 1, c.max_amount, 'invalid_amount'},
               {'reservation'}, {'ttl', 1, c.max_ttl_s, 'invalid_ttl'},
               {'submitted_at', 0, MAX_TIME_MS, 'invalid_submitted_at'}, {'lot'},
               {'expires_at', 1, MAX_TIME_MS, 'invalid_expiry'},
               {'expires_in', 1, MAX_DURATION_MS / 1000, 'invalid_expiry'}}
  return c
end

-- Judges each entry: the item settle_item settles (e.item), or the reason and detail it
-- is dead-lettered with. Returns the items and the reasons used.
local function judge_entries(entries, c, now)
  local items, reasons, listed = {}, {}, {}
  for _, e in ipairs(entries) do
    local ahead_ms = tonumber(string.match(e.id, '^%d+')) - now
    if ahead_ms > c.max_skew_ms then
      e.reason, e.detail = 'id_in_future', 'entry id ' .. e.id .. ' is ' .. string.format('%.0f', ahead_ms)
          .. ' ms ahead of the Redis clock; producers must let Redis choose the id (XADD *)'
    elseif e.deliveries > c.max_deliveries then
      e.reason, e.detail = 'max_deliveries', 'delivered ' .. digits(e.deliveries) .. ' times without being settled'
    else
      local a, reply_to, detail = judge_entry(e.pairs, e.id, c, now)
      if a then
        e.item = {a = a, reply_to = reply_to}
        items[#items + 1] = e.item
      else
        e.reason, e.detail = reply_to, detail
      end
    end
    if e.reason and not listed[e.reason] then
      listed[e.reason] = true
      reasons[#reasons + 1] = e.reason
    end
  end
  return items, reasons
end

-- Whether a dead letter can be written for each reason: the streams and hash of another
-- type or an exhausted dead-letter stream refuse the call, and so does a count HINCRBY
-- would fail on (not an integer it can add one to).
local function dead_letters_writable(k, reasons)
  local err = wrong_types(k, DEAD_TYPES) or postable(k.deadletter)
  if err then return err end
  for i, stored in ipairs(redis.call('HMGET', k['deadletter:reasons'], unpack(reasons))) do
    if stored and not (stored == '0' or (#stored <= 18 and string.find(stored, '^%-?[1-9][0-9]*$'))) then
      return refuse('corrupt_reason_count', reasons[i])
    end
  end
  return nil
end

-- The settling core of pump: entries read from the request stream ({id, deliveries,
-- pairs}) judged, dead-lettered or settled through
-- settle_item, in one read ahead and one write ahead. Every check comes before the first
-- write. Returns one reply per entry, in order: what its own function returns,
-- {'dead', reason} or an error (that entry
-- wrote nothing and stays pending); or nil and the refusal of the whole call (nothing
-- written).
local function settle_read(k, c, entries)
  local now = now_ms() -- one for the call: the id_in_future rule, the dedupe window, expiries
  local items, reasons = judge_entries(entries, c, now)
  local err = #reasons > 0 and dead_letters_writable(k, reasons)
  if err then return nil, err end
  local ahead = #items > 0 and batch_ahead(k, items, now)
  local replies = {}
  for i, e in ipairs(entries) do
    if e.item then
      replies[i] = settle_item(k, e.item, ahead)
    else
      ack(k.requests, c.group, e.id)
      local fields = {}
      for j, v in ipairs(e.pairs) do fields[j] = string.sub(v, 1, DEADLETTER_FIELD_BYTES) end
      write_dead_letter(k, e.id, e.reason, e.detail, c.maxlen, fields)
      replies[i] = {'dead', e.reason}
    end
  end
  if ahead then write_ahead(k, ahead) end
  return replies
end

--[[
pump: what a worker calls, over and over, per partition: the library reads its own
entries, judges, rates and settles them (settle_read) and answers
with a summary; no entry crosses the wire. In one call, for consumer of the workers' group:
 1. reclaim_idle_ms > 0: XAUTOCLAIM (JUSTID: claiming counts no delivery; the read below
    does) up to count entries idle that long from other consumers (dead or stalled),
    looping on the cursor at most MAX_CLAIM_ROUNDS times. Ids XAUTOCLAIM reports deleted
    (already gone from the pending list) are dead-lettered entry_deleted, unacked. The
    dead-letter stream and count are checked before the claim, so nothing after it fails.
 2. this consumer's own pending entries, oldest first (XREADGROUP ... 0, COUNT count):
    what it read before a crash, what a refused call left, what it claimed, what the
    worker's wait (a blocking XREADGROUP of COUNT 1) delivered; then, with room left, new
    ones (>). No BLOCK: the worker waits outside.
 3. each entry's delivery count (XPENDING of this consumer), for the max_deliveries rule;
    the entry id given as waited (the worker's wait delivered it once; its settling is the
    first try) counts one less.
 4. settles them all (settle_read). A refused entry (or a whole call refused)
    writes nothing and stays pending to this consumer: the next call reads it again (and
    counts one more delivery), so the worker waits a little first.
KEYS: balances, results, requests, held, reservations, expiries, holds, deadletter,
      deadletter:reasons
ARGV: consumer, count (1..1000), reclaim_idle_ms (0: no reclaim), waited ('' or an entry
      id), then the 15 of the context (above: settling entries as read).
Returns a flat summary:
  {read, reclaimed, last_id ('' when none read), approved, duplicate, refused,
   error (the first refusal's text, '' when none),
   R, R pairs (reason, n): charges rejected,
   D, D pairs (reason, n): entries dead-lettered (entry_deleted ones of the claim included),
   S, S triples (op, result, n): reservation operations, result approved, duplicate or the
   rejection reason}
approved, duplicate and the rejections count charges (op charge) only; a duplicate is a
replay answered from its record (an idempotency conflict is a rejection).
]]
local PUMP_ARGS = 4
local MAX_CLAIM_ROUNDS = 10
local CONSUMER = '^[\33-\126]+$'

-- Takes over up to wanted entries of other consumers idle longer than idle_ms; the ids
-- found deleted are dead-lettered. Returns how many were claimed and the dead letters.
local function reclaim(k, c, consumer, wanted, idle_ms)
  local cursor, claimed, deleted = '0-0', 0, {}
  for _ = 1, MAX_CLAIM_ROUNDS do
    local reply = redis.call('XAUTOCLAIM', k.requests, c.group, consumer, idle_ms, cursor, 'COUNT',
                             wanted - claimed, 'JUSTID')
    cursor, claimed = reply[1], claimed + #reply[2]
    for _, id in ipairs(reply[3] or {}) do deleted[#deleted + 1] = id end
    if cursor == '0-0' or claimed >= wanted then break end
  end
  for _, id in ipairs(deleted) do
    write_dead_letter(k, id, 'entry_deleted', 'deleted before it was settled', c.maxlen, {})
  end
  return claimed, #deleted
end

-- Appends what one XREADGROUP gave to entries, as settle_read takes them.
local function read_into(reply, entries)
  local messages = reply and reply[1] and reply[1][2] or {}
  for _, m in ipairs(messages) do
    -- pairs false: deleted while pending, read as no fields
    entries[#entries + 1] = {id = m[1], deliveries = 1, pairs = m[2] or {}}
  end
end

-- Counts by key, in the order first seen: {keys..., n} groups flattened for the reply.
local function tally(t, ...)
  local key = table.concat({...}, SEP)
  if not t.n[key] then
    t.order[#t.order + 1] = {...}
    t.n[key] = 0
  end
  t.n[key] = t.n[key] + 1
end

local function flat_tally(out, t)
  out[#out + 1] = #t.order
  for _, parts in ipairs(t.order) do
    for _, part in ipairs(parts) do out[#out + 1] = part end
    out[#out + 1] = t.n[table.concat(parts, SEP)]
  end
end

-- The context of a pump call, checked once per partition and header: every call of a
-- worker repeats them, and checking them costs more than a short call's entries. Kept by
-- the library between calls (a pure function of the arguments; dropped when the library is
-- loaded again), at most MAX_KNOWN of them.
local MAX_KNOWN = 4096
local known, known_n = {}, 0

local function known_context(k, args)
  local key = k.tag .. SEP .. table.concat(args, SEP, PUMP_ARGS + 1)
  -- one key per input only when no part holds SEP itself: else checked, never kept
  local unambiguous = select(2, string.gsub(key, SEP, '')) == ENTRIES_HEADER
  local c = unambiguous and known[key]
  if c then return c end
  local err
  c, err = entries_context(k, {unpack(args, PUMP_ARGS + 1)})
  if not c then return nil, err end
  if not unambiguous then return c end
  if known_n >= MAX_KNOWN then known, known_n = {}, 0 end
  known[key], known_n = c, known_n + 1
  return c
end

local function pump(keys, args)
  local k = #keys == #ENTRIES_ROLES and #args == PUMP_ARGS + ENTRIES_HEADER and partition_keys(keys, ENTRIES_ROLES)
  if not k then
    return refuse('wrong_arguments', 'pump takes the keys ' .. table.concat(ENTRIES_ROLES, ', ') .. ', consumer, '
                  .. 'count, reclaim_idle_ms, waited and ' .. ENTRIES_HEADER .. ' arguments')
  end
  local consumer, wanted, idle_ms, waited = args[1], count(args[2], 1, MAX_BATCH),
      count(args[3], 0, MAX_DURATION_MS), args[4]
  if not text(consumer, CONSUMER, 128) then return refuse('invalid_consumer') end
  if not wanted then return refuse('invalid_count', '1..' .. MAX_BATCH) end
  if not idle_ms then return refuse('invalid_reclaim_idle') end
  if waited ~= '' and not text(waited, ENTRY_ID, 41) then return refuse('invalid_entry_id', waited) end
  local c, err = known_context(k, args)
  if not c then return err end
  local dead, reclaimed, deleted = {order = {}, n = {}}, 0, 0
  if idle_ms > 0 then
    err = dead_letters_writable(k, {'entry_deleted'})
    if err then return err end
    reclaimed, deleted = reclaim(k, c, consumer, wanted, idle_ms)
    for _ = 1, deleted do tally(dead, 'entry_deleted') end
  end

  local entries = {}
  read_into(redis.call('XREADGROUP', 'GROUP', c.group, consumer, 'COUNT', wanted, 'STREAMS', k.requests, '0'),
            entries)
  if #entries < wanted then
    read_into(redis.call('XREADGROUP', 'GROUP', c.group, consumer, 'COUNT', wanted - #entries, 'STREAMS',
                         k.requests, '>'), entries)
  end
  local replies, refusal = {}, nil
  if #entries > 0 then
    local delivered = {}
    for _, p in ipairs(redis.call('XPENDING', k.requests, c.group, entries[1].id, entries[#entries].id, #entries,
                                  consumer)) do
      delivered[p[1]] = p[4]
    end
    for _, e in ipairs(entries) do
      e.deliveries = delivered[e.id] or 1
      if e.id == waited and e.deliveries > 1 then e.deliveries = e.deliveries - 1 end
    end
    replies, refusal = settle_read(k, c, entries)
  end

  local summary = {#entries, reclaimed, #entries > 0 and entries[#entries].id or '', 0, 0, 0, ''}
  local rejected, ops = {order = {}, n = {}}, {order = {}, n = {}}
  for i, e in ipairs(entries) do
    local r = replies and replies[i] or refusal
    if r.err then
      summary[6] = summary[6] + 1
      if summary[7] == '' then summary[7] = r.err end
    elseif r[1] == 'dead' then
      tally(dead, r[2])
    else
      local result = r[2] ~= '' and r[2] or 'approved'
      if r[5] == 1 and r[2] ~= 'idempotency_conflict' then result = 'duplicate' end
      if e.item.a.op ~= 'charge' then
        tally(ops, e.item.a.op, result)
      elseif result == 'approved' then
        summary[4] = summary[4] + 1
      elseif result == 'duplicate' then
        summary[5] = summary[5] + 1
      else
        tally(rejected, r[2])
      end
    end
  end
  flat_tally(summary, rejected)
  flat_tally(summary, dead)
  flat_tally(summary, ops)
  return summary
end

-- The money in an account's lots, for a call that adds to its main balance (0 for a caller
-- of the layout before lots, which passes no wallets key); nil and the refusal for a wallet
-- the library did not write.
local ADDING_ROLES = {{'balances'}, {'balances', 'wallets'}} -- by key count: before lots, and now

local function wallet_money(k, account)
  if not k.wallets then return 0 end
  local w = parse_wallet(redis.call('HGET', k.wallets, account))
  if not w then return nil, refuse('corrupt_wallet', account) end
  return lot_money(w)
end

-- A balance as set_balances and top_up take it: digits, at most MAX_BALANCE.
local function balance_arg(value)
  local n = count(value, 0, MAX_BALANCE)
  if n then return n end
  if type(value) == 'string' and string.find(value, '^[0-9]+$') then return nil, 'balance_too_large' end
  return nil, 'invalid_balance'
end

--[[
top_up: add to an existing account. KEYS: balances. ARGV: account, amount (1..10^15).
Returns the new balance, or an error for an unknown account or a balance over the
library's limit (10^15), before anything is written.
]]
local function top_up(keys, args)
  local k = (#keys == 1 or #keys == 2) and #args == 2 and partition_keys(keys, ADDING_ROLES[#keys])
  if not k then return refuse('wrong_arguments', 'top_up takes the keys balances, wallets and account, amount') end
  if not text(args[1], ACCOUNT, 64) then return refuse('invalid_account') end
  local amount = count(args[2], 1, MAX_BALANCE)
  if not amount then return refuse('invalid_amount', 'a whole number 1..' .. MAX_BALANCE) end
  local current = redis.call('HGET', k.balances, args[1])
  if not current then return refuse('unknown_account') end
  current = stored_balance(current)
  if not current then return refuse('corrupt_balance', args[1]) end
  local lots, err = wallet_money(k, args[1])
  if not lots then return err end
  if current + lots + amount > MAX_BALANCE then return refuse('balance_too_large', 'at most ' .. MAX_BALANCE) end
  return redis.call('HINCRBY', k.balances, args[1], amount)
end

--[[
set_balances: create or overwrite accounts (operator reset).
KEYS: balances. ARGV: account, balance, account, balance, ...  Every pair is checked
before any is written (balances 0..10^15). Returns the count set.
]]
local function set_balances(keys, args)
  local k = (#keys == 1 or #keys == 2) and #args >= 2 and #args % 2 == 0 and partition_keys(keys, ADDING_ROLES[#keys])
  if not k then
    return refuse('wrong_arguments', 'set_balances takes the keys balances, wallets and account/balance pairs')
  end
  local written = {}
  for i = 1, #args, 2 do
    if not text(args[i], ACCOUNT, 64) then return refuse('invalid_account', args[i]) end
    local n, reason = balance_arg(args[i + 1])
    if not n then return refuse(reason, args[i] .. ' ' .. args[i + 1]) end
    local lots, err = wallet_money(k, args[i])
    if not lots then return err end
    if n + lots > MAX_BALANCE then return refuse('balance_too_large', args[i] .. ': with its lots, over ' .. MAX_BALANCE) end
    written[i], written[i + 1] = args[i], digits(n) -- '0100' stored as 100: see stored_balance
  end
  redis.call('HSET', k.balances, unpack(written))
  return #args / 2
end

-- ---- plans and lots ------------------------------------------------------------------

--[[
set_plan: create or change a plan in one partition (the client sets every partition).
KEYS: plans. ARGV: name, then the unit prices of sms, voice and data (1..10^15).
The name 'default' is the tariff's and cannot be set. Returns 1 when the plan is new
here, 0 when it changed.
]]
local PLAN = LOT_ID

local function set_plan(keys, args)
  local k = #keys == 1 and #args == 4 and partition_keys(keys, {'plans'})
  if not k then return refuse('wrong_arguments', 'set_plan takes the key plans and name, sms, voice, data') end
  if not text(args[1], PLAN, 64) or args[1] == 'default' then
    return refuse('invalid_plan', 'a name of 1..64 of A-Z a-z 0-9 _ . -, not default')
  end
  local prices = {}
  for i = 2, 4 do
    prices[i - 1] = count(args[i], 1, MAX_BALANCE)
    if not prices[i - 1] then return refuse('invalid_price', 'a whole number 1..' .. MAX_BALANCE) end
  end
  return redis.call('HSET', k.plans, args[1], pack(prices))
end

-- An account's wallet for a change that is not a charge: its balance must exist (nil and
-- the refusal when not), and its wallet be the library's.
local function wallet_of(k, account)
  if not text(account, ACCOUNT, 64) then return nil, refuse('invalid_account') end
  local main = redis.call('HGET', k.balances, account)
  if not main then return nil, refuse('unknown_account', account) end
  main = stored_balance(main)
  if not main then return nil, refuse('corrupt_balance', account) end
  local w = parse_wallet(redis.call('HGET', k.wallets, account))
  if not w then return nil, refuse('corrupt_wallet', account) end
  return w, main
end

local function write_wallet(k, account, w)
  if blank(w) then redis.call('HDEL', k.wallets, account) else redis.call('HSET', k.wallets, account, pack_wallet(w)) end
end

--[[
assign_plan: put an account on a plan of its partition ('default': take it off its plan).
KEYS: balances, wallets, plans. ARGV: account, plan. Returns the plan.
]]
local function assign_plan(keys, args)
  local k = #keys == 3 and #args == 2 and partition_keys(keys, {'balances', 'wallets', 'plans'})
  if not k then return refuse('wrong_arguments', 'assign_plan takes the keys balances, wallets, plans and account, plan') end
  local plan = args[2]
  if not text(plan, PLAN, 64) then return refuse('invalid_plan', plan) end
  local w, err = wallet_of(k, args[1])
  if not w then return err end
  if plan ~= 'default' and redis.call('HEXISTS', k.plans, plan) == 0 then return refuse('unknown_plan', plan) end
  w.plan = plan == 'default' and '' or plan
  write_wallet(k, args[1], w)
  return plan
end

--[[
grant: give an account a credit lot. KEYS: balances, wallets, lot_expiries, results.
ARGV: account, lot id, kind (money or units), quantity (1..10^15), service ('' for money
of any service; required for units), expires_at (ms since the epoch, later than now) or
expires_in_ms (1..10 years), at most one of them ('' for a lot that never expires).
Idempotent by lot id while the account holds the lot: the same content again is a
duplicate, other content idempotency_conflict. The account's lots that have expired are
ended first, their breakage recorded (events on the results stream), as at a settling call. Returns {granted or duplicate, lot, left,
expires_at ('' never)}.
]]
local GRANT_ROLES = {'balances', 'wallets', 'lot_expiries', 'results'}

-- The expiry of a grant from now: expires_at and the spec a replay must match; nil and
-- the refusal when it is not one.
local function grant_expiry(at, within, now)
  if at ~= '' and within ~= '' then return nil, refuse('invalid_expiry', 'give expires_at or expires_in, not both') end
  if at ~= '' then
    local when = count(at, 0, MAX_TIME_MS)
    if not when then return nil, refuse('invalid_expiry', 'expires_at must be ms since the epoch') end
    return when, 'at:' .. digits(when)
  end
  if within ~= '' then
    local ms = duration_arg(within)
    if not ms then return nil, refuse('invalid_expiry', 'expires_in must be 1..' .. MAX_DURATION_MS .. ' ms') end
    return now + ms, 'in:' .. digits(ms)
  end
  return false, ''
end

local function grant(keys, args)
  local k = #keys == #GRANT_ROLES and #args == 7 and partition_keys(keys, GRANT_ROLES)
  if not k then
    return refuse('wrong_arguments', 'grant takes the keys ' .. table.concat(GRANT_ROLES, ', ')
                  .. ' and account, lot, kind, quantity, service, expires_at, expires_in_ms')
  end
  local account, id, kind, service = args[1], args[2], args[3], args[5]
  if not text(account, ACCOUNT, 64) then return refuse('invalid_account') end
  if not text(id, LOT_ID, 64) or id == 'main' then
    return refuse('invalid_lot', 'a lot id is 1..64 of A-Z a-z 0-9 _ . -, not main')
  end
  if not KINDS[kind] then return refuse('invalid_kind', 'money or units') end
  local qty = count(args[4], 1, MAX_BALANCE)
  if not qty then return refuse(kind == 'money' and 'invalid_amount' or 'invalid_units', '1..' .. MAX_BALANCE) end
  if service ~= '' and not SERVICES[service] then return refuse('unknown_service', service) end
  if kind == 'units' and service == '' then return refuse('missing_service', 'a lot of units is of one service') end
  local now = now_ms()
  local expires_at, spec = grant_expiry(args[6], args[7], now)
  if expires_at == nil then return spec end
  local w, main = wallet_of(k, account)
  if not w then return main end
  -- The account's lots that have expired go first, as at a settling call: a lot id granted
  -- again once its lot has expired is a new lot.
  local s = {account = account, wallet = w, balance = main, held = 0, charge = false, broken = false,
             gone_lots = false, wallet_changed = false}
  settle_lots(s, now)
  local lot = w.by_id[id]
  local reply
  if lot then
    if lot.kind ~= kind or lot.service ~= service or lot.granted ~= qty or lot.spec ~= spec then
      return refuse('idempotency_conflict', 'lot ' .. id .. ' was granted with other content')
    end
    reply = {'duplicate', id, lot.left, lot.expires_at or ''}
  else
    if expires_at and expires_at <= now then return refuse('invalid_expiry', 'expires_at must be later than now') end
    if #w.lots >= MAX_LOTS then return refuse('too_many_lots', 'an account holds at most ' .. MAX_LOTS) end
    if kind == 'money' and main + lot_money(w) + qty > MAX_BALANCE then
      return refuse('balance_too_large', 'an account holds at most ' .. MAX_BALANCE .. ' with its lots')
    end
    local index = #w.lots > 0 and w.lots[#w.lots].index + 1 or 1
    w.lots[#w.lots + 1] = {id = id, kind = kind, service = service, granted = qty, left = qty, held = 0,
                           expires_at = expires_at, spec = spec, index = index}
    reply = {'granted', id, qty, expires_at or ''}
  end
  local err = wrong_type(k.lot_expiries, 'zset')
  if err then return err end
  -- Then write: the breakage events first (the first XADD refuses the call, nothing written).
  err = post_events(k.results, breakage_events(s, digits(now)))
  if err then return err end
  if reply[1] == 'granted' or s.wallet_changed then write_wallet(k, account, w) end
  if s.gone_lots then redis.call('ZREM', k.lot_expiries, unpack(s.gone_lots)) end
  if reply[1] == 'granted' and expires_at then
    redis.call('ZADD', k.lot_expiries, digits(expires_at), account .. '/' .. id)
  end
  return reply
end

-- An XINFO reply (alternating names and values) as a table.
local function map_of(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
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
    local info = map_of(g)
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
  maxlen 0 (request streams): drop everything the named groups (every group when none is
  named) have acked. The workers name their own group: another group made on the stream
  (the worker role may XGROUP CREATE) must not keep every entry for good.
  maxlen > 0 (results streams): keep about maxlen entries; with group names, never
  drop an entry one of those groups has not read and acked (other groups are not
  protected), so the stream can stay longer than maxlen while a named group is behind.
Returns the number of entries removed.
]]
local function trim(keys, args)
  local stream, maxlen = keys[1], count(args[1], 0, MAX_BALANCE)
  if #keys ~= 1 or not maxlen then return refuse('wrong_arguments', 'trim takes one stream, maxlen, group names') end
  local names = {}
  for i = 2, #args do names[#names + 1] = args[i] end
  local kind = redis.call('TYPE', stream)['ok']
  if kind == 'none' then return 0 end
  if kind ~= 'stream' then return refuse('WRONGTYPE', stream .. ' holds a ' .. kind .. ', not a stream') end
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

--[[
repair: undo what a client allowed to XADD to a request stream can do to it that no ACL
rule can forbid (docs/security.md, "Threat model"). Maintenance only (the maintainer role).
Only the workers' group counts: another group on the stream (the worker role may XGROUP
CREATE) reads nothing that is charged, so it may neither hold a repair back nor have
losses recorded for it; the maintainer reports it (stray_group_found).
 - Entries removed before the workers' group read them (XADD with MAXLEN or MINID, XTRIM):
   the group never counted them as read, so its read counter stays behind by their number
   for good (a group that never read counts nothing: everything ever added is behind it).
   Found where the entries still unread are known without a scan; recorded as one dead
   letter, error entries_removed, naming the group and how many; then the group's read
   counter is set right, so each loss is recorded once. (A group made at 0 on a stream
   whose head was already trimmed would count that head: request streams get their one
   group before anything is trimmed.)
 - Ids pushed into the future (XADD with an explicit id far ahead; the last possible id
   refuses every later XADD): once the workers' group has read and acked every entry, the
   entries go and the stream's last id and every group's go back to the server's time, so
   XADD * works again. The worker dead-letters such entries (id_in_future) meanwhile.
KEYS: requests, deadletter, deadletter:reasons. ARGV: max_skew_ms (1000..10 years),
deadletter maxlen, the workers' group. Every key and argument is checked before anything
is written; the dead letter, the only write that can fail, goes first.
Returns {entries found removed, 1 if the stream was rewound else 0}.
]]
local REPAIR_ROLES = {'requests', 'deadletter', 'deadletter:reasons'}

-- How many entries the workers' group lost (removed before it read them), where that is
-- known without a scan: its read counter behind by more than the entries still unread.
local function entries_lost(s, group)
  local read_to, counted = group['last-delivered-id'], group['entries-read']
  local behind = counted and s['entries-added'] - counted or (read_to == '0-0' and s['entries-added'])
  local first = s['first-entry'] and s['first-entry'][1]
  -- The entries still in the stream that the group has not read: none once it has read up
  -- to the last id, all when all are past it.
  local unread = nil
  if read_to == s['last-generated-id'] then unread = 0
  elseif not first or stream_id_less(read_to, first) then unread = s['length'] end
  if unread and behind and behind > unread then return behind - unread, unread end
  return 0, unread
end

local function repair(keys, args)
  local k = #keys == 3 and #args == 3 and partition_keys(keys, REPAIR_ROLES)
  if not k then
    return refuse('wrong_arguments', 'repair takes the keys ' .. table.concat(REPAIR_ROLES, ', ') ..
                  ' and max_skew_ms, maxlen, group')
  end
  local max_skew, maxlen = count(args[1], 1000, MAX_DURATION_MS), count(args[2], 1, MAX_BALANCE)
  if not max_skew then return refuse('invalid_max_skew', '1000..' .. MAX_DURATION_MS) end
  if not maxlen then return refuse('invalid_maxlen') end
  if args[3] == '' then return refuse('invalid_group') end
  local err = wrong_types(k, DEAD_TYPES)
  if err then return err end
  local stream = k.requests
  if redis.call('TYPE', stream)['ok'] == 'none' then return {0, 0} end
  -- Everything is read first; what follows writes only what was checked here.
  local s = map_of(redis.call('XINFO', 'STREAM', stream))
  local last = s['last-generated-id']
  local groups, workers = {}, nil
  for i, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    groups[i] = map_of(g)
    if groups[i]['name'] == args[3] then workers = groups[i] end
  end
  if not workers then return {0, 0} end -- no worker has read this stream yet
  local removed, unread = entries_lost(s, workers)
  if removed > 0 then
    err = postable(k.deadletter)
    if err then return err end
    local lost = digits(removed)
    write_dead_letter(k, '', 'entries_removed',
      lost .. ' entries were removed from the stream before group ' .. args[3] ..
      ' read them (XADD with MAXLEN or MINID, or XTRIM, by a client); they were never charged',
      maxlen, {'group', args[3], 'removed', lost})
    redis.call('XGROUP', 'SETID', stream, args[3], workers['last-delivered-id'],
               'ENTRIESREAD', digits(s['entries-added'] - unread))
  end
  local settled, now = workers['pending'] == 0 and workers['last-delivered-id'] == last, now_ms()
  if not (settled and tonumber(string.match(last, '^%d+')) > now + max_skew) then return {removed, 0} end
  local id = digits(now) .. '-0'
  redis.call('XTRIM', stream, 'MAXLEN', 0)
  redis.call('XSETID', stream, id, 'MAXDELETEDID', id)
  for _, group in ipairs(groups) do
    redis.call('XGROUP', 'SETID', stream, group['name'], id, 'ENTRIESREAD', digits(s['entries-added']))
  end
  return {removed, 1}
end

redis.register_function('charge', function(keys, args) return settle('charge', keys, args) end)
redis.register_function('reserve', function(keys, args) return settle('reserve', keys, args) end)
redis.register_function('commit', function(keys, args) return settle('commit', keys, args) end)
redis.register_function('extend', function(keys, args) return settle('extend', keys, args) end)
redis.register_function('release', function(keys, args) return settle('release', keys, args) end)
redis.register_function('pump', pump)
redis.register_function('expire_reservations', expire_reservations)
redis.register_function('top_up', top_up)
redis.register_function('set_balances', set_balances)
redis.register_function('set_plan', set_plan)
redis.register_function('assign_plan', assign_plan)
redis.register_function('grant', grant)
redis.register_function('trim', trim)
redis.register_function('repair', repair)
