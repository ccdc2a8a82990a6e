"""The Lua scripts of the Redis backend: what must happen at once for the whole cluster
(Redis runs a script with nothing in between). ``TIME`` is Redis's clock, one for every
relay."""

# KEYS: the invite. ARGV: the prefix of the tenants' invite sets, the invite's digest (its
# member there). Returns {status, tenant_id, permissions, expires_at, uses_left}; an invite
# expired or used up leaves its tenant's set.
TAKE_INVITE = """
local invite = redis.call('HMGET', KEYS[1], 'tenant_id', 'permissions', 'expires_at', 'uses_left')
if not invite[1] then return {'unknown'} end
local now = redis.call('TIME')
if tonumber(invite[3]) <= tonumber(now[1]) + tonumber(now[2]) / 1000000 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[1] .. invite[1], ARGV[2])
  return {'expired'}
end
local left = redis.call('HINCRBY', KEYS[1], 'uses_left', -1)
if left <= 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[1] .. invite[1], ARGV[2])
end
return {'ok', invite[1], invite[2], invite[3], tostring(left)}
"""

# KEYS: the tenant's sessions. ARGV: member/session_id, limit, presence_ttl.
OPEN_SESSION = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
"""

# KEYS: the tenant's sessions. ARGV: presence_ttl, 'restore' or 'refresh', then the sessions
# this relay holds. A refresh touches only the entries there ('XX'): one a relay is closing
# meanwhile is not written again. A restore (Redis back after an outage) writes them all: a
# Redis restarted without its data lost them, and sessions opened meanwhile were never there.
REFRESH_SESSIONS = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
for i = 3, #ARGV do
  if ARGV[2] == 'restore' then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  else
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""

# KEYS: the tenant's mesh. ARGV: peer_id, this relay. The device, deleted if held here.
DROP_DEVICE = """
local device = redis.call('HGET', KEYS[1], ARGV[1])
if not device then return false end
local ok, decoded = pcall(cjson.decode, device)
if not ok or type(decoded) ~= 'table' or decoded.relay ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
return device
"""

# KEYS: the set of relay names. ARGV: the prefix of presence keys. Names and records of
# the live relays; names whose presence lapsed leave the set.
LIVE_RELAYS = """
local live = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('GET', ARGV[1] .. name)
  if record then
    table.insert(live, name)
    table.insert(live, record)
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return live
"""
