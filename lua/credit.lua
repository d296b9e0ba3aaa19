-- Credit: add credits to an account exactly once per idempotency key.
-- KEYS[1] account hash   KEYS[2] the idempotency marker   KEYS[3] the partition's ready marker
-- ARGV[1] amount (micro-credits, integer string; > 0 for money in)   ARGV[2] fingerprint ("<account> <amount>")
-- Returns {status, balance}: 1 credited now, 0 credited before with the same fingerprint,
-- -1 no such account, -2 the key was used before for a different account or amount,
-- -4 this partition was not rebuilt from the ledger yet (Redis was lost): nothing is credited, so the
-- rebuild, which sets balances to the ledger's figures, can never count a credit twice.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {-4, 0}
end
local balance = redis.call('HGET', KEYS[1], 'balance')
if not balance then
  return {-1, 0}
end
local previous = redis.call('GET', KEYS[2])
if previous then
  if previous == ARGV[2] then
    return {0, tonumber(balance)}
  end
  return {-2, tonumber(balance)}
end
balance = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return {1, balance}
