-- Repair balance: move an account's Redis balance by a delta the reconciler computed, once per repair
-- id and only while the balance is still the one the delta was computed from (compare and set).
-- KEYS[1] account hash   KEYS[2] the repair's marker   KEYS[3] the partition's ready marker
-- ARGV[1] the balance the repair was computed from (integer string)   ARGV[2] delta (integer string)
-- ARGV[3] fingerprint ("<account> <delta>")
-- Returns {status, balance}: 1 moved now, 0 this repair was applied before (a retried call),
-- -1 no such account, -2 the repair id was used for another delta, -3 the balance moved since the
-- snapshot (a settle, a grant or another repair came first): nothing is moved, the next pass decides,
-- -4 this partition was not rebuilt from the ledger yet.
-- Two reconcilers repairing at once, or one repair sent twice, therefore move the balance once.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {-4, 0}
end
local balance = redis.call('HGET', KEYS[1], 'balance')
if not balance then
  return {-1, 0}
end
local previous = redis.call('GET', KEYS[2])
if previous then
  if previous == ARGV[3] then
    return {0, tonumber(balance)}
  end
  return {-2, tonumber(balance)}
end
if balance ~= ARGV[1] then
  return {-3, tonumber(balance)}
end
balance = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
return {1, balance}
