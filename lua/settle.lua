-- Settle: release a request's hold, debit its actual cost from the account's grants and append the debit
-- to the partition's outbox stream, atomically and exactly once.
-- include: wallet
-- KEYS[1] account hash   KEYS[2] the account's holds hash   KEYS[3] the partition's hold-expiry zset
-- KEYS[4] the request's settled marker   KEYS[5] the partition's outbox stream
-- KEYS[6] the account's grants hash   KEYS[7] the partition's wallet-due zset   KEYS[8] its caps hash
-- KEYS[9] its held-by-scope hash   KEYS[10] its hold-scopes hash   KEYS[11..13] its spend hashes (total,
-- this day, this month)
-- ARGV[1] request id   ARGV[2] charge (micro-credits, integer string, >= 0)
-- ARGV[3] the settle's window end (ms since epoch: its first try + settled_marker_seconds, the same on
-- every retry)   ARGV[4] expiry member ("<account> <request id>")
-- ARGV[5] "1" to record a zero charge too (a cache hit)   ARGV[6] the outbox entry (JSON: request id,
-- account, charge and what the ledger row records)
-- ARGV[7] a response-cache entry's value and ARGV[8] its TTL (ms), stored when KEYS[14] is given
-- ARGV[9] account id   ARGV[10] now (ms; the wallet's clock)   ARGV[11] idle expiry (ms; 0 off)
-- ARGV[12], ARGV[13] when the day's and the month's spend hashes may go (ms since epoch)
-- ARGV[14..] the request's cap scopes (counted in the spend hashes when the account has caps); with
-- KEYS[15], ARGV[14] and ARGV[15] are its entry and TTL, and the scopes are ARGV[16..]
-- Optional KEYS[14] a response-cache entry to store (same hash tag), unless it is KEYS[15] itself
-- Optional KEYS[15] the request's idempotency entry: ARGV[14] stored with the TTL ARGV[15] (ms) unless
-- another request's answer or claim is there, or with ARGV[14] "" this request's claim on it
-- (reserve.lua) released, so that a retry goes upstream again
-- Returns {status, balance, released, charged}: 1 settled now, 0 settled before (the first charge is
-- returned and nothing moves), -1 no such account, -3 the window ended (nothing moves).
-- A hold that already expired (reaped) is simply absent: the charge is still debited, once.
-- The whole charge is debited even when no hold or grant covers it: the balance may go below zero (an
-- overdraft past the hold; an account on invoice accruing its usage, admitted by reserve.lua against its
-- credit line), and what no grant covers only lowers the balance (the grants then sum to 0; the next
-- money in pays the debt back first: credit.lua).
-- The charge draws down the grants (wallet.lua: soonest ending, then priority, then oldest); the outbox
-- entry carries what it drew in a second field, g, and the balance after it in b (what alerts and
-- auto-reload read: signals/alerts.py; the balance before is b + the charge). Grants that ended by now
-- expire first, while this hold still counts as live (what the live holds need of them is kept:
-- wallet.lua); the charge then draws first on what an ended grant kept, and what the holds left no
-- longer need expires after the usage entry (the returned balance is after that).
-- Exactly once with a bounded memory: the settled marker expires at the window end (PXAT), and from
-- then on, by the server's clock, the script refuses this request id, so no retry can land after its
-- marker is gone. A cache hit (ARGV[5] "1", nothing charged) leaves no marker unless it released a hold:
-- it moved no money, and its ledger row is written once by request id.
-- Every argument is checked before the first write, so a refused call changes nothing; amounts reach
-- redis.call as the integer strings they arrived as (negated by prefixing '-'), or as w_int strings.
-- a charge below 2^53 (16 digits at most, then compared exactly as a number below 2^53)
if not w_whole(ARGV[2], 16) or tonumber(ARGV[2]) > 9007199254740991 then
  return redis.error_reply('ERR settle: charge must be a non-negative integer below 2^53')
end
if not w_whole(ARGV[3], 15) or ARGV[3]:match('^0+$') then
  return redis.error_reply('ERR settle: window end must be a positive integer (ms since epoch)')
end
local cache = KEYS[14] and KEYS[14] ~= KEYS[15]
if cache and (not w_whole(ARGV[8], 15) or ARGV[8]:match('^0+$')) then
  return redis.error_reply('ERR settle: cache entry TTL must be a positive integer (ms)')
end
local scoped = KEYS[15] and 16 or 14  -- the first cap scope
if KEYS[15] and ARGV[14] ~= '' and (not w_whole(ARGV[15], 15) or ARGV[15]:match('^0+$')) then
  return redis.error_reply('ERR settle: idempotency entry TTL must be a positive integer (ms)')
end
for i = 10, 13 do
  if not w_whole(ARGV[i], 15) then
    return redis.error_reply('ERR settle: now, the idle expiry and the spend expiries must be integers (ms)')
  end
end
local meta = redis.call('HMGET', KEYS[1], 'balance', 'due', 'idle', 'active_ms')
local balance = meta[1]
if not balance then
  return {-1, 0, 0, 0}
end
if not balance:match('^-?%d+$') then
  return redis.error_reply('ERR settle: the stored balance is not an integer')
end
local previous = redis.call('GET', KEYS[4])
if previous then
  return {0, tonumber(balance), 0, tonumber(previous)}
end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) >= tonumber(ARGV[3]) * 1000 then  -- in µs, exact below 2^53
  return {-3, tonumber(balance), 0, 0}
end
local released = 0
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if hold and not hold:match('^%d+$') then
  return redis.error_reply('ERR settle: the stored hold is not a non-negative integer')
end
local wall, idle_ms = tonumber(ARGV[10]), tonumber(ARGV[11])
local active = tonumber(meta[4] or ARGV[10])
local due = w_due(meta[2], meta[3], active, wall, idle_ms)
local grants = nil
if due or (ARGV[2] ~= '0' and redis.call('EXISTS', KEYS[6]) == 1) then
  grants = w_load(KEYS[6])  -- read and checked before the first write
end
if grants and due then  -- before the release: the hold was admitted against what ended
  w_expire(KEYS[1], KEYS[6], KEYS[5], ARGV[9], grants, wall, active, idle_ms)
end
if hold then
  redis.call('HDEL', KEYS[2], ARGV[1])
  if hold ~= '0' then
    redis.call('HINCRBY', KEYS[1], 'held', '-' .. hold)
    w_release_caps(KEYS[9], KEYS[10], ARGV[1], hold)
  end
  redis.call('ZREM', KEYS[3], ARGV[4])
  released = tonumber(hold)
end
local drawn = {}
if grants and ARGV[2] ~= '0' then
  active = wall
  drawn = w_draw(KEYS[6], grants, tonumber(ARGV[2]), active, idle_ms)
end
local after  -- the balance it leaves, as an integer string (the outbox entry's b)
if ARGV[2] ~= '0' then
  balance = redis.call('HINCRBY', KEYS[1], 'balance', '-' .. ARGV[2])
  after = w_int(balance)
else
  after = redis.call('HGET', KEYS[1], 'balance')
  balance = after
end
if #drawn > 0 then
  redis.call('XADD', KEYS[5], '*', 'd', ARGV[6], 'g', cjson.encode(drawn), 'b', after)
elseif ARGV[2] ~= '0' or ARGV[5] == '1' then
  redis.call('XADD', KEYS[5], '*', 'd', ARGV[6], 'b', after)
end
if grants then
  if due then  -- what an ended grant kept and the holds left no longer need
    w_expire(KEYS[1], KEYS[6], KEYS[5], ARGV[9], grants, wall, active, idle_ms)
    balance = redis.call('HGET', KEYS[1], 'balance')
  end
  w_meta(KEYS[1], KEYS[7], ARGV[9], grants, active, idle_ms)
end
if ARGV[5] ~= '1' or ARGV[2] ~= '0' or hold then
  redis.call('SET', KEYS[4], ARGV[2], 'PXAT', ARGV[3])
end
if ARGV[2] ~= '0' and #ARGV >= scoped and redis.call('EXISTS', KEYS[8]) == 1 then
  for i = scoped, #ARGV do
    redis.call('HINCRBY', KEYS[11], ARGV[i], ARGV[2])
    redis.call('HINCRBY', KEYS[12], ARGV[i], ARGV[2])
    redis.call('HINCRBY', KEYS[13], ARGV[i], ARGV[2])
  end
  redis.call('PEXPIREAT', KEYS[12], ARGV[12])
  redis.call('PEXPIREAT', KEYS[13], ARGV[13])
end
if cache then
  redis.call('SET', KEYS[14], ARGV[7], 'PX', ARGV[8])
end
if KEYS[15] then  -- the first answer stays: stored over nothing or this request's own claim only
  local current = redis.call('GET', KEYS[15])
  local mine = current == 'pending:' .. ARGV[1]
  if ARGV[14] ~= '' and (mine or not current) then
    redis.call('SET', KEYS[15], ARGV[14], 'PX', ARGV[15])
  elseif mine then
    redis.call('DEL', KEYS[15])
  end
end
return {1, tonumber(balance), released, tonumber(ARGV[2])}
