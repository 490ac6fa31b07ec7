// SPDX-License-Identifier: MIT
// File: tests/cluster/suite.h -- the cluster behavioural suite. Included by
// one test file per backend after it defines CLUSTER_WORLD (a type with
// World(n), s(i), until(pred), settle()); every case runs on that backend.
// The rules under test are cluster::Node's (roomkeeper/cluster/node.h).
#ifndef ROOMKEEPER_TESTS_CLUSTER_SUITE_H_
#define ROOMKEEPER_TESTS_CLUSTER_SUITE_H_

#include <catch2/catch.hpp>

#include "cluster/world.h"

namespace rkt {
using roomkeeper::BroadcastTargets;
using roomkeeper::Result;

// Session "<user>@<n>" of user <user> on node n, in the given rooms.
template <typename W>
void join(W& w, std::size_t n, const std::string& user, std::vector<std::string> rooms,
          const std::string& tag = "") {
  const std::string sid = user + "@" + std::to_string(n) + tag;
  REQUIRE(w.s(n).keeper->connectAuthenticated(sid, user) == Result::kOk);
  for (auto& r : rooms) REQUIRE(w.s(n).keeper->trackRoom(sid, r) == Result::kOk);
}
}  // namespace rkt

using roomkeeper::Result;

TEST_CASE("cluster: a broadcast reaches the room's members on every node, once each",
          "[cluster]") {
  CLUSTER_WORLD w(3);
  // Members of job:42 on all three nodes, one member in two named rooms.
  rkt::join(w, 0, "a", {"job:42"});
  rkt::join(w, 1, "b", {"job:42", "crew:7"});
  rkt::join(w, 2, "c", {"job:42", "muted"});
  rkt::join(w, 2, "d", {"crew:7"});
  rkt::join(w, 1, "e", {"elsewhere"});
  REQUIRE(w.until([&] {
    std::size_t n = 0;
    w.s(0).node->roomSize("job:42", [&](std::size_t k) { n = k; });
    w.settle();
    return n == 3;
  }));
  roomkeeper::BroadcastTargets t;
  t.rooms = {"job:42", "crew:7"};
  t.except = {"muted"};
  t.sender = "a@0";
  CHECK(w.s(0).keeper->broadcast(t, "jobUpdated", "{\"id\":42}") == 0);  // only the sender here
  REQUIRE(w.until([&] { return w.s(2).count("d@2", "jobUpdated") == 1; }));
  w.settle();
  CHECK(w.s(0).count("a@0", "jobUpdated") == 0);  // the sender
  CHECK(w.s(1).count("b@1", "jobUpdated") == 1);  // in both rooms: once
  CHECK(w.s(2).count("c@2", "jobUpdated") == 0);  // in an except room
  CHECK(w.s(2).count("d@2", "jobUpdated") == 1);
  CHECK(w.s(1).count("e@1", "jobUpdated") == 0);  // not in a named room
  CHECK(w.s(1).emits.back().payload == "{\"id\":42}");
}

TEST_CASE("cluster: a broadcast with no room reaches everyone on every node", "[cluster]") {
  CLUSTER_WORLD w(2);
  rkt::join(w, 0, "a", {});
  rkt::join(w, 1, "b", {});
  w.settle();
  w.s(1).keeper->broadcast({}, "notice", "{}");
  REQUIRE(w.until([&] { return w.s(0).count("a@0", "notice") == 1; }));
  w.settle();
  CHECK(w.s(1).count("b@1", "notice") == 1);
  CHECK(w.s(0).count("a@0", "notice") == 1);
}

TEST_CASE("cluster: presence is per user across nodes (two devices, two nodes)",
          "[cluster]") {
  CLUSTER_WORLD w(3);
  rkt::join(w, 0, "u", {});
  REQUIRE(w.until([&] {
    return w.s(0).online.size() == 1 && w.s(1).online.size() == 1 &&
           w.s(2).online.size() == 1;
  }));
  rkt::join(w, 1, "u", {});  // the second device: no second userOnline
  w.settle();
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(w.s(i).online == std::vector<std::string>{"u"});
    CHECK(w.s(i).offline.empty());
  }
  bool on = false;
  w.s(2).node->isOnline("u", [&](bool b) { on = b; });
  REQUIRE(w.until([&] { return on; }));
  CHECK(w.s(0).keeper->disconnect("u@0") == Result::kOk);  // one device left
  w.settle();
  for (std::size_t i = 0; i < 3; ++i) CHECK(w.s(i).offline.empty());
  CHECK(w.s(1).keeper->disconnect("u@1") == Result::kOk);  // the last one
  REQUIRE(w.until([&] {
    return w.s(0).offline.size() == 1 && w.s(1).offline.size() == 1 &&
           w.s(2).offline.size() == 1;
  }));
  w.settle();
  for (std::size_t i = 0; i < 3; ++i) CHECK(w.s(i).offline == std::vector<std::string>{"u"});
  on = true;
  w.s(2).node->isOnline("u", [&](bool b) { on = b; });
  REQUIRE(w.until([&] { return !on; }));
}

TEST_CASE("cluster: typing crosses nodes, one indicator for one user's two devices",
          "[cluster]") {
  CLUSTER_WORLD w(2);
  const std::string room = "thread:7";
  rkt::join(w, 0, "u", {room});       // u's phone on node 0
  rkt::join(w, 1, "u", {room});       // u's laptop on node 1
  rkt::join(w, 0, "m", {room});       // a member on node 0
  rkt::join(w, 1, "n", {room});       // a member on node 1
  w.settle();
  REQUIRE(w.s(0).keeper->startTyping("u@0", "7") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(1).count("n@1", "typingStarted") == 1; }));
  CHECK(w.s(0).count("m@0", "typingStarted") == 1);
  CHECK(w.s(1).count("u@1", "typingStarted") == 0);  // not to the typer's own devices
  CHECK(w.s(1).emits.back().payload == R"({"threadId":"7","userId":"u"})");
  // The laptop types too: still one indicator, nobody hears a second start.
  REQUIRE(w.s(1).keeper->startTyping("u@1", "7") == Result::kOk);
  w.settle();
  CHECK(w.s(0).count("m@0", "typingStarted") == 1);
  CHECK(w.s(1).count("n@1", "typingStarted") == 1);
  // The phone stops; the laptop still types: nobody hears typingStopped.
  REQUIRE(w.s(0).keeper->stopTyping("u@0", "7") == Result::kOk);
  w.settle();
  CHECK(w.s(0).countEvent("typingStopped") == 0);
  CHECK(w.s(1).countEvent("typingStopped") == 0);
  // The laptop's indicator clears itself after 5 s: stopped everywhere, once.
  w.advance(std::chrono::milliseconds(5001));
  REQUIRE(w.until([&] { return w.s(0).count("m@0", "typingStopped") == 1; }));
  w.settle();
  CHECK(w.s(1).count("n@1", "typingStopped") == 1);
  CHECK(w.s(0).count("m@0", "typingStopped") == 1);
  CHECK(w.s(0).count("u@0", "typingStopped") == 0);
}

TEST_CASE("cluster: a node without the thread's room keeps nothing for a relayed start, and "
          "a member who joins between start and stop hears neither",
          "[cluster]") {
  CLUSTER_WORLD w(2);
  rkt::join(w, 0, "u", {"thread:9"});
  rkt::join(w, 0, "m", {"thread:9"});
  rkt::join(w, 1, "x", {"lobby"});  // node 1 has no thread:9
  w.settle();
  const std::size_t bytesBefore = w.s(1).keeper->getMemoryStats().bytes;
  REQUIRE(w.s(0).keeper->startTyping("u@0", "9") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(0).count("m@0", "typingStarted") == 1; }));
  w.settle();
  CHECK(w.s(1).keeper->getMemoryStats().bytes == bytesBefore);  // nothing remembered
  // A member on node 1 joins while u types: told neither the start it
  // missed nor a stop for a start it never heard.
  rkt::join(w, 1, "n", {"thread:9"});
  REQUIRE(w.s(0).keeper->stopTyping("u@0", "9") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(0).count("m@0", "typingStopped") == 1; }));
  w.settle();
  CHECK(w.s(1).count("n@1", "typingStarted") == 0);
  CHECK(w.s(1).count("n@1", "typingStopped") == 0);
  // The next start reaches n, and its stop too.
  REQUIRE(w.s(0).keeper->startTyping("u@0", "9") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(1).count("n@1", "typingStarted") == 1; }));
  REQUIRE(w.s(0).keeper->stopTyping("u@0", "9") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(1).count("n@1", "typingStopped") == 1; }));
  w.settle();
  CHECK(w.s(1).count("n@1", "typingStarted") == 1);
  CHECK(w.s(1).count("n@1", "typingStopped") == 1);
}

TEST_CASE("cluster: two devices start and stop typing at once on two nodes: every member "
          "hears one typingStarted and one typingStopped",
          "[cluster]") {
  CLUSTER_WORLD w(2);
  const std::string room = "thread:9";
  rkt::join(w, 0, "u", {room});
  rkt::join(w, 1, "u", {room});
  rkt::join(w, 0, "m", {room});
  rkt::join(w, 1, "n", {room});
  w.settle();
  // Node 1's start comes before node 0's news reaches it (in-process: the
  // shared view already has node 0 typing, its relay is still queued).
  REQUIRE(w.s(0).keeper->startTyping("u@0", "9") == Result::kOk);
  REQUIRE(w.s(1).keeper->startTyping("u@1", "9") == Result::kOk);
  REQUIRE(w.until([&] {
    return w.s(0).count("m@0", "typingStarted") == 1 &&
           w.s(1).count("n@1", "typingStarted") == 1;
  }));
  w.settle();
  CHECK(w.s(0).count("m@0", "typingStarted") == 1);
  CHECK(w.s(1).count("n@1", "typingStarted") == 1);
  // Both stop before either hears of the other.
  REQUIRE(w.s(0).keeper->stopTyping("u@0", "9") == Result::kOk);
  REQUIRE(w.s(1).keeper->stopTyping("u@1", "9") == Result::kOk);
  REQUIRE(w.until([&] {
    return w.s(0).count("m@0", "typingStopped") == 1 &&
           w.s(1).count("n@1", "typingStopped") == 1;
  }));
  w.settle();
  CHECK(w.s(0).count("m@0", "typingStopped") == 1);
  CHECK(w.s(1).count("n@1", "typingStopped") == 1);
  CHECK(w.s(0).countEvent("typingStarted") + w.s(1).countEvent("typingStarted") == 2);
}

TEST_CASE("cluster: the typing wildcard is persisted only when the user's last session "
          "in the cluster goes",
          "[cluster]") {
  CLUSTER_WORLD w(2);
  rkt::join(w, 0, "u", {"thread:1"});
  rkt::join(w, 1, "u", {"thread:1"});
  w.settle();
  REQUIRE(w.s(0).keeper->startTyping("u@0", "1") == Result::kOk);
  w.settle();
  REQUIRE(w.s(0).keeper->disconnect("u@0") == Result::kOk);
  w.settle();
  CHECK(w.s(0).wildcards("u") == 0);  // still connected on node 1
  CHECK(w.s(1).wildcards("u") == 0);
  REQUIRE(w.s(1).keeper->disconnect("u@1") == Result::kOk);
  REQUIRE(w.until([&] { return w.s(1).wildcards("u") == 1; }));
  w.settle();
  CHECK(w.s(0).wildcards("u") == 0);  // once, by the last session's node
  CHECK(w.s(1).wildcards("u") == 1);
}

TEST_CASE("cluster: room size and members are cluster-wide", "[cluster]") {
  CLUSTER_WORLD w(3);
  for (std::size_t n = 0; n < 3; ++n)
    for (int i = 0; i < 4; ++i) rkt::join(w, n, "u" + std::to_string(i), {"crew:1"});
  std::size_t size = 0;
  std::vector<std::string> members;
  REQUIRE(w.until([&] {
    w.s(1).node->roomSize("crew:1", [&](std::size_t k) { size = k; });
    w.settle();
    return size == 12;
  }));
  w.s(2).node->roomMembers("crew:1", [&](std::vector<std::string> v) { members = std::move(v); });
  REQUIRE(w.until([&] { return members.size() == 12; }));
  std::sort(members.begin(), members.end());
  CHECK(members.front() == "u0@0");
  CHECK(members.back() == "u3@2");
  REQUIRE(w.s(0).keeper->untrackRoom("u0@0", "crew:1") == Result::kOk);
  REQUIRE(w.s(2).keeper->disconnect("u1@2") == Result::kOk);
  REQUIRE(w.until([&] {
    w.s(1).node->roomSize("crew:1", [&](std::size_t k) { size = k; });
    w.settle();
    return size == 10;
  }));
}

TEST_CASE("cluster: every node's clean shutdown leaves nothing in the shared view",
          "[cluster]") {
  CLUSTER_WORLD w(3);
  for (std::size_t n = 0; n < 3; ++n)
    for (int i = 0; i < 20; ++i)
      rkt::join(w, n, "u" + std::to_string(i % 7),
                {"crew:" + std::to_string(i % 3), "all", "thread:9"}, "#" + std::to_string(i));
  for (std::size_t n = 0; n < 3; ++n)
    REQUIRE(w.s(n).keeper->startTyping("u1@" + std::to_string(n) + "#1", "9") == Result::kOk);
  w.settle();
  CHECK(w.shared() > 0);
  for (std::size_t n = 0; n < 3; ++n) w.s(n).keeper->shutdown();
  REQUIRE(w.until([&] { return w.shared() == 0; }));
  for (std::size_t n = 0; n < 3; ++n) {
    const roomkeeper::MemoryStats st = w.s(n).keeper->getMemoryStats();
    CHECK(st.connectedClients == 0);
    CHECK(st.typingTimers == 0);
  }
}

#endif  // ROOMKEEPER_TESTS_CLUSTER_SUITE_H_
