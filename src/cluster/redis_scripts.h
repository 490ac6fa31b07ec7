// SPDX-License-Identifier: MIT
// File: src/cluster/redis_scripts.h -- RedisNode's Lua scripts (see
// docs/cluster.md for the key schema). Every script gets ARGV[1] = the key
// prefix and ARGV[2] = the calling node's id. Each change checks the
// caller's lease first (fencing) and publishes what it changed on
// "<prefix>:ev" in the same script. Fields inside keys are joined with the
// byte 0x1F. Messages are length-prefixed fields ("<len>:<bytes>"...):
//   P publisher user online(1/0)
//   T publisher node user thread started(1/0) edge(1 = the cluster's
//     indicator started/ended with this change)
//   B publisher rooms... (count first) except... (count first) sender event payload
//   H node       (the heartbeat's probe of the subscription)
// The publisher is "" for what a reaper publishes: every node applies it.
#ifndef ROOMKEEPER_SRC_CLUSTER_REDIS_SCRIPTS_H_
#define ROOMKEEPER_SRC_CLUSTER_REDIS_SCRIPTS_H_

namespace roomkeeper::cluster::detail {

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
  "  return (not e) or tonumber(e) < now_ms() end\n"

// ARGV[3] session, ARGV[4] user, ARGV[5] 1 = up, 0 = down. Returns 1 when
// the user's first session in the cluster came up / the last one went.
inline constexpr const char* kSession = RK_LUA_PRELUDE R"(
if fenced() then return redis.error_reply('FENCED lease lost') end
local up = ARGV[5] == '1'
local s, k, f = ns .. ':node:' .. node .. ':s', ns .. ':u:' .. ARGV[4], node .. SEP .. ARGV[3]
local edge
if up then
  redis.call('SADD', s, ARGV[3] .. SEP .. ARGV[4])
  edge = redis.call('HSET', k, f, '1') == 1 and redis.call('HLEN', k) == 1
else
  redis.call('SREM', s, ARGV[3] .. SEP .. ARGV[4])
  edge = redis.call('HDEL', k, f) == 1 and redis.call('EXISTS', k) == 0
end
if edge then
  pub(enc('P', node, ARGV[4], ARGV[5]))
  return 1
end
return 0
)";

// ARGV[3] session, ARGV[4] room, ARGV[5] 1 = join, 0 = leave.
inline constexpr const char* kMember = RK_LUA_PRELUDE R"(
if fenced() then return redis.error_reply('FENCED lease lost') end
local m, f = ARGV[4] .. SEP .. ARGV[3], node .. SEP .. ARGV[3]
if ARGV[5] == '1' then
  redis.call('SADD', ns .. ':node:' .. node .. ':m', m)
  redis.call('HSET', ns .. ':r:' .. ARGV[4], f, '1')
else
  redis.call('SREM', ns .. ':node:' .. node .. ':m', m)
  redis.call('HDEL', ns .. ':r:' .. ARGV[4], f)
end
return 1
)";

// ARGV[3] user, ARGV[4] thread, ARGV[5] 1 = started, 0 = ended.
inline constexpr const char* kTyping = RK_LUA_PRELUDE R"(
if fenced() then return redis.error_reply('FENCED lease lost') end
local e = ARGV[3] .. SEP .. ARGV[4]
local tk = ns .. ':t:' .. e
local edge = '0'
if ARGV[5] == '1' then
  redis.call('SADD', ns .. ':node:' .. node .. ':t', e)
  if redis.call('SADD', tk, node) == 1 and redis.call('SCARD', tk) == 1 then edge = '1' end
else
  redis.call('SREM', ns .. ':node:' .. node .. ':t', e)
  if redis.call('SREM', tk, node) == 1 and redis.call('EXISTS', tk) == 0 then edge = '1' end
end
pub(enc('T', node, node, ARGV[3], ARGV[4], ARGV[5], edge))
return 1
)";

// ARGV[3] lease ms. Registers (or re-registers) the node; returns TIME in ms.
inline constexpr const char* kRegister = RK_LUA_PRELUDE R"(
local t = now_ms()
redis.call('ZADD', ns .. ':nodes', t + tonumber(ARGV[3]), node)
return t
)";

// ARGV[3] lease ms. Renews a lease that has not expired; FENCED otherwise.
inline constexpr const char* kRenew = RK_LUA_PRELUDE R"(
local t = now_ms()
local e = redis.call('ZSCORE', ns .. ':nodes', node)
if (not e) or tonumber(e) < t then return redis.error_reply('FENCED lease lost') end
redis.call('ZADD', ns .. ':nodes', 'XX', t + tonumber(ARGV[3]), node)
return t
)";

// The nodes whose lease has expired.
inline constexpr const char* kDead = RK_LUA_PRELUDE R"(
return redis.call('ZRANGEBYSCORE', ns .. ':nodes', '-inf', '(' .. now_ms())
)";

// ARGV[3] dead node, ARGV[4] batch, ARGV[5] 1 = even if its lease is good
// (a node's own old id, or a clean stop). Removes up to a batch of what the
// dead node held, publishing each change; idempotent and resumable.
// Returns {done (1/0), users left with no session...}.
inline constexpr const char* kReap = RK_LUA_PRELUDE R"(
local dead, batch = ARGV[3], tonumber(ARGV[4])
local e = redis.call('ZSCORE', ns .. ':nodes', dead)
if ARGV[5] ~= '1' and e and tonumber(e) >= now_ms() then return {1} end
local out = {0}
local base = ns .. ':node:' .. dead
local n = 0
local function split(m) local i = string.find(m, SEP, 1, true)
  return string.sub(m, 1, i - 1), string.sub(m, i + 1) end
for _, m in ipairs(redis.call('SRANDMEMBER', base .. ':s', batch)) do
  local session, user = split(m)
  local uk = ns .. ':u:' .. user
  if redis.call('HDEL', uk, dead .. SEP .. session) == 1 and redis.call('EXISTS', uk) == 0 then
    pub(enc('P', '', user, '0'))
    out[#out + 1] = user
  end
  redis.call('SREM', base .. ':s', m)
  n = n + 1
end
if n < batch then
  for _, m in ipairs(redis.call('SRANDMEMBER', base .. ':m', batch - n)) do
    local room, session = split(m)
    redis.call('HDEL', ns .. ':r:' .. room, dead .. SEP .. session)
    redis.call('SREM', base .. ':m', m)
    n = n + 1
  end
end
if n < batch then
  for _, m in ipairs(redis.call('SRANDMEMBER', base .. ':t', batch - n)) do
    local user, thread = split(m)
    local tk = ns .. ':t:' .. m
    if redis.call('SREM', tk, dead) == 1 then
      local edge = redis.call('EXISTS', tk) == 0 and '1' or '0'
      pub(enc('T', '', dead, user, thread, '0', edge))
    end
    redis.call('SREM', base .. ':t', m)
    n = n + 1
  end
end
if n < batch then
  redis.call('ZREM', ns .. ':nodes', dead)
  redis.call('DEL', base .. ':s', base .. ':m', base .. ':t', ns .. ':reap:' .. dead)
  out[1] = 1
end
return out
)";

// Every key or field of the namespace that no registered node accounts
// for: node indexes of unregistered nodes, shared fields naming one, reap
// locks without expiry, unknown keys.
inline constexpr const char* kAudit = RK_LUA_PRELUDE R"(
local live = {}
for _, n in ipairs(redis.call('ZRANGE', ns .. ':nodes', 0, -1)) do live[n] = true end
local keys = redis.call('KEYS', ns .. ':*')
local out = {tostring(#keys)}
for _, k in ipairs(keys) do
  local rest = string.sub(k, #ns + 2)
  local kind = string.sub(rest, 1, 2)
  if rest == 'nodes' then
  elseif string.sub(rest, 1, 5) == 'node:' then
    local id = string.match(rest, '^node:(.*):[smt]$')
    if not id or not live[id] then out[#out + 1] = k end
  elseif kind == 'u:' or kind == 'r:' then
    for _, f in ipairs(redis.call('HKEYS', k)) do
      local i = string.find(f, SEP, 1, true)
      if not i or not live[string.sub(f, 1, i - 1)] then out[#out + 1] = k .. ' ' .. f end
    end
  elseif kind == 't:' then
    for _, n in ipairs(redis.call('SMEMBERS', k)) do
      if not live[n] then out[#out + 1] = k .. ' ' .. n end
    end
  elseif string.sub(rest, 1, 5) == 'reap:' then
    if redis.call('PTTL', k) < 0 then out[#out + 1] = k end
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

#undef RK_LUA_PRELUDE

}  // namespace roomkeeper::cluster::detail

#endif  // ROOMKEEPER_SRC_CLUSTER_REDIS_SCRIPTS_H_
