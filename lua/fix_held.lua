-- Fix held: set an account's `held` field to the sum of its holds hash (the reconciler's repair of a
-- held total that drifted), atomically against reserves and settles.
-- KEYS[1] account hash   KEYS[2] the account's holds hash
-- Returns {before, after}. The sum is built as a decimal string (holds are integers below 2^53, so the
-- Lua number sum is exact) and passed to HSET with string.format('%d'), never as a float.
local before = redis.call('HGET', KEYS[1], 'held')
if not redis.call('HGET', KEYS[1], 'balance') then
  return {-1, 0}
end
local total = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do
  total = total + tonumber(amount)
end
local text = string.format('%d', total)
redis.call('HSET', KEYS[1], 'held', text)
return {tonumber(before or '0'), total}
