-- Billing mode: set an account hash's `credit` and `blocked` fields (read by reserve.lua) to what
-- Postgres' account_billing row says (documents/billing_modes.py writes the row first, then runs this).
-- Idempotent: the same arguments always leave the same fields, so it can run twice or be replayed.
-- KEYS[1] account hash
-- ARGV[1] credit: '' prepaid (the field removed), 'unlimited', or the credit limit in micro-credits (an
-- integer string below 2^53)   ARGV[2] blocked: '1' blocked, '0' not (the field removed)
-- Returns 1 written, -1 no such account (nothing written: this never creates an account hash).
local credit, blocked = ARGV[1], ARGV[2]
if not (credit == '' or credit == 'unlimited' or (credit:match('^%d+$') and #credit <= 15))
    or (blocked ~= '0' and blocked ~= '1') then
  return redis.error_reply('ERR billing_mode: credit must be "", "unlimited" or an integer; blocked 0 or 1')
end
if redis.call('HEXISTS', KEYS[1], 'balance') == 0 then
  return -1
end
if credit == '' then
  redis.call('HDEL', KEYS[1], 'credit')
else
  redis.call('HSET', KEYS[1], 'credit', credit)
end
if blocked == '1' then
  redis.call('HSET', KEYS[1], 'blocked', '1')
else
  redis.call('HDEL', KEYS[1], 'blocked')
end
return 1
