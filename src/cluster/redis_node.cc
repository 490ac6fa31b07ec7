// SPDX-License-Identifier: MIT
#include "roomkeeper/cluster/redis_node.h"

#include <boost/asio.hpp>
#include <random>
#include <set>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "fmt/format.h"
#include "redis_conn.h"
#include "redis_scripts.h"
#include "sha1.h"

namespace roomkeeper::cluster {

namespace asio = boost::asio;
using detail::RedisConn;
using detail::Reply;
using Clock = std::chrono::steady_clock;

namespace {

std::string freshId() {
  std::random_device rd;
  std::mt19937_64 g((static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
                    static_cast<std::uint64_t>(Clock::now().time_since_epoch().count()));
  return fmt::format("{:016x}", g());
}

void putField(std::string& out, std::string_view v) {
  out += std::to_string(v.size());
  out += ':';
  out.append(v.data(), v.size());
}

// Splits a length-prefixed message; false if malformed.
bool decode(std::string_view m, std::vector<std::string_view>& out) {
  out.clear();
  while (!m.empty()) {
    const std::size_t colon = m.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon > 10) return false;
    std::size_t len = 0;
    for (std::size_t i = 0; i < colon; ++i) {
      if (m[i] < '0' || m[i] > '9') return false;
      len = len * 10 + static_cast<std::size_t>(m[i] - '0');
    }
    if (m.size() - colon - 1 < len) return false;
    out.push_back(m.substr(colon + 1, len));
    m.remove_prefix(colon + 1 + len);
  }
  return true;
}

bool shareable(std::string_view id) { return id.find('\x1f') == std::string_view::npos; }

std::string key2(std::string_view a, std::string_view b) {
  std::string k(a);
  k.push_back('\x1f');
  k.append(b);
  return k;
}

}  // namespace

struct RedisNode::Impl : std::enable_shared_from_this<RedisNode::Impl> {
  Impl(asio::io_context& ctx, RedisConfig c)
      : io(ctx), cfg(std::move(c)), hbTimer(ctx), cmdRetry(ctx), subRetry(ctx) {
    RedisConn::Options o;
    o.host = cfg.host;
    o.port = cfg.port;
    o.requestTimeout = cfg.requestTimeout;
    o.maxPending = cfg.maxPending;
    cmd = std::make_shared<RedisConn>(ctx, o);
    o.maxPending = 64;
    sub = std::make_shared<RedisConn>(ctx, o);
    hb = std::make_shared<RedisConn>(ctx, o);
    id = freshId();
  }

  asio::io_context& io;
  RedisConfig cfg;
  std::shared_ptr<RedisConn> cmd, sub, hb;
  asio::steady_timer hbTimer, cmdRetry, subRetry;
  std::chrono::milliseconds cmdBackoff{0}, subBackoff{0}, hbBackoff{0};
  std::string id;
  std::vector<std::string> oldIds;  // earlier ids of this node, to remove
  Keeper* keeper = nullptr;
  Post post;
  bool started = false, stopping = false;
  bool draining = false;  // stop() is removing what this node holds
  bool registered = false;
  bool registering = false;
  bool needResync = false;  // a change was dropped: the shared view is off
  Clock::time_point leaseAt{}, goodSince{}, lastProbe{};
  bool good = false;
  std::set<std::string> reaping;
  // user \x1f thread -> other nodes with the user typing there
  std::unordered_map<std::string, std::set<std::string>> remoteTyping;
  ClusterStats st;
  std::vector<std::string_view> fields;  // decode scratch

  void log(LogLevel l, const std::string& m) {
    if (cfg.log) cfg.log(l, m);
  }
  std::chrono::milliseconds beat() const {
    return std::max(std::chrono::milliseconds(50), cfg.lease / 5);
  }
  static std::chrono::milliseconds next(std::chrono::milliseconds b, const RedisConfig& c) {
    return b.count() == 0 ? c.reconnectMin : std::min(b * 2, c.reconnectMax);
  }

  // ---- Connections -------------------------------------------------------

  void start() {
    if (started) return;
    started = true;
    auto self = shared_from_this();
    cmd->onDown = [this, self]() { cmdLost(); };
    sub->onDown = [this, self]() { subLost(); };
    hb->onDown = [this, self]() {
      good = false;
      st.connected = false;
    };
    sub->onPush = [this, self](Reply&& r) { onMessage(r); };
    connectCmd();
    connectSub();
    connectHb();
    heartbeat();
  }

  void connectCmd() {
    if (stopping) return;
    auto self = shared_from_this();
    cmd->connect([this, self](bool ok) {
      if (ok) {
        loadScripts(*cmd);
        cmdBackoff = {};
        maybeRegister();
        return;
      }
      retry(cmdRetry, cmdBackoff, [this]() { connectCmd(); });
    });
  }
  void cmdLost() {
    st.connected = false;
    needResync = true;
    retry(cmdRetry, cmdBackoff, [this]() { connectCmd(); });
  }
  void connectSub() {
    if (stopping) return;
    auto self = shared_from_this();
    sub->connect([this, self](bool ok) {
      if (!ok) return retry(subRetry, subBackoff, [this]() { connectSub(); });
      subBackoff = {};
      sub->setSubscribed(true);
      sub->command({"SUBSCRIBE", cfg.keyPrefix + ":ev"}, [this, self](Reply&& r) {
        if (r.error()) return;
        lastProbe = Clock::now();
        // Anything published while we were away is lost (pub/sub is
        // at-most-once): the typing we knew of is dropped rather than
        // trusted, and counted as a resynchronisation.
        if (subscribedOnce) ++st.resyncs;
        subscribedOnce = true;
        remoteTyping.clear();
      });
    });
  }
  bool subscribedOnce = false;
  void subLost() { retry(subRetry, subBackoff, [this]() { connectSub(); }); }
  void connectHb() {
    if (stopping) return;
    auto self = shared_from_this();
    hb->connect([this, self](bool ok) {
      if (ok) {
        loadScripts(*hb);
        hbBackoff = {};
        maybeRegister();
      }
    });
  }
  template <typename F>
  void retry(asio::steady_timer& t, std::chrono::milliseconds& b, F f) {
    if (stopping) return;
    b = next(b, cfg);
    t.expires_after(b);
    auto self = shared_from_this();
    t.async_wait([self, f](boost::system::error_code e) {
      if (!e) f();
    });
  }

  // ---- Scripts -----------------------------------------------------------

  void eval(RedisConn& c, const char* script, std::vector<std::string> args,
            RedisConn::Callback cb, const std::string* as = nullptr) {
    std::vector<std::string> argv;
    argv.reserve(args.size() + 5);
    // By name: every connection loads every script first thing (loadScripts).
    argv.emplace_back("EVALSHA");
    argv.push_back(shaOf(script));
    argv.emplace_back("0");
    argv.push_back(cfg.keyPrefix);
    argv.push_back(as ? *as : id);
    for (auto& a : args) argv.push_back(std::move(a));
    c.command(std::move(argv), std::move(cb));
  }

  // The scripts, by SHA-1 (computed once).
  static const std::vector<std::pair<const char*, std::string>>& scripts() {
    static const std::vector<std::pair<const char*, std::string>> all = [] {
      std::vector<std::pair<const char*, std::string>> v;
      for (const char* s : {detail::kSession, detail::kMember, detail::kTyping,
                            detail::kRegister, detail::kRenew, detail::kDead, detail::kReap,
                            detail::kAudit, detail::kKeyCount})
        v.emplace_back(s, detail::sha1Hex(s));
      return v;
    }();
    return all;
  }
  static const std::string& shaOf(const char* script) {
    for (auto& [s, sha] : scripts())
      if (s == script) return sha;
    static const std::string none;
    return none;
  }
  // Right after a connect, before anything else on that connection.
  static void loadScripts(RedisConn& c) {
    for (auto& [s, sha] : scripts()) c.command({"SCRIPT", "LOAD", s}, [](Reply&&) {});
  }

  // A change for the shared view; false (and counted) if it cannot be sent.
  bool change(const char* script, std::vector<std::string> args, RedisConn::Callback cb = {}) {
    if (!registered || !cmd->connected()) {
      ++st.dropped;
      needResync = true;
      return false;
    }
    ++st.published;
    auto self = shared_from_this();
    eval(*cmd, script, std::move(args),
         [this, self, cb = std::move(cb), sentAs = id](Reply&& r) {
           if (r.error()) {
             if (sentAs != id) return;  // an old id's change: replayed anyway
             ++st.dropped;
             if (r.str.rfind("FENCED", 0) == 0) return fenced();
             needResync = true;
             return;
           }
           if (cb) cb(std::move(r));
         });
    return true;
  }

  // ---- Lease -------------------------------------------------------------

  void maybeRegister() {
    if (registered || registering || stopping || !hb->connected() || !cmd->connected()) return;
    registering = true;
    auto self = shared_from_this();
    eval(*hb, detail::kRegister, {std::to_string(cfg.lease.count())}, [this, self](Reply&& r) {
      registering = false;
      if (r.error()) return;
      registered = true;
      good = true;
      st.connected = true;
      leaseAt = goodSince = Clock::now();
      log(LogLevel::kInfo, fmt::format("roomkeeper cluster: node {} registered", id));
      resync();
    });
  }

  // The shared view of this node is rebuilt under the current id: the
  // Keeper replays its state, then what older ids held is removed (after
  // the replay, so that a user still here never looks offline).
  void resync() {
    needResync = false;
    if (keeper) keeper->replayToBus();
    for (const std::string& old : oldIds) reap(old, true);
    oldIds.clear();
  }

  void fenced() {
    if (!registered) return;
    ++st.fenced;
    log(LogLevel::kWarning,
        fmt::format("roomkeeper cluster: node {} lost its lease; re-registering", id));
    reregister();
  }

  void reregister() {
    registered = false;
    oldIds.push_back(id);
    id = freshId();
    maybeRegister();
  }

  void heartbeat() {
    if (stopping) return;
    auto self = shared_from_this();
    hbTimer.expires_after(beat());
    hbTimer.async_wait([this, self](boost::system::error_code e) {
      if (e || stopping) return;
      beatOnce();
      heartbeat();
    });
  }

  void beatOnce() {
    if (!hb->connected()) {
      good = false;
      st.connected = false;
      if (hbBackoff.count() == 0 || true) connectHb();
      return;
    }
    if (!registered) {
      maybeRegister();
      return;
    }
    // Changes were dropped (Redis was out of reach for the commands): the
    // shared view under this id is wrong; start again under a fresh one.
    if (needResync && cmd->connected()) {
      ++st.resyncs;
      reregister();
      return;
    }
    auto self = shared_from_this();
    eval(*hb, detail::kRenew, {std::to_string(cfg.lease.count())},
         [this, self, sentAs = id](Reply&& r) {
           if (sentAs != id) return;
           if (r.error()) {
             good = false;
             if (r.str.rfind("FENCED", 0) == 0) fenced();
             return;
           }
           const auto now = Clock::now();
           if (!good) goodSince = now;
           good = true;
           st.connected = cmd->connected();
           leaseAt = now;
           // Only after a full lease of good heartbeats may this node bury
           // others: right after a Redis blip, everyone looks dead.
           if (now - goodSince >= cfg.lease) findDead();
         });
    // The subscription's probe: our own message must come back.
    std::string probe;
    putField(probe, "H");
    putField(probe, id);
    hb->command({"PUBLISH", cfg.keyPrefix + ":ev", probe}, [](Reply&&) {});
    if (sub->connected() && Clock::now() - lastProbe > beat() * 4 + cfg.requestTimeout) {
      log(LogLevel::kWarning, "roomkeeper cluster: subscription silent; reconnecting it");
      sub->close();
      subLost();
    }
    countNodes();
  }

  void countNodes() {
    auto self = shared_from_this();
    hb->command({"ZCARD", cfg.keyPrefix + ":nodes"}, [this, self](Reply&& r) {
      if (r.type == Reply::Type::kInteger) st.nodes = static_cast<std::size_t>(r.integer);
    });
  }

  void findDead() {
    if (!cmd->connected()) return;
    auto self = shared_from_this();
    eval(*cmd, detail::kDead, {}, [this, self](Reply&& r) {
      if (r.type != Reply::Type::kArray) return;
      for (auto& e : r.elements)
        if (e.str != id && !reaping.count(e.str)) lockAndReap(e.str);
    });
  }

  void lockAndReap(const std::string& dead) {
    auto self = shared_from_this();
    reaping.insert(dead);
    cmd->command({"SET", cfg.keyPrefix + ":reap:" + dead, id, "NX", "PX",
                  std::to_string(cfg.lease.count() * 2)},
                 [this, self, dead](Reply&& r) {
                   if (r.type != Reply::Type::kStatus) {
                     reaping.erase(dead);  // another node has it
                     return;
                   }
                   log(LogLevel::kInfo,
                       fmt::format("roomkeeper cluster: node {} reaping dead node {}", id, dead));
                   reap(dead, false);
                 });
  }

  void reap(const std::string& dead, bool force, std::function<void()> done = {},
            int tries = 0) {
    auto self = shared_from_this();
    reaping.insert(dead);
    eval(*cmd, detail::kReap, {dead, std::to_string(cfg.reapBatch), force ? "1" : "0"},
         [this, self, dead, force, done, tries](Reply&& r) {
           if (r.type != Reply::Type::kArray || r.elements.empty()) {
             // Too much in flight (a shutdown's burst): again shortly, as
             // long as the connection holds; else whoever looks next resumes.
             // While stopping, a connection lost mid-way is waited for too.
             if ((cmd->connected() || draining) && tries < 200) {
               auto t = std::make_shared<asio::steady_timer>(io, std::chrono::milliseconds(50));
               t->async_wait([this, self, t, dead, force, done, tries](auto) {
                 reap(dead, force, done, tries + 1);
               });
               return;
             }
             reaping.erase(dead);
             if (done) done();
             return;
           }
           // The users left with no session anywhere: their wildcard.
           for (std::size_t i = 1; i < r.elements.size(); ++i)
             if (keeper && !stopping) keeper->relayUserGone(r.elements[i].str);
           if (r.elements[0].integer == 1) {
             reaping.erase(dead);
             if (!force) ++st.nodesReaped;
             if (done) done();
             return;
           }
           reap(dead, force, done);
         });
  }

  // ---- Messages ----------------------------------------------------------

  void onMessage(const Reply& r) {
    if (r.elements.size() < 3 || r.elements[0].str != "message") return;
    const std::string& m = r.elements[2].str;
    if (!decode(m, fields) || fields.empty()) return;
    const std::string_view kind = fields[0];
    if (kind == "H") {
      if (fields.size() == 2 && fields[1] == id) lastProbe = Clock::now();
      return;
    }
    if (fields.size() < 2 || fields[1] == id || !keeper || stopping) return;
    if (kind == "P" && fields.size() == 4) {
      ++st.received;
      keeper->relayPresence(fields[2], fields[3] == "1");
    } else if (kind == "T" && fields.size() == 7) {
      ++st.received;
      const std::string k = key2(fields[3], fields[4]);
      const bool on = fields[5] == "1";
      if (fields[2] != id) {
        if (on) {
          remoteTyping[k].emplace(fields[2]);
        } else if (auto it = remoteTyping.find(k); it != remoteTyping.end()) {
          it->second.erase(std::string(fields[2]));
          if (it->second.empty()) remoteTyping.erase(it);
        }
      }
      if (fields[6] == "1") keeper->relayTyping(fields[3], fields[4], on);
    } else if (kind == "B") {
      applyBroadcast();
    }
  }

  void applyBroadcast() {
    // B publisher nrooms rooms... nexcept except... sender event payload
    std::size_t i = 2;
    auto count = [&](std::size_t& n) {
      if (i >= fields.size()) return false;
      n = 0;
      for (char c : fields[i]) {
        if (c < '0' || c > '9') return false;
        n = n * 10 + static_cast<std::size_t>(c - '0');
      }
      ++i;
      return i + n <= fields.size();
    };
    BroadcastTargets t;
    std::size_t nr = 0, ne = 0;
    if (!count(nr)) return;
    for (std::size_t k = 0; k < nr; ++k) t.rooms.push_back(fields[i++]);
    if (!count(ne)) return;
    for (std::size_t k = 0; k < ne; ++k) t.except.push_back(fields[i++]);
    if (i + 3 != fields.size()) return;
    t.sender = fields[i];
    ++st.received;
    keeper->relayBroadcast(t, fields[i + 1], fields[i + 2]);
  }
};

RedisNode::RedisNode(asio::io_context& io, RedisConfig config)
    : impl_(std::make_shared<Impl>(io, std::move(config))) {}

RedisNode::~RedisNode() {
  impl_->stopping = true;
  impl_->keeper = nullptr;
  impl_->hbTimer.cancel();
  impl_->cmdRetry.cancel();
  impl_->subRetry.cancel();
  impl_->cmd->onDown = nullptr;
  impl_->sub->onDown = nullptr;
  impl_->sub->onPush = nullptr;
  impl_->hb->onDown = nullptr;
  impl_->cmd->close();
  impl_->sub->close();
  impl_->hb->close();
}

bool RedisNode::bind(Keeper& keeper, Post post) {
  if (impl_->keeper || !post) return false;
  impl_->keeper = &keeper;
  impl_->post = std::move(post);
  return true;
}

void RedisNode::start() { impl_->start(); }

void RedisNode::stop(std::function<void()> done) {
  Impl& im = *impl_;
  auto self = impl_;
  auto finish = [self, done]() {
    self->stopping = true;
    self->registered = false;
    self->hbTimer.cancel();
    self->cmdRetry.cancel();
    self->subRetry.cancel();
    self->cmd->close();
    self->sub->close();
    self->hb->close();
    if (done) done();
  };
  if (!im.cmd->connected()) return finish();
  im.keeper = nullptr;  // nothing more reaches the Keeper
  im.draining = true;
  // Whatever is left under this id (and older ids) goes, then the lease.
  auto ids = std::make_shared<std::vector<std::string>>(im.oldIds);
  ids->push_back(im.id);
  auto step = std::make_shared<std::function<void()>>();
  *step = [self, ids, step, finish]() {
    if (ids->empty()) return finish();
    const std::string one = ids->back();
    ids->pop_back();
    self->reap(one, true, [step]() { (*step)(); });
  };
  (*step)();
}

void RedisNode::audit(std::function<void(AuditReport)> done) {
  auto self = impl_;
  impl_->eval(*impl_->cmd, detail::kAudit, {}, [self, done](Reply&& r) {
    AuditReport rep;
    if (r.type == Reply::Type::kArray && !r.elements.empty()) {
      rep.ok = true;
      rep.keys = static_cast<std::size_t>(std::stoull(r.elements[0].str));
      for (std::size_t i = 1; i < r.elements.size(); ++i)
        rep.orphans.push_back(std::move(r.elements[i].str));
    }
    done(std::move(rep));
  });
}

void RedisNode::keyCount(std::function<void(std::size_t)> done) {
  impl_->eval(*impl_->cmd, detail::kKeyCount, {},
              [done](Reply&& r) { done(static_cast<std::size_t>(r.integer)); });
}

void RedisNode::sessionUp(std::string_view session, std::string_view user) {
  if (!shareable(session) || !shareable(user)) return void(++impl_->st.dropped);
  auto self = impl_;
  impl_->change(detail::kSession, {std::string(session), std::string(user), "1"},
                [self, u = std::string(user)](Reply&& r) {
                  if (r.integer == 1 && self->keeper) self->keeper->relayPresence(u, true);
                });
}

void RedisNode::sessionDown(std::string_view session, std::string_view user) {
  auto self = impl_;
  const bool sent = shareable(session) && shareable(user) &&
                    impl_->change(detail::kSession, {std::string(session), std::string(user), "0"},
                                  [self, u = std::string(user)](Reply&& r) {
                                    if (r.integer != 1 || !self->keeper) return;
                                    self->keeper->relayPresence(u, false);
                                    self->keeper->relayUserGone(u);
                                  });
  // Out of touch, this node cannot know whether the user is connected
  // elsewhere; it persists the wildcard (a stale "typing" row is the worse
  // error), and the host hears userOffline from its own view.
  if (!sent && impl_->keeper) impl_->keeper->relayUserGone(user);
}

void RedisNode::joined(std::string_view session, std::string_view room) {
  if (!shareable(session) || !shareable(room)) return void(++impl_->st.dropped);
  impl_->change(detail::kMember, {std::string(session), std::string(room), "1"});
}

void RedisNode::left(std::string_view session, std::string_view room) {
  if (!shareable(session) || !shareable(room)) return;
  impl_->change(detail::kMember, {std::string(session), std::string(room), "0"});
}

void RedisNode::typing(std::string_view user, std::string_view thread, bool started) {
  if (!shareable(user) || !shareable(thread)) return void(++impl_->st.dropped);
  impl_->change(detail::kTyping, {std::string(user), std::string(thread), started ? "1" : "0"});
}

void RedisNode::broadcast(const BroadcastTargets& targets, std::string_view event,
                          std::string_view payload) {
  Impl& im = *impl_;
  if (!im.cmd->connected()) return void(++im.st.dropped);
  std::string m;
  m.reserve(64 + payload.size());
  putField(m, "B");
  putField(m, im.id);
  putField(m, std::to_string(targets.rooms.size()));
  for (auto r : targets.rooms) putField(m, r);
  putField(m, std::to_string(targets.except.size()));
  for (auto r : targets.except) putField(m, r);
  putField(m, targets.sender);
  putField(m, event);
  putField(m, payload);
  ++im.st.published;
  auto self = impl_;
  im.cmd->command({"PUBLISH", im.cfg.keyPrefix + ":ev", std::move(m)}, [self](Reply&& r) {
    if (r.error()) ++self->st.dropped;
  });
}

bool RedisNode::typingElsewhere(std::string_view user, std::string_view thread) const noexcept {
  try {
    return impl_->remoteTyping.count(key2(user, thread)) != 0;
  } catch (...) {
    return false;
  }
}

void RedisNode::roomSize(std::string room, std::function<void(std::size_t)> done) {
  impl_->cmd->command({"HLEN", impl_->cfg.keyPrefix + ":r:" + room}, [done](Reply&& r) {
    done(r.type == Reply::Type::kInteger ? static_cast<std::size_t>(r.integer) : 0);
  });
}

void RedisNode::roomMembers(std::string room,
                            std::function<void(std::vector<std::string>)> done) {
  impl_->cmd->command({"HKEYS", impl_->cfg.keyPrefix + ":r:" + room}, [done](Reply&& r) {
    std::vector<std::string> v;
    for (auto& e : r.elements) {
      const std::size_t cut = e.str.find('\x1f');
      if (cut != std::string::npos) v.push_back(e.str.substr(cut + 1));
    }
    done(std::move(v));
  });
}

void RedisNode::isOnline(std::string user, std::function<void(bool)> done) {
  impl_->cmd->command({"EXISTS", impl_->cfg.keyPrefix + ":u:" + user},
                      [done](Reply&& r) { done(r.integer == 1); });
}

std::string RedisNode::id() const { return impl_->id; }

ClusterStats RedisNode::stats() const {
  ClusterStats s = impl_->st;
  s.connected = impl_->registered && impl_->cmd->connected() && impl_->good;
  s.leaseAgeMs = impl_->registered ? std::chrono::duration_cast<std::chrono::milliseconds>(
                                         Clock::now() - impl_->leaseAt)
                                         .count()
                                   : -1;
  return s;
}

}  // namespace roomkeeper::cluster
