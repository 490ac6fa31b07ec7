// SPDX-License-Identifier: MIT
// The cluster behavioural suite on the Redis backend (RedisNode), against a
// real redis-server started per test case, plus what only Redis shows in
// one process: a node that stops heartbeating (a crash) reaped by the
// others, a node fenced after its lease, Redis killed and restarted, the
// subscription cut by CLIENT KILL, and a clean stop that empties the
// namespace. Process-level crashes (kill -9, SIGSTOP) are in
// cluster_process_test.sh.
#include <roomkeeper/cluster/redis_node.h>

// Before Asio: Boost 1.74's asio/awaitable.hpp uses std::exchange without
// including <utility> (a C++20 build fails without this).
#include <utility>
#include <boost/asio.hpp>

#include <algorithm>

#include <catch2/catch.hpp>

#include "cluster/redis_support.h"
#include "cluster/world.h"

namespace rkt {

class RedisWorld {
 public:
  explicit RedisWorld(std::size_t n, std::chrono::milliseconds lease = std::chrono::milliseconds(5000))
      : peek_(redis_.port()) {
    for (std::size_t i = 0; i < n; ++i) add(lease);
    REQUIRE(until([&] {
      for (auto& s : servers_)
        if (!s->node->stats().connected) return false;
      return true;
    }));
  }
  ~RedisWorld() { stopAll(); }
  /// Every Keeper shuts down, then every node stops cleanly.
  void stopAll() {
    for (auto& s : servers_)
      if (s->keeper) s->keeper->shutdown();
    settle();
    for (auto& s : servers_) stopNode(*s);
  }
  void add(std::chrono::milliseconds lease) {
    auto s = std::make_unique<Server>();
    roomkeeper::cluster::RedisConfig rc;
    rc.port = redis_.port();
    rc.lease = lease;
    rc.requestTimeout = std::chrono::milliseconds(500);
    auto node = std::make_unique<roomkeeper::cluster::RedisNode>(io_, rc);
    auto* raw = node.get();
    s->node = std::move(node);
    makeKeeper(*s, &clock_);
    REQUIRE(raw->bind(*s->keeper, [this](std::function<void()> fn) {
      boost::asio::post(io_, std::move(fn));
    }));
    raw->start();
    servers_.push_back(std::move(s));
  }
  Server& s(std::size_t i) { return *servers_.at(i); }
  roomkeeper::cluster::RedisNode& redisNode(std::size_t i) {
    return static_cast<roomkeeper::cluster::RedisNode&>(*s(i).node);
  }
  bool until(const std::function<bool()>& pred,
             std::chrono::milliseconds timeout = std::chrono::milliseconds(8000)) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      io_.run_for(std::chrono::milliseconds(2));
      io_.restart();
      if (pred()) return true;
    }
    return pred();
  }
  /// Lets what is in flight arrive (a few round trips on loopback).
  void settle() {
    io_.run_for(std::chrono::milliseconds(150));
    io_.restart();
  }
  void advance(std::chrono::milliseconds d) {
    clock_.advanceBy(d);
    for (auto& s : servers_)
      if (s->keeper) s->keeper->advance();
  }
  std::size_t shared() { return peek_.stateKeys("rk"); }
  void stopNode(Server& s) {
    if (!s.node || s.stopped) return;
    bool done = false;
    static_cast<roomkeeper::cluster::RedisNode&>(*s.node).stop([&] { done = true; });
    until([&] { return done; }, std::chrono::milliseconds(3000));
    s.stopped = true;
  }
  RedisProcess& redis() { return redis_; }
  RedisPeek& peek() { return peek_; }
  boost::asio::io_context& io() { return io_; }

 private:
  RedisProcess redis_;
  RedisPeek peek_;
  boost::asio::io_context io_;
  roomkeeper::ManualClock clock_;
  std::vector<std::unique_ptr<Server>> servers_;
};

}  // namespace rkt

#define CLUSTER_WORLD rkt::RedisWorld
#include "cluster/suite.h"

using std::chrono::milliseconds;

namespace {
// Two nodes with a 1 s lease; a@0 and b@1 in `room`.
std::unique_ptr<rkt::RedisWorld> pairIn(const std::string& room) {
  auto w = std::make_unique<rkt::RedisWorld>(2, milliseconds(1000));
  rkt::join(*w, 0, "a", {room});
  rkt::join(*w, 1, "b", {room});
  w->settle();
  return w;
}
}  // namespace

TEST_CASE("redis cluster: one round trip per change, and a clean stop of every node "
          "leaves no key",
          "[cluster][redis]") {
  auto w = std::make_unique<rkt::RedisWorld>(2);
  auto& peek = w->peek();
  const long long before = peek.integer({"DBSIZE"});
  CHECK(before == 1);  // the node registry
  rkt::join(*w, 0, "u", {"crew:1", "thread:3"});
  rkt::join(*w, 1, "v", {"crew:1"});
  REQUIRE(w->s(0).keeper->startTyping("u@0", "3") == Result::kOk);
  w->settle();
  CHECK(w->shared() > 0);
  // Stats count one published change per event (each one EVAL).
  CHECK(w->s(0).node->stats().published == 4);  // up, 2 joins, typing
  CHECK(w->s(0).node->stats().dropped == 0);
  w->stopAll();
  CHECK(peek.integer({"DBSIZE"}) == 0);
}

TEST_CASE("redis cluster: a node that stops heartbeating is reaped by the others",
          "[cluster][redis]") {
  rkt::RedisWorld w(3, milliseconds(1000));
  rkt::join(w, 0, "gone", {"thread:5", "crew:1"});
  rkt::join(w, 0, "both", {"crew:1"});
  rkt::join(w, 1, "both", {"crew:1"});
  rkt::join(w, 2, "watcher", {"thread:5"});
  REQUIRE(w.s(0).keeper->startTyping("gone@0", "5") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(2).count("watcher@2", "typingStarted") == 1; }));
  // Node 0 dies: its Keeper and node go without a word (no shutdown).
  const std::string deadId = w.s(0).node->id();
  w.s(0).keeper.reset();
  w.s(0).node.reset();
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(w.until([&] {
    return w.s(1).offline.size() == 1 && w.s(2).offline.size() == 1 &&
           w.s(2).count("watcher@2", "typingStopped") == 1;
  }));
  const auto ms =
      std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - t0).count();
  INFO("kill-to-clean " << ms << " ms");
  CHECK(ms < 10000);
  CHECK(w.s(1).offline == std::vector<std::string>{"gone"});
  CHECK(w.s(1).wildcards("gone") + w.s(2).wildcards("gone") == 1);
  w.settle();
  for (auto& k : w.peek().strings({"KEYS", "rk:*"})) CHECK(k.find(deadId) == std::string::npos);
  bool on = false;
  w.s(2).node->isOnline("both", [&](bool b) { on = b; });
  REQUIRE(w.until([&] { return on; }));
  roomkeeper::cluster::AuditReport rep;
  w.redisNode(1).audit([&](roomkeeper::cluster::AuditReport r) { rep = std::move(r); });
  REQUIRE(w.until([&] { return rep.ok; }));
  CHECK(rep.orphans.empty());
  // Every key expires: one made to live for ever is what the audit names.
  const std::string live = "rk:node:" + w.s(1).node->id() + ":s";
  CHECK(w.peek().integer({"PTTL", live}) > 0);
  REQUIRE(w.peek().integer({"PERSIST", live}) == 1);
  rep = {};
  w.redisNode(1).audit([&](roomkeeper::cluster::AuditReport r) { rep = std::move(r); });
  REQUIRE(w.until([&] { return rep.ok; }));
  CHECK(rep.orphans == std::vector<std::string>{live});
}

TEST_CASE("redis cluster: Redis killed and restarted: local work goes on, the shared view "
          "converges",
          "[cluster][redis]") {
  auto pw = pairIn("crew:1");
  rkt::RedisWorld& w = *pw;
  w.redis().stop();
  // Local operation never fails or waits because of Redis.
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(w.s(0).keeper->connectAuthenticated("c@0", "c") == Result::kOk);
  REQUIRE(w.s(0).keeper->trackRoom("c@0", "crew:1") == Result::kOk);
  REQUIRE(w.s(0).keeper->disconnect("a@0") == Result::kOk);
  CHECK(std::chrono::steady_clock::now() - t0 < milliseconds(50));
  w.settle();
  CHECK(w.s(0).node->stats().dropped > 0);
  w.redis().start();  // empty: no persistence
  std::size_t size = 0;
  REQUIRE(w.until([&] {
    w.s(1).node->roomSize("crew:1", [&](std::size_t k) { size = k; });
    return size == 2 && w.s(0).node->stats().connected && w.s(1).node->stats().connected;
  }, milliseconds(15000)));
  std::vector<std::string> members;
  w.s(1).node->roomMembers("crew:1", [&](std::vector<std::string> v) { members = std::move(v); });
  REQUIRE(w.until([&] { return members.size() == 2; }));
  std::sort(members.begin(), members.end());
  CHECK(members == std::vector<std::string>{"b@1", "c@0"});
  // Broadcasts reach across again.
  roomkeeper::BroadcastTargets t;
  t.rooms = {"crew:1"};
  w.s(1).keeper->broadcast(t, "after", "{}");
  REQUIRE(w.until([&] { return w.s(0).count("c@0", "after") == 1; }));
}

TEST_CASE("redis cluster: the subscription cut by CLIENT KILL comes back (resubscribe, "
          "resync)",
          "[cluster][redis]") {
  auto pw = pairIn("r");
  rkt::RedisWorld& w = *pw;
  CHECK(w.peek().integer({"CLIENT", "KILL", "TYPE", "pubsub"}) == 2);
  REQUIRE(w.until([&] {
    return w.s(0).node->stats().resyncs >= 1 && w.s(1).node->stats().resyncs >= 1;
  }));
  roomkeeper::BroadcastTargets t;
  t.rooms = {"r"};
  REQUIRE(w.until([&] {
    w.s(0).keeper->broadcast(t, "ping", "{}");
    w.settle();
    return w.s(1).count("b@1", "ping") >= 1;
  }));
}

TEST_CASE("redis cluster: what was published while the subscriptions were down is mended "
          "(presence and typing differences, each once)",
          "[cluster][redis]") {
  auto pw = pairIn("r");
  rkt::RedisWorld& w = *pw;
  rkt::join(w, 1, "c", {"thread:9"});
  rkt::join(w, 0, "watcher", {"thread:9"});
  REQUIRE(w.s(1).keeper->startTyping("c@1", "9") == Result::kOk);
  REQUIRE(w.until([&] {
    return w.s(0).count("watcher@0", "typingStarted") == 1 &&
           std::count(w.s(0).online.begin(), w.s(0).online.end(), "c") == 1;
  }));
  // Every subscription drops; before any is back (the first retry waits
  // 100 ms), c goes and d comes, on node 1.
  REQUIRE(w.peek().integer({"CLIENT", "KILL", "TYPE", "pubsub"}) == 2);
  REQUIRE(w.s(1).keeper->disconnect("c@1") == Result::kOk);
  rkt::join(w, 1, "d", {"r"});
  // Both nodes missed both edges, node 1 its own too: a lease after the
  // subscription is back, each relays the differences, once.
  auto seen = [](const std::vector<std::string>& v, const char* u) {
    return std::count(v.begin(), v.end(), u);
  };
  REQUIRE(w.until([&] {
    return seen(w.s(0).offline, "c") == 1 && seen(w.s(0).online, "d") == 1 &&
           seen(w.s(1).offline, "c") == 1 && seen(w.s(1).online, "d") == 1 &&
           w.s(0).count("watcher@0", "typingStopped") == 1;
  }));
  CHECK(w.s(0).node->stats().resyncs >= 1);
  w.settle();
  w.settle();
  CHECK(seen(w.s(0).offline, "c") == 1);
  CHECK(seen(w.s(0).online, "d") == 1);
  CHECK(seen(w.s(0).online, "c") == 1);
  CHECK(w.s(0).count("watcher@0", "typingStopped") == 1);
  CHECK_FALSE(w.s(0).node->typingElsewhere("c", "9"));
  // Afterwards the subscription carries the news again, each edge once.
  REQUIRE(w.s(1).keeper->disconnect("d@1") == Result::kOk);
  REQUIRE(w.until([&] { return seen(w.s(0).offline, "d") == 1; }));
  w.settle();
  CHECK(seen(w.s(0).offline, "d") == 1);
  CHECK(seen(w.s(1).offline, "d") == 1);
}

TEST_CASE("redis cluster: a node that starts later hears userOffline for a user who was "
          "online before it started",
          "[cluster][redis]") {
  auto pw = pairIn("r");
  rkt::RedisWorld& w = *pw;
  w.add(milliseconds(1000));
  REQUIRE(w.until([&] { return w.s(2).node->stats().connected; }));
  w.settle();
  CHECK(w.s(2).online.empty());  // the view is seeded without a word
  REQUIRE(w.s(0).keeper->disconnect("a@0") == Result::kOk);
  REQUIRE(w.until([&] { return !w.s(2).offline.empty(); }));
  w.settle();
  CHECK(w.s(2).offline == std::vector<std::string>{"a"});
  CHECK(w.s(1).offline == std::vector<std::string>{"a"});
}

TEST_CASE("redis cluster: a node whose lease expired is fenced and re-registers; no "
          "session exists twice",
          "[cluster][redis]") {
  auto pw = pairIn("r");
  rkt::RedisWorld& w = *pw;
  const std::string first = w.s(0).node->id();
  // Make node 0's lease look expired, as after a pause longer than it.
  CHECK(w.peek().integer({"ZADD", "rk:nodes", "1", first}) == 0);
  w.settle();
  INFO("fenced " << w.s(0).node->stats().fenced << " id " << w.s(0).node->id() << " was "
                 << first << " connected " << w.s(0).node->stats().connected);
  REQUIRE(w.until([&] { return w.s(0).node->stats().fenced >= 1 && w.s(0).node->id() != first &&
                               w.s(0).node->stats().connected; }));
  std::vector<std::string> members;
  REQUIRE(w.until([&] {
    w.s(1).node->roomMembers("r", [&](std::vector<std::string> v) { members = std::move(v); });
    w.settle();
    std::sort(members.begin(), members.end());
    return members == std::vector<std::string>{"a@0", "b@1"};
  }));
  // The old id holds nothing any more; the user never looked offline.
  for (auto& k : w.peek().strings({"KEYS", "rk:*"})) CHECK(k.find(first) == std::string::npos);
  CHECK(w.s(1).offline.empty());
}
