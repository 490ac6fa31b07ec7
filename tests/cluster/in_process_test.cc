// SPDX-License-Identifier: MIT
// The cluster behavioural suite on the in-process backend (InProcessHub),
// plus what only this backend can show in one process: a node destroyed
// with its Keeper's sessions still in the shared view (a crash).
#include <roomkeeper/cluster/in_process.h>

#include <catch2/catch.hpp>

#include <deque>

#include "cluster/world.h"

namespace rkt {

/// N Keepers on one hub; each node's "loop" is a queue the test runs.
class InProcessWorld {
  using InProcessHub = roomkeeper::cluster::InProcessHub;

 public:
  explicit InProcessWorld(std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      auto s = std::make_unique<Server>();
      s->node = hub_.join();
      makeKeeper(*s, &clock_);
      auto* q = &queues_.emplace_back();
      REQUIRE(s->node->bind(*s->keeper, [q](std::function<void()> fn) {
        q->push_back(std::move(fn));
      }));
      servers_.push_back(std::move(s));
    }
  }
  ~InProcessWorld() {
    for (auto& s : servers_)
      if (s->keeper) s->keeper->shutdown();
    settle();
  }
  Server& s(std::size_t i) { return *servers_.at(i); }
  /// Runs every loop's queue until all are empty.
  void settle() {
    for (bool any = true; any;) {
      any = false;
      for (auto& q : queues_)
        while (!q.empty()) {
          auto fn = std::move(q.front());
          q.pop_front();
          fn();
          any = true;
        }
    }
  }
  /// Runs loop i's queue until it is empty (what it posts to itself too).
  void runLoop(std::size_t i) {
    auto& q = queues_.at(i);
    while (!q.empty()) {
      auto fn = std::move(q.front());
      q.pop_front();
      fn();
    }
  }
  std::size_t queued(std::size_t i) const { return queues_.at(i).size(); }
  bool until(const std::function<bool()>& pred) {
    settle();
    return pred();
  }
  void advance(std::chrono::milliseconds d) {
    clock_.advanceBy(d);
    for (auto& s : servers_)
      if (s->keeper) s->keeper->advance();
  }
  std::size_t shared() const { return hub_.entries(); }
  /// Node i goes without its Keeper reporting anything (a crash): the
  /// Keeper is destroyed without shutdown, then the node.
  void crash(std::size_t i) {
    s(i).keeper.reset();
    s(i).node.reset();
  }
  InProcessHub& hub() { return hub_; }

 private:
  roomkeeper::ManualClock clock_;
  InProcessHub hub_;
  std::deque<std::deque<std::function<void()>>> queues_;
  std::vector<std::unique_ptr<Server>> servers_;
};

}  // namespace rkt

#define CLUSTER_WORLD rkt::InProcessWorld
#include "cluster/suite.h"

TEST_CASE("in-process cluster: a crashed node's users go offline, its typing stops, one "
          "survivor persists the wildcard",
          "[cluster][inprocess]") {
  rkt::InProcessWorld w(3);
  rkt::join(w, 0, "gone", {"thread:5"});     // only on the node that dies
  rkt::join(w, 0, "stays", {"thread:5"});    // also on node 1
  rkt::join(w, 1, "stays", {"thread:5"});
  rkt::join(w, 2, "watcher", {"thread:5"});
  REQUIRE(w.s(0).keeper->startTyping("gone@0", "5") == roomkeeper::Result::kOk);
  w.settle();
  REQUIRE(w.s(2).count("watcher@2", "typingStarted") == 1);
  w.crash(0);
  w.settle();
  CHECK(w.hub().nodes() == 2);
  for (std::size_t i : {1u, 2u}) {
    CHECK(w.s(i).offline == std::vector<std::string>{"gone"});
    CHECK(w.s(i).countEvent("typingStopped") == (i == 2 ? 1u : 1u));
  }
  CHECK(w.s(1).wildcards("gone") + w.s(2).wildcards("gone") == 1);
  CHECK(w.s(1).wildcards("stays") + w.s(2).wildcards("stays") == 0);
  bool on = false;
  w.s(2).node->isOnline("stays", [&](bool b) { on = b; });
  w.settle();
  CHECK(on);
  // What is left in the shared view is the survivors' alone.
  w.s(1).keeper->shutdown();
  w.s(2).keeper->shutdown();
  w.settle();
  CHECK(w.shared() == 0);
}

TEST_CASE("in-process cluster: a command for a Keeper that has gone is not run",
          "[cluster][inprocess]") {
  rkt::InProcessWorld w(2);
  rkt::join(w, 0, "a", {"r"});
  rkt::join(w, 1, "b", {"r"});
  w.settle();
  roomkeeper::BroadcastTargets t;
  t.rooms = {"r"};
  w.s(0).keeper->broadcast(t, "e", "{}");  // queued for node 1's loop
  w.crash(1);                              // node 1 goes before its loop runs
  w.settle();                              // the queued command finds no Keeper
  CHECK(w.s(0).count("a@0", "e") == 1);
}

TEST_CASE("in-process cluster: an edge wakes the other loops when its own loop's turn ends, "
          "a broadcast at once",
          "[cluster][inprocess]") {
  rkt::InProcessWorld w(2);
  // Two presence edges decided on loop 0: loop 1 is not woken until loop
  // 0 runs what it posted itself (the end of its turn), and then once.
  REQUIRE(w.s(0).keeper->connectAuthenticated("u@0", "u") == Result::kOk);
  REQUIRE(w.s(0).keeper->connectAuthenticated("x@0", "x") == Result::kOk);
  CHECK(w.queued(1) == 0);
  w.runLoop(1);
  CHECK(w.s(1).online.empty());
  w.runLoop(0);
  CHECK(w.queued(1) == 1);  // one drain for both edges
  w.runLoop(1);
  CHECK(w.s(1).online == std::vector<std::string>{"u", "x"});

  // An edge, then a broadcast, both from loop 0: the broadcast wakes loop 1
  // at once, and that one drain delivers the edge queued ahead of it too.
  rkt::join(w, 1, "m", {"r"});
  w.settle();
  REQUIRE(w.s(0).keeper->connectAuthenticated("v@0", "v") == Result::kOk);
  CHECK(w.queued(1) == 0);  // the edge alone has not woken loop 1
  roomkeeper::BroadcastTargets t;
  t.rooms = {"r"};
  w.s(0).keeper->broadcast(t, "news", "{}");
  CHECK(w.queued(1) == 1);
  w.runLoop(1);
  CHECK(w.s(1).online == std::vector<std::string>{"u", "x", "m", "v"});
  CHECK(w.s(1).count("m@1", "news") == 1);
  w.settle();
  CHECK(w.s(0).online == std::vector<std::string>{"u", "x", "m", "v"});
}
