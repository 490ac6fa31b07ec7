// SPDX-License-Identifier: MIT
// File: bench/cluster_workload.cc -- W4 `cluster` of shared/bench/WORKLOAD.md:
// N = 3 node processes (this program again, --cluster-node) and one
// redis-server, all started here; S sessions, session s on node s % N, user
// user-<s % (S/2)>, rooms user:<user>, crew:<s%100>, job:<s%500>,
// thread:<s%1000> and all. Timestamps are CLOCK_MONOTONIC (steady_clock),
// the same clock in every process of one machine. Phases: connect
// (presence_visible_ms_p99), broadcast (1,000 warm-up, then 2,000/s for 10 s
// to random crew rooms, then to `all`), typing, crash (kill -9 of one node:
// kill_to_clean_ms), stop (orphan_keys). Redis commands per join / typing
// start from INFO commandstats deltas, bytes per session from used_memory.
//
// The parent talks to each node over its stdin/stdout, one line a command,
// one "ok ..." line (after any data lines) when it is done.
#include "cluster_workload.h"

#include <roomkeeper/cluster/redis_node.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
// Before Asio: Boost 1.74's asio/awaitable.hpp uses std::exchange without
// including <utility> (a C++20 build fails without this).
#include <utility>
#include <boost/asio.hpp>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench_util.h"
#include "cluster/redis_support.h"

namespace {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

std::int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch())
      .count();
}

std::string userOf(std::size_t s, std::size_t S) {
  return "user-" + std::to_string(s % std::max<std::size_t>(1, S / 2));
}

// ---- A node process ----------------------------------------------------------

class NodeProcess {
 public:
  NodeProcess(std::size_t index, std::size_t nodes, std::size_t sessions, std::uint16_t port)
      : index_(index), nodes_(nodes), S_(sessions), in_(io_, ::dup(0)), tick_(io_) {
    roomkeeper::cluster::RedisConfig rc;
    rc.port = port;
    node_ = std::make_unique<roomkeeper::cluster::RedisNode>(io_, rc);
    roomkeeper::KeeperCallbacks cb;
    cb.userOnline = [this](std::string_view u) { online_.emplace_back(u, nowNs()); };
    cb.userOffline = [this](std::string_view) { ++offline_; };
    cb.emit = [this](std::string_view session, std::string_view event, std::string_view p) {
      onEmit(session, event, p);
    };
    roomkeeper::KeeperOptions o;
    o.bus = node_.get();
    o.authTimeout = roomkeeper::Millis{0};
    keeper_ = std::make_unique<roomkeeper::Keeper>(std::move(cb), o);
    node_->bind(*keeper_, [this](std::function<void()> fn) { asio::post(io_, std::move(fn)); });
    node_->start();
  }

  int run() {
    readLine();
    io_.run();
    return 0;
  }

 private:
  void out(const std::string& line) { std::fwrite(line.data(), 1, line.size(), stdout); }
  void done(const std::string& rest = "") {
    out("ok" + (rest.empty() ? "" : " " + rest) + "\n");
    std::fflush(stdout);
  }

  void readLine() {
    asio::async_read_until(in_, buf_, '\n', [this](boost::system::error_code ec, std::size_t) {
      if (ec) return stop();  // the parent has gone
      std::istream is(&buf_);
      std::string line;
      std::getline(is, line);
      command(line);
      readLine();
    });
  }

  void command(const std::string& line) {
    std::istringstream is(line);
    std::string cmd;
    is >> cmd;
    if (cmd == "wait") return waitRegistered();
    if (cmd == "connect") return connectAll();
    if (cmd == "join") return joinAll();
    if (cmd == "presence") return presence();
    if (cmd == "bcast") {
      std::string kind;
      std::size_t count = 0;
      double rate = 0;
      std::int64_t start = 0;
      is >> kind >> count >> rate >> start;
      return broadcasts(kind, count, rate, start);
    }
    if (cmd == "report") return report();
    if (cmd == "reset") {
      // Before a phase, on every node, so that no node clears what another
      // node's first messages already brought.
      sentTo_.clear();
      received_.clear();
      // Room for a phase's broadcasts up front (the peer's harness keeps
      // them in arrays made before the phase): no rehash of 20,000
      // entries in the middle of a measured delivery.
      received_.reserve(32768);
      sentTo_.reserve(32768 / nodes_ + 1);
      cur_ = nullptr;
      typingSeen_.clear();
      typingStart_.clear();
      return done();
    }
    if (cmd == "received") {
      std::uint64_t n = 0;
      for (auto& [id, r] : received_) n += r.first;
      return done(std::to_string(n));
    }
    if (cmd == "typing") return typing();
    if (cmd == "typingreport") return typingReport();
    if (cmd == "offline") return done(std::to_string(offline_));
    if (cmd == "id") return done(node_->id());
    if (cmd == "stop") return stop();
    done("unknown");
  }

  // After every change sent so far has been applied (replies in order).
  void barrier(std::function<void()> then) {
    node_->isOnline("-", [then](bool) { then(); });
  }

  void waitRegistered() {
    if (node_->stats().connected) return done();
    tick_.expires_after(std::chrono::milliseconds(10));
    tick_.async_wait([this](auto) { waitRegistered(); });
  }

  template <typename F>
  void chunked(std::size_t from, F each) {
    std::size_t s = from, k = 0;
    for (; s < S_ && k < 500; s += nodes_, ++k) each(s);
    if (s >= S_) return barrier([this] { done(); });
    barrier([this, s, each] { chunked(s, each); });
  }

  void connectAll() {
    chunked(index_, [this](std::size_t s) {
      const std::string sid = "s" + std::to_string(s);
      connectedAt_.emplace_back(userOf(s, S_), nowNs());
      if (keeper_->connectAuthenticated(sid, userOf(s, S_)) != roomkeeper::Result::kOk)
        std::abort();
    });
  }

  void joinAll() {
    chunked(index_, [this](std::size_t s) {
      const std::string sid = "s" + std::to_string(s);
      for (const std::string& r :
           {"user:" + userOf(s, S_), "crew:" + std::to_string(s % 100),
            "job:" + std::to_string(s % 500), "thread:" + std::to_string(s % 1000),
            std::string("all")})
        if (keeper_->trackRoom(sid, r) != roomkeeper::Result::kOk) std::abort();
    });
  }

  void presence() {
    for (auto& [u, t] : connectedAt_) out("C " + u + " " + std::to_string(t) + "\n");
    for (auto& [u, t] : online_) out("O " + u + " " + std::to_string(t) + "\n");
    done();
  }

  void onEmit(std::string_view, std::string_view event, std::string_view payload) {
    const std::int64_t t = nowNs();
    if (event == "b") {
      // payload: <id> <sendNs>. The members of one broadcast get the same
      // payload one after the other, so it is parsed once per broadcast
      // and each member costs a compare, a clock read and a count -- as the
      // peer's harness does (sio_redis_cluster.js parses once per packet).
      if (cur_ == nullptr || payload != curPayload_) {
        std::size_t id = 0;
        std::from_chars(payload.data(), payload.data() + payload.size(), id);
        curPayload_.assign(payload.data(), payload.size());
        cur_ = &received_[id];
      }
      ++cur_->first;
      cur_->second = std::max(cur_->second, t);
    } else if (event == "typingStarted") {
      // {"threadId":"…","userId":"…"}: the pair, as a key
      auto& r = typingSeen_[std::string(payload)];
      r = std::max(r, t);
    }
  }

  // This node's share of one schedule for the whole cluster, as the peer's
  // harness keeps it: broadcast `id` (this node sends index_, index_ +
  // nodes_, ...) is due at start + id / rate, so the nodes' sends take
  // turns, evenly spaced; the node sleeps until its next one is due.
  void broadcasts(const std::string& kind, std::size_t count, double rate, std::int64_t start) {
    auto k = std::make_shared<std::size_t>(0);
    auto rng = std::make_shared<std::mt19937>(static_cast<unsigned>(index_ * 7919 + 1));
    auto step = std::make_shared<std::function<void()>>();
    const auto dueNs = [this, rate, start](std::size_t k) {
      const double id = static_cast<double>(index_ + nodes_ * k);
      return rate <= 0 ? start : start + static_cast<std::int64_t>(id / rate * 1e9);
    };
    *step = [this, kind, count, k, rng, step, dueNs]() {
      for (; *k < count && dueNs(*k) <= nowNs(); ++*k) {
        const std::size_t id = index_ + nodes_ * *k;
        const std::string room =
            kind == "all" ? std::string("all") : "crew:" + std::to_string((*rng)() % 100);
        const std::int64_t sendNs = nowNs();
        const std::string payload = std::to_string(id) + " " + std::to_string(sendNs);
        sentTo_.push_back({id, room, sendNs, sendNs - dueNs(*k)});
        roomkeeper::BroadcastTargets t;
        t.rooms.push_back(room);
        keeper_->broadcast(t, "b", payload);
      }
      if (*k >= count) {
        NodeProcess* self = this;  // the closure goes with the next line
        auto cell = step;
        *cell = nullptr;
        return self->barrier([self] { self->done(); });
      }
      tick_.expires_at(Clock::time_point(std::chrono::nanoseconds(dueNs(*k))));
      tick_.async_wait([step](auto) {
        if (*step) (*step)();
      });
    };
    (*step)();
  }

  void report() {
    for (auto& s : sentTo_)
      out("S " + std::to_string(s.id) + " " + s.room + " " + std::to_string(s.t) + " " +
          std::to_string(s.lag) + "\n");
    for (auto& [id, r] : received_)
      out("R " + std::to_string(id) + " " + std::to_string(r.first) + " " +
          std::to_string(r.second) + "\n");
    done();
  }

  void typing() {
    for (std::size_t s = index_; s < S_; s += nodes_) {
      const std::string thread = std::to_string(s % 1000);
      typingStart_.emplace_back("{\"threadId\":\"" + thread + "\",\"userId\":\"" +
                                    userOf(s, S_) + "\"}",
                                nowNs());
      const roomkeeper::Result r = keeper_->startTyping("s" + std::to_string(s), thread);
      if (r != roomkeeper::Result::kOk && r != roomkeeper::Result::kAlreadyDone) std::abort();
    }
    barrier([this] { done(); });
  }

  void typingReport() {
    for (auto& [k, t] : typingStart_) out("TS " + std::to_string(t) + " " + k + "\n");
    for (auto& [k, t] : typingSeen_) out("TR " + std::to_string(t) + " " + k + "\n");
    done();
  }

  void stop() {
    if (stopping_) return;
    stopping_ = true;
    keeper_->shutdown();
    node_->stop([this] {
      done();
      io_.stop();
    });
  }

  struct Sent {
    std::size_t id;
    std::string room;
    std::int64_t t;    // sent (the latency's start)
    std::int64_t lag;  // sent minus due on the schedule: how late the sender was
  };
  std::size_t index_, nodes_, S_;
  asio::io_context io_;
  asio::posix::stream_descriptor in_;
  asio::streambuf buf_;
  asio::steady_timer tick_;
  std::unique_ptr<roomkeeper::cluster::RedisNode> node_;
  std::unique_ptr<roomkeeper::Keeper> keeper_;
  std::vector<std::pair<std::string, std::int64_t>> connectedAt_, online_, typingStart_;
  std::unordered_map<std::size_t, std::pair<std::size_t, std::int64_t>> received_;
  // The broadcast whose members are being told (onEmit); std::unordered_map
  // keeps element addresses across inserts, and reset clears both.
  std::pair<std::size_t, std::int64_t>* cur_ = nullptr;
  std::string curPayload_;
  std::unordered_map<std::string, std::int64_t> typingSeen_;
  std::vector<Sent> sentTo_;
  std::size_t offline_ = 0;
  bool stopping_ = false;
};

// ---- The parent --------------------------------------------------------------

struct Child {
  pid_t pid = -1;
  std::FILE* to = nullptr;
  std::FILE* from = nullptr;
  bool alive = true;

  void send(const std::string& cmd) {
    std::fprintf(to, "%s\n", cmd.c_str());
    std::fflush(to);
  }
  // Data lines until "ok ...", which is returned (without "ok").
  std::string wait(std::vector<std::string>* lines = nullptr) {
    char* buf = nullptr;
    std::size_t cap = 0;
    std::string last;
    while (::getline(&buf, &cap, from) > 0) {
      std::string l(buf);
      if (!l.empty() && l.back() == '\n') l.pop_back();
      if (l.rfind("ok", 0) == 0) {
        last = l.size() > 3 ? l.substr(3) : "";
        break;
      }
      if (lines) lines->push_back(std::move(l));
    }
    std::free(buf);
    return last;
  }
};

Child spawn(const char* self, std::size_t i, std::size_t n, std::size_t S, std::uint16_t port) {
  int down[2], up[2];
  if (::pipe(down) != 0 || ::pipe(up) != 0) std::abort();
  Child c;
  c.pid = ::fork();
  if (c.pid == 0) {
    ::dup2(down[0], 0);
    ::dup2(up[1], 1);
    ::close(down[1]);
    ::close(up[0]);
    const std::string si = std::to_string(i), sn = std::to_string(n), ss = std::to_string(S),
                      sp = std::to_string(port);
    ::execl(self, self, "--cluster-node", si.c_str(), sn.c_str(), ss.c_str(), sp.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(down[0]);
  ::close(up[1]);
  c.to = ::fdopen(down[1], "w");
  c.from = ::fdopen(up[0], "r");
  return c;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const auto k = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(k, v.size() - 1)];
}

long long infoField(rkt::RedisPeek& peek, const std::string& section, const std::string& key) {
  const std::string text = peek.text({"INFO", section});
  long long total = 0;
  std::istringstream is(text);
  std::string line;
  while (std::getline(is, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    // "calls": every command Redis ran, those inside scripts included;
    // "evalsha": the scripts (one per change this side sends).
    const bool all = key == "calls" && line.rfind("cmdstat_", 0) == 0;
    const bool scripts = key == "evalsha" && line.rfind("cmdstat_evalsha:", 0) == 0;
    if (all || scripts) {
      const auto at = line.find("calls=");
      if (at != std::string::npos) total += std::atoll(line.c_str() + at + 6);
    } else if (line.rfind(key + ":", 0) == 0) {
      return std::atoll(line.c_str() + key.size() + 1);
    }
  }
  return total;
}

struct Delivery {
  double p50us = 0, p99us = 0;
  double sendLagP99us = 0;  // how late the senders sent (not in the latency)
  std::uint64_t delivered = 0, expected = 0;
};

// `total` broadcasts split over the nodes (the first ones send one more
// when it does not divide) on one schedule, `rate` a second in all (0: at
// once), the nodes taking turns.
Delivery broadcastPhase(std::vector<Child>& nodes, const std::string& kind, std::size_t total,
                        double rate, std::size_t S) {
  const std::size_t n = nodes.size();
  for (auto& c : nodes) c.send("reset");
  for (auto& c : nodes) c.wait();
  // One schedule: broadcast id is due at start + id / rate, whichever node
  // sends it; 200 ms from now, so that every node has its command first.
  const std::int64_t start = nowNs() + 200'000'000;
  for (std::size_t i = 0; i < n; ++i)
    nodes[i].send("bcast " + kind + " " + std::to_string(total / n + (i < total % n ? 1 : 0)) +
                  " " + std::to_string(rate) + " " + std::to_string(start));
  for (auto& c : nodes) c.wait();
  // Every message has been published; wait until what the nodes have
  // delivered stops growing (for 500 ms; at most 10 s), then collect.
  std::uint64_t last = 0;
  auto still = Clock::now();
  for (auto waitFrom = Clock::now(); Clock::now() - waitFrom < std::chrono::seconds(10);) {
    std::uint64_t n = 0;
    for (auto& c : nodes) {
      c.send("received");
      n += std::strtoull(c.wait().c_str(), nullptr, 10);
    }
    if (n != last) {
      last = n;
      still = Clock::now();
    } else if (Clock::now() - still > std::chrono::milliseconds(500)) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::map<std::size_t, std::pair<std::string, std::int64_t>> sent;
  std::vector<double> lags;
  std::map<std::size_t, std::pair<std::uint64_t, std::int64_t>> got;
  for (auto& c : nodes) {
    std::vector<std::string> lines;
    c.send("report");
    c.wait(&lines);
    for (auto& l : lines) {
      std::istringstream is(l);
      std::string tag;
      is >> tag;
      std::size_t id = 0;
      is >> id;
      if (tag == "S") {
        std::string room;
        std::int64_t t = 0, lag = 0;
        is >> room >> t >> lag;
        sent[id] = {room, t};
        lags.push_back(static_cast<double>(lag) / 1000.0);
      } else if (tag == "R") {
        std::uint64_t n = 0;
        std::int64_t t = 0;
        is >> n >> t;
        got[id].first += n;
        got[id].second = std::max(got[id].second, t);
      }
    }
  }
  Delivery d;
  std::vector<double> lat;
  for (auto& [id, s] : sent) {
    // Members of crew:k: sessions with s % 100 == k; of all: every session.
    const std::uint64_t members = s.first == "all" ? S : S / 100 + (std::stoul(s.first.substr(5)) < S % 100 ? 1 : 0);
    d.expected += members;
    auto it = got.find(id);
    if (it == got.end()) continue;
    d.delivered += it->second.first;
    lat.push_back(static_cast<double>(it->second.second - s.second) / 1000.0);
  }
  d.p50us = percentile(lat, 0.50);
  d.p99us = percentile(lat, 0.99);
  d.sendLagP99us = percentile(lags, 0.99);
  return d;
}

}  // namespace

int runClusterNode(int argc, char** argv) {
  if (argc < 6) return 2;
  NodeProcess p(std::strtoull(argv[2], nullptr, 10), std::strtoull(argv[3], nullptr, 10),
                std::strtoull(argv[4], nullptr, 10),
                static_cast<std::uint16_t>(std::atoi(argv[5])));
  return p.run();
}

void runClusterWorkload(const char* self, std::size_t S) {
  const std::size_t N = 3;
  rkt::RedisProcess redis;
  rkt::RedisPeek peek(redis.port());
  std::vector<Child> nodes;
  for (std::size_t i = 0; i < N; ++i) nodes.push_back(spawn(self, i, N, S, redis.port()));
  for (auto& c : nodes) c.send("wait");
  for (auto& c : nodes) c.wait();
  const long long mem0 = infoField(peek, "memory", "used_memory");

  // 1. connect (presence), then join.
  for (auto& c : nodes) c.send("connect");
  for (auto& c : nodes) c.wait();
  const long long calls0 = infoField(peek, "commandstats", "calls");
  const long long evals0 = infoField(peek, "commandstats", "evalsha");
  for (auto& c : nodes) c.send("join");
  for (auto& c : nodes) c.wait();
  const long long calls1 = infoField(peek, "commandstats", "calls");
  const long long evals1 = infoField(peek, "commandstats", "evalsha");
  const long long mem1 = infoField(peek, "memory", "used_memory");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::unordered_map<std::string, std::int64_t> firstConnect, lastOnline;
  std::unordered_map<std::string, std::size_t> onlineSeen;
  for (auto& c : nodes) {
    std::vector<std::string> lines;
    c.send("presence");
    c.wait(&lines);
    for (auto& l : lines) {
      std::istringstream is(l);
      std::string tag, user;
      std::int64_t t = 0;
      is >> tag >> user >> t;
      if (tag == "C") {
        auto [it, fresh] = firstConnect.emplace(user, t);
        if (!fresh) it->second = std::min(it->second, t);
      } else {
        lastOnline[user] = std::max(lastOnline[user], t);
        ++onlineSeen[user];
      }
    }
  }
  std::vector<double> presence;
  std::size_t presenceMissing = 0;
  for (auto& [u, t0] : firstConnect) {
    if (onlineSeen[u] < N) {
      ++presenceMissing;
      continue;
    }
    presence.push_back(static_cast<double>(lastOnline[u] - t0) / 1e6);
  }

  // 2. broadcast: warm-up, then 2,000/s for 10 s (crew), then the same to all.
  broadcastPhase(nodes, "crew", 1000, 2000, S);  // warm-up, not reported
  const Delivery crew = broadcastPhase(nodes, "crew", 20000, 2000, S);
  const Delivery all = broadcastPhase(nodes, "all", 20000, 2000, S);

  // 3. typing.
  const long long calls2 = infoField(peek, "commandstats", "calls");
  const long long evals2 = infoField(peek, "commandstats", "evalsha");
  for (auto& c : nodes) c.send("reset");
  for (auto& c : nodes) c.wait();
  for (auto& c : nodes) c.send("typing");
  for (auto& c : nodes) c.wait();
  const long long calls3 = infoField(peek, "commandstats", "calls");
  const long long evals3 = infoField(peek, "commandstats", "evalsha");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::unordered_map<std::string, std::int64_t> startAt;
  std::vector<std::unordered_map<std::string, std::int64_t>> seenAt(N);
  std::vector<std::unordered_map<std::string, std::size_t>> startedOn(N);
  for (std::size_t i = 0; i < N; ++i) {
    std::vector<std::string> lines;
    nodes[i].send("typingreport");
    nodes[i].wait(&lines);
    for (auto& l : lines) {
      std::istringstream is(l);
      std::string tag, key;
      std::int64_t t = 0;
      is >> tag >> t >> key;
      if (tag == "TS") {
        auto [it, fresh] = startAt.emplace(key, t);
        if (!fresh) it->second = std::min(it->second, t);
        ++startedOn[i][key];
      } else {
        seenAt[i][key] = t;
      }
    }
  }
  std::vector<double> typingLat;
  for (auto& [key, t0] : startAt)
    for (std::size_t i = 0; i < N; ++i) {
      if (startedOn[i].count(key)) continue;  // not another node
      auto it = seenAt[i].find(key);
      if (it != seenAt[i].end()) typingLat.push_back(static_cast<double>(it->second - t0) / 1000.0);
    }

  // 4. crash: kill -9 of the last node.
  Child& victim = nodes.back();
  victim.send("id");
  const std::string dead = victim.wait();
  const std::size_t soloUsers = [&] {
    std::unordered_map<std::string, std::set<std::size_t>> where;
    for (std::size_t s = 0; s < S; ++s) where[userOf(s, S)].insert(s % N);
    std::size_t n = 0;
    for (auto& [u, w] : where) n += w.size() == 1 && *w.begin() == N - 1;
    return n;
  }();
  const std::int64_t k0 = nowNs();
  ::kill(victim.pid, SIGKILL);
  ::waitpid(victim.pid, nullptr, 0);
  victim.alive = false;
  double killToClean = std::nan("");
  while (nowNs() - k0 < 30'000'000'000LL) {
    bool gone = peek.nil({"ZSCORE", "rk:nodes", dead}) &&
                peek.strings({"KEYS", "rk:node:" + dead + ":*"}).empty();
    for (std::size_t i = 0; gone && i + 1 < N; ++i) {
      nodes[i].send("offline");
      gone = std::strtoull(nodes[i].wait().c_str(), nullptr, 10) >= soloUsers;
    }
    if (gone) {
      killToClean = static_cast<double>(nowNs() - k0) / 1e6;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  // 5. stop.
  for (std::size_t i = 0; i + 1 < N; ++i) nodes[i].send("stop");
  for (std::size_t i = 0; i + 1 < N; ++i) {
    nodes[i].wait();
    ::waitpid(nodes[i].pid, nullptr, 0);
  }
  const std::size_t orphans = peek.keys("rk");

  const double joins = static_cast<double>(S) * 5;
  JsonLine line;
  line.addString("workload", "cluster")
      .addString("system", "roomkeeper")
      .addCount("sessions", S)
      .addCount("nodes", N)
      .addNumber("presence_visible_ms_p99", percentile(presence, 0.99), 3)
      .addCount("presence_missing", presenceMissing)
      .addNumber("broadcast_p50_us_crew", crew.p50us, 1)
      .addNumber("broadcast_p99_us_crew", crew.p99us, 1)
      .addNumber("broadcast_p50_us_all", all.p50us, 1)
      .addNumber("broadcast_p99_us_all", all.p99us, 1)
      .addCount("delivered", crew.delivered + all.delivered)
      .addCount("expected", crew.expected + all.expected)
      .addCount("lost", crew.expected + all.expected - crew.delivered - all.delivered)
      .addObject("crew", JsonLine()
                             .addCount("broadcasts", 20000)
                             .addCount("expected", crew.expected)
                             .addCount("delivered", crew.delivered)
                             .addNumber("send_lag_p99_us", crew.sendLagP99us, 1))
      .addObject("all", JsonLine()
                            .addCount("broadcasts", 20000)
                            .addCount("expected", all.expected)
                            .addCount("delivered", all.delivered)
                            .addNumber("send_lag_p99_us", all.sendLagP99us, 1))
      .addNumber("typing_cross_node_p99_us", percentile(typingLat, 0.99), 1)
      .addNumber("kill_to_clean_ms", killToClean, 0)
      .addCount("orphan_keys", orphans)
      // Commands sent (each one script, one round trip, pipelined), and the
      // commands Redis ran inside them; the barrier query of each chunk of
      // 500 sessions is in the totals (+1/2500 per join).
      .addNumber("redis_cmds_per_join", static_cast<double>(evals1 - evals0) / joins, 3)
      .addNumber("redis_cmds_per_typing_start",
                 static_cast<double>(evals3 - evals2) / static_cast<double>(S), 3)
      .addNumber("redis_inner_cmds_per_join", static_cast<double>(calls1 - calls0) / joins, 3)
      .addNumber("redis_inner_cmds_per_typing_start",
                 static_cast<double>(calls3 - calls2) / static_cast<double>(S), 3)
      .addNumber("redis_bytes_per_session", static_cast<double>(mem1 - mem0) / static_cast<double>(S), 0);
  line.print();
}
