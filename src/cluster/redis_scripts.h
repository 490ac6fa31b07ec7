// SPDX-License-Identifier: MIT
// File: src/cluster/redis_scripts.h -- RedisNode's Lua scripts (see
// docs/cluster.md for the key schema). Every script gets ARGV[1] = the key
// prefix and ARGV[2] = the calling node's id. Each change checks the
// caller's lease first (fencing) and publishes what it changed on
// "<prefix>:ev" in the same script. Fields inside keys are joined with the
// byte 0x1F (ids never contain it). Every key but the reap locks belongs to
// one node (<prefix>:node:<id>:*) or is the lease table <prefix>:nodes, and
// expires two leases after its node's last renewal: a cluster whose every
// node was killed leaves nothing behind. Messages are length-prefixed
// fields ("<len>:<bytes>"...):
//   P publisher user online(1/0)
//   T publisher node user thread started(1/0) edge(1 = the cluster's
//     indicator started/ended with this change)
//   B publisher rooms... (count first) except... (count first) sender event payload
//   H node       (the heartbeat's probe of the subscription)
// The publisher is "" for what a reaper publishes: every node applies it.
#ifndef ROOMKEEPER_SRC_CLUSTER_REDIS_SCRIPTS_H_
#define ROOMKEEPER_SRC_CLUSTER_REDIS_SCRIPTS_H_

namespace roomkeeper::cluster::detail {

// nk(id, kind): a node's key. keep(k): a key just created takes the lease
// table's time to live (renew refreshes both). held(kind, probe, f, skip):
// whether a registered node other than `skip` holds f in its key `kind`.
#define RK_LUA_PRELUDE                                                          \
  "local ns, node = ARGV[1], ARGV[2]\n"                                         \
  "local SEP = '\\31'\n"                                                        \
  "local function now_ms() local t = redis.call('TIME')\n"                      \
  "  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end\n"    \
  "local function enc(...) local p = {}\n"                                      \
  "  for _, v in ipairs({...}) do p[#p + 1] = #v .. ':' .. v end\n"             \
  "  return table.concat(p) end\n"                                              \
  "local function pub(m) redis.call('PUBLISH', ns .. ':ev', m) end\n"           \
  "local function fenced() local e = redis.call('ZSCORE', ns .. ':nodes', node)\n" \
  "  return (not e) or tonumber(e) < now_ms() end\n"                            \
  "local function nk(id, kind) return ns .. ':node:' .. id .. ':' .. kind end\n" \
  "local function keep(k) if redis.call('PTTL', k) == -1 then\n"                \
  "  local t = redis.call('PTTL', ns .. ':nodes')\n"                            \
  "  if t > 0 then redis.call('PEXPIRE', k, t) end end end\n"                   \
  "local function held(kind, probe, f, skip)\n"                                 \
  "  for _, n in ipairs(redis.call('ZRANGE', ns .. ':nodes', 0, -1)) do\n"      \
  "    if n ~= skip and redis.call(probe, nk(n, kind), f) == 1 then\n"          \
  "      return true end end\n"                                                 \
  "  return false end\n"

// ARGV[3] session, ARGV[4] user, ARGV[5] 1 = up, 0 = down. Returns 1 when
// the user's first session in the cluster came up / the last one went.
inline constexpr const char* kSession = RK_LUA_PRELUDE R"(
if fenced() then return redis.error_reply('FENCED lease lost') end
local s, u = nk(node, 's'), nk(node, 'u')
local session, user = ARGV[3], ARGV[4]
if ARGV[5] == '1' then
  if redis.call('HSETNX', s, session, user) == 0 then return 0 end
  keep(s)
  if redis.call('HINCRBY', u, user, 1) ~= 1 then return 0 end
  keep(u)
else
  user = redis.call('HGET', s, session)
  if not user then return 0 end
  redis.call('HDEL', s, session)
  if redis.call('HINCRBY', u, user, -1) > 0 then return 0 end
  redis.call('HDEL', u, user)
end
if held('u', 'HEXISTS', user, node) then return 0 end
pub(enc('P', node, user, ARGV[5]))
return 1
)";

// ARGV[3] session, ARGV[4] room, ARGV[5] 1 = join, 0 = leave.
inline constexpr const char* kMember = RK_LUA_PRELUDE R"(
if fenced() then return redis.error_reply('FENCED lease lost') end
local m = nk(node, 'm')
if ARGV[5] == '1' then
  redis.call('ZADD', m, 0, ARGV[4] .. SEP .. ARGV[3])
  keep(m)
else
  redis.call('ZREM', m, ARGV[4] .. SEP .. ARGV[3])
end
return 1
)";

// ARGV[3] user, ARGV[4] thread, ARGV[5] 1 = started, 0 = ended.
inline constexpr const char* kTyping = RK_LUA_PRELUDE R"(
if fenced() then return redis.error_reply('FENCED lease lost') end
local t, e = nk(node, 't'), ARGV[3] .. SEP .. ARGV[4]
local edge = '0'
if ARGV[5] == '1' then
  if redis.call('SADD', t, e) == 1 then
    keep(t)
    if not held('t', 'SISMEMBER', e, node) then edge = '1' end
  end
elseif redis.call('SREM', t, e) == 1 and not held('t', 'SISMEMBER', e, node) then
  edge = '1'
end
pub(enc('T', node, node, ARGV[3], ARGV[4], ARGV[5], edge))
return 1
)";

// ARGV[3] lease ms. Registers (or re-registers) the node; returns TIME in
// ms. The lease table lives two leases past the longest-lived renewal.
#define RK_LUA_LEASE_TTL                                                        \
  "local life = 2 * tonumber(ARGV[3])\n"                                        \
  "if redis.call('PTTL', ns .. ':nodes') < life then\n"                         \
  "  redis.call('PEXPIRE', ns .. ':nodes', life) end\n"
inline constexpr const char* kRegister = RK_LUA_PRELUDE R"(
local t = now_ms()
redis.call('ZADD', ns .. ':nodes', t + tonumber(ARGV[3]), node)
)" RK_LUA_LEASE_TTL R"(
return t
)";

// ARGV[3] lease ms. Renews a lease that has not expired, and the life of
// the node's keys; FENCED otherwise.
inline constexpr const char* kRenew = RK_LUA_PRELUDE R"(
local t = now_ms()
local e = redis.call('ZSCORE', ns .. ':nodes', node)
if (not e) or tonumber(e) < t then return redis.error_reply('FENCED lease lost') end
redis.call('ZADD', ns .. ':nodes', 'XX', t + tonumber(ARGV[3]), node)
)" RK_LUA_LEASE_TTL R"(
for _, kind in ipairs({'s', 'u', 'm', 't'}) do redis.call('PEXPIRE', nk(node, kind), life) end
return t
)";
#undef RK_LUA_LEASE_TTL

// The nodes whose lease has expired.
inline constexpr const char* kDead = RK_LUA_PRELUDE R"(
return redis.call('ZRANGEBYSCORE', ns .. ':nodes', '-inf', '(' .. now_ms())
)";

// ARGV[3] dead node, ARGV[4] batch, ARGV[5] 1 = even if its lease is good
// (a node's own old id, or a clean stop). Removes up to a batch of the dead
// node's users and typing indicators, publishing each edge; then, when both
// are empty, its keys and its lease. Idempotent and resumable.
// Returns {done (1/0), users left with no session...}.
inline constexpr const char* kReap = RK_LUA_PRELUDE R"(
local dead, batch = ARGV[3], tonumber(ARGV[4])
local e = redis.call('ZSCORE', ns .. ':nodes', dead)
if ARGV[5] ~= '1' and e and tonumber(e) >= now_ms() then return {1} end
local out = {0}
local n = 0
local u, t = nk(dead, 'u'), nk(dead, 't')
for _, user in ipairs(redis.call('HRANDFIELD', u, batch)) do
  redis.call('HDEL', u, user)
  if not held('u', 'HEXISTS', user, dead) then
    pub(enc('P', '', user, '0'))
    out[#out + 1] = user
  end
  n = n + 1
end
if n < batch then
  for _, m in ipairs(redis.call('SRANDMEMBER', t, batch - n)) do
    local i = string.find(m, SEP, 1, true)
    redis.call('SREM', t, m)
    local edge = held('t', 'SISMEMBER', m, dead) and '0' or '1'
    pub(enc('T', '', dead, string.sub(m, 1, i - 1), string.sub(m, i + 1), '0', edge))
    n = n + 1
  end
end
if n < batch then
  redis.call('ZREM', ns .. ':nodes', dead)
  redis.call('UNLINK', nk(dead, 's'), nk(dead, 'm'), u, t, ns .. ':reap:' .. dead)
  out[1] = 1
end
return out
)";

// Every key of the namespace that no registered node accounts for: keys of
// unregistered nodes, keys that would never expire, unknown keys.
inline constexpr const char* kAudit = RK_LUA_PRELUDE R"(
local live = {}
for _, n in ipairs(redis.call('ZRANGE', ns .. ':nodes', 0, -1)) do live[n] = true end
local keys = redis.call('KEYS', ns .. ':*')
local out = {tostring(#keys)}
for _, k in ipairs(keys) do
  local rest = string.sub(k, #ns + 2)
  local forever = redis.call('PTTL', k) < 0
  if rest == 'nodes' or string.sub(rest, 1, 5) == 'reap:' then
    if forever then out[#out + 1] = k end
  elseif string.sub(rest, 1, 5) == 'node:' then
    local id = string.match(rest, '^node:(.*):[sumt]$')
    if forever or not id or not live[id] then out[#out + 1] = k end
  else
    out[#out + 1] = k
  end
end
return out
)";

// Keys of the namespace.
inline constexpr const char* kKeyCount = RK_LUA_PRELUDE R"(
return #redis.call('KEYS', ns .. ':*')
)";

// Queries (any node, no lease needed). ARGV[3] room: its members on every
// registered node, counted / listed.
#define RK_LUA_ROOM_RANGE                                                       \
  "local lo, hi = '[' .. ARGV[3] .. SEP, '(' .. ARGV[3] .. ' '\n"
inline constexpr const char* kRoomSize = RK_LUA_PRELUDE RK_LUA_ROOM_RANGE R"(
local n = 0
for _, id in ipairs(redis.call('ZRANGE', ns .. ':nodes', 0, -1)) do
  n = n + redis.call('ZLEXCOUNT', nk(id, 'm'), lo, hi)
end
return n
)";
inline constexpr const char* kRoomMembers = RK_LUA_PRELUDE RK_LUA_ROOM_RANGE R"(
local out, cut = {}, #ARGV[3] + 2
for _, id in ipairs(redis.call('ZRANGE', ns .. ':nodes', 0, -1)) do
  for _, m in ipairs(redis.call('ZRANGEBYLEX', nk(id, 'm'), lo, hi)) do
    out[#out + 1] = string.sub(m, cut)
  end
end
return out
)";
#undef RK_LUA_ROOM_RANGE

// ARGV[3] user: 1 if a registered node has a session of it.
inline constexpr const char* kOnline = RK_LUA_PRELUDE R"(
return held('u', 'HEXISTS', ARGV[3]) and 1 or 0
)";

// Who is online and who is typing, on every registered node: {users,
// {node, user␟thread, ...}} (a node mends its view with it after its
// subscription was down).
inline constexpr const char* kSnapshot = RK_LUA_PRELUDE R"(
local users, typing, seen = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGE', ns .. ':nodes', 0, -1)) do
  for _, u in ipairs(redis.call('HKEYS', nk(id, 'u'))) do
    if not seen[u] then seen[u] = true; users[#users + 1] = u end
  end
  for _, e in ipairs(redis.call('SMEMBERS', nk(id, 't'))) do
    typing[#typing + 1] = id
    typing[#typing + 1] = e
  end
end
return {users, typing}
)";

#undef RK_LUA_PRELUDE

}  // namespace roomkeeper::cluster::detail

#endif  // ROOMKEEPER_SRC_CLUSTER_REDIS_SCRIPTS_H_
