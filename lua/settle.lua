-- Settle: release a request's hold, debit its actual cost and append the debit to the partition's
-- outbox stream, atomically and exactly once.
-- KEYS[1] account hash   KEYS[2] the account's holds hash   KEYS[3] the partition's hold-expiry zset
-- KEYS[4] the request's settled marker   KEYS[5] the partition's outbox stream
-- ARGV[1] request id   ARGV[2] charge (micro-credits, integer string, >= 0)
-- ARGV[3] the settle's window end (ms since epoch: its first try + settled_marker_seconds, the same on
-- every retry)   ARGV[4] expiry member ("<account> <request id>")
-- ARGV[5] "1" to record a zero charge too (a cache hit)   ARGV[6] the outbox entry (JSON: request id,
-- account, charge and what the ledger row records)
-- Optional KEYS[6] a response-cache entry to store (same hash tag)   ARGV[7] its value   ARGV[8] its TTL (ms)
-- Returns {status, balance, released, charged}: 1 settled now, 0 settled before (the first charge is
-- returned and nothing moves), -1 no such account, -3 the window ended (nothing moves).
-- A hold that already expired (reaped) is simply absent: the charge is still debited, once.
-- Exactly once with a bounded memory: the settled marker expires at the window end (PXAT), and from
-- then on, by the server's clock, the script refuses this request id, so no retry can land after its
-- marker is gone. A cache hit (ARGV[5] "1", nothing charged) leaves no marker unless it released a hold:
-- it moved no money, and its ledger row is written once by request id.
-- Every argument is checked before the first write, so a refused call changes nothing; amounts reach
-- redis.call as the integer strings they arrived as (negated by prefixing '-'), never as Lua numbers.
local function whole(s, digits)
  return type(s) == 'string' and s:match('^%d+$') ~= nil and #s <= digits
end
-- a charge below 2^53 (16 digits at most, then compared exactly as a number below 2^53)
if not whole(ARGV[2], 16) or tonumber(ARGV[2]) > 9007199254740991 then
  return redis.error_reply('ERR settle: charge must be a non-negative integer below 2^53')
end
if not whole(ARGV[3], 15) or ARGV[3]:match('^0+$') then
  return redis.error_reply('ERR settle: window end must be a positive integer (ms since epoch)')
end
if KEYS[6] and (not whole(ARGV[8], 15) or ARGV[8]:match('^0+$')) then
  return redis.error_reply('ERR settle: cache entry TTL must be a positive integer (ms)')
end
local balance = redis.call('HGET', KEYS[1], 'balance')
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
if hold then
  redis.call('HDEL', KEYS[2], ARGV[1])
  if hold ~= '0' then
    redis.call('HINCRBY', KEYS[1], 'held', '-' .. hold)
  end
  redis.call('ZREM', KEYS[3], ARGV[4])
  released = tonumber(hold)
end
if ARGV[2] ~= '0' then
  balance = redis.call('HINCRBY', KEYS[1], 'balance', '-' .. ARGV[2])
end
if ARGV[2] ~= '0' or ARGV[5] == '1' then
  redis.call('XADD', KEYS[5], '*', 'd', ARGV[6])
end
if ARGV[5] ~= '1' or ARGV[2] ~= '0' or hold then
  redis.call('SET', KEYS[4], ARGV[2], 'PXAT', ARGV[3])
end
if KEYS[6] then
  redis.call('SET', KEYS[6], ARGV[7], 'PX', ARGV[8])
end
return {1, tonumber(balance), released, tonumber(ARGV[2])}
