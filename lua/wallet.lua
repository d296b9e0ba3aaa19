-- The wallet's shared functions, spliced into the scripts that say "-- include: wallet" (balances.load_lua).
-- An account's credits are grants: its grants hash maps a grant id to
--   "remaining expires_ms priority order_ms idle kind" or "... kind ended_ms"
-- (expires_ms 0: a fixed date never comes; idle 1: it also expires once the account was idle idle_ms;
-- ended_ms: the grant ended then, and what is left of it is kept only for the live holds: w_expire).
-- Invariant: the remainders sum to max(balance, 0) for an account whose credits all came as grants; an
-- older account's credits from before grants are the balance no grant covers, drawn after every grant.
-- Numbers: every amount and time is an integer below 2^53, exact in Lua's doubles; w_int formats one as an
-- integer string for redis.call (never "1e+15"), and amounts leave for the ledger as those strings.
local function w_int(x)
  return string.format('%d', x)
end

local function w_whole(s, digits)
  return type(s) == 'string' and s:match('^%d+$') ~= nil and #s <= digits
end

local function w_parse(id, v)
  local r, e, p, o, i, k, n = v:match('^(%d+) (%d+) (%-?%d+) (%d+) ([01]) (%S+) (%d+)$')
  if not r then
    r, e, p, o, i, k = v:match('^(%d+) (%d+) (%-?%d+) (%d+) ([01]) (%S+)$')
    n = '0'
  end
  if not r then
    error('wallet: grant ' .. id .. ' is stored malformed')
  end
  return {id = id, rem = tonumber(r), exp = tonumber(e), pri = tonumber(p), ord = tonumber(o), idle = i, kind = k,
    ended = tonumber(n)}
end

local function w_format(g)
  local v = w_int(g.rem) .. ' ' .. w_int(g.exp) .. ' ' .. w_int(g.pri) .. ' ' .. w_int(g.ord) .. ' ' .. g.idle .. ' ' .. g.kind
  if g.ended > 0 then
    v = v .. ' ' .. w_int(g.ended)
  end
  return v
end

-- Read (and check) every grant; scripts call it before their first write, so a malformed grant refuses
-- the whole call.
local function w_load(gkey)
  local flat = redis.call('HGETALL', gkey)
  local list = {}
  for i = 1, #flat, 2 do
    list[#list + 1] = w_parse(flat[i], flat[i + 1])
  end
  return list
end

-- When a grant stops counting: its fixed date, or idle_ms after the account's last activity (if idle);
-- once it ended (ended_ms), that instant, which later activity no longer moves.
local function w_ends(g, active, idle_ms)
  if g.ended > 0 then
    return g.ended
  end
  local e = g.exp
  if g.idle == '1' and idle_ms > 0 then
    local t = active + idle_ms
    if e == 0 or t < e then
      e = t
    end
  end
  return e
end

-- Whether some grant may have ended by `now`, from the account hash's summary fields (no grant read).
local function w_due(meta_due, meta_idle, active, now, idle_ms)
  local due = tonumber(meta_due or '0') or 0
  if due > 0 and due <= now then
    return true
  end
  return meta_idle == '1' and idle_ms > 0 and active + idle_ms <= now
end

-- Expire the grants that ended by `now`. A live hold keeps the credits it was admitted against: of the
-- ended grants' remainders only the spare part leaves the balance now, the part that keeps
-- balance - held + the credit line (absent: 0; "unlimited": everything is spare) at 0 or above, taken
-- from the ended grants soonest ended first (then priority, order, id). An ended grant keeps the rest,
-- marked ended (ended_ms: its end); it is drawn first by the settles, no new hold can take it (nothing
-- is available while it is kept), and each later call expires what the holds no longer need. With
-- `whole` every ended grant expires entirely (a grant that arrived after its end: no hold needs it).
-- Each part goes to the outbox as an expiry entry (x): dated at the grant's end when it is the first,
-- else now; a part that leaves something kept names it ("left"), which gives the part its own ledger id
-- (the remainder only ever shrinks, so no two parts of a grant leave the same). A kept part that no
-- hold releases moves nothing: the call can run twice. Returns the grants list (ended ones marked gone).
local function w_expire(akey, gkey, okey, account, list, now, active, idle_ms, whole)
  local ended = {}
  for _, g in ipairs(list) do
    if not g.gone then
      local ends = w_ends(g, active, idle_ms)
      if ends > 0 and ends <= now then
        g.sortend = ends
        ended[#ended + 1] = g
      end
    end
  end
  if #ended == 0 then
    return list
  end
  table.sort(ended, function(a, b)
    if a.sortend ~= b.sortend then return a.sortend < b.sortend end
    if a.pri ~= b.pri then return a.pri < b.pri end
    if a.ord ~= b.ord then return a.ord < b.ord end
    return a.id < b.id
  end)
  local spare = nil  -- nil: no limit
  local m = redis.call('HMGET', akey, 'balance', 'held', 'credit')
  if not whole and m[3] ~= 'unlimited' then
    spare = tonumber(m[1]) - tonumber(m[2] or '0') + tonumber(m[3] or '0')
    if spare < 0 then
      spare = 0
    end
  end
  for _, g in ipairs(ended) do
    local part = g.rem
    if spare and part > spare then
      part = spare
    end
    if spare then
      spare = spare - part
    end
    local at = g.sortend
    if g.ended > 0 then
      at = now
    end
    if part > 0 then
      g.rem = g.rem - part
      redis.call('HINCRBY', akey, 'balance', '-' .. w_int(part))
      local entry = {account = account, grant = g.id, amount = w_int(part), at = w_int(at)}
      if g.rem > 0 then
        entry.left = w_int(g.rem)
      end
      redis.call('XADD', okey, '*', 'x', cjson.encode(entry))
    end
    if g.rem == 0 then
      redis.call('HDEL', gkey, g.id)
      g.gone = true
    elseif part > 0 or g.ended == 0 then
      g.ended = g.sortend
      redis.call('HSET', gkey, g.id, w_format(g))
    end
  end
  return list
end

-- Take `charge` from the live grants: soonest ending first, then lower priority number, then oldest, then
-- by id (the grant `first`, when given, before all). Returns what was drawn, {{grant id, amount string},
-- ...}; what no grant covers only lowers the balance (the caller's HINCRBY).
local function w_draw(gkey, list, charge, active, idle_ms, first)
  local live = {}
  for _, g in ipairs(list) do
    if not g.gone and g.rem > 0 then
      g.sortend = w_ends(g, active, idle_ms)  -- 0: never, which sorts last
      live[#live + 1] = g
    end
  end
  table.sort(live, function(a, b)
    if first and (a.id == first) ~= (b.id == first) then
      return a.id == first
    end
    if a.sortend ~= b.sortend then
      if a.sortend == 0 or b.sortend == 0 then return b.sortend == 0 end
      return a.sortend < b.sortend
    end
    if a.pri ~= b.pri then return a.pri < b.pri end
    if a.ord ~= b.ord then return a.ord < b.ord end
    return a.id < b.id
  end)
  local left, drawn = charge, {}
  for _, g in ipairs(live) do
    if left <= 0 then
      break
    end
    local take = g.rem
    if take > left then
      take = left
    end
    g.rem = g.rem - take
    left = left - take
    drawn[#drawn + 1] = {g.id, w_int(take)}
    if g.rem == 0 then
      redis.call('HDEL', gkey, g.id)
      g.gone = true
    else
      redis.call('HSET', gkey, g.id, w_format(g))
    end
  end
  return drawn
end

-- Write the account's summary fields (the next fixed end, or the end of an ended grant still kept: due
-- at once; whether an idle-expiring grant is left; the last activity) and its place in the partition's
-- wallet-due zset, from the grants list.
local function w_meta(akey, dkey, account, list, active, idle_ms)
  local due, idle = 0, '0'
  for _, g in ipairs(list) do
    if not g.gone and g.rem > 0 then
      local e = g.exp
      if g.ended > 0 then  -- ended, kept for live holds: due now, until they no longer need it
        e = g.ended
      end
      if e > 0 and (due == 0 or e < due) then
        due = e
      end
      if g.idle == '1' and g.ended == 0 then
        idle = '1'
      end
    end
  end
  redis.call('HSET', akey, 'due', w_int(due), 'idle', idle, 'active_ms', w_int(active))
  local next = due
  if idle == '1' and idle_ms > 0 and (next == 0 or active + idle_ms < next) then
    next = active + idle_ms
  end
  if next == 0 then
    redis.call('ZREM', dkey, account)
  else
    redis.call('ZADD', dkey, w_int(next), account)
  end
end

-- Spend caps. `scopes` are the request's ("account", "key:<id>", "model:<name>", "user:<end user>");
-- a user scope without a cap of its own for a period takes the "user:*" cap of that period.
local W_PERIODS = {'total', 'day', 'month'}

-- The first cap this amount would overshoot, counting what is settled in each period and what live holds
-- hold in the scope: {scope, period, limit, used} or nil. spend_keys: total, day, month.
local function w_cap_refusal(ckey, hkey, spend_keys, scopes, amount)
  local fields = {}
  for _, s in ipairs(scopes) do
    for _, p in ipairs(W_PERIODS) do
      fields[#fields + 1] = s .. '|' .. p
      if s:sub(1, 5) == 'user:' then
        fields[#fields + 1] = 'user:*|' .. p
      end
    end
  end
  local limits = redis.call('HMGET', ckey, unpack(fields))
  local held = redis.call('HMGET', hkey, unpack(scopes))
  local spent = {}
  for i, key in ipairs(spend_keys) do
    spent[i] = redis.call('HMGET', key, unpack(scopes))
  end
  local f = 0
  for si, s in ipairs(scopes) do
    for pi, p in ipairs(W_PERIODS) do
      f = f + 1
      local limit, named = limits[f], s
      if s:sub(1, 5) == 'user:' then
        f = f + 1
        if not limit then
          limit, named = limits[f], 'user:*'
        end
      end
      if limit then
        local used = tonumber(spent[pi][si] or '0') + tonumber(held[si] or '0')
        if used + amount > tonumber(limit) then
          return {named, p, limit, w_int(used)}
        end
      end
    end
  end
  return nil
end

-- Give back what a released hold (`hold`, an integer string) held in each scope it counted in.
local function w_release_caps(hkey, skey, request_id, hold)
  local scoped = redis.call('HGET', skey, request_id)
  if scoped then
    for s in scoped:gmatch('[^\n]+') do
      redis.call('HINCRBY', hkey, s, '-' .. hold)
    end
    redis.call('HDEL', skey, request_id)
  end
end
