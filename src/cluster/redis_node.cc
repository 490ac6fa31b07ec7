// SPDX-License-Identifier: MIT
#include "roomkeeper/cluster/redis_node.h"

// Before Asio: Boost 1.74's asio/awaitable.hpp uses std::exchange without
// including <utility> (a C++20 build fails without this).
#include <utility>
#include <boost/asio.hpp>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <random>
#include <set>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <unistd.h>

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

std::uint64_t mix64(std::uint64_t z) noexcept {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A node's id: 64 bits from std::random_device, mixed with both clocks, the
// process id and a counter. std::random_device may throw where there is no
// entropy source, and re-registering (a lease lost) calls this inside a
// handler, where a throw would reach the host's io_context::run(): then the
// id comes from the rest alone (two processes would need the same pid,
// clock readings and count to collide).
std::string freshId() {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t seed =
      mix64(static_cast<std::uint64_t>(Clock::now().time_since_epoch().count())) ^
      mix64(static_cast<std::uint64_t>(
                std::chrono::system_clock::now().time_since_epoch().count()) +
            1) ^
      mix64((static_cast<std::uint64_t>(::getpid()) << 32) ^
            counter.fetch_add(1, std::memory_order_relaxed));
  try {
    std::random_device rd;
    seed ^= (static_cast<std::uint64_t>(rd()) << 32) | rd();
  } catch (...) {  // no entropy source: the clocks, pid and counter above
  }
  return fmt::format("{:016x}", mix64(seed));
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
      : io(ctx),
        strand(asio::make_strand(ctx)),
        cfg(std::move(c)),
        hbTimer(strand),
        cmdRetry(strand),
        subRetry(strand) {
    RedisConn::Options o;
    o.host = cfg.host;
    o.port = cfg.port;
    o.requestTimeout = cfg.requestTimeout;
    o.maxPending = cfg.maxPending;
    cmd = std::make_shared<RedisConn>(strand, o);
    o.maxPending = 64;
    sub = std::make_shared<RedisConn>(strand, o);
    hb = std::make_shared<RedisConn>(strand, o);
    setId(freshId());
    boost::system::error_code ec;
    asio::ip::make_address(cfg.host, ec);
    if (ec)
      log(LogLevel::kError, fmt::format("roomkeeper cluster: RedisConfig::host must be an IP "
                                        "address (got \"{}\"): not connecting",
                                        cfg.host));
  }

  asio::io_context& io;
  detail::Strand strand;  // every handler and every state change of the node
  RedisConfig cfg;
  std::shared_ptr<RedisConn> cmd, sub, hb;
  asio::steady_timer hbTimer, cmdRetry, subRetry;
  // heartbeat()'s spread: seeded from the clock and this object's address
  // (std::random_device may throw where there is no entropy source).
  std::mt19937_64 jitter{static_cast<std::uint64_t>(Clock::now().time_since_epoch().count()) ^
                         reinterpret_cast<std::uintptr_t>(this)};
  std::chrono::milliseconds cmdBackoff{0}, subBackoff{0};
  std::string id;
  std::vector<std::string> oldIds;  // earlier ids of this node, to remove
  std::set<std::string, std::less<>> pastIds;  // every earlier id: its messages are ours
  // The bound Keeper, reached only through its post function (its thread).
  std::shared_ptr<std::atomic<BusTarget*>> target =
      std::make_shared<std::atomic<BusTarget*>>(nullptr);
  bool bound = false;
  Post post;
  bool started = false, stopping = false;
  bool draining = false;  // stop() is removing what this node holds
  bool registered = false;
  bool registering = false;
  bool needResync = false;  // a change was dropped: the shared view is off
  Clock::time_point goodSince{}, lastProbe{};
  bool good = false;
  std::set<std::string> reaping;
  // user \x1f thread -> other nodes with the user typing there
  std::unordered_map<std::string, std::set<std::string>> remoteTyping;
  // The users this node has told its Keeper are online (each presence
  // edge is relayed once), and the snapshot that mends it and remoteTyping
  // after the subscription was down (see mend()).
  std::unordered_set<std::string> online;
  bool snapWanted = false, snapSeed = false, snapInFlight = false;
  Clock::time_point snapAfter{};
  std::uint64_t snapGen = 0;
  std::unordered_set<std::string> touched;  // users, typing keys: news since asked
  mutable std::mutex mu;  // st, remoteTyping, idCopy, leaseAtMs: read elsewhere
  ClusterStats st;
  std::string idCopy;          // id, for id() from any thread
  std::int64_t leaseAtMs = -1;  // steady ms of the last good lease; -1 = none
  void setId(std::string v) {
    id = std::move(v);
    std::lock_guard<std::mutex> g(mu);
    idCopy = id;
  }
  void leaseRenewed(bool ok) {
    std::lock_guard<std::mutex> g(mu);
    leaseAtMs = ok ? std::chrono::duration_cast<std::chrono::milliseconds>(
                         Clock::now().time_since_epoch())
                         .count()
                   : -1;
  }
  std::vector<std::string_view> fields;  // decode scratch

  void count(std::uint64_t ClusterStats::*c) {
    std::lock_guard<std::mutex> g(mu);
    ++(st.*c);
  }
  void setConnected(bool on) {
    std::lock_guard<std::mutex> g(mu);
    st.connected = on;
  }
  // Runs `fn` on the node's strand, always queued (never inline), so that
  // events keep the order in which they were raised.
  template <typename F>
  void onStrand(F fn) {
    asio::post(strand, [self = shared_from_this(), fn = std::move(fn)]() mutable { fn(); });
  }
  // Runs `fn` on the node's strand, inline when the strand is idle and
  // this thread runs the io_context (Asio's dispatch), queued otherwise:
  // never ahead of an event raised before it, and never inside a strand
  // handler already running on this thread (that one's queued events
  // would be overtaken). For a broadcast, whose PUBLISH then leaves before
  // the caller's local fan-out.
  template <typename F>
  void soonOnStrand(F fn) {
    if (strand.running_in_this_thread()) return onStrand(std::move(fn));
    asio::dispatch(strand, [self = shared_from_this(), fn = std::move(fn)]() mutable { fn(); });
  }
  // A query's answer, through the post function (at once without one).
  void answer(std::function<void()> fn) {
    if (post)
      post(std::move(fn));
    else
      fn();
  }
  // A read-only command from any thread; `make` turns the reply into the
  // answer to post.
  void query(std::vector<std::string> args, std::function<std::function<void()>(Reply&&)> make) {
    auto self = shared_from_this();
    onStrand([self, args = std::move(args), make = std::move(make)]() mutable {
      self->cmd->command(std::move(args),
                         [self, make](Reply&& r) { self->answer(make(std::move(r))); });
    });
  }
  // Runs `fn(keeper)` on the Keeper's thread, if it is still bound then.
  void toKeeper(std::function<void(BusTarget&)> fn) {
    if (!post) return;
    post([t = target, fn = std::move(fn)]() {
      if (BusTarget* k = t->load()) fn(*k);
    });
  }

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
      setConnected(false);
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
        trySnapshot();
        return;
      }
      retry(cmdRetry, cmdBackoff, [this]() { connectCmd(); });
    });
  }
  void cmdLost() {
    setConnected(false);
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
        if (subscribedOnce) count(&ClusterStats::resyncs);
        // The first time, the view is seeded from Redis at once; after a
        // gap, it is mended one lease later (time for every node to be back
        // and replayed after a Redis restart).
        wantSnapshot(!subscribedOnce);
        subscribedOnce = true;
      });
    });
  }
  bool subscribedOnce = false;

  // ---- Mending the view after a gap in the subscription -------------------
  // Presence and typing are state: what was published while the
  // subscription was down is read back from Redis (kSnapshot) and the
  // differences are relayed. A user or typing key with news on the
  // subscription while the snapshot is in flight is left to that news
  // (the subscription is ordered; the snapshot's time is not known).
  void wantSnapshot(bool seed) {
    snapWanted = true;
    snapSeed = seed;
    ++snapGen;
    snapInFlight = false;
    snapAfter = Clock::now() + (seed ? Clock::duration::zero() : Clock::duration(cfg.lease));
    trySnapshot();
  }
  void trySnapshot() {
    if (!snapWanted || snapInFlight || stopping || !cmd->connected() ||
        Clock::now() < snapAfter)
      return;
    snapInFlight = true;
    touched.clear();
    auto self = shared_from_this();
    eval(*cmd, detail::kSnapshot, {}, [this, self, gen = snapGen](Reply&& r) {
      if (gen != snapGen) return;  // a newer gap asked again
      snapInFlight = false;
      if (r.type != Reply::Type::kArray || r.elements.size() != 2) return;  // next beat
      snapWanted = false;
      mend(r.elements[0].elements, r.elements[1].elements, snapSeed);
      touched.clear();
    });
  }
  void mend(const std::vector<Reply>& users, const std::vector<Reply>& typing, bool seed) {
    std::unordered_set<std::string> now;
    for (const Reply& u : users) {
      if (touched.count(u.str)) continue;
      now.insert(u.str);
      if (online.insert(u.str).second && !seed) relayPresence(u.str, true);
    }
    if (!seed) {
      for (auto it = online.begin(); it != online.end();) {
        if (now.count(*it) || touched.count(*it)) {
          ++it;
          continue;
        }
        relayPresence(*it, false);
        it = online.erase(it);
      }
    }
    std::unordered_map<std::string, std::set<std::string>> remote;
    std::unordered_set<std::string> here;  // typing on this node
    for (std::size_t i = 0; i + 1 < typing.size(); i += 2) {
      if (touched.count(typing[i + 1].str)) continue;
      if (typing[i].str == id) here.insert(typing[i + 1].str);
      else remote[typing[i + 1].str].insert(typing[i].str);
    }
    std::vector<std::pair<std::string, bool>> edges;
    {
      std::lock_guard<std::mutex> g(mu);
      for (auto it = remoteTyping.begin(); it != remoteTyping.end();) {
        if (touched.count(it->first) || remote.count(it->first)) {
          ++it;
          continue;
        }
        if (!here.count(it->first)) edges.emplace_back(it->first, false);
        it = remoteTyping.erase(it);
      }
      for (auto& [key, nodes] : remote) {
        auto [it, added] = remoteTyping.try_emplace(key);
        if (added && !here.count(key)) edges.emplace_back(key, true);
        it->second = std::move(nodes);
      }
    }
    if (seed) return;
    for (auto& [key, on] : edges) {
      const std::size_t cut = key.find('\x1f');
      toKeeper([u = key.substr(0, cut), t = key.substr(cut + 1), on = on](BusTarget& k) {
        k.relayTyping(u, t, on);
      });
    }
  }
  void relayPresence(const std::string& user, bool on) {
    toKeeper([u = user, on](BusTarget& k) { k.relayPresence(u, on); });
  }
  void subLost() { retry(subRetry, subBackoff, [this]() { connectSub(); }); }
  void connectHb() {
    if (stopping) return;
    auto self = shared_from_this();
    hb->connect([this, self](bool ok) {
      if (ok) {
        loadScripts(*hb);
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
    c.command(evalArgs(script, std::move(args), as ? *as : id), std::move(cb));
  }
  std::vector<std::string> evalArgs(const char* script, std::vector<std::string> args,
                                    const std::string& as) {
    std::vector<std::string> argv;
    argv.reserve(args.size() + 5);
    // By name: every connection loads every script first thing (loadScripts).
    argv.emplace_back("EVALSHA");
    argv.push_back(shaOf(script));
    argv.emplace_back("0");
    argv.push_back(cfg.keyPrefix);
    argv.push_back(as);
    for (auto& a : args) argv.push_back(std::move(a));
    return argv;
  }

  // The scripts, by SHA-1 (computed once).
  static const std::vector<std::pair<const char*, std::string>>& scripts() {
    static const std::vector<std::pair<const char*, std::string>> all = [] {
      std::vector<std::pair<const char*, std::string>> v;
      for (const char* s : {detail::kSession, detail::kMember, detail::kTyping,
                            detail::kRegister, detail::kRenew, detail::kDead, detail::kReap,
                            detail::kAudit, detail::kKeyCount, detail::kRoomSize,
                            detail::kRoomMembers, detail::kOnline, detail::kSnapshot})
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
      count(&ClusterStats::dropped);
      needResync = true;
      return false;
    }
    count(&ClusterStats::published);
    auto self = shared_from_this();
    eval(*cmd, script, std::move(args),
         [this, self, cb = std::move(cb), sentAs = id](Reply&& r) {
           if (r.error()) {
             if (sentAs != id) return;  // an old id's change: replayed anyway
             count(&ClusterStats::dropped);
             if (r.str.rfind("FENCED", 0) == 0) return fenced();
             // The scripts were flushed (SCRIPT FLUSH, a failover): load them
             // again; the next heartbeat resynchronises what was lost.
             if (r.str.rfind("NOSCRIPT", 0) == 0) loadScripts(*cmd);
             needResync = true;
             return;
           }
           if (cb) cb(std::move(r));
         });
    return true;
  }

  // ---- Lease -------------------------------------------------------------

  void maybeRegister() {
    if (registered || registering || stopping || draining || !hb->connected() ||
        !cmd->connected())
      return;
    registering = true;
    auto self = shared_from_this();
    eval(*hb, detail::kRegister, {std::to_string(cfg.lease.count())}, [this, self](Reply&& r) {
      registering = false;
      if (r.error()) {
        if (r.str.rfind("NOSCRIPT", 0) == 0) {
          loadScripts(*hb);
          loadScripts(*cmd);
        }
        return;
      }
      registered = true;
      good = true;
      setConnected(true);
      goodSince = Clock::now();
      leaseRenewed(true);
      log(LogLevel::kInfo, fmt::format("roomkeeper cluster: node {} registered", id));
      // A first registration with nothing dropped has nothing to replay:
      // every event since the Keeper was made has reached Redis, or was
      // dropped and set needResync. (Replaying anyway would publish the
      // state twice when the Keeper's first events race the reply.)
      if (needResync || !oldIds.empty()) resync();
    });
  }

  // The shared view of this node is rebuilt under the current id: the
  // Keeper replays its state, then what older ids held is removed (after
  // the replay, so that a user still here never looks offline).
  void resync() {
    needResync = false;
    auto old = std::make_shared<std::vector<std::string>>(std::move(oldIds));
    oldIds.clear();
    auto self = shared_from_this();
    if (!post || !target->load()) {
      for (const std::string& o : *old) reap(o, true);
      return;
    }
    // The replay's events reach the strand before this last step does
    // (posted in order from the Keeper's thread).
    toKeeper([self, old](BusTarget& k) {
      k.replayToBus();
      self->onStrand([self, old]() {
        for (const std::string& o : *old) self->reap(o, true);
      });
    });
  }

  void fenced() {
    if (!registered || draining) return;
    count(&ClusterStats::fenced);
    log(LogLevel::kWarning,
        fmt::format("roomkeeper cluster: node {} lost its lease; re-registering", id));
    reregister();
  }

  void reregister() {
    registered = false;
    setConnected(false);
    pastIds.insert(id);
    oldIds.push_back(id);
    setId(freshId());
    leaseRenewed(false);
    maybeRegister();
  }

  // The next beat comes 80-100 % of beat() later, at random: nodes started
  // together (a deploy, a test) would otherwise renew, probe and look for
  // the dead at the same instant, every beat, for as long as they run.
  // Never later than beat(), so the lease keeps its margin.
  void heartbeat() {
    if (stopping) return;
    auto self = shared_from_this();
    const auto b = std::chrono::duration_cast<std::chrono::microseconds>(beat());
    hbTimer.expires_after(b - std::chrono::microseconds(static_cast<std::int64_t>(
                                  jitter() % static_cast<std::uint64_t>(b.count() / 5 + 1))));
    hbTimer.async_wait([this, self](boost::system::error_code e) {
      if (e || stopping) return;
      beatOnce();
      heartbeat();
    });
  }

  void beatOnce() {
    if (draining) return;  // stop() is removing this node: no lease, no reaping
    trySnapshot();
    if (!hb->connected()) {
      good = false;
      setConnected(false);
      if (!hb->connecting()) connectHb();  // an attempt in progress is left to finish
      return;
    }
    if (!registered) {
      maybeRegister();
      return;
    }
    // Changes were dropped (Redis was out of reach for the commands): the
    // shared view under this id is wrong; start again under a fresh one.
    if (needResync && cmd->connected()) {
      count(&ClusterStats::resyncs);
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
             if (r.str.rfind("NOSCRIPT", 0) == 0) loadScripts(*hb);
             return;
           }
           const auto now = Clock::now();
           if (!good) goodSince = now;
           good = true;
           setConnected(cmd->connected());
           leaseRenewed(true);
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
      if (r.type != Reply::Type::kInteger) return;
      std::lock_guard<std::mutex> g(mu);
      st.nodes = static_cast<std::size_t>(r.integer);
    });
  }

  void findDead() {
    if (!cmd->connected() || draining) return;
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
             if ((cmd->connected() || draining) && !stopping && tries < 200) {
               auto t =
                   std::make_shared<asio::steady_timer>(strand, std::chrono::milliseconds(50));
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
             if (!stopping)
               toKeeper([u = r.elements[i].str](BusTarget& k) { k.relayUserGone(u); });
           if (r.elements[0].integer == 1) {
             reaping.erase(dead);
             if (!force) count(&ClusterStats::nodesReaped);
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
    if (fields.size() < 2 || stopping) return;
    // Presence edges, this node's own included, are applied only from here,
    // so that every node sees them in Redis's order.
    // A typing edge of this node's own is applied too (the Keeper shows
    // each start and stop once, whoever's news comes first).
    const bool own = fields[1] == id;
    if (kind != "P" && pastIds.count(fields[1]) != 0) return;
    if (own && kind != "P" && kind != "T") return;
    if (kind == "P" && fields.size() == 4) {
      count(&ClusterStats::received);
      std::string u(fields[2]);
      const bool on = fields[3] == "1";
      if (snapInFlight) touched.insert(u);
      // Each edge once: a replay after a Redis restart says "online" again.
      // Until the view is first seeded, a user may be online unseen.
      const bool unseeded = snapWanted && snapSeed;
      if (on ? online.insert(u).second : online.erase(u) != 0 || unseeded)
        relayPresence(u, on);
    } else if (kind == "T" && fields.size() == 7) {
      if (!own) count(&ClusterStats::received);
      const std::string key = key2(fields[3], fields[4]);
      if (snapInFlight) touched.insert(key);
      const bool on = fields[5] == "1";
      if (!own && fields[2] != id) {
        std::lock_guard<std::mutex> g(mu);
        if (on) {
          remoteTyping[key].emplace(fields[2]);
        } else if (auto it = remoteTyping.find(key); it != remoteTyping.end()) {
          it->second.erase(std::string(fields[2]));
          if (it->second.empty()) remoteTyping.erase(it);
        }
      }
      if (fields[6] == "1")
        toKeeper([u = std::string(fields[3]), t = std::string(fields[4]), on](BusTarget& k) {
          k.relayTyping(u, t, on);
        });
    } else if (kind == "B") {
      applyBroadcast();
    }
  }

  void applyBroadcast() {
    // B publisher nrooms rooms... nexcept except... sender event payload
    std::size_t i = 2;
    auto number = [&](std::size_t& n) {
      if (i >= fields.size()) return false;
      n = 0;
      for (char c : fields[i]) {
        if (c < '0' || c > '9') return false;
        n = n * 10 + static_cast<std::size_t>(c - '0');
      }
      ++i;
      return i + n <= fields.size();
    };
    auto m = std::make_shared<BroadcastMessage>();
    std::size_t nr = 0, ne = 0;
    if (!number(nr)) return;
    for (std::size_t k = 0; k < nr; ++k) m->rooms.emplace_back(fields[i++]);
    if (!number(ne)) return;
    for (std::size_t k = 0; k < ne; ++k) m->except.emplace_back(fields[i++]);
    if (i + 3 != fields.size()) return;
    m->sender = std::string(fields[i]);
    m->event = std::string(fields[i + 1]);
    m->payload = std::string(fields[i + 2]);
    count(&ClusterStats::received);
    toKeeper([m](BusTarget& k) { k.relayBroadcast(m->targets(), m->event, m->payload); });
  }
};

RedisNode::RedisNode(asio::io_context& io, RedisConfig config)
    : impl_(std::make_shared<Impl>(io, std::move(config))) {}

RedisNode::~RedisNode() {
  Impl& im = *impl_;
  im.stopping = true;
  im.target->store(nullptr);
  im.hbTimer.cancel();
  im.cmdRetry.cancel();
  im.subRetry.cancel();
  im.cmd->onDown = nullptr;
  im.sub->onDown = nullptr;
  im.sub->onPush = nullptr;
  im.hb->onDown = nullptr;
  im.cmd->close();
  im.sub->close();
  im.hb->close();
}

bool RedisNode::bind(BusTarget& keeper, Post post) {
  if (impl_->bound || !post) return false;
  impl_->bound = true;
  impl_->post = std::move(post);
  impl_->target->store(&keeper);
  return true;
}

void RedisNode::start() {
  impl_->onStrand([im = impl_.get()]() { im->start(); });
}

void RedisNode::stop(std::function<void()> done) {
  impl_->onStrand([self = impl_, done]() {
    Impl& im = *self;
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
    im.target->store(nullptr);  // nothing more reaches the Keeper
    if (!im.cmd->connected()) return finish();
    im.draining = true;
    im.hbTimer.cancel();
    // Whatever is left under this id (and older ids) goes, then the lease.
    auto ids = std::make_shared<std::vector<std::string>>(im.oldIds);
    ids->push_back(im.id);
    auto step = std::make_shared<std::function<void()>>();
    *step = [self, ids, step, finish]() {
      if (ids->empty()) {
        // The cycle through the capture ends here; nothing captured is
        // touched once the closure is gone.
        auto last = finish;
        auto cell = step;
        *cell = nullptr;
        return last();
      }
      const std::string one = ids->back();
      ids->pop_back();
      self->reap(one, true, [step]() { (*step)(); });
    };
    (*step)();
  });
}

void RedisNode::audit(std::function<void(AuditReport)> done) {
  impl_->onStrand([self = impl_, done]() {
    self->eval(*self->cmd, detail::kAudit, {}, [self, done](Reply&& r) {
      AuditReport rep;
      if (r.type == Reply::Type::kArray && !r.elements.empty()) {
        rep.ok = true;
        rep.keys = static_cast<std::size_t>(std::stoull(r.elements[0].str));
        for (std::size_t i = 1; i < r.elements.size(); ++i)
          rep.orphans.push_back(std::move(r.elements[i].str));
      }
      self->answer([done, rep = std::move(rep)]() mutable { done(std::move(rep)); });
    });
  });
}

void RedisNode::keyCount(std::function<void(std::size_t)> done) {
  impl_->onStrand([self = impl_, done]() {
    self->eval(*self->cmd, detail::kKeyCount, {}, [self, done](Reply&& r) {
      const auto n = static_cast<std::size_t>(r.integer);
      self->answer([done, n]() { done(n); });
    });
  });
}

void RedisNode::sessionUp(std::string_view session, std::string_view user) {
  impl_->onStrand([im = impl_.get(), s = std::string(session), u = std::string(user)]() {
    if (!shareable(s) || !shareable(u)) return im->count(&ClusterStats::dropped);
    // userOnline comes back through the subscription (onMessage), in order.
    im->change(detail::kSession, {s, u, "1"});
  });
}

void RedisNode::sessionDown(std::string_view session, std::string_view user) {
  impl_->onStrand([im = impl_.get(), s = std::string(session), u = std::string(user)]() {
    const bool sent = shareable(s) && shareable(u) &&
                      im->change(detail::kSession, {s, u, "0"}, [im, u](Reply&& r) {
                        // The wildcard is this node's to persist; userOffline
                        // comes through the subscription.
                        if (r.integer == 1)
                          im->toKeeper([u](BusTarget& k) { k.relayUserGone(u); });
                      });
    // Out of touch, this node cannot know whether the user is connected
    // elsewhere; it persists the wildcard (a stale "typing" row is the
    // worse error).
    if (!sent) im->toKeeper([u](BusTarget& k) { k.relayUserGone(u); });
  });
}

void RedisNode::joined(std::string_view session, std::string_view room) {
  impl_->onStrand([im = impl_.get(), s = std::string(session), r = std::string(room)]() {
    if (!shareable(s) || !shareable(r)) return im->count(&ClusterStats::dropped);
    im->change(detail::kMember, {s, r, "1"});
  });
}

void RedisNode::left(std::string_view session, std::string_view room) {
  impl_->onStrand([im = impl_.get(), s = std::string(session), r = std::string(room)]() {
    if (!shareable(s) || !shareable(r)) return;
    im->change(detail::kMember, {s, r, "0"});
  });
}

void RedisNode::typing(std::string_view user, std::string_view thread, bool started) {
  impl_->onStrand(
      [im = impl_.get(), u = std::string(user), t = std::string(thread), started]() {
        if (!shareable(u) || !shareable(t)) return im->count(&ClusterStats::dropped);
        im->change(detail::kTyping, {u, t, started ? "1" : "0"});
      });
}

void RedisNode::broadcast(const BroadcastTargets& targets, std::string_view event,
                          std::string_view payload) {
  // Encoded here (the views are the caller's), sent on the strand: handed
  // to the socket before this call returns when this thread runs the
  // io_context, the strand is idle and no write is in flight.
  std::string m;
  m.reserve(64 + payload.size());
  putField(m, "B");
  const std::size_t idAt = m.size();  // the sender's id goes here, on the strand
  putField(m, std::to_string(targets.rooms.size()));
  for (auto r : targets.rooms) putField(m, r);
  putField(m, std::to_string(targets.except.size()));
  for (auto r : targets.except) putField(m, r);
  putField(m, targets.sender);
  putField(m, event);
  putField(m, payload);
  impl_->soonOnStrand([im = impl_.get(), m = std::move(m), idAt]() mutable {
    if (!im->cmd->connected()) return im->count(&ClusterStats::dropped);
    std::string id;
    putField(id, im->id);
    m.insert(idAt, id);
    im->count(&ClusterStats::published);
    im->cmd->command({"PUBLISH", im->cfg.keyPrefix + ":ev", std::move(m)}, [im](Reply&& r) {
      if (r.error()) im->count(&ClusterStats::dropped);
    });
  });
}

bool RedisNode::typingElsewhere(std::string_view user, std::string_view thread) const noexcept {
  try {
    std::lock_guard<std::mutex> g(impl_->mu);
    return impl_->remoteTyping.count(key2(user, thread)) != 0;
  } catch (...) {
    return false;
  }
}

// Queries run as no node (they need no lease): "" as the caller's id.
void RedisNode::roomSize(std::string room, std::function<void(std::size_t)> done) {
  impl_->query(impl_->evalArgs(detail::kRoomSize, {std::move(room)}, {}), [done](Reply&& r) {
    const std::size_t n = r.type == Reply::Type::kInteger ? static_cast<std::size_t>(r.integer) : 0;
    return std::function<void()>([done, n]() { done(n); });
  });
}

void RedisNode::roomMembers(std::string room,
                            std::function<void(std::vector<std::string>)> done) {
  impl_->query(impl_->evalArgs(detail::kRoomMembers, {std::move(room)}, {}), [done](Reply&& r) {
    std::vector<std::string> v;
    for (auto& e : r.elements) v.push_back(std::move(e.str));
    return std::function<void()>([done, v = std::move(v)]() { done(v); });
  });
}

void RedisNode::isOnline(std::string user, std::function<void(bool)> done) {
  impl_->query(impl_->evalArgs(detail::kOnline, {std::move(user)}, {}), [done](Reply&& r) {
    const bool on = r.integer == 1;
    return std::function<void()>([done, on]() { done(on); });
  });
}

std::string RedisNode::id() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  return impl_->idCopy;
}

ClusterStats RedisNode::stats() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  ClusterStats s = impl_->st;
  s.leaseAgeMs = impl_->leaseAtMs < 0
                     ? -1
                     : std::chrono::duration_cast<std::chrono::milliseconds>(
                           Clock::now().time_since_epoch())
                               .count() -
                           impl_->leaseAtMs;
  return s;
}

}  // namespace roomkeeper::cluster
