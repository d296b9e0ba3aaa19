-- Expire an account's grants that ended by now (the wallet sweeper's script; reserve, settle and credit
-- do the same inline for the account they touch).
-- include: wallet
-- KEYS[1] account hash   KEYS[2] the account's grants hash   KEYS[3] the partition's wallet-due zset
-- KEYS[4] the partition's outbox
-- ARGV[1] account id   ARGV[2] now (ms)   ARGV[3] idle expiry (ms; 0 off)
-- Returns the micro-credits that expired now (0 the second time: an expired grant is gone, and what an
-- ended grant keeps for live holds stays until they no longer need it; wallet.lua).
if not w_whole(ARGV[2], 15) or not w_whole(ARGV[3], 15) then
  return redis.error_reply('ERR expire_grants: now and the idle expiry must be integers (ms)')
end
local meta = redis.call('HMGET', KEYS[1], 'balance', 'active_ms')
if not meta[1] then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
local wall, idle_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local active = tonumber(meta[2] or ARGV[2])
local grants = w_load(KEYS[2])
local before = tonumber(meta[1])
w_expire(KEYS[1], KEYS[2], KEYS[4], ARGV[1], grants, wall, active, idle_ms)
w_meta(KEYS[1], KEYS[3], ARGV[1], grants, active, idle_ms)
return before - tonumber(redis.call('HGET', KEYS[1], 'balance'))
