-- Reserve: hold the worst-case cost of one request, atomically and idempotently.
-- KEYS[1] account hash (fields: balance, held)   KEYS[2] the account's holds hash (request id -> amount)
-- KEYS[3] the partition's hold-expiry zset        KEYS[4] the request's settled marker
-- ARGV[1] request id   ARGV[2] amount (micro-credits, integer string)
-- ARGV[3] lease end (ms since epoch)   ARGV[4] expiry member ("<account> <request id>")
-- ARGV[5] the request's window end (ms since epoch): its start + settled_marker_seconds. A settled
-- marker lives only until its settle's window end, never before this one, so a reserve arriving later
-- (a lost try landing late) could no longer see it: it is refused, by the server's clock.
-- Optional KEYS[5] a response-cache entry (same hash tag): looked up first, in the same round trip.
-- A hold of 0 (free work) is always taken, even on an overdrawn account; a positive hold only when
-- the account's available credits (balance - held) cover it, so an account at or below zero gets
-- nothing but free work.
-- Returns {status, balance, held}: 1 held (also when this request id already holds),
-- 0 insufficient, -1 no such account, -2 this request id was already settled, -3 the window ended;
-- or {2, entry, ttl ms} when the cache entry exists: nothing is held (a hit is free).
-- All arithmetic is on integers below 2^53, exact in Lua's numbers; sums are done by HINCRBY.
if KEYS[5] then
  local entry = redis.call('GET', KEYS[5])
  if entry then
    return {2, entry, redis.call('PTTL', KEYS[5])}
  end
end
local balance = redis.call('HGET', KEYS[1], 'balance')
if not balance then
  return {-1, 0, 0}
end
balance = tonumber(balance)
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0')
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {-2, balance, held}
end
if type(ARGV[5]) ~= 'string' or not ARGV[5]:match('^%d+$') or #ARGV[5] > 15 then
  return redis.error_reply('ERR reserve: window end must be a positive integer (ms since epoch)')
end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) >= tonumber(ARGV[5]) * 1000 then  -- in µs, exact below 2^53
  return {-3, balance, held}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {1, balance, held}
end
local amount = tonumber(ARGV[2])
if amount > 0 and balance - held < amount then
  return {0, balance, held}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
held = redis.call('HINCRBY', KEYS[1], 'held', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return {1, balance, held}
