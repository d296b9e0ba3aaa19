-- Settle: release a request's hold, debit its actual cost and append the debit to the partition's
-- outbox stream, atomically and exactly once.
-- KEYS[1] account hash   KEYS[2] the account's holds hash   KEYS[3] the partition's hold-expiry zset
-- KEYS[4] the request's settled marker   KEYS[5] the partition's outbox stream
-- ARGV[1] request id   ARGV[2] charge (micro-credits, integer string, >= 0)
-- ARGV[3] settled-marker lifetime (ms)   ARGV[4] expiry member ("<account> <request id>")
-- ARGV[5] "1" to record a zero charge too   ARGV[6] the outbox entry (JSON: request id, account,
-- charge and what the ledger row records)
-- Optional KEYS[6] a response-cache entry to store (same hash tag)   ARGV[7] its value   ARGV[8] its TTL (ms)
-- Returns {status, balance, released, charged}: 1 settled now, 0 settled before (the first charge is
-- returned and nothing moves), -1 no such account.
-- A hold that already expired (reaped) is simply absent: the charge is still debited, once.
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
  return redis.error_reply('ERR settle: settled-marker lifetime must be a positive integer (ms)')
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
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
if KEYS[6] then
  redis.call('SET', KEYS[6], ARGV[7], 'PX', ARGV[8])
end
return {1, tonumber(balance), released, tonumber(ARGV[2])}
