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
-- returned and nothing moves), -1 no such account, -3 an argument is not a valid integer string
-- (nothing was written).
-- A hold that already expired (reaped) is simply absent: the charge is still debited, once.
-- Every argument is checked before the first write, and redis.call only ever gets strings read from
-- Redis or passed in (never a Lua arithmetic result: Redis 7.2.0-7.2.4 format 1e8 multiples as floats).
local function integer(s, digits)
  return type(s) == 'string' and string.match(s, '^[0-9]+$') ~= nil and #s <= digits
end
-- Charges below 10^15 (16 digits would allow 2^53 and above); TTLs as Redis takes them.
if not integer(ARGV[2], 15) or not integer(ARGV[3], 15) or ARGV[3] == '0'
    or (KEYS[6] and (not integer(ARGV[8], 15) or ARGV[8] == '0')) then
  return {-3, 0, 0, 0}
end
local balance = redis.call('HGET', KEYS[1], 'balance')
if not balance then
  return {-1, 0, 0, 0}
end
local previous = redis.call('GET', KEYS[4])
if previous then
  return {0, tonumber(balance), 0, tonumber(previous)}
end
local released = 0
local hold = redis.call('HGET', KEYS[2], ARGV[1])
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
