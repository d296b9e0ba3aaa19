-- Expire one hold whose lease ran out (the sidecar that took it died or hung).
-- include: wallet
-- KEYS[1] account hash   KEYS[2] the account's holds hash   KEYS[3] the partition's hold-expiry zset
-- KEYS[4] the account's held-by-scope hash   KEYS[5] its hold-scopes hash (spend caps)
-- ARGV[1] request id   ARGV[2] expiry member   ARGV[3] now (ms since epoch)
-- Returns the amount released (0 when the lease was renewed or the hold is already gone).
-- The hold is negated by prefixing '-' to the string read from Redis, never by Lua arithmetic.
local lease_end = redis.call('ZSCORE', KEYS[3], ARGV[2])
if not lease_end or tonumber(lease_end) > tonumber(ARGV[3]) then
  return 0
end
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if hold and not hold:match('^%d+$') then
  return redis.error_reply('ERR expire_hold: the stored hold is not a non-negative integer')
end
redis.call('ZREM', KEYS[3], ARGV[2])
if not hold then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
if hold ~= '0' then
  redis.call('HINCRBY', KEYS[1], 'held', '-' .. hold)
  w_release_caps(KEYS[4], KEYS[5], ARGV[1], hold)
end
return tonumber(hold)
