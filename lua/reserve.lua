-- Reserve: hold the worst-case cost of one request, atomically and idempotently, within the account's
-- balance (plus its credit line, on invoice) and its spend caps.
-- include: wallet
-- KEYS[1] account hash (fields: balance, held; the wallet's due, idle, active_ms; the billing mode's
-- credit and blocked: documents/billing_modes.py)
-- KEYS[2] the account's holds hash (request id -> amount)
-- KEYS[3] the partition's hold-expiry zset        KEYS[4] the request's settled marker
-- KEYS[5] the account's grants hash   KEYS[6] the partition's wallet-due zset   KEYS[7] the partition's outbox
-- KEYS[8] the account's caps hash   KEYS[9] its held-by-scope hash   KEYS[10] its hold-scopes hash
-- KEYS[11..13] its spend hashes of the periods total, this day, this month (in the time zone ARGV[9])
-- ARGV[1] request id   ARGV[2] amount (micro-credits, integer string)
-- ARGV[3] lease end (ms since epoch)   ARGV[4] expiry member ("<account> <request id>")
-- ARGV[5] the request's window end (ms since epoch): its start + settled_marker_seconds. A settled
-- marker lives only until its settle's window end, never before this one, so a reserve arriving later
-- (a lost try landing late) could no longer see it: it is refused, by the server's clock.
-- ARGV[6] account id   ARGV[7] now (ms; the wallet's clock: grant expiry)   ARGV[8] idle expiry (ms; 0 off)
-- ARGV[9] the time zone the day and month spend keys were named in ("" = UTC)
-- ARGV[10..] the request's cap scopes ("account", "key:<id>", "model:<name>", "user:<end user>")
-- Optional KEYS[14] a response-cache entry (same hash tag): looked up first, in the same round trip.
-- Optional KEYS[15] the request's idempotency entry (same hash tag; KEYS[14] is then the same key when
-- there is no cache entry to look up): looked up before the cache entry. When it is absent and the hold
-- is taken, it is claimed for this request ("pending:<request id>") until the lease end (ARGV[3]); a
-- claim of another request id is {-7, 0, 0, that request id} (in progress: nothing is held).
-- A hold of 0 (free work) is always taken, even on an overdrawn account; a positive hold only when
-- the account is not blocked (field blocked "1": an overdue invoice), its available credits cover it
-- and no spend cap would be overshot (what is settled in the cap's period plus what live holds hold in
-- its scope, plus this hold). Available: balance - held + credit, where the field credit is absent on a
-- prepaid account (0: an account at or below zero gets nothing but free work), the credit limit (an
-- integer string, micro-credits) of an account on invoice, or "unlimited" (always covered; caps still
-- apply). Grants that ended by now expire first (see wallet.lua).
-- Returns {status, balance, held}: 1 held (also when this request id already holds),
-- {0, balance, held, credit ("0" prepaid)} insufficient, -1 no such account, -2 this request id was
-- already settled, -3 the window ended, -8 blocked (an overdue invoice: no positive hold);
-- {-5, balance, held, scope, period, limit, used} a spend cap would be overshot;
-- {-6, balance, held, time zone} the account's caps follow another time zone: call again with its keys;
-- or {2, entry, ttl ms, 14 or 15 (whose entry), balance} when an entry exists: nothing is held (a hit
-- and a replay are free).
-- All arithmetic is on integers below 2^53, exact in Lua's numbers; sums are done by HINCRBY.
local claim = KEYS[15] and ('pending:' .. ARGV[1])
for i = #KEYS, 14, -1 do
  local entry = (i == 15 or KEYS[i] ~= KEYS[15]) and redis.call('GET', KEYS[i])
  if entry and entry ~= claim then
    if i == 15 and entry:sub(1, 8) == 'pending:' then
      return {-7, 0, 0, entry:sub(9)}
    end
    return {2, entry, redis.call('PTTL', KEYS[i]), i, redis.call('HGET', KEYS[1], 'balance') or '0'}
  end
end
local meta = redis.call('HMGET', KEYS[1], 'balance', 'held', 'due', 'idle', 'active_ms', 'credit', 'blocked')
if not meta[1] then
  return {-1, 0, 0}
end
local balance = tonumber(meta[1])
local held = tonumber(meta[2] or '0')
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {-2, balance, held}
end
if not w_whole(ARGV[5], 15) then
  return redis.error_reply('ERR reserve: window end must be a positive integer (ms since epoch)')
end
if not w_whole(ARGV[7], 15) or not w_whole(ARGV[8], 15) then
  return redis.error_reply('ERR reserve: now and the idle expiry must be non-negative integers (ms)')
end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) >= tonumber(ARGV[5]) * 1000 then  -- in µs, exact below 2^53
  return {-3, balance, held}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {1, balance, held}
end
local amount = tonumber(ARGV[2])
local scopes = {}
for i = 10, #ARGV do
  scopes[#scopes + 1] = ARGV[i]
end
local capped = #scopes > 0 and redis.call('EXISTS', KEYS[8]) == 1
if capped then
  local tz = redis.call('HGET', KEYS[8], 'tz') or ''
  if tz ~= ARGV[9] then
    return {-6, balance, held, tz}
  end
end
local wall, idle_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
local active = tonumber(meta[5] or ARGV[7])
if w_due(meta[3], meta[4], active, wall, idle_ms) then
  local grants = w_load(KEYS[5])
  w_expire(KEYS[1], KEYS[5], KEYS[7], ARGV[6], grants, wall, active, idle_ms)
  w_meta(KEYS[1], KEYS[6], ARGV[6], grants, active, idle_ms)
  balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
end
if amount > 0 and meta[7] == '1' then
  return {-8, balance, held}
end
local credit = meta[6] or '0'
if amount > 0 and credit ~= 'unlimited' and balance - held + tonumber(credit) < amount then
  return {0, balance, held, credit}
end
if capped and amount > 0 then
  local over = w_cap_refusal(KEYS[8], KEYS[9], {KEYS[11], KEYS[12], KEYS[13]}, scopes, amount)
  if over then
    return {-5, balance, held, over[1], over[2], over[3], over[4]}
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
held = redis.call('HINCRBY', KEYS[1], 'held', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
if capped and amount > 0 then
  for _, s in ipairs(scopes) do
    redis.call('HINCRBY', KEYS[9], s, ARGV[2])
  end
  redis.call('HSET', KEYS[10], ARGV[1], table.concat(scopes, '\n'))
end
if claim then
  redis.call('SET', KEYS[15], claim, 'PXAT', ARGV[3])
end
return {1, balance, held}
