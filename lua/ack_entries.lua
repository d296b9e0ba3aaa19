-- Acknowledge and delete outbox entries the flusher has committed to the ledger, in one call per stream
-- (so the client sends one argument per batch, not two encoded arguments per entry).
-- KEYS[1] the partition's outbox stream
-- ARGV[1] the consumer group   ARGV[2] the entry ids, separated by single spaces
-- Returns the number of entries deleted. Safe to run twice: acknowledging or deleting an entry that is
-- already gone does nothing.
local ids = {}
for id in string.gmatch(ARGV[2], '%S+') do
  ids[#ids + 1] = id
end
local deleted = 0
local chunk = 500 -- unpack() puts every argument on Lua's C stack, which holds a few thousand
for first = 1, #ids, chunk do
  local last = first + chunk - 1
  if last > #ids then
    last = #ids
  end
  local part = {unpack(ids, first, last)}
  redis.call('XACK', KEYS[1], ARGV[1], unpack(part))
  deleted = deleted + redis.call('XDEL', KEYS[1], unpack(part))
end
return deleted
