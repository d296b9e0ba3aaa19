-- Debit: take credits back from an account because its money went back (a provider refund, a dispute,
-- an operator's refund of unused purchased credits), exactly once per debit id.
-- include: wallet
-- KEYS[1] account hash   KEYS[2] the debit's marker   KEYS[3] the partition's ready marker
-- KEYS[4] the account's grants hash   KEYS[5] the partition's wallet-due zset   KEYS[6] the partition's outbox
-- ARGV[1] debit id   ARGV[2] amount asked (micro-credits, integer string; > 0)   ARGV[3] account id
-- ARGV[4] the grant drawn first ('' none)   ARGV[5] '1': only from that grant
-- ARGV[6] idle expiry (ms; 0 off)   ARGV[7] now (ms)
-- What is taken: at most the amount asked, never more than the account has available (its balance less
-- what live holds hold, so the balance never goes below zero and every hold can still settle), and with
-- ARGV[5] '1' never more than is left of that grant. It is drawn from that grant first, then from the
-- others in draw-down order; what no grant covers (credits from before grants) only lowers the balance.
-- Grants that ended by now expire first. A debit is not activity. The taken part goes to the outbox
-- (field r, with the grants it drew in g) for the ledger's 'reversal' row; nothing goes when 0 is taken.
-- Returns {status, taken, balance}: 1 taken now, 0 taken before (taken: what that first call took),
-- -1 no such account, -4 this partition was not rebuilt from the ledger yet (nothing is taken).
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {-4, 0, 0}
end
local meta = redis.call('HMGET', KEYS[1], 'balance', 'held', 'active_ms')
if not meta[1] then
  return {-1, 0, 0}
end
local previous = redis.call('GET', KEYS[2])
if previous then
  return {0, tonumber(previous), tonumber(meta[1])}
end
if ARGV[1] == '' or not w_whole(ARGV[2], 16) or (ARGV[5] ~= '0' and ARGV[5] ~= '1')
    or (ARGV[5] == '1' and ARGV[4] == '') or not w_whole(ARGV[6], 15) or not w_whole(ARGV[7], 15) then
  return redis.error_reply('ERR debit: malformed arguments')
end
local wall, idle_ms = tonumber(ARGV[7]), tonumber(ARGV[6])
local active = tonumber(meta[3] or ARGV[7])
local grants = w_load(KEYS[4])
w_expire(KEYS[1], KEYS[4], KEYS[6], ARGV[3], grants, wall, active, idle_ms)
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
local take = balance - tonumber(meta[2] or '0')
local asked = tonumber(ARGV[2])
if take > asked then
  take = asked
end
if take < 0 then
  take = 0
end
local first
for _, g in ipairs(grants) do
  if g.id == ARGV[4] and not g.gone then
    first = g
  end
end
if ARGV[5] == '1' then
  local left = first and first.rem or 0
  if take > left then
    take = left
  end
end
local drawn = {}
if take > 0 then
  drawn = w_draw(KEYS[4], grants, take, active, idle_ms, ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'balance', '-' .. w_int(take))
  local entry = cjson.encode({account = ARGV[3], id = ARGV[1], amount = w_int(take), at = ARGV[7]})
  if #drawn > 0 then
    redis.call('XADD', KEYS[6], '*', 'r', entry, 'g', cjson.encode(drawn))
  else
    redis.call('XADD', KEYS[6], '*', 'r', entry)
  end
end
redis.call('SET', KEYS[2], w_int(take))
w_meta(KEYS[1], KEYS[5], ARGV[3], grants, active, idle_ms)
return {1, take, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
