-- Credit: add a grant to an account exactly once per idempotency key.
-- include: wallet
-- KEYS[1] account hash   KEYS[2] the idempotency marker   KEYS[3] the partition's ready marker
-- KEYS[4] the account's grants hash   KEYS[5] the partition's wallet-due zset   KEYS[6] the partition's outbox
-- ARGV[1] amount (micro-credits, integer string; > 0)   ARGV[2] fingerprint ("<account> <amount>")
-- ARGV[3] account id   ARGV[4] grant id   ARGV[5] its fixed end (ms; "0" never)
-- ARGV[6] priority (integer; lower is drawn first)   ARGV[7] its order (ms: when it took effect)
-- ARGV[8] "1" if it expires after the account is idle ARGV[10] ms   ARGV[9] its kind   ARGV[11] now (ms)
-- The grant's remainder is its amount less what pays back a negative balance (the debt is what the
-- balance falls short of the remainders); that part goes to the outbox as a payoff entry (field p),
-- so the ledger knows what each grant gave. Grants that ended by now expire first (what live holds need
-- of them is kept: wallet.lua); a grant whose own end has passed expires at once, all of it. A credit
-- counts as activity.
-- Returns {status, balance}: 1 credited now, 0 credited before with the same fingerprint,
-- -1 no such account, -2 the key was used before for a different account or amount,
-- -4 this partition was not rebuilt from the ledger yet (Redis was lost): nothing is credited, so the
-- rebuild, which sets balances to the ledger's figures, can never count a credit twice.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {-4, 0}
end
local meta = redis.call('HMGET', KEYS[1], 'balance', 'due', 'idle', 'active_ms')
if not meta[1] then
  return {-1, 0}
end
local previous = redis.call('GET', KEYS[2])
if previous then
  if previous == ARGV[2] then
    return {0, tonumber(meta[1])}
  end
  return {-2, tonumber(meta[1])}
end
if not w_whole(ARGV[1], 16) or not w_whole(ARGV[5], 15) or not w_whole(ARGV[7], 15)
    or not w_whole(ARGV[10], 15) or not w_whole(ARGV[11], 15)
    or not (type(ARGV[6]) == 'string' and ARGV[6]:match('^%-?%d+$') and #ARGV[6] <= 10)
    or (ARGV[8] ~= '0' and ARGV[8] ~= '1') or not ARGV[9]:match('^%a+$')
    or ARGV[4] == '' then
  return redis.error_reply('ERR credit: malformed grant arguments')
end
local wall, idle_ms = tonumber(ARGV[11]), tonumber(ARGV[10])
local active = tonumber(meta[4] or ARGV[11])
local grants = w_load(KEYS[4])
w_expire(KEYS[1], KEYS[4], KEYS[6], ARGV[3], grants, wall, active, idle_ms)
local sum = 0
for _, g in ipairs(grants) do
  if not g.gone then
    sum = sum + g.rem
  end
end
local before = tonumber(redis.call('HGET', KEYS[1], 'balance'))
local amount = tonumber(ARGV[1])
local payoff = 0  -- what pays back the debt: the balance's shortfall below the remainders, at most amount
if sum > before then
  payoff = sum - before
end
if payoff > amount then
  payoff = amount
end
redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
if payoff > 0 then
  redis.call('XADD', KEYS[6], '*', 'p',
    cjson.encode({account = ARGV[3], grant = ARGV[4], amount = w_int(payoff), at = ARGV[11]}))
end
local g = {id = ARGV[4], rem = amount - payoff, exp = tonumber(ARGV[5]), pri = tonumber(ARGV[6]),
  ord = tonumber(ARGV[7]), idle = ARGV[8], kind = ARGV[9], ended = 0}
if g.rem > 0 then
  redis.call('HSET', KEYS[4], g.id, w_format(g))
  grants[#grants + 1] = g
end
active = wall
w_expire(KEYS[1], KEYS[4], KEYS[6], ARGV[3], {g}, wall, active, idle_ms, true)  -- no hold needs it
w_meta(KEYS[1], KEYS[5], ARGV[3], grants, active, idle_ms)
return {1, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
