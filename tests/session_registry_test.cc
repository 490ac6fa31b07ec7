// SPDX-License-Identifier: MIT
//
// SessionRegistry: socket.io-adapter's behaviours (rooms, events, broadcast,
// the disconnect tombstone), limits, re-entrant and throwing callbacks, and a
// randomized model test against plain std::map/std::set.
#include <roomkeeper/session_registry.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "test_support.h"


namespace {

using roomkeeper::BroadcastTargets;
using roomkeeper::Limits;
using roomkeeper::LogLevel;
using roomkeeper::RegistryCallbacks;
using roomkeeper::RegistryStats;
using roomkeeper::Result;
using roomkeeper::SessionHandle;
using roomkeeper::SessionRegistry;

using Strings = std::vector<std::string>;

std::string cat(std::string_view a, std::string_view b) {
  std::string s(a);
  s += ':';
  s += b;
  return s;
}
std::string cat(std::string_view a, std::string_view b, std::string_view c) {
  return cat(cat(a, b), c);
}

Strings sorted(Strings v) {
  std::sort(v.begin(), v.end());
  return v;
}

/// Records every callback as "kind:args" and runs an optional hook after
/// recording, so a test can call back into the registry from any callback.
struct Recorder {
  Strings ev;
  Strings logs;
  std::size_t emits = 0;
  bool recordEmit = true;

  std::function<void(std::string_view, std::string_view)> onLeave;
  std::function<void(std::string_view, std::string_view)> onRoomJoined;
  std::function<void(std::string_view, std::string_view)> onRoomLeft;
  std::function<void(std::string_view)> onRoomCreated;
  std::function<void(std::string_view)> onRoomDeleted;
  std::function<void(std::string_view)> onUserOnline;
  std::function<void(std::string_view)> onUserOffline;
  std::function<void(std::string_view)> onDisconnecting;
  std::function<bool(std::string_view, std::string_view)> canJoin;  // empty: allow
  std::function<void(std::string_view, std::string_view, std::string_view)> onEmit;

  RegistryCallbacks callbacks(bool withCanJoin = false) {
    RegistryCallbacks cb;
    cb.leave = [this](std::string_view s, std::string_view r) {
      ev.push_back(cat("leave", s, r));
      if (onLeave) onLeave(s, r);
    };
    cb.emit = [this](std::string_view s, std::string_view e, std::string_view p) {
      ++emits;
      if (recordEmit) ev.push_back(cat(cat("emit", s), e, p));
      if (onEmit) onEmit(s, e, p);
    };
    if (withCanJoin) {
      cb.canJoin = [this](std::string_view s, std::string_view r) {
        ev.push_back(cat("canJoin", s, r));
        return canJoin ? canJoin(s, r) : true;
      };
    }
    cb.roomCreated = [this](std::string_view r) {
      ev.push_back(cat("roomCreated", r));
      if (onRoomCreated) onRoomCreated(r);
    };
    cb.roomJoined = [this](std::string_view r, std::string_view s) {
      ev.push_back(cat("roomJoined", r, s));
      if (onRoomJoined) onRoomJoined(r, s);
    };
    cb.roomLeft = [this](std::string_view r, std::string_view s) {
      ev.push_back(cat("roomLeft", r, s));
      if (onRoomLeft) onRoomLeft(r, s);
    };
    cb.roomDeleted = [this](std::string_view r) {
      ev.push_back(cat("roomDeleted", r));
      if (onRoomDeleted) onRoomDeleted(r);
    };
    cb.userOnline = [this](std::string_view u) {
      ev.push_back(cat("userOnline", u));
      if (onUserOnline) onUserOnline(u);
    };
    cb.userOffline = [this](std::string_view u) {
      ev.push_back(cat("userOffline", u));
      if (onUserOffline) onUserOffline(u);
    };
    cb.disconnecting = [this](std::string_view s) {
      ev.push_back(cat("disconnecting", s));
      if (onDisconnecting) onDisconnecting(s);
    };
    cb.log = [this](LogLevel level, std::string_view msg) {
      logs.push_back(cat(roomkeeper::toString(level), msg));
    };
    return cb;
  }
  void clearHooks() {
    onLeave = nullptr;
    onRoomJoined = nullptr;
    onRoomLeft = nullptr;
    onRoomCreated = nullptr;
    onRoomDeleted = nullptr;
    onUserOnline = nullptr;
    onUserOffline = nullptr;
    onDisconnecting = nullptr;
    canJoin = nullptr;
    onEmit = nullptr;
  }
  Strings take() {
    Strings out;
    out.swap(ev);
    return out;
  }
};

RegistryStats zeroStats() { return RegistryStats{}; }

// ------------------------------------------------------------ basics ---

TEST_CASE("a default registry connects, tracks and forgets", "[registry]") {
  SessionRegistry reg;
  REQUIRE(reg.connect("sock-1", "user-1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:42") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:42") == Result::kAlreadyDone);
  REQUIRE(reg.roomSize("job:42") == 1);
  REQUIRE(reg.disconnect("sock-1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:7") == Result::kNotConnected);
  REQUIRE(reg.getMemoryStats() == zeroStats());
}

TEST_CASE("add and remove keep both directions of the index", "[registry]") {
  SessionRegistry reg;
  REQUIRE(reg.connect("a") == Result::kOk);
  REQUIRE(reg.connect("b") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "r1") == Result::kOk);

  CHECK(sorted(reg.roomsOf("a")) == Strings{"r1", "r2"});
  CHECK(reg.roomsOf("b") == Strings{"r1"});
  CHECK(sorted(reg.membersOf("r1")) == Strings{"a", "b"});
  CHECK(reg.membersOf("r2") == Strings{"a"});
  CHECK(reg.isMember("a", "r1"));
  CHECK(reg.isMember("b", "r1"));
  CHECK_FALSE(reg.isMember("b", "r2"));
  CHECK_FALSE(reg.isMember("nobody", "r1"));
  CHECK_FALSE(reg.isMember("a", "nowhere"));
  CHECK(reg.roomSize("r1") == 2);
  CHECK(reg.roomCount("a") == 2);
  CHECK(reg.roomCount("nobody") == 0);
  CHECK(reg.roomSize("nowhere") == 0);

  RegistryStats st = reg.getMemoryStats();
  CHECK(st.sessions == 2);
  CHECK(st.users == 0);
  CHECK(st.rooms == 2);
  CHECK(st.memberships == 3);
  CHECK(st.sessionsWithRooms == 2);
  CHECK(st.bytes > 0);

  REQUIRE(reg.untrackRoom("a", "r1") == Result::kOk);
  CHECK(reg.roomsOf("a") == Strings{"r2"});
  CHECK(reg.membersOf("r1") == Strings{"b"});
  CHECK_FALSE(reg.isMember("a", "r1"));
  st = reg.getMemoryStats();
  CHECK(st.memberships == 2);
  CHECK(st.rooms == 2);

  CHECK(reg.clearRoomTracking("a") == 1);
  CHECK(reg.isConnected("a"));
  CHECK(reg.roomCount("a") == 0);
  CHECK(reg.clearRoomTracking("a") == 0);
  CHECK(reg.clearRoomTracking("nobody") == 0);
  st = reg.getMemoryStats();
  CHECK(st.sessionsWithRooms == 1);
  CHECK(st.rooms == 1);

  REQUIRE(reg.disconnect("a") == Result::kOk);
  REQUIRE(reg.disconnect("b") == Result::kOk);
  CHECK(reg.getMemoryStats() == zeroStats());
}

TEST_CASE("an empty room is deleted at once", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  REQUIRE(reg.connect("a") == Result::kOk);
  REQUIRE(reg.connect("b") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "job:1") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "job:1") == Result::kOk);

  REQUIRE(reg.untrackRoom("a", "job:1") == Result::kOk);
  CHECK(reg.roomExists("job:1"));
  REQUIRE(reg.untrackRoom("b", "job:1") == Result::kOk);
  CHECK_FALSE(reg.roomExists("job:1"));
  CHECK(reg.roomSize("job:1") == 0);
  CHECK(reg.getMemoryStats().rooms == 0);
  CHECK(reg.getMemoryStats().memberships == 0);
  CHECK(reg.membersOf("job:1").empty());

  // Via disconnect and clearRoomTracking too.
  REQUIRE(reg.trackRoom("a", "job:2") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "job:3") == Result::kOk);
  REQUIRE(reg.disconnect("a") == Result::kOk);
  CHECK_FALSE(reg.roomExists("job:2"));
  CHECK(reg.clearRoomTracking("b") == 1);
  CHECK_FALSE(reg.roomExists("job:3"));
  CHECK(reg.getMemoryStats().rooms == 0);

  // A long room name (heap-allocated) is freed with its room.
  const std::string longRoom(200, 'x');
  const std::size_t before = reg.getMemoryStats().bytes;
  REQUIRE(reg.trackRoom("b", longRoom) == Result::kOk);
  CHECK(reg.getMemoryStats().bytes > before);
  REQUIRE(reg.untrackRoom("b", longRoom) == Result::kOk);
  CHECK(reg.getMemoryStats().bytes == before);
  REQUIRE(reg.disconnect("b") == Result::kOk);
  CHECK(reg.getMemoryStats().bytes == 0);
}

TEST_CASE("observer events arrive in socket.io's order", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());

  REQUIRE(reg.connect("a", "u1") == Result::kOk);
  CHECK(rec.take() == Strings{"userOnline:u1"});
  REQUIRE(reg.connect("b") == Result::kOk);
  CHECK(rec.take().empty());

  REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
  CHECK(rec.take() == Strings{"roomCreated:r", "roomJoined:r:a"});
  REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
  CHECK(rec.take() == Strings{"roomJoined:r:b"});

  REQUIRE(reg.untrackRoom("a", "r") == Result::kOk);
  CHECK(rec.take() == Strings{"leave:a:r", "roomLeft:r:a"});
  REQUIRE(reg.untrackRoom("b", "r") == Result::kOk);
  CHECK(rec.take() == Strings{"leave:b:r", "roomLeft:r:b", "roomDeleted:r"});

  // Disconnect: disconnecting (rooms intact), each room left, then offline.
  REQUIRE(reg.trackRoom("a", "x") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "x") == Result::kOk);
  rec.take();
  Strings roomsSeen;
  rec.onDisconnecting = [&](std::string_view s) {
    roomsSeen = reg.roomsOf(s);
    CHECK(reg.isConnected(s));
  };
  REQUIRE(reg.disconnect("a") == Result::kOk);
  CHECK(roomsSeen == Strings{"x"});
  CHECK(rec.take() ==
        Strings{"disconnecting:a", "leave:a:x", "roomLeft:x:a", "userOffline:u1"});
  REQUIRE(reg.disconnect("b") == Result::kOk);
  CHECK(rec.take() ==
        Strings{"disconnecting:b", "leave:b:x", "roomLeft:x:b", "roomDeleted:x"});

  // A session in several rooms: each room's leave, roomLeft[, roomDeleted]
  // come together; userOffline comes last, after every room is left.
  REQUIRE(reg.connect("c", "u2") == Result::kOk);
  REQUIRE(reg.connect("d") == Result::kOk);
  REQUIRE(reg.trackRoom("c", "p") == Result::kOk);
  REQUIRE(reg.trackRoom("c", "q") == Result::kOk);
  REQUIRE(reg.trackRoom("d", "q") == Result::kOk);
  rec.take();
  rec.onDisconnecting = nullptr;
  REQUIRE(reg.disconnect("c") == Result::kOk);
  const Strings ev = rec.take();
  REQUIRE(ev.size() == 7);
  CHECK(ev.front() == "disconnecting:c");
  CHECK(ev.back() == "userOffline:u2");
  const Strings groupP{"leave:c:p", "roomLeft:p:c", "roomDeleted:p"};
  const Strings groupQ{"leave:c:q", "roomLeft:q:c"};
  const Strings pThenQ = [&] {
    Strings v = groupP;
    v.insert(v.end(), groupQ.begin(), groupQ.end());
    return v;
  }();
  const Strings qThenP = [&] {
    Strings v = groupQ;
    v.insert(v.end(), groupP.begin(), groupP.end());
    return v;
  }();
  const Strings middle(ev.begin() + 1, ev.end() - 1);
  CHECK((middle == pThenQ || middle == qThenP));
  REQUIRE(reg.disconnect("d") == Result::kOk);
  CHECK(reg.getMemoryStats() == zeroStats());
}

TEST_CASE("repeat join and leave are idempotent and emit nothing", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  REQUIRE(reg.connect("a") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
  rec.take();
  const RegistryStats st = reg.getMemoryStats();
  for (int i = 0; i < 3; ++i) {
    REQUIRE(reg.trackRoom("a", "r") == Result::kAlreadyDone);
    REQUIRE(reg.trackRoom(reg.handleOf("a"), "r") == Result::kAlreadyDone);
  }
  CHECK(rec.take().empty());
  CHECK(reg.getMemoryStats() == st);
  CHECK(reg.roomSize("r") == 1);
  CHECK(reg.roomCount("a") == 1);

  REQUIRE(reg.untrackRoom("a", "r") == Result::kOk);
  CHECK(rec.take() == Strings{"leave:a:r", "roomLeft:r:a", "roomDeleted:r"});
  const RegistryStats st2 = reg.getMemoryStats();
  for (int i = 0; i < 3; ++i) {
    REQUIRE(reg.untrackRoom("a", "r") == Result::kAlreadyDone);
    REQUIRE(reg.untrackRoom(reg.handleOf("a"), "r") == Result::kAlreadyDone);
    REQUIRE(reg.untrackRoom("a", "never-existed") == Result::kAlreadyDone);
  }
  CHECK(rec.take().empty());
  CHECK(reg.getMemoryStats() == st2);
  // Leave of a room the session is not in, while others are in it.
  REQUIRE(reg.connect("b") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
  rec.take();
  REQUIRE(reg.untrackRoom("a", "r") == Result::kAlreadyDone);
  CHECK(rec.take().empty());
  CHECK(reg.roomSize("r") == 1);
  // Repeat connect and disconnect.
  REQUIRE(reg.connect("a") == Result::kAlreadyConnected);
  REQUIRE(reg.disconnect("a") == Result::kOk);
  CHECK(rec.take() == Strings{"disconnecting:a"});
  REQUIRE(reg.disconnect("a") == Result::kNotConnected);
  CHECK(rec.take().empty());
}

TEST_CASE("a roomLeft listener that leaves or disconnects again (socket.io-adapter #74)",
          "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  std::vector<Result> nested;
  rec.onRoomLeft = [&](std::string_view room, std::string_view session) {
    nested.push_back(reg.untrackRoom(session, room));
    nested.push_back(reg.untrackRoom(session, "r2"));
    nested.push_back(reg.disconnect(session));
    nested.push_back(reg.disconnect(session));
  };

  SECTION("from disconnect") {
    REQUIRE(reg.connect("a", "u") == Result::kOk);
    REQUIRE(reg.connect("b") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);
    REQUIRE(reg.trackRoom("b", "r1") == Result::kOk);
    rec.take();
    REQUIRE(reg.disconnect("a") == Result::kOk);
    // Every nested call found the session already gone.
    REQUIRE(nested.size() == 8);
    for (Result r : nested) CHECK(r == Result::kNotConnected);
    const Strings ev = rec.take();
    CHECK(std::count(ev.begin(), ev.end(), "leave:a:r1") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "leave:a:r2") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomLeft:r1:a") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomLeft:r2:a") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r2") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "userOffline:u") == 1);
    CHECK(ev.size() == 7);
    CHECK(reg.membersOf("r1") == Strings{"b"});
    CHECK_FALSE(reg.roomExists("r2"));
    const RegistryStats st = reg.getMemoryStats();
    CHECK(st.sessions == 1);
    CHECK(st.memberships == 1);
    CHECK(st.users == 0);
  }

  SECTION("from untrackRoom") {
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);
    rec.take();
    REQUIRE(reg.untrackRoom("a", "r1") == Result::kOk);
    // First listener (r1): leave again -> kAlreadyDone, leave r2 -> kOk,
    // disconnect -> kOk, again -> kNotConnected. The r2 listener runs after
    // the disconnect: everything is kNotConnected.
    REQUIRE(nested.size() == 8);
    CHECK(nested[0] == Result::kAlreadyDone);
    CHECK(nested[1] == Result::kOk);
    CHECK(nested[2] == Result::kOk);
    CHECK(nested[3] == Result::kNotConnected);
    for (std::size_t i = 4; i < 8; ++i) CHECK(nested[i] == Result::kNotConnected);
    const Strings ev = rec.take();
    CHECK(std::count(ev.begin(), ev.end(), "roomLeft:r1:a") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomLeft:r2:a") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "disconnecting:a") == 1);
    CHECK_FALSE(reg.isConnected("a"));
    CHECK(reg.getMemoryStats() == zeroStats());
  }

  SECTION("from clearRoomTracking") {
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r3") == Result::kOk);
    rec.take();
    CHECK(reg.clearRoomTracking("a") == 3);
    // The session had no rooms left when the first listener ran.
    REQUIRE(nested.size() == 12);
    CHECK(nested[0] == Result::kAlreadyDone);
    CHECK(nested[1] == Result::kAlreadyDone);
    CHECK(nested[2] == Result::kOk);
    CHECK(nested[3] == Result::kNotConnected);
    const Strings ev = rec.take();
    CHECK(std::count(ev.begin(), ev.end(), "disconnecting:a") == 1);
    CHECK(std::count_if(ev.begin(), ev.end(), [](const std::string& e) {
            return e.rfind("leave:", 0) == 0;
          }) == 3);
    CHECK(reg.getMemoryStats() == zeroStats());
  }
}

// --------------------------------------------------------- broadcast ---

TEST_CASE("broadcast: union of rooms, deduplicated, minus except and sender",
          "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  for (const char* s : {"a", "b", "c", "d", "e", "f"})
    REQUIRE(reg.connect(s) == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "r1") == Result::kOk);
  REQUIRE(reg.trackRoom("c", "r1") == Result::kOk);
  REQUIRE(reg.trackRoom("c", "r2") == Result::kOk);
  REQUIRE(reg.trackRoom("d", "r2") == Result::kOk);
  REQUIRE(reg.trackRoom("e", "r2") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "muted") == Result::kOk);
  REQUIRE(reg.trackRoom("f", "other") == Result::kOk);
  rec.take();

  SECTION("union and dedupe") {
    BroadcastTargets t;
    t.rooms = {"r1", "r2", "r1", "no-such-room"};
    CHECK(reg.broadcast(t, "msg", "hi") == 5);
    CHECK(sorted(rec.take()) == Strings{"emit:a:msg:hi", "emit:b:msg:hi", "emit:c:msg:hi",
                                        "emit:d:msg:hi", "emit:e:msg:hi"});
  }
  SECTION("except rooms and sender") {
    BroadcastTargets t;
    t.rooms = {"r1", "r2"};
    t.except = {"muted", "no-such-room"};
    t.sender = "d";
    CHECK(reg.broadcast(t, "msg", "x") == 3);
    CHECK(sorted(rec.take()) == Strings{"emit:a:msg:x", "emit:c:msg:x", "emit:e:msg:x"});
  }
  SECTION("sender not in the rooms, unknown sender") {
    BroadcastTargets t;
    t.rooms = {"r2"};
    t.sender = "f";
    CHECK(reg.broadcast(t, "e", "p") == 3);
    t.sender = "nobody";
    CHECK(reg.broadcast(t, "e", "p") == 3);
    CHECK(rec.emits == 6);
  }
  SECTION("every target excluded") {
    BroadcastTargets t;
    t.rooms = {"r1"};
    t.except = {"r1"};
    CHECK(reg.broadcast(t, "e", "p") == 0);
    CHECK(rec.emits == 0);
  }
  SECTION("no rooms named: every session, as socket.io's io.emit") {
    BroadcastTargets t;
    CHECK(reg.broadcast(t, "all", "p") == 6);
    CHECK(sorted(rec.take()) == Strings{"emit:a:all:p", "emit:b:all:p", "emit:c:all:p",
                                        "emit:d:all:p", "emit:e:all:p", "emit:f:all:p"});
    // io.except("r2").emit(...), and from a sender (socket.broadcast.emit).
    t.except = {"r2"};
    t.sender = "a";
    CHECK(reg.broadcast(t, "all", "p") == 2);
    CHECK(sorted(rec.take()) == Strings{"emit:b:all:p", "emit:f:all:p"});
  }
  SECTION("rooms are left in join order, as socket.io leaves them") {
    REQUIRE(reg.trackRoom("a", "x1") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "x2") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "x3") == Result::kOk);
    REQUIRE(reg.untrackRoom("a", "x1") == Result::kOk);  // from the middle
    REQUIRE(reg.trackRoom("a", "x4") == Result::kOk);
    CHECK(reg.roomsOf("a") == Strings{"r1", "x2", "x3", "x4"});
    rec.take();
    CHECK(reg.clearRoomTracking("a") == 4);
    Strings leaves;
    for (const std::string& e : rec.take())
      if (e.rfind("leave:", 0) == 0) leaves.push_back(e);
    CHECK(leaves == Strings{"leave:a:r1", "leave:a:x2", "leave:a:x3", "leave:a:x4"});
  }
  SECTION("consecutive broadcasts do not leak de-duplication marks") {
    BroadcastTargets t1;
    t1.rooms = {"r1"};
    t1.except = {"r2"};
    BroadcastTargets t2;
    t2.rooms = {"r2"};
    for (int i = 0; i < 50; ++i) {
      CHECK(reg.broadcast(t1, "e", "1") == 2);  // a, b
      CHECK(reg.broadcast(t2, "e", "2") == 3);  // c, d, e
    }
  }
  SECTION("forEachTarget visits the same set") {
    BroadcastTargets t;
    t.rooms = {"r1", "r2"};
    t.except = {"muted"};
    Strings seen;
    CHECK(reg.forEachTarget(t, [&](std::string_view s) { seen.emplace_back(s); }) == 4);
    CHECK(sorted(seen) == Strings{"a", "c", "d", "e"});
    CHECK(rec.emits == 0);
  }
  SECTION("no emit callback: broadcast sends nothing") {
    SessionRegistry plain;
    REQUIRE(plain.connect("a") == Result::kOk);
    REQUIRE(plain.trackRoom("a", "r") == Result::kOk);
    BroadcastTargets t;
    t.rooms = {"r"};
    CHECK(plain.broadcast(t, "e", "p") == 0);
  }
  SECTION("an emit that throws is counted; the others still get it") {
    int calls = 0;
    rec.onEmit = [&](std::string_view, std::string_view, std::string_view) {
      if (++calls == 1) throw std::runtime_error("socket closed");
    };
    BroadcastTargets t;
    t.rooms = {"r1"};
    CHECK(reg.broadcast(t, "e", "p") == 3);
    CHECK(calls == 3);
    CHECK(reg.getMemoryStats().callbackErrors == 1);
    REQUIRE(rec.logs.size() == 1);
    CHECK(rec.logs[0].find("socket closed") != std::string::npos);
  }
}

TEST_CASE("forEachTarget skips a target disconnected before its turn", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  for (const char* s : {"a", "b", "c", "d"}) {
    REQUIRE(reg.connect(s) == Result::kOk);
    REQUIRE(reg.trackRoom(s, "room") == Result::kOk);
  }
  BroadcastTargets t;
  t.rooms = {"room"};

  SECTION("the first visited target disconnects every other one") {
    Strings seen;
    const std::size_t n = reg.forEachTarget(t, [&](std::string_view s) {
      seen.emplace_back(s);
      for (const char* other : {"a", "b", "c", "d"}) {
        if (other != s) {
          const Result r = reg.disconnect(other);
          CHECK(r == Result::kOk);
        }
      }
    });
    CHECK(n == 1);
    CHECK(seen.size() == 1);
    CHECK(reg.getMemoryStats().sessions == 1);
  }
  SECTION("a target that disconnects and reconnects under the same id is skipped") {
    Strings seen;
    const std::size_t n = reg.forEachTarget(t, [&](std::string_view s) {
      if (seen.empty()) {
        for (const char* other : {"a", "b", "c", "d"}) {
          if (other == s) continue;
          CHECK(reg.disconnect(other) == Result::kOk);
          CHECK(reg.connect(other) == Result::kOk);
          CHECK(reg.trackRoom(other, "room") == Result::kOk);
        }
      }
      seen.emplace_back(s);
    });
    CHECK(n == 1);
    CHECK(seen.size() == 1);
    CHECK(reg.roomSize("room") == 4);
  }
  SECTION("a visitor may join, leave and disconnect itself") {
    Strings seen;
    const std::size_t n = reg.forEachTarget(t, [&](std::string_view s) {
      seen.emplace_back(s);
      CHECK(reg.trackRoom(s, "elsewhere") == Result::kOk);
      CHECK(reg.untrackRoom(s, "room") == Result::kOk);
      CHECK(reg.disconnect(s) == Result::kOk);
    });
    CHECK(n == 4);
    CHECK(sorted(seen) == Strings{"a", "b", "c", "d"});
    CHECK(reg.getMemoryStats() == zeroStats());
  }
}

// --------------------------------------------------------- tombstone ---

TEST_CASE("disconnect leaves a tombstone: late calls change nothing", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  REQUIRE(reg.connect("sock-1", "user-1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:42") == Result::kOk);
  REQUIRE(reg.disconnect("sock-1") == Result::kOk);
  rec.take();
  REQUIRE(reg.getMemoryStats() == zeroStats());

  // socket.io #4067: a join that arrives after disconnect must not
  // re-create the room; socket.io-adapter #58: a leave must not allocate.
  CHECK(reg.trackRoom("sock-1", "job:42") == Result::kNotConnected);
  CHECK(reg.trackRoom("sock-1", "job:7") == Result::kNotConnected);
  CHECK(reg.untrackRoom("sock-1", "job:42") == Result::kNotConnected);
  CHECK(reg.clearRoomTracking("sock-1") == 0);
  CHECK(reg.bindUser("sock-1", "user-1") == Result::kNotConnected);
  CHECK(reg.disconnect("sock-1") == Result::kNotConnected);
  CHECK(reg.untrackRoom("never-seen", "job:42") == Result::kNotConnected);
  CHECK(reg.trackRoom("never-seen", "job:42") == Result::kNotConnected);
  CHECK_FALSE(reg.roomExists("job:42"));
  CHECK_FALSE(reg.roomExists("job:7"));
  CHECK(reg.getMemoryStats() == zeroStats());
  CHECK(rec.take().empty());

  // The same with other sessions alive (non-zero bytes).
  REQUIRE(reg.connect("other", "user-2") == Result::kOk);
  REQUIRE(reg.trackRoom("other", "job:42") == Result::kOk);
  rec.take();
  const RegistryStats st = reg.getMemoryStats();
  CHECK(reg.trackRoom("sock-1", "job:42") == Result::kNotConnected);
  CHECK(reg.trackRoom("sock-1", "job:99") == Result::kNotConnected);
  CHECK(reg.untrackRoom("sock-1", "job:42") == Result::kNotConnected);
  CHECK(reg.getMemoryStats() == st);
  CHECK(reg.membersOf("job:42") == Strings{"other"});
  CHECK(rec.take().empty());
}

TEST_CASE("a stale handle stays stale after the same id reconnects", "[registry]") {
  SessionRegistry reg;
  SessionHandle h1;
  REQUIRE_FALSE(h1.valid());
  REQUIRE(reg.connect("sock", "u", &h1) == Result::kOk);
  REQUIRE(h1.valid());
  CHECK(reg.handleOf("sock") == h1);
  CHECK(reg.idOf(h1) == "sock");
  CHECK(reg.isConnected(h1));
  REQUIRE(reg.trackRoom(h1, "r") == Result::kOk);
  CHECK(reg.isMember("sock", "r"));
  REQUIRE(reg.untrackRoom(h1, "r") == Result::kOk);
  REQUIRE(reg.trackRoom(h1, "r") == Result::kOk);
  CHECK(reg.clearRoomTracking(h1) == 1);
  REQUIRE(reg.trackRoom(h1, "r") == Result::kOk);
  REQUIRE(reg.disconnect(h1) == Result::kOk);

  const auto checkStale = [&](SessionHandle h) {
    const RegistryStats st = reg.getMemoryStats();
    CHECK_FALSE(reg.isConnected(h));
    CHECK(reg.idOf(h).empty());
    CHECK(reg.trackRoom(h, "r") == Result::kStaleHandle);
    CHECK(reg.trackRoom(h, "fresh") == Result::kStaleHandle);
    CHECK(reg.untrackRoom(h, "r") == Result::kStaleHandle);
    CHECK(reg.clearRoomTracking(h) == 0);
    CHECK(reg.disconnect(h) == Result::kStaleHandle);
    CHECK(reg.getMemoryStats() == st);
  };
  checkStale(h1);
  checkStale(SessionHandle{});
  checkStale(SessionHandle{12345, 678});

  SessionHandle h2;
  REQUIRE(reg.connect("sock", "u", &h2) == Result::kOk);
  CHECK(h2 != h1);
  REQUIRE(reg.trackRoom(h2, "r") == Result::kOk);
  checkStale(h1);
  CHECK(reg.isMember("sock", "r"));
  CHECK(reg.idOf(h2) == "sock");
  CHECK(reg.handleOf("sock") == h2);

  // Many reconnects of the same id: every old handle stays stale.
  std::vector<SessionHandle> old{h1, h2};
  REQUIRE(reg.disconnect("sock") == Result::kOk);
  for (int i = 0; i < 20; ++i) {
    SessionHandle h;
    REQUIRE(reg.connect("sock", {}, &h) == Result::kOk);
    for (SessionHandle o : old) {
      CHECK(o != h);
      CHECK(reg.trackRoom(o, "r") == Result::kStaleHandle);
    }
    old.push_back(h);
    REQUIRE(reg.disconnect(h) == Result::kOk);
  }
  CHECK(reg.getMemoryStats() == zeroStats());
}

// ------------------------------------------------------------ limits ---

TEST_CASE("ids: empty or longer than maxIdLength are refused", "[registry]") {
  Limits lim;
  lim.maxIdLength = 20;
  Recorder rec;
  SessionRegistry reg(rec.callbacks(), lim);
  const std::string max20(20, 's');
  const std::string long21(21, 's');

  // With nothing allocated yet, and with state present.
  for (int round = 0; round < 2; ++round) {
    const RegistryStats st = reg.getMemoryStats();
    rec.take();
    CHECK(reg.connect("") == Result::kInvalidId);
    CHECK(reg.connect(long21) == Result::kInvalidId);
    CHECK(reg.connect("ok-id", long21) == Result::kInvalidId);
    CHECK(reg.getMemoryStats() == st);
    CHECK_FALSE(reg.isConnected("ok-id"));
    CHECK(rec.take().empty());
    if (round == 0) {
      REQUIRE(reg.connect("present", "u") == Result::kOk);
      REQUIRE(reg.trackRoom("present", "r") == Result::kOk);
    }
  }
  const RegistryStats st = reg.getMemoryStats();
  rec.take();
  CHECK(reg.trackRoom("present", "") == Result::kInvalidId);
  CHECK(reg.trackRoom("present", long21) == Result::kInvalidId);
  CHECK(reg.trackRoom(reg.handleOf("present"), long21) == Result::kInvalidId);
  CHECK(reg.untrackRoom("present", "") == Result::kInvalidId);
  CHECK(reg.untrackRoom("present", long21) == Result::kInvalidId);
  CHECK(reg.bindUser("present", long21) == Result::kInvalidId);
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take().empty());

  // Exactly maxIdLength is fine for session, user and room.
  CHECK(reg.connect(max20, max20) == Result::kOk);
  CHECK(reg.trackRoom(max20, max20) == Result::kOk);
  CHECK(reg.userOf(max20) == max20);
  CHECK(reg.membersOf(max20) == Strings{max20});
  REQUIRE(reg.disconnect(max20) == Result::kOk);
  // An anonymous session (empty user) is allowed.
  CHECK(reg.connect("anon", "") == Result::kOk);
  CHECK(reg.userOf("anon").empty());
  CHECK(reg.bindUser("anon", "") == Result::kInvalidId);
  CHECK(reg.userOf("anon").empty());
}

TEST_CASE("maxRoomsPerSession", "[registry]") {
  Limits lim;
  lim.maxRoomsPerSession = 3;
  Recorder rec;
  SessionRegistry reg(rec.callbacks(true), lim);
  REQUIRE(reg.connect("a") == Result::kOk);
  REQUIRE(reg.connect("b") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "r4") == Result::kOk);
  for (const char* r : {"r1", "r2", "r3"}) REQUIRE(reg.trackRoom("a", r) == Result::kOk);
  rec.take();
  const RegistryStats st = reg.getMemoryStats();
  CHECK(reg.trackRoom("a", "r4") == Result::kTooManyRooms);   // existing room
  CHECK(reg.trackRoom("a", "new") == Result::kTooManyRooms);  // new room
  CHECK(reg.trackRoom(reg.handleOf("a"), "new") == Result::kTooManyRooms);
  CHECK(reg.trackRoom("a", "r2") == Result::kAlreadyDone);    // repeat still fine
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take().empty());  // canJoin not even asked
  CHECK_FALSE(reg.roomExists("new"));
  CHECK(reg.roomSize("r4") == 1);
  REQUIRE(reg.untrackRoom("a", "r1") == Result::kOk);
  CHECK(reg.trackRoom("a", "r4") == Result::kOk);
}

// trackRooms must be one trackRoom per room, only faster: the same
// results, the same events in the same order, the same state, on two twin
// registries, whatever the list holds and whatever canJoin does meanwhile.
// Two registries that were made the same calls: every count equal, and the
// bytes too, except in builds without NDEBUG (the sanitizer builds), where
// Abseil's tables insert at the front or the back of a probe group at
// random, so the same inserts and erases can leave two tables with
// different tombstones and grow them at different times.
void checkSameStats(const RegistryStats& a, const RegistryStats& b) {
  RegistryStats x = a, y = b;
#ifndef NDEBUG
  x.bytes = y.bytes = 0;
#endif
  CHECK(x == y);
}

TEST_CASE("trackRooms gives the results and events of one trackRoom per room",
          "[registry]") {
  const bool byHandle = GENERATE(false, true);
  INFO((byHandle ? "by handle" : "by id"));
  Limits lim;
  lim.maxRoomsPerSession = 24;
  lim.maxIdLength = 16;
  lim.maxMembersPerRoom = 2;
  Recorder one, many;
  SessionRegistry regOne(one.callbacks(true), lim), regMany(many.callbacks(true), lim);
  // 40 names: more than one chunk of 16; repeats, an empty and a too long
  // id, a full room, and more rooms than the session may have.
  std::vector<std::string> rooms;
  for (int i = 0; i < 30; ++i) rooms.push_back("r" + std::to_string(i % 26));
  rooms.insert(rooms.begin() + 3, "");
  rooms.insert(rooms.begin() + 5, std::string(17, 'x'));
  rooms.insert(rooms.begin() + 7, "full");
  rooms.insert(rooms.begin() + 9, "r1");
  rooms.push_back("r3");
  for (SessionRegistry* reg : {&regOne, &regMany}) {
    REQUIRE(reg->connect("other1") == Result::kOk);
    REQUIRE(reg->connect("other2") == Result::kOk);
    REQUIRE(reg->trackRoom("other1", "full") == Result::kOk);
    REQUIRE(reg->trackRoom("other2", "full") == Result::kOk);
    REQUIRE(reg->trackRoom("other1", "r7") == Result::kOk);
    REQUIRE(reg->connect("s") == Result::kOk);
  }
  // canJoin refuses one room and, at another, disconnects the session from
  // inside the hook: every later room then finds no session.
  for (Recorder* rec : {&one, &many}) {
    SessionRegistry* reg = rec == &one ? &regOne : &regMany;
    rec->canJoin = [reg](std::string_view, std::string_view room) {
      if (room == "r9") return false;
      if (room == "r20") (void)reg->disconnect("s");
      return true;
    };
  }
  one.take();
  many.take();

  std::vector<Result> expected;
  const SessionHandle hOne = regOne.handleOf("s"), hMany = regMany.handleOf("s");
  for (const std::string& r : rooms)
    expected.push_back(byHandle ? regOne.trackRoom(hOne, r) : regOne.trackRoom("s", r));
  std::vector<Result> got;
  const std::size_t joined = byHandle ? regMany.trackRooms(hMany, rooms, &got)
                                      : regMany.trackRooms("s", rooms, &got);
  REQUIRE(got.size() == rooms.size());
  CHECK(got == expected);
  CHECK(joined == static_cast<std::size_t>(std::count(got.begin(), got.end(), Result::kOk)));
  // The list reached every kind of answer.
  for (Result r : {Result::kOk, Result::kAlreadyDone, Result::kInvalidId, Result::kRoomFull,
                   Result::kDenied, byHandle ? Result::kStaleHandle : Result::kNotConnected})
    CHECK(std::count(got.begin(), got.end(), r) > 0);
  CHECK(many.take() == one.take());
  checkSameStats(regMany.getMemoryStats(), regOne.getMemoryStats());
  CHECK(sorted(regMany.roomsOf("other1")) == sorted(regOne.roomsOf("other1")));
  for (const std::string& r : rooms) CHECK(regMany.roomSize(r) == regOne.roomSize(r));

  // Again with the session's room limit (24) reached in the middle of a
  // list of 30 new rooms.
  one.canJoin = nullptr;
  many.canJoin = nullptr;
  std::vector<std::string> more;
  for (int i = 0; i < 30; ++i) more.push_back("m" + std::to_string(i));
  for (SessionRegistry* reg : {&regOne, &regMany}) REQUIRE(reg->connect("t") == Result::kOk);
  one.take();
  many.take();
  expected.clear();
  const SessionHandle tOne = regOne.handleOf("t"), tMany = regMany.handleOf("t");
  for (const std::string& r : more)
    expected.push_back(byHandle ? regOne.trackRoom(tOne, r) : regOne.trackRoom("t", r));
  CHECK((byHandle ? regMany.trackRooms(tMany, more, &got) : regMany.trackRooms("t", more, &got)) ==
        24);
  CHECK(got == expected);
  CHECK(std::count(got.begin(), got.end(), Result::kTooManyRooms) == 6);
  CHECK(many.take() == one.take());
  checkSameStats(regMany.getMemoryStats(), regOne.getMemoryStats());
  CHECK(regMany.roomsOf("t") == regOne.roomsOf("t"));
}

// The names are kept as views until their chunk is joined: a range whose
// elements are made on the fly (and gone at the next step) is refused at
// compile time by trackRooms' static_assert on this trait.
namespace {
struct MadeOnTheFly {  // yields a std::string by value
  struct It {
    int i;
    std::string operator*() const { return "r" + std::to_string(i); }
    It& operator++() {
      ++i;
      return *this;
    }
    bool operator!=(const It& o) const { return i != o.i; }
  };
  It begin() const { return {0}; }
  It end() const { return {3}; }
};
using roomkeeper::detail::kKeepsNames;
static_assert(kKeepsNames<std::vector<std::string>>);
static_assert(kKeepsNames<std::vector<std::string_view>>);
static_assert(kKeepsNames<std::array<const char*, 2>>);
static_assert(kKeepsNames<std::initializer_list<std::string_view>>);
static_assert(!kKeepsNames<MadeOnTheFly>);
}  // namespace

TEST_CASE("trackRooms: a braced list, the session's room limit, a stale handle",
          "[registry]") {
  Limits lim;
  lim.maxRoomsPerSession = 2;
  SessionRegistry reg({}, lim);
  SessionHandle h;
  REQUIRE(reg.connect("s", {}, &h) == Result::kOk);
  std::vector<Result> got;
  CHECK(reg.trackRooms(h, {"a", "b", "c", "a"}, &got) == 2);
  CHECK(got == std::vector<Result>{Result::kOk, Result::kOk, Result::kTooManyRooms,
                                   Result::kAlreadyDone});
  CHECK(reg.roomsOf("s") == Strings{"a", "b"});
  REQUIRE(reg.disconnect(h) == Result::kOk);
  const RegistryStats st = reg.getMemoryStats();
  CHECK(reg.trackRooms(h, {"x", "y"}, &got) == 0);
  CHECK(got == std::vector<Result>{Result::kStaleHandle, Result::kStaleHandle});
  CHECK(reg.trackRooms("s", std::vector<std::string_view>{"x"}, &got) == 0);
  CHECK(got == std::vector<Result>{Result::kNotConnected});
  CHECK(reg.trackRooms("s", std::vector<std::string>{}, &got) == 0);
  CHECK(got.empty());
  CHECK(reg.getMemoryStats() == st);
  CHECK_FALSE(reg.roomExists("x"));
}

// A big room's member list grows by a quarter, not by doubling: its slots
// stay within 25 % of its members (plus the room's own slab page), and it
// still shrinks back to nothing.
TEST_CASE("a big room's member list holds at most a quarter more slots than members",
          "[registry]") {
  SessionRegistry reg;
  constexpr std::size_t kMembers = 20000;
  std::vector<SessionHandle> h(kMembers);
  for (std::size_t i = 0; i < kMembers; ++i)
    REQUIRE(reg.connect("s" + std::to_string(i), {}, &h[i]) == Result::kOk);
  const std::size_t before = reg.getMemoryStats().bytes;
  for (std::size_t i = 0; i < kMembers; ++i) REQUIRE(reg.trackRoom(h[i], "big") == Result::kOk);
  const std::size_t list = reg.getMemoryStats().bytes - before;
  const std::size_t exact = kMembers * 8;  // one 8-byte entry per member
  INFO("member list and room: " << list << " bytes for " << exact << " of entries");
  CHECK(list >= exact);
  CHECK(list <= exact + exact / 4 + 64 * 1024);  // doubling would be 262,136
  CHECK(reg.roomSize("big") == kMembers);
  std::size_t visited = 0;
  reg.forEachMember("big", [&](std::string_view) { ++visited; });
  CHECK(visited == kMembers);
  for (std::size_t i = 0; i < kMembers; i += 2) REQUIRE(reg.untrackRoom(h[i], "big") == Result::kOk);
  CHECK(reg.roomSize("big") == kMembers / 2);
  CHECK(reg.isMember("s1", "big"));
  CHECK_FALSE(reg.isMember("s0", "big"));
  for (std::size_t i = 1; i < kMembers; i += 2) REQUIRE(reg.untrackRoom(h[i], "big") == Result::kOk);
  CHECK_FALSE(reg.roomExists("big"));
  CHECK(reg.getMemoryStats().bytes == before);
}

// findSession() tries the newest session before the index (a connect is
// followed by calls naming it). The shortcut must never answer for a
// session that left, nor for another id that shares its length and last
// byte, nor outlive the slot being reused. A freed slot's name reads
// empty, so a shortcut left set after its session left shows only once
// the slab's pages are gone: the last lookup below then reads a released
// page (a crash, or an ASan report in .ci/run's sanitizer stage).
TEST_CASE("the newest-session shortcut: exact for ids alike, after a leave, after slot reuse",
          "[registry]") {
  SessionRegistry reg;
  REQUIRE(reg.connect("x1y") == Result::kOk);
  REQUIRE(reg.connect("x2y") == Result::kOk);  // the newest; same length, same last byte
  REQUIRE(reg.trackRoom("x1y", "r1") == Result::kOk);
  REQUIRE(reg.trackRoom("x2y", "r2") == Result::kOk);
  CHECK(reg.roomsOf("x1y") == std::vector<std::string>{"r1"});
  CHECK(reg.roomsOf("x2y") == std::vector<std::string>{"r2"});
  CHECK_FALSE(reg.isConnected("x3y"));
  CHECK_FALSE(reg.isConnected("x2"));

  // The newest leaves: its id is not connected, whatever was cached.
  REQUIRE(reg.disconnect("x2y") == Result::kOk);
  CHECK_FALSE(reg.isConnected("x2y"));
  CHECK(reg.trackRoom("x2y", "r2") == Result::kNotConnected);
  CHECK(reg.disconnect("x2y") == Result::kNotConnected);
  CHECK(reg.isConnected("x1y"));

  // Its slot is reused by the next connect: the old id still finds nothing,
  // the new one finds its own session.
  SessionHandle z;
  REQUIRE(reg.connect("zzz", {}, &z) == Result::kOk);
  CHECK_FALSE(reg.isConnected("x2y"));
  REQUIRE(reg.trackRoom("zzz", "r3") == Result::kOk);
  CHECK(reg.roomsOf("zzz") == std::vector<std::string>{"r3"});
  CHECK(reg.roomSize("r2") == 0);

  // The same id connected again is a new session (a new handle).
  REQUIRE(reg.connect("x2y") == Result::kOk);
  CHECK(reg.roomsOf("x2y").empty());
  CHECK(reg.connect("x2y") == Result::kAlreadyConnected);
  CHECK(reg.connect("x1y") == Result::kAlreadyConnected);

  // Everyone leaves, the slab's pages go, and a new session starts over.
  REQUIRE(reg.disconnect("x1y") == Result::kOk);
  REQUIRE(reg.disconnect("x2y") == Result::kOk);
  REQUIRE(reg.disconnect(z) == Result::kOk);
  CHECK(reg.getMemoryStats().bytes == 0);
  CHECK_FALSE(reg.isConnected("zzz"));
  REQUIRE(reg.connect("zzz") == Result::kOk);
  CHECK(reg.isConnected("zzz"));
  CHECK(reg.roomsOf("zzz").empty());
}

// A list keeps two entries inline: a 2-member room, or a session in two
// rooms, costs no list bytes. The third entry moves the list to the heap
// (3 slots, then 7); it goes back inline only when it empties.
TEST_CASE("two entries inline: a 2-member room and a 2-room session hold no list on the heap",
          "[registry]") {
  SessionRegistry reg;
  SessionHandle a, b, c;
  REQUIRE(reg.connect("a", {}, &a) == Result::kOk);
  REQUIRE(reg.connect("b", {}, &b) == Result::kOk);
  REQUIRE(reg.connect("c", {}, &c) == Result::kOk);
  REQUIRE(reg.trackRoom(a, "keep") == Result::kOk);  // the room slab's page
  {
    // The room index grown first (it keeps its capacity when rooms go), so
    // that only the lists move the byte count below.
    SessionHandle d;
    REQUIRE(reg.connect("d", {}, &d) == Result::kOk);
    for (int i = 0; i < 16; ++i) REQUIRE(reg.trackRoom(d, "x" + std::to_string(i)) == Result::kOk);
    REQUIRE(reg.disconnect(d) == Result::kOk);
  }
  const std::size_t base = reg.getMemoryStats().bytes;
  const auto roomBytes = [&] { return reg.getMemoryStats().bytes - base; };

  REQUIRE(reg.trackRoom(a, "r") == Result::kOk);  // a: 2 rooms
  REQUIRE(reg.trackRoom(b, "r") == Result::kOk);  // r: 2 members
  CHECK(roomBytes() == 0);
  REQUIRE(reg.trackRoom(c, "r") == Result::kOk);  // r: 3 members, on the heap
  CHECK(roomBytes() == 3 * 8);
  REQUIRE(reg.trackRoom(a, "s") == Result::kOk);  // a: 3 rooms, on the heap
  CHECK(roomBytes() == 6 * 8);

  // The first member leaves: the last one moves into its place, and its
  // mirror in c's room list follows.
  REQUIRE(reg.untrackRoom(a, "r") == Result::kOk);
  CHECK(reg.roomSize("r") == 2);
  CHECK(reg.isMember("c", "r"));
  CHECK(reg.isMember("b", "r"));
  CHECK_FALSE(reg.isMember("a", "r"));
  std::set<std::string> seen;
  reg.forEachMember("r", [&](std::string_view m) { seen.emplace(m); });
  CHECK(seen == std::set<std::string>{"b", "c"});
  CHECK(reg.roomsOf("c") == std::vector<std::string>{"r"});

  // Inline lists: the first of two entries leaves, the second moves down.
  REQUIRE(reg.trackRoom(b, "t") == Result::kOk);
  REQUIRE(reg.trackRoom(c, "t") == Result::kOk);
  REQUIRE(reg.untrackRoom(b, "r") == Result::kOk);  // b's first room
  CHECK(reg.roomsOf("b") == std::vector<std::string>{"t"});
  REQUIRE(reg.untrackRoom(b, "t") == Result::kOk);
  CHECK(reg.roomsOf("b").empty());
  CHECK(reg.roomSize("t") == 1);
  CHECK(reg.isMember("c", "t"));

  REQUIRE(reg.disconnect(c) == Result::kOk);
  CHECK_FALSE(reg.roomExists("r"));
  CHECK_FALSE(reg.roomExists("t"));
  CHECK(reg.roomsOf("a") == std::vector<std::string>{"keep", "s"});
  CHECK(roomBytes() == 3 * 8);  // a's list: 2 entries in 3 heap slots
  REQUIRE(reg.untrackRoom(a, "s") == Result::kOk);
  CHECK(roomBytes() == 3 * 8);  // it stays on the heap until it empties
  REQUIRE(reg.trackRoom(b, "u") == Result::kOk);
  REQUIRE(reg.trackRoom(b, "v") == Result::kOk);
  CHECK(roomBytes() == 3 * 8);
  REQUIRE(reg.untrackRoom(a, "keep") == Result::kOk);  // a's list empties: freed
  REQUIRE(reg.trackRoom(a, "keep") == Result::kOk);
  CHECK(roomBytes() == 0);
}

TEST_CASE("maxSessionsPerUser, on connect and on bindUser", "[registry]") {
  Limits lim;
  lim.maxSessionsPerUser = 2;
  Recorder rec;
  SessionRegistry reg(rec.callbacks(), lim);
  REQUIRE(reg.connect("t1", "u") == Result::kOk);
  REQUIRE(reg.connect("t2", "u") == Result::kOk);
  REQUIRE(reg.connect("anon") == Result::kOk);
  rec.take();
  const RegistryStats st = reg.getMemoryStats();
  CHECK(reg.connect("t3", "u") == Result::kTooManySessions);
  SessionHandle h;
  CHECK(reg.connect("t3", "u", &h) == Result::kTooManySessions);
  CHECK_FALSE(h.valid());
  CHECK(reg.bindUser("anon", "u") == Result::kTooManySessions);
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take().empty());
  CHECK_FALSE(reg.isConnected("t3"));
  CHECK(reg.userOf("anon").empty());
  CHECK(reg.sessionCountOfUser("u") == 2);
  // Other users are unaffected; freeing a slot lets the next one in.
  CHECK(reg.connect("t3", "v") == Result::kOk);
  REQUIRE(reg.disconnect("t1") == Result::kOk);
  CHECK(reg.bindUser("anon", "u") == Result::kOk);
  CHECK(reg.sessionCountOfUser("u") == 2);

  Limits unlimited;
  unlimited.maxSessionsPerUser = 0;
  SessionRegistry many(RegistryCallbacks{}, unlimited);
  for (int i = 0; i < 200; ++i)
    REQUIRE(many.connect("s" + std::to_string(i), "same-user") == Result::kOk);
  CHECK(many.sessionCountOfUser("same-user") == 200);
  CHECK(many.getMemoryStats().users == 1);
  CHECK(many.clear() == 200);
  CHECK(many.getMemoryStats() == zeroStats());
}

TEST_CASE("maxMembersPerRoom", "[registry]") {
  Limits lim;
  lim.maxMembersPerRoom = 2;
  Recorder rec;
  SessionRegistry reg(rec.callbacks(true), lim);
  for (const char* s : {"a", "b", "c"}) REQUIRE(reg.connect(s) == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
  rec.take();
  const RegistryStats st = reg.getMemoryStats();
  CHECK(reg.trackRoom("c", "r") == Result::kRoomFull);
  CHECK(reg.trackRoom(reg.handleOf("c"), "r") == Result::kRoomFull);
  CHECK(reg.trackRoom("a", "r") == Result::kAlreadyDone);
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take().empty());
  CHECK_FALSE(reg.isMember("c", "r"));
  REQUIRE(reg.untrackRoom("a", "r") == Result::kOk);
  CHECK(reg.trackRoom("c", "r") == Result::kOk);
  CHECK(sorted(reg.membersOf("r")) == Strings{"b", "c"});
}

TEST_CASE("canJoin refusing or throwing gives kDenied and changes nothing", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks(true));
  REQUIRE(reg.connect("a", "u") == Result::kOk);
  REQUIRE(reg.connect("b") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "existing") == Result::kOk);
  CHECK(rec.take() == Strings{"userOnline:u", "canJoin:b:existing", "roomCreated:existing",
                              "roomJoined:existing:b"});

  rec.canJoin = [](std::string_view, std::string_view room) {
    return room.substr(0, 7) != "private";
  };
  RegistryStats st = reg.getMemoryStats();
  CHECK(reg.trackRoom("a", "private:1") == Result::kDenied);
  CHECK(reg.trackRoom(reg.handleOf("a"), "private:1") == Result::kDenied);
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take() == Strings{"canJoin:a:private:1", "canJoin:a:private:1"});
  CHECK_FALSE(reg.roomExists("private:1"));
  CHECK(reg.trackRoom("a", "public") == Result::kOk);
  CHECK(rec.take() ==
        Strings{"canJoin:a:public", "roomCreated:public", "roomJoined:public:a"});
  // Not asked for a repeat join.
  CHECK(reg.trackRoom("a", "public") == Result::kAlreadyDone);
  CHECK(rec.take().empty());

  rec.canJoin = [](std::string_view, std::string_view) -> bool {
    throw std::runtime_error("auth backend down");
  };
  st = reg.getMemoryStats();
  CHECK(reg.trackRoom("a", "existing") == Result::kDenied);
  CHECK(reg.trackRoom("a", "brand-new") == Result::kDenied);
  RegistryStats expected = st;
  expected.callbackErrors += 2;
  CHECK(reg.getMemoryStats() == expected);
  CHECK(reg.membersOf("existing") == Strings{"b"});
  CHECK_FALSE(reg.roomExists("brand-new"));
  REQUIRE(rec.logs.size() == 2);
  CHECK(rec.logs[0].rfind("error:", 0) == 0);
  CHECK(rec.logs[0].find("canJoin") != std::string::npos);
  CHECK(rec.logs[0].find("auth backend down") != std::string::npos);
}

TEST_CASE("canJoin may call back in, and trackRoom re-checks afterwards", "[registry]") {
  Limits lim;
  lim.maxRoomsPerSession = 2;
  lim.maxMembersPerRoom = 2;
  Recorder rec;
  SessionRegistry reg(rec.callbacks(true), lim);
  // Long ids: their names live on the heap, so a use after free shows up
  // under AddressSanitizer.
  const std::string a = "session-with-a-long-id-a";
  const std::string b = "session-with-a-long-id-b";
  REQUIRE(reg.connect(a, "user-with-a-long-name") == Result::kOk);
  REQUIRE(reg.connect(b) == Result::kOk);

  SECTION("the hook disconnects the session: kNotConnected") {
    std::string seenAfter;
    rec.canJoin = [&](std::string_view s, std::string_view) {
      CHECK(reg.disconnect(s) == Result::kOk);
      seenAfter.assign(s.data(), s.size());  // the view is still valid
      return true;
    };
    const RegistryStats before = reg.getMemoryStats();
    CHECK(reg.trackRoom(a, "room") == Result::kNotConnected);
    CHECK(seenAfter == a);
    CHECK_FALSE(reg.roomExists("room"));
    CHECK(reg.getMemoryStats().sessions == before.sessions - 1);
    CHECK(reg.getMemoryStats().users == 0);
  }
  SECTION("the hook disconnects the session, by handle") {
    rec.canJoin = [&](std::string_view s, std::string_view) {
      CHECK(reg.disconnect(s) == Result::kOk);
      CHECK(reg.connect(s) == Result::kOk);  // same id, new session
      return true;
    };
    const Result r = reg.trackRoom(reg.handleOf(a), "room");
    CHECK((r == Result::kNotConnected || r == Result::kStaleHandle));
    CHECK_FALSE(reg.roomExists("room"));
    CHECK(reg.isConnected(a));
  }
  SECTION("the room is named by a registry view that the hook frees") {
    rec.canJoin = [&](std::string_view s, std::string_view) {
      if (s == b) CHECK(reg.disconnect(a) == Result::kOk);
      return true;
    };
    const std::string_view roomView = reg.idOf(reg.handleOf(a));  // registry storage
    CHECK(reg.trackRoom(b, roomView) == Result::kOk);
    CHECK(reg.roomsOf(b) == Strings{a});
    CHECK(reg.membersOf(a) == Strings{b});
  }
  SECTION("the hook fills the session's room quota: kTooManyRooms") {
    bool inside = false;
    rec.canJoin = [&](std::string_view s, std::string_view room) {
      if (inside || room != "target") return true;
      inside = true;
      CHECK(reg.trackRoom(s, "x") == Result::kOk);
      CHECK(reg.trackRoom(s, "y") == Result::kOk);
      inside = false;
      return true;
    };
    CHECK(reg.trackRoom(a, "target") == Result::kTooManyRooms);
    CHECK_FALSE(reg.roomExists("target"));
    CHECK(sorted(reg.roomsOf(a)) == Strings{"x", "y"});
  }
  SECTION("the hook fills the room: kRoomFull") {
    REQUIRE(reg.connect("c") == Result::kOk);
    REQUIRE(reg.trackRoom(b, "target") == Result::kOk);
    bool inside = false;
    rec.canJoin = [&](std::string_view s, std::string_view room) {
      if (inside || s != a) return true;
      inside = true;
      CHECK(reg.trackRoom("c", room) == Result::kOk);
      inside = false;
      return true;
    };
    CHECK(reg.trackRoom(a, "target") == Result::kRoomFull);
    CHECK(reg.roomSize("target") == 2);
    CHECK_FALSE(reg.isMember(a, "target"));
  }
  SECTION("the hook joins the same room itself: kAlreadyDone, one membership") {
    bool inside = false;
    rec.canJoin = [&](std::string_view s, std::string_view room) {
      if (inside) return true;
      inside = true;
      CHECK(reg.trackRoom(s, room) == Result::kOk);
      inside = false;
      return true;
    };
    CHECK(reg.trackRoom(a, "target") == Result::kAlreadyDone);
    CHECK(reg.roomSize("target") == 1);
    const Strings ev = rec.take();
    CHECK(std::count(ev.begin(), ev.end(), "roomCreated:target") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomJoined:target:" + a) == 1);
  }
  SECTION("the hook starts the session's disconnect; joins from it are kClosing") {
    rec.onDisconnecting = [&](std::string_view s) {
      CHECK(reg.trackRoom(s, "late") == Result::kClosing);
    };
    rec.canJoin = [&](std::string_view s, std::string_view) {
      return s != a || reg.disconnect(s) == Result::kOk;
    };
    CHECK(reg.trackRoom(a, "r") == Result::kNotConnected);
    CHECK_FALSE(reg.roomExists("late"));
    CHECK_FALSE(reg.roomExists("r"));
  }
  rec.clearHooks();
  REQUIRE(reg.clear() >= 1);
  CHECK(reg.getMemoryStats().bytes == 0);
}

// ------------------------------------------------------ re-entrancy ---

TEST_CASE("callbacks may call back in: join, leave, disconnect", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());

  SECTION("roomJoined joins another room; events of the nested call come after") {
    rec.onRoomJoined = [&](std::string_view room, std::string_view s) {
      if (room == "r1") CHECK(reg.trackRoom(s, "r2") == Result::kOk);
    };
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    CHECK(rec.take() ==
          Strings{"roomCreated:r1", "roomJoined:r1:a", "roomCreated:r2", "roomJoined:r2:a"});
    CHECK(sorted(reg.roomsOf("a")) == Strings{"r1", "r2"});
  }
  SECTION("roomJoined leaves the room it just joined") {
    rec.onRoomJoined = [&](std::string_view room, std::string_view s) {
      CHECK(reg.untrackRoom(s, room) == Result::kOk);
    };
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    CHECK(rec.take() == Strings{"roomCreated:r1", "roomJoined:r1:a", "leave:a:r1",
                                "roomLeft:r1:a", "roomDeleted:r1"});
    CHECK(reg.getMemoryStats().rooms == 0);
  }
  SECTION("roomJoined disconnects the joiner") {
    rec.onRoomJoined = [&](std::string_view, std::string_view s) {
      CHECK(reg.disconnect(s) == Result::kOk);
    };
    REQUIRE(reg.connect("a", "u") == Result::kOk);
    rec.take();
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    CHECK(rec.take() == Strings{"roomCreated:r1", "roomJoined:r1:a", "disconnecting:a",
                                "leave:a:r1", "roomLeft:r1:a", "roomDeleted:r1",
                                "userOffline:u"});
    CHECK(reg.getMemoryStats() == zeroStats());
  }
  SECTION("leave leaves another room and joins one") {
    rec.onLeave = [&](std::string_view s, std::string_view room) {
      if (room == "r1") {
        CHECK(reg.untrackRoom(s, "r2") == Result::kOk);
        CHECK(reg.trackRoom(s, "lobby") == Result::kOk);
      }
    };
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);
    rec.take();
    REQUIRE(reg.untrackRoom("a", "r1") == Result::kOk);
    CHECK(rec.take() == Strings{"leave:a:r1", "roomLeft:r1:a", "roomDeleted:r1",
                                "leave:a:r2", "roomLeft:r2:a", "roomDeleted:r2",
                                "roomCreated:lobby", "roomJoined:lobby:a"});
    CHECK(reg.roomsOf("a") == Strings{"lobby"});
  }
  SECTION("leave during disconnect tries to rejoin: the tombstone holds") {
    std::vector<Result> rs;
    rec.onLeave = [&](std::string_view s, std::string_view room) {
      rs.push_back(reg.trackRoom(s, room));
      rs.push_back(reg.trackRoom(s, "elsewhere"));
    };
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.disconnect("a") == Result::kOk);
    REQUIRE(rs.size() == 2);
    CHECK(rs[0] == Result::kNotConnected);
    CHECK(rs[1] == Result::kNotConnected);
    CHECK(reg.getMemoryStats() == zeroStats());
  }
  SECTION("roomDeleted disconnects others and itself") {
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.connect("b") == Result::kOk);
    REQUIRE(reg.connect("c") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.trackRoom("b", "r2") == Result::kOk);
    REQUIRE(reg.trackRoom("c", "r2") == Result::kOk);
    rec.take();
    rec.onRoomDeleted = [&](std::string_view room) {
      if (room == "r1") {
        CHECK(reg.disconnect("b") == Result::kOk);
        CHECK(reg.disconnect("a") == Result::kOk);
        CHECK(reg.disconnect("c") == Result::kOk);
      }
    };
    REQUIRE(reg.untrackRoom("a", "r1") == Result::kOk);
    CHECK(reg.getMemoryStats() == zeroStats());
    const Strings ev = rec.take();
    CHECK(ev.front() == "leave:a:r1");
    CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r2") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "disconnecting:a") == 1);
  }
  SECTION("userOffline connects a replacement and disconnects others") {
    REQUIRE(reg.connect("a", "u") == Result::kOk);
    REQUIRE(reg.connect("b", "w") == Result::kOk);
    REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
    rec.take();
    rec.onUserOffline = [&](std::string_view user) {
      if (user == "u") {
        CHECK(reg.connect("a2", "u") == Result::kOk);
        CHECK(reg.disconnect("b") == Result::kOk);
      }
    };
    REQUIRE(reg.disconnect("a") == Result::kOk);
    // disconnecting is synchronous, so b's may come before the queued
    // userOnline of the replacement; everything else is in change order.
    const Strings ev = rec.take();
    CHECK(sorted(ev) == sorted(Strings{"disconnecting:a", "userOffline:u", "userOnline:u",
                                       "disconnecting:b", "leave:b:r", "roomLeft:r:b",
                                       "roomDeleted:r", "userOffline:w"}));
    const auto at = [&](const char* e) { return std::find(ev.begin(), ev.end(), e); };
    CHECK(ev.front() == "disconnecting:a");
    CHECK(at("userOffline:u") < at("userOnline:u"));
    CHECK(at("disconnecting:b") < at("leave:b:r"));
    CHECK(at("leave:b:r") < at("roomLeft:r:b"));
    CHECK(at("roomLeft:r:b") < at("roomDeleted:r"));
    CHECK(at("roomDeleted:r") < at("userOffline:w"));
    CHECK(reg.isConnected("a2"));
    CHECK(reg.userOf("a2") == "u");
    CHECK(reg.getMemoryStats().sessions == 1);
    CHECK(reg.getMemoryStats().users == 1);
  }
  SECTION("userOnline joins a room") {
    rec.onUserOnline = [&](std::string_view) {
      CHECK(reg.trackRoom("a", "welcome") == Result::kOk);
    };
    REQUIRE(reg.connect("a", "u") == Result::kOk);
    CHECK(rec.take() ==
          Strings{"userOnline:u", "roomCreated:welcome", "roomJoined:welcome:a"});
  }
  SECTION("disconnecting: rooms intact, may leave, join others, disconnect others") {
    REQUIRE(reg.connect("a", "u") == Result::kOk);
    REQUIRE(reg.connect("b") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);
    REQUIRE(reg.trackRoom("b", "r1") == Result::kOk);
    rec.take();
    std::vector<Result> rs;
    rec.onDisconnecting = [&](std::string_view s) {
      if (s != "a") return;
      CHECK(sorted(reg.roomsOf(s)) == Strings{"r1", "r2"});
      rs.push_back(reg.trackRoom(s, "r3"));             // kClosing
      rs.push_back(reg.trackRoom(reg.handleOf(s), "r3"));  // kClosing
      rs.push_back(reg.bindUser(s, "u"));               // kClosing
      rs.push_back(reg.disconnect(s));                  // kClosing
      rs.push_back(reg.disconnect(reg.handleOf(s)));    // kClosing
      rs.push_back(reg.connect(s));                     // still live: kAlreadyConnected
      rs.push_back(reg.trackRoom("b", "r9"));           // kOk
      rs.push_back(reg.disconnect("b"));                // kOk
    };
    REQUIRE(reg.disconnect("a") == Result::kOk);
    CHECK(rs == std::vector<Result>{Result::kClosing, Result::kClosing, Result::kClosing,
                                    Result::kClosing, Result::kClosing,
                                    Result::kAlreadyConnected, Result::kOk, Result::kOk});
    CHECK_FALSE(reg.roomExists("r3"));
    CHECK(reg.getMemoryStats() == zeroStats());
    const Strings ev = rec.take();
    CHECK(ev.front() == "disconnecting:a");
    CHECK(ev.back() == "userOffline:u");
    CHECK(std::count(ev.begin(), ev.end(), "disconnecting:b") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r9") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r1") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r2") == 1);
  }
  SECTION("disconnecting leaves its own rooms first") {
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);
    rec.take();
    rec.onDisconnecting = [&](std::string_view s) {
      CHECK(reg.clearRoomTracking(s) == 1);
    };
    REQUIRE(reg.disconnect("a") == Result::kOk);
    const Strings ev = rec.take();
    CHECK(std::count(ev.begin(), ev.end(), "leave:a:r1") == 1);
    CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r1") == 1);
    CHECK(reg.getMemoryStats() == zeroStats());
  }
  SECTION("disconnecting calls clear()") {
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.connect("b") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
    REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
    rec.onDisconnecting = [&](std::string_view s) {
      if (s == "a") CHECK(reg.clear() == 1);  // everyone but the closing one
    };
    REQUIRE(reg.disconnect("a") == Result::kOk);
    CHECK(reg.getMemoryStats() == zeroStats());
  }
  SECTION("nested disconnect from a roomLeft listener of another session") {
    REQUIRE(reg.connect("a") == Result::kOk);
    REQUIRE(reg.connect("b") == Result::kOk);
    REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
    REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
    std::vector<Result> rs;
    rec.onDisconnecting = [&](std::string_view s) {
      if (s == "b") rs.push_back(reg.disconnect(s));  // own disconnecting: kClosing
    };
    rec.onRoomLeft = [&](std::string_view, std::string_view s) {
      if (s == "a") rs.push_back(reg.disconnect("b"));
    };
    REQUIRE(reg.disconnect("a") == Result::kOk);
    CHECK(rs == std::vector<Result>{Result::kClosing, Result::kOk});
    CHECK(reg.getMemoryStats() == zeroStats());
  }
  rec.clearHooks();
  REQUIRE(reg.clear() <= 3);
  CHECK(reg.getMemoryStats().bytes == 0);
}

TEST_CASE("a disconnect from inside its own disconnecting callback is kClosing",
          "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  SessionHandle h;
  REQUIRE(reg.connect("a", "u", &h) == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
  rec.take();
  std::vector<Result> rs;
  rec.onDisconnecting = [&](std::string_view s) {
    rs.push_back(reg.disconnect(s));
    rs.push_back(reg.disconnect(h));
  };
  REQUIRE(reg.disconnect(h) == Result::kOk);
  CHECK(rs == std::vector<Result>{Result::kClosing, Result::kClosing});
  // Exactly one teardown.
  CHECK(rec.take() ==
        Strings{"disconnecting:a", "leave:a:r", "roomLeft:r:a", "roomDeleted:r",
                "userOffline:u"});
  CHECK(reg.getMemoryStats() == zeroStats());
}

TEST_CASE("a mutating call from inside a const visitor is refused with kBusy",
          "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  SessionHandle ha;
  REQUIRE(reg.connect("a", "u", &ha) == Result::kOk);
  REQUIRE(reg.connect("b") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
  REQUIRE(reg.trackRoom("b", "r") == Result::kOk);
  rec.take();
  const RegistryStats st = reg.getMemoryStats();

  std::vector<Result> rs;
  std::vector<std::size_t> counts;
  const auto mutateAll = [&](std::string_view) {
    rs.push_back(reg.connect("c"));
    rs.push_back(reg.connect("d", "u", nullptr));
    rs.push_back(reg.bindUser("b", "v"));
    rs.push_back(reg.trackRoom("a", "r2"));
    rs.push_back(reg.trackRoom(ha, "r2"));
    rs.push_back(reg.untrackRoom("a", "r"));
    rs.push_back(reg.untrackRoom(ha, "r"));
    rs.push_back(reg.disconnect("b"));
    rs.push_back(reg.disconnect(ha));
    counts.push_back(reg.clearRoomTracking("a"));
    counts.push_back(reg.clearRoomTracking(ha));
    counts.push_back(reg.clear());
  };
  CHECK(reg.forEachMember("r", mutateAll) == 2);
  CHECK(reg.forEachRoomOf("a", mutateAll) == 1);
  CHECK(reg.forEachSessionOfUser("u", mutateAll) == 1);
  CHECK(reg.forEachSession(mutateAll) == 2);
  REQUIRE(rs.size() == 6 * 9);
  for (Result r : rs) CHECK(r == Result::kBusy);
  for (std::size_t n : counts) CHECK(n == 0);
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take().empty());
  CHECK(sorted(reg.membersOf("r")) == Strings{"a", "b"});
  CHECK(reg.userOf("b").empty());

  // Nested visitors work, and the refusal ends with the visitor.
  std::size_t inner = 0;
  reg.forEachMember("r", [&](std::string_view s) {
    inner += reg.forEachRoomOf(s, [&](std::string_view) {});
  });
  CHECK(inner == 2);
  // A visitor that throws does not leave the registry refusing calls.
  CHECK_THROWS_AS(reg.forEachMember("r", [](std::string_view) { throw 1; }), int);
  CHECK(reg.trackRoom("a", "r2") == Result::kOk);
  CHECK(reg.disconnect("b") == Result::kOk);
}

// -------------------------------------------------- throwing callbacks ---

TEST_CASE("callbacks that throw: state fully cleaned, errors counted and logged",
          "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  int thrown = 0;
  const auto boom2 = [&](std::string_view, std::string_view) {
    ++thrown;
    throw std::runtime_error("boom");
  };
  const auto boom1 = [&](std::string_view) {
    ++thrown;
    throw std::runtime_error("boom");
  };
  rec.onLeave = boom2;
  rec.onRoomLeft = boom2;
  rec.onRoomJoined = boom2;
  rec.onRoomCreated = boom1;
  rec.onRoomDeleted = boom1;
  rec.onUserOnline = boom1;
  rec.onUserOffline = [&](std::string_view) {
    ++thrown;
    throw 42;  // not a std::exception
  };
  rec.onDisconnecting = boom1;

  REQUIRE(reg.connect("a", "u") == Result::kOk);           // online
  REQUIRE(reg.connect("b", "u") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r1") == Result::kOk);        // created, joined
  REQUIRE(reg.trackRoom("a", "r2") == Result::kOk);        // created, joined
  REQUIRE(reg.trackRoom("b", "r1") == Result::kOk);        // joined
  CHECK(thrown == 6);
  CHECK(reg.getMemoryStats().callbackErrors == 6);
  CHECK(sorted(reg.roomsOf("a")) == Strings{"r1", "r2"});
  CHECK(sorted(reg.membersOf("r1")) == Strings{"a", "b"});
  CHECK(reg.getMemoryStats().memberships == 3);

  // disconnect a: disconnecting, 2x (leave, roomLeft), roomDeleted r2.
  REQUIRE(reg.disconnect("a") == Result::kOk);
  CHECK(thrown == 6 + 6);
  CHECK_FALSE(reg.isConnected("a"));
  CHECK_FALSE(reg.roomExists("r2"));
  CHECK(reg.membersOf("r1") == Strings{"b"});
  // Every event was still delivered.
  const Strings ev = rec.take();
  CHECK(std::count(ev.begin(), ev.end(), "roomLeft:r1:a") == 1);
  CHECK(std::count(ev.begin(), ev.end(), "roomLeft:r2:a") == 1);
  CHECK(std::count(ev.begin(), ev.end(), "roomDeleted:r2") == 1);

  // disconnect b: disconnecting, leave, roomLeft, roomDeleted, userOffline.
  REQUIRE(reg.disconnect("b") == Result::kOk);
  CHECK(thrown == 12 + 5);
  RegistryStats expected;
  expected.callbackErrors = 17;
  CHECK(reg.getMemoryStats() == expected);
  CHECK(rec.take().back() == "userOffline:u");

  REQUIRE(rec.logs.size() == 17);
  for (const std::string& line : rec.logs) CHECK(line.rfind("error:", 0) == 0);
  CHECK(std::count_if(rec.logs.begin(), rec.logs.end(), [](const std::string& l) {
          return l.find("boom") != std::string::npos;
        }) == 16);
  CHECK(rec.logs.back().find("non-exception") != std::string::npos);

  // The registry works normally afterwards.
  rec = Recorder{};
  REQUIRE(reg.connect("c") == Result::kOk);
  REQUIRE(reg.trackRoom("c", "r") == Result::kOk);
  REQUIRE(reg.disconnect("c") == Result::kOk);
  CHECK(reg.getMemoryStats().bytes == 0);
}

TEST_CASE("a log callback that throws is survived", "[registry]") {
  RegistryCallbacks cb;
  int logs = 0;
  cb.roomJoined = [](std::string_view, std::string_view) { throw std::logic_error("x"); };
  cb.log = [&](LogLevel, std::string_view) {
    ++logs;
    throw std::runtime_error("log sink down");
  };
  SessionRegistry reg(std::move(cb));
  REQUIRE(reg.connect("a") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "r") == Result::kOk);
  CHECK(logs == 1);
  CHECK(reg.getMemoryStats().callbackErrors >= 1);
  CHECK(reg.isMember("a", "r"));
  REQUIRE(reg.disconnect("a") == Result::kOk);
  CHECK(reg.getMemoryStats().bytes == 0);
}

// ------------------------------------------------------------ users ---

TEST_CASE("userOnline and userOffline only on a user's first and last session",
          "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  REQUIRE(reg.connect("tab1", "alice") == Result::kOk);
  CHECK(rec.take() == Strings{"userOnline:alice"});
  REQUIRE(reg.connect("tab2", "alice") == Result::kOk);
  REQUIRE(reg.connect("tab3", "alice") == Result::kOk);
  CHECK(rec.take().empty());
  CHECK(reg.sessionCountOfUser("alice") == 3);
  CHECK(sorted(reg.sessionsOfUser("alice")) == Strings{"tab1", "tab2", "tab3"});
  CHECK(reg.getMemoryStats().users == 1);

  REQUIRE(reg.disconnect("tab2") == Result::kOk);
  REQUIRE(reg.disconnect("tab1") == Result::kOk);
  CHECK(rec.take() == Strings{"disconnecting:tab2", "disconnecting:tab1"});
  CHECK(reg.sessionsOfUser("alice") == Strings{"tab3"});
  // Second browser tab reopens before the last closes: no offline/online.
  REQUIRE(reg.connect("tab4", "alice") == Result::kOk);
  REQUIRE(reg.disconnect("tab3") == Result::kOk);
  CHECK(rec.take() == Strings{"disconnecting:tab3"});
  REQUIRE(reg.trackRoom("tab4", "r") == Result::kOk);
  rec.take();
  REQUIRE(reg.disconnect("tab4") == Result::kOk);
  CHECK(rec.take() == Strings{"disconnecting:tab4", "leave:tab4:r", "roomLeft:r:tab4",
                              "roomDeleted:r", "userOffline:alice"});
  CHECK(reg.sessionCountOfUser("alice") == 0);
  CHECK(reg.sessionsOfUser("alice").empty());
  CHECK(reg.getMemoryStats() == zeroStats());

  // Online again, then bindUser of an anonymous session: no second online.
  REQUIRE(reg.connect("x") == Result::kOk);
  CHECK(rec.take().empty());
  REQUIRE(reg.bindUser("x", "bob") == Result::kOk);
  CHECK(rec.take() == Strings{"userOnline:bob"});
  REQUIRE(reg.connect("y") == Result::kOk);
  REQUIRE(reg.bindUser("y", "bob") == Result::kOk);
  CHECK(rec.take().empty());
  REQUIRE(reg.disconnect("x") == Result::kOk);
  REQUIRE(reg.disconnect("y") == Result::kOk);
  CHECK(rec.take() == Strings{"disconnecting:x", "disconnecting:y", "userOffline:bob"});
}

TEST_CASE("bindUser", "[registry]") {
  Recorder rec;
  Limits lim;
  lim.maxSessionsPerUser = 2;
  lim.maxIdLength = 32;
  SessionRegistry reg(rec.callbacks(), lim);
  REQUIRE(reg.connect("s1") == Result::kOk);
  REQUIRE(reg.connect("s2", "carol") == Result::kOk);
  rec.take();
  RegistryStats st = reg.getMemoryStats();
  CHECK(reg.bindUser("nobody", "carol") == Result::kNotConnected);
  CHECK(reg.bindUser("s1", "") == Result::kInvalidId);
  CHECK(reg.bindUser("s1", std::string(33, 'u')) == Result::kInvalidId);
  CHECK(reg.bindUser("s2", "carol") == Result::kAlreadyDone);
  CHECK(reg.bindUser("s2", "dave") == Result::kUserMismatch);
  CHECK(reg.getMemoryStats() == st);
  CHECK(rec.take().empty());
  CHECK(reg.userOf("s2") == "carol");

  CHECK(reg.bindUser("s1", "carol") == Result::kOk);
  CHECK(reg.userOf("s1") == "carol");
  CHECK(reg.bindUser("s1", "carol") == Result::kAlreadyDone);
  CHECK(reg.bindUser("s1", "dave") == Result::kUserMismatch);
  CHECK(reg.sessionCountOfUser("carol") == 2);
  CHECK(rec.take().empty());  // carol was online already

  REQUIRE(reg.connect("s3") == Result::kOk);
  st = reg.getMemoryStats();
  CHECK(reg.bindUser("s3", "carol") == Result::kTooManySessions);
  CHECK(reg.getMemoryStats() == st);
  CHECK(reg.userOf("s3").empty());
  // A long (heap) user name.
  const std::string longUser(32, 'L');
  CHECK(reg.bindUser("s3", longUser) == Result::kOk);
  CHECK(reg.userOf("s3") == longUser);
  CHECK(rec.take() == Strings{"userOnline:" + longUser});
  CHECK(reg.getMemoryStats().users == 2);
  REQUIRE(reg.disconnect("s3") == Result::kOk);
  CHECK(rec.take().back() == "userOffline:" + longUser);
  CHECK(reg.clear() == 2);
  CHECK(reg.getMemoryStats() == zeroStats());
}

TEST_CASE("clear() ends every session", "[registry]") {
  Recorder rec;
  SessionRegistry reg(rec.callbacks());
  CHECK(reg.clear() == 0);
  REQUIRE(reg.connect("a", "u") == Result::kOk);
  REQUIRE(reg.connect("b", "u") == Result::kOk);
  REQUIRE(reg.connect("c") == Result::kOk);
  REQUIRE(reg.connect("d", "w") == Result::kOk);
  SessionHandle hb = reg.handleOf("b");
  for (const char* s : {"a", "b", "c"}) REQUIRE(reg.trackRoom(s, "shared") == Result::kOk);
  REQUIRE(reg.trackRoom("a", "solo") == Result::kOk);
  rec.take();

  CHECK(reg.clear() == 4);
  const Strings ev = rec.take();
  const auto count = [&](const std::string& prefix) {
    return std::count_if(ev.begin(), ev.end(), [&](const std::string& e) {
      return e.rfind(prefix, 0) == 0;
    });
  };
  CHECK(count("leave:") == 4);
  CHECK(count("roomLeft:") == 4);
  CHECK(count("roomDeleted:") == 2);
  CHECK(count("userOffline:") == 2);
  CHECK(reg.getMemoryStats() == zeroStats());
  for (const char* s : {"a", "b", "c", "d"}) {
    CHECK_FALSE(reg.isConnected(s));
    CHECK(reg.trackRoom(s, "shared") == Result::kNotConnected);
  }
  CHECK(reg.trackRoom(hb, "shared") == Result::kStaleHandle);
  CHECK(reg.getMemoryStats() == zeroStats());
  // Usable afterwards.
  REQUIRE(reg.connect("a", "u") == Result::kOk);
  CHECK(rec.take() == Strings{"userOnline:u"});
  CHECK(reg.clear() == 1);
  CHECK(reg.getMemoryStats() == zeroStats());
}

TEST_CASE("moving a registry keeps its state", "[registry]") {
  SessionRegistry a;
  REQUIRE(a.connect("s", "u") == Result::kOk);
  REQUIRE(a.trackRoom("s", "r") == Result::kOk);
  SessionRegistry b(std::move(a));
  CHECK(b.isMember("s", "r"));
  SessionRegistry c;
  c = std::move(b);
  CHECK(c.roomSize("r") == 1);
  REQUIRE(c.disconnect("s") == Result::kOk);
  CHECK(c.getMemoryStats() == zeroStats());
}

TEST_CASE("many sessions and rooms: bytes grow and return to zero", "[registry]") {
  Limits lim;
  lim.maxSessionsPerUser = 0;
  SessionRegistry reg(RegistryCallbacks{}, lim);
  std::size_t peak = 0;
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < 3000; ++i) {
      const std::string s = "session-number-" + std::to_string(i);
      REQUIRE(reg.connect(s, "user-" + std::to_string(i % 100)) == Result::kOk);
      for (int k = 0; k < 5; ++k)
        REQUIRE(reg.trackRoom(s, "room-" + std::to_string((i * 7 + k * 13) % 500)) ==
                Result::kOk);
    }
    const RegistryStats st = reg.getMemoryStats();
    CHECK(st.sessions == 3000);
    CHECK(st.users == 100);
    CHECK(st.memberships == 15000);
    CHECK(st.sessionsWithRooms == 3000);
    CHECK(st.rooms == 500);
    CHECK(st.bytes > 15000 * 16);
    if (round == 0) peak = st.bytes;
    CHECK(st.bytes == peak);  // same shape, same bytes
    for (int i = 0; i < 3000; i += 2)
      REQUIRE(reg.disconnect("session-number-" + std::to_string(i)) == Result::kOk);
    for (int i = 1; i < 3000; i += 2)
      CHECK(reg.clearRoomTracking("session-number-" + std::to_string(i)) == 5);
    CHECK(reg.getMemoryStats().rooms == 0);
    CHECK(reg.clear() == 1500);
    CHECK(reg.getMemoryStats() == zeroStats());
  }
}

// ------------------------------------------------------------- model ---

/// The plain model: what the registry should hold.
struct ModelSession {
  std::string user;
  std::set<std::string> rooms;
  SessionHandle handle;
};
struct Model {
  std::map<std::string, ModelSession> sessions;
  std::map<std::string, std::set<std::string>> rooms;
  std::map<std::string, std::set<std::string>> users;
};

constexpr std::size_t kModelMaxRooms = 4;
constexpr std::size_t kModelMaxSessionsPerUser = 3;
constexpr std::size_t kModelMaxMembers = 3;
constexpr std::size_t kModelMaxId = 30;

bool modelDenies(std::string_view session, std::string_view room) {
  return room == "r7" && (session == "s1" || session == "s2");
}

bool validModelId(const std::string& id) {
  return !id.empty() && id.size() <= kModelMaxId;
}

class ModelRun {
 public:
  explicit ModelRun(std::uint64_t seed) : rng_(seed), reg_(callbacks(), limits()) {
    for (int i = 0; i < 8; ++i) sessionIds_.push_back("s" + std::to_string(i));
    sessionIds_.push_back("session-with-a-long-id-8");   // heap name
    sessionIds_.push_back("session-with-a-long-id-9");
    for (int i = 0; i < 8; ++i) roomIds_.push_back("r" + std::to_string(i));
    roomIds_.push_back("room:with-a-long-name-8");
    roomIds_.push_back("room:with-a-long-name-9");
    for (int i = 0; i < 4; ++i) userIds_.push_back("u" + std::to_string(i));
    userIds_.push_back("user-with-a-long-name-4");
  }

  static Limits limits() {
    Limits l;
    l.maxRoomsPerSession = kModelMaxRooms;
    l.maxSessionsPerUser = kModelMaxSessionsPerUser;
    l.maxMembersPerRoom = kModelMaxMembers;
    l.maxIdLength = kModelMaxId;
    return l;
  }

  RegistryCallbacks callbacks() {
    RegistryCallbacks cb;
    cb.leave = [this](std::string_view s, std::string_view r) { ev_.push_back(cat("leave", s, r)); };
    cb.canJoin = [this](std::string_view s, std::string_view r) {
      ev_.push_back(cat("canJoin", s, r));
      return !modelDenies(s, r);
    };
    cb.roomCreated = [this](std::string_view r) { ev_.push_back(cat("roomCreated", r)); };
    cb.roomJoined = [this](std::string_view r, std::string_view s) {
      ev_.push_back(cat("roomJoined", r, s));
    };
    cb.roomLeft = [this](std::string_view r, std::string_view s) {
      ev_.push_back(cat("roomLeft", r, s));
    };
    cb.roomDeleted = [this](std::string_view r) { ev_.push_back(cat("roomDeleted", r)); };
    cb.userOnline = [this](std::string_view u) { ev_.push_back(cat("userOnline", u)); };
    cb.userOffline = [this](std::string_view u) { ev_.push_back(cat("userOffline", u)); };
    cb.disconnecting = [this](std::string_view s) { ev_.push_back(cat("disconnecting", s)); };
    return cb;
  }

  /// Runs `steps` random operations, checking everything after each; returns
  /// an empty string or a description of the first failure.
  std::string run(std::size_t steps) {
    for (step_ = 0; step_ < steps; ++step_) {
      std::string err = randomOp();
      if (err.empty()) err = checkInvariants();
      if (!err.empty()) return "step " + std::to_string(step_) + " (" + lastOp_ + "): " + err;
    }
    // Tear down: everyone disconnects; nothing may remain.
    while (!model_.sessions.empty()) {
      const std::string id = model_.sessions.begin()->first;
      lastOp_ = "final disconnect " + id;
      std::string err = doDisconnect(id, false);
      if (err.empty()) err = checkInvariants();
      if (!err.empty()) return "teardown (" + lastOp_ + "): " + err;
    }
    const RegistryStats st = reg_.getMemoryStats();
    if (!(st == RegistryStats{}))
      return "after teardown stats not zero: " +
             Catch::StringMaker<RegistryStats>::convert(st);
    return {};
  }

  std::size_t opsRun() const { return opsRun_; }
  const std::map<Result, std::size_t>& resultsSeen() const { return seen_; }

 private:
  template <typename T>
  const T& pick(const std::vector<T>& v) {
    return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng_)];
  }
  int percent() { return std::uniform_int_distribution<int>(0, 99)(rng_); }

  std::string anySessionId() {
    const int p = percent();
    if (p < 2) return "";
    if (p < 4) return std::string(kModelMaxId + 1, 'z');
    return pick(sessionIds_);
  }
  std::string anyRoomId() {
    const int p = percent();
    if (p < 2) return "";
    if (p < 4) return std::string(kModelMaxId + 1, 'q');
    if (p < 40) return roomIds_[static_cast<std::size_t>(p % 3)];  // crowded rooms
    return pick(roomIds_);
  }
  std::string anyUserId(bool allowAnonymous) {
    const int p = percent();
    if (p < 3) return std::string(kModelMaxId + 1, 'w');
    if (allowAnonymous && p < 30) return "";
    if (!allowAnonymous && p < 5) return "";
    return pick(userIds_);
  }
  /// A handle: a live one, a stale one, or the null handle. Sets *id to the
  /// live session's id, or empty.
  SessionHandle anyHandle(std::string* id) {
    id->clear();
    const int p = percent();
    if (p < 65 && !model_.sessions.empty()) {
      auto it = model_.sessions.begin();
      std::advance(it, std::uniform_int_distribution<std::size_t>(
                           0, model_.sessions.size() - 1)(rng_));
      *id = it->first;
      return it->second.handle;
    }
    if (p < 95 && !stale_.empty()) return pick(stale_);
    return SessionHandle{};
  }

  std::string expectResult(Result got, Result want) {
    ++seen_[want];
    if (got == want) return {};
    return "result " + std::string(roomkeeper::toString(got)) + ", model says " +
           std::string(roomkeeper::toString(want));
  }
  std::string expectEvents(const Strings& want) {
    Strings got;
    got.swap(ev_);
    if (got == want) return {};
    std::string msg = "events differ; got [";
    for (const auto& e : got) msg += e + " ";
    msg += "] want [";
    for (const auto& e : want) msg += e + " ";
    return msg + "]";
  }

  // The events of leaving `rooms`, in any room order: each room's group is
  // leave, roomLeft[, roomDeleted]. Checks `got` (a slice) against them.
  static std::string checkLeaveGroups(const Strings& got, const std::string& session,
                                      const std::set<std::string>& rooms,
                                      const Model& before) {
    std::vector<Strings> want;
    for (const std::string& r : rooms) {
      Strings g{cat("leave", session, r), cat("roomLeft", r, session)};
      if (before.rooms.at(r).size() == 1) g.push_back(cat("roomDeleted", r));
      want.push_back(g);
    }
    std::vector<Strings> have;
    for (const std::string& e : got) {
      if (e.rfind("leave:", 0) == 0) have.emplace_back();
      if (have.empty()) return "leave group does not start with leave: " + e;
      have.back().push_back(e);
    }
    std::sort(want.begin(), want.end());
    std::sort(have.begin(), have.end());
    if (want != have) return "leave groups differ for " + session;
    return {};
  }

  void forgetSession(const std::string& id) {
    ModelSession& ms = model_.sessions.at(id);
    for (const std::string& r : ms.rooms) {
      auto& members = model_.rooms.at(r);
      members.erase(id);
      if (members.empty()) model_.rooms.erase(r);
    }
    ms.rooms.clear();
    if (!ms.user.empty()) {
      auto& ss = model_.users.at(ms.user);
      ss.erase(id);
      if (ss.empty()) model_.users.erase(ms.user);
    }
    stale_.push_back(ms.handle);
    if (stale_.size() > 32) stale_.erase(stale_.begin());
    model_.sessions.erase(id);
  }

  std::string doConnect() {
    const std::string id = anySessionId();
    const std::string user = anyUserId(true);
    const bool withHandle = percent() < 50;
    lastOp_ = "connect " + id + " " + user;
    Result want = Result::kOk;
    if (!validModelId(id))
      want = Result::kInvalidId;
    else if (!user.empty() && user.size() > kModelMaxId)
      want = Result::kInvalidId;
    else if (model_.sessions.count(id))
      want = Result::kAlreadyConnected;
    else if (!user.empty() && model_.users.count(user) &&
             model_.users[user].size() >= kModelMaxSessionsPerUser)
      want = Result::kTooManySessions;
    SessionHandle h;
    const Result got = withHandle ? reg_.connect(id, user, &h) : reg_.connect(id, user);
    std::string err = expectResult(got, want);
    if (!err.empty()) return err;
    Strings wantEv;
    if (want == Result::kOk) {
      if (!withHandle) h = reg_.handleOf(id);
      if (!h.valid()) return "connect gave no valid handle";
      for (const SessionHandle& old : stale_)
        if (old == h) return "a new handle equals a stale one";
      ModelSession ms;
      ms.user = user;
      ms.handle = h;
      model_.sessions[id] = ms;
      if (!user.empty()) {
        if (!model_.users.count(user)) wantEv.push_back(cat("userOnline", user));
        model_.users[user].insert(id);
      }
    } else if (withHandle && h.valid()) {
      return "a refused connect set the handle";
    }
    return expectEvents(wantEv);
  }

  std::string doBindUser() {
    const std::string id = anySessionId();
    const std::string user = anyUserId(false);
    lastOp_ = "bindUser " + id + " " + user;
    Result want = Result::kOk;
    auto it = model_.sessions.find(id);
    if (it == model_.sessions.end())
      want = Result::kNotConnected;
    else if (!validModelId(user))
      want = Result::kInvalidId;
    else if (!it->second.user.empty())
      want = it->second.user == user ? Result::kAlreadyDone : Result::kUserMismatch;
    else if (model_.users.count(user) &&
             model_.users[user].size() >= kModelMaxSessionsPerUser)
      want = Result::kTooManySessions;
    std::string err = expectResult(reg_.bindUser(id, user), want);
    if (!err.empty()) return err;
    Strings wantEv;
    if (want == Result::kOk) {
      if (!model_.users.count(user)) wantEv.push_back(cat("userOnline", user));
      model_.users[user].insert(id);
      it->second.user = user;
    }
    return expectEvents(wantEv);
  }

  std::string doTrack(bool byHandle) {
    std::string id;
    SessionHandle h;
    if (byHandle)
      h = anyHandle(&id);
    else
      id = anySessionId();
    const std::string room = anyRoomId();
    lastOp_ = std::string(byHandle ? "trackRoom(handle) " : "trackRoom ") + id + " " + room;
    auto it = model_.sessions.find(id);
    Result want = Result::kOk;
    bool asks = false;
    if (it == model_.sessions.end())
      want = byHandle ? Result::kStaleHandle : Result::kNotConnected;
    else if (!validModelId(room))
      want = Result::kInvalidId;
    else if (it->second.rooms.count(room))
      want = Result::kAlreadyDone;
    else if (it->second.rooms.size() >= kModelMaxRooms)
      want = Result::kTooManyRooms;
    else if (model_.rooms.count(room) && model_.rooms[room].size() >= kModelMaxMembers)
      want = Result::kRoomFull;
    else {
      asks = true;
      if (modelDenies(id, room)) want = Result::kDenied;
    }
    const Result got = byHandle ? reg_.trackRoom(h, room) : reg_.trackRoom(id, room);
    std::string err = expectResult(got, want);
    if (!err.empty()) return err;
    Strings wantEv;
    if (asks) wantEv.push_back(cat("canJoin", id, room));
    if (want == Result::kOk) {
      if (!model_.rooms.count(room)) wantEv.push_back(cat("roomCreated", room));
      wantEv.push_back(cat("roomJoined", room, id));
      model_.rooms[room].insert(id);
      it->second.rooms.insert(room);
    }
    return expectEvents(wantEv);
  }

  std::string doUntrack(bool byHandle) {
    std::string id;
    SessionHandle h;
    if (byHandle)
      h = anyHandle(&id);
    else
      id = anySessionId();
    // Prefer a room the session is in, so leaves are common.
    std::string room = anyRoomId();
    auto it = model_.sessions.find(id);
    if (it != model_.sessions.end() && !it->second.rooms.empty() && percent() < 60) {
      auto r = it->second.rooms.begin();
      std::advance(r, std::uniform_int_distribution<std::size_t>(
                          0, it->second.rooms.size() - 1)(rng_));
      room = *r;
    }
    lastOp_ = std::string(byHandle ? "untrackRoom(handle) " : "untrackRoom ") + id + " " + room;
    Result want = Result::kOk;
    if (it == model_.sessions.end())
      want = byHandle ? Result::kStaleHandle : Result::kNotConnected;
    else if (!validModelId(room))
      want = Result::kInvalidId;
    else if (!it->second.rooms.count(room))
      want = Result::kAlreadyDone;
    const Result got = byHandle ? reg_.untrackRoom(h, room) : reg_.untrackRoom(id, room);
    std::string err = expectResult(got, want);
    if (!err.empty()) return err;
    Strings wantEv;
    if (want == Result::kOk) {
      wantEv = {cat("leave", id, room), cat("roomLeft", room, id)};
      auto& members = model_.rooms.at(room);
      members.erase(id);
      if (members.empty()) {
        wantEv.push_back(cat("roomDeleted", room));
        model_.rooms.erase(room);
      }
      it->second.rooms.erase(room);
    }
    return expectEvents(wantEv);
  }

  std::string doClearRooms(bool byHandle) {
    std::string id;
    SessionHandle h;
    if (byHandle)
      h = anyHandle(&id);
    else
      id = anySessionId();
    lastOp_ = std::string(byHandle ? "clearRoomTracking(handle) " : "clearRoomTracking ") + id;
    auto it = model_.sessions.find(id);
    const std::size_t want = it == model_.sessions.end() ? 0 : it->second.rooms.size();
    const Model before = model_;
    const std::size_t got = byHandle ? reg_.clearRoomTracking(h) : reg_.clearRoomTracking(id);
    if (got != want)
      return "clearRoomTracking returned " + std::to_string(got) + ", model says " +
             std::to_string(want);
    if (it == model_.sessions.end()) return expectEvents({});
    const std::set<std::string> rooms = it->second.rooms;
    for (const std::string& r : rooms) {
      auto& members = model_.rooms.at(r);
      members.erase(id);
      if (members.empty()) model_.rooms.erase(r);
    }
    it->second.rooms.clear();
    Strings got2;
    got2.swap(ev_);
    return checkLeaveGroups(got2, id, rooms, before);
  }

  std::string doDisconnect(const std::string& idIn, bool byHandle) {
    std::string id = idIn;
    SessionHandle h;
    if (byHandle) h = anyHandle(&id);
    lastOp_ = std::string(byHandle ? "disconnect(handle) " : "disconnect ") + id;
    auto it = model_.sessions.find(id);
    Result want = Result::kOk;
    if (it == model_.sessions.end())
      want = byHandle ? Result::kStaleHandle : Result::kNotConnected;
    const Model before = model_;
    const Result got = byHandle ? reg_.disconnect(h) : reg_.disconnect(id);
    std::string err = expectResult(got, want);
    if (!err.empty()) return err;
    if (want != Result::kOk) return expectEvents({});
    Strings ev;
    ev.swap(ev_);
    if (ev.empty() || ev.front() != cat("disconnecting", id))
      return "disconnect did not start with disconnecting";
    const std::string user = it->second.user;
    const bool offline = !user.empty() && before.users.at(user).size() == 1;
    if (offline && ev.back() != cat("userOffline", user))
      return "disconnect did not end with userOffline";
    const Strings middle(ev.begin() + 1, ev.end() - (offline ? 1 : 0));
    const std::set<std::string> rooms = it->second.rooms;
    forgetSession(id);
    return checkLeaveGroups(middle, id, rooms, before);
  }

  std::string doClear() {
    lastOp_ = "clear";
    const std::size_t want = model_.sessions.size();
    const Model before = model_;
    const std::size_t got = reg_.clear();
    if (got != want)
      return "clear returned " + std::to_string(got) + ", model says " + std::to_string(want);
    Strings wantEv;
    for (const auto& [id, ms] : before.sessions)
      for (const std::string& r : ms.rooms) {
        wantEv.push_back(cat("leave", id, r));
        wantEv.push_back(cat("roomLeft", r, id));
      }
    for (const auto& [r, members] : before.rooms) {
      (void)members;
      wantEv.push_back(cat("roomDeleted", r));
    }
    for (const auto& [u, ss] : before.users) {
      (void)ss;
      wantEv.push_back(cat("userOffline", u));
    }
    while (!model_.sessions.empty()) forgetSession(model_.sessions.begin()->first);
    Strings ev;
    ev.swap(ev_);
    if (sorted(ev) != sorted(wantEv)) return "clear events differ";
    return {};
  }

  std::string randomOp() {
    ++opsRun_;
    const int p = percent();
    if (p < 20) return doConnect();
    if (p < 26) return doBindUser();
    if (p < 48) return doTrack(false);
    if (p < 58) return doTrack(true);
    if (p < 70) return doUntrack(false);
    if (p < 76) return doUntrack(true);
    if (p < 80) return doClearRooms(false);
    if (p < 82) return doClearRooms(true);
    if (p < 92) return doDisconnect(anySessionId(), false);
    if (p < 99) return doDisconnect({}, true);
    // Rarely, end everything.
    if (std::uniform_int_distribution<int>(0, 19)(rng_) == 0) return doClear();
    return doConnect();
  }

  std::string checkInvariants() {
    // Sessions: both directions, user link, handle.
    std::size_t memberships = 0;
    std::size_t withRooms = 0;
    for (const std::string& id : sessionIds_) {
      auto it = model_.sessions.find(id);
      const bool live = it != model_.sessions.end();
      if (reg_.isConnected(id) != live) return "isConnected(" + id + ") wrong";
      if (!live) {
        // A disconnected session owns nothing.
        if (reg_.roomCount(id) != 0 || !reg_.roomsOf(id).empty() || !reg_.userOf(id).empty() ||
            reg_.handleOf(id).valid())
          return "disconnected " + id + " still owns something";
        continue;
      }
      const ModelSession& ms = it->second;
      if (reg_.roomCount(id) != ms.rooms.size()) return "roomCount(" + id + ") wrong";
      Strings rooms = sorted(reg_.roomsOf(id));
      if (rooms != Strings(ms.rooms.begin(), ms.rooms.end())) return "roomsOf(" + id + ") wrong";
      if (reg_.userOf(id) != ms.user) return "userOf(" + id + ") wrong";
      if (reg_.handleOf(id) != ms.handle) return "handleOf(" + id + ") wrong";
      if (reg_.idOf(ms.handle) != id) return "idOf(handle of " + id + ") wrong";
      if (!reg_.isConnected(ms.handle)) return "isConnected(handle of " + id + ") wrong";
      memberships += ms.rooms.size();
      if (!ms.rooms.empty()) ++withRooms;
    }
    for (const SessionHandle& h : stale_) {
      if (reg_.isConnected(h) || !reg_.idOf(h).empty()) return "a stale handle resolves";
    }
    // Rooms: the other direction; no empty room.
    for (const std::string& r : roomIds_) {
      auto it = model_.rooms.find(r);
      const bool exists = it != model_.rooms.end();
      if (exists && it->second.empty()) return "model bug: empty room " + r;
      if (reg_.roomExists(r) != exists) return "roomExists(" + r + ") wrong";
      const std::size_t size = exists ? it->second.size() : 0;
      if (reg_.roomSize(r) != size) return "roomSize(" + r + ") wrong";
      Strings members = sorted(reg_.membersOf(r));
      Strings want;
      if (exists) want.assign(it->second.begin(), it->second.end());
      if (members != want) return "membersOf(" + r + ") wrong";
      for (const std::string& s : sessionIds_) {
        const bool m = exists && it->second.count(s) > 0;
        if (reg_.isMember(s, r) != m) return "isMember(" + s + ", " + r + ") wrong";
      }
    }
    // Users.
    for (const std::string& u : userIds_) {
      auto it = model_.users.find(u);
      Strings want;
      if (it != model_.users.end()) want.assign(it->second.begin(), it->second.end());
      if (reg_.sessionCountOfUser(u) != want.size()) return "sessionCountOfUser(" + u + ") wrong";
      if (sorted(reg_.sessionsOfUser(u)) != want) return "sessionsOfUser(" + u + ") wrong";
    }
    // Counters equal a recount.
    const RegistryStats st = reg_.getMemoryStats();
    RegistryStats want;
    want.sessions = model_.sessions.size();
    want.users = model_.users.size();
    want.rooms = model_.rooms.size();
    want.memberships = memberships;
    want.sessionsWithRooms = withRooms;
    want.bytes = st.bytes;
    want.callbackErrors = 0;
    if (!(st == want))
      return "stats " + Catch::StringMaker<RegistryStats>::convert(st) + " recount " +
             Catch::StringMaker<RegistryStats>::convert(want);
    if (model_.sessions.empty() && st.bytes != 0)
      return "no sessions but bytes = " + std::to_string(st.bytes);
    if (!model_.sessions.empty() && st.bytes == 0) return "sessions but bytes = 0";
    std::size_t n = 0;
    if (reg_.forEachSession([&](std::string_view) { ++n; }) != model_.sessions.size() ||
        n != model_.sessions.size())
      return "forEachSession count wrong";
    if (!ev_.empty()) return "events outside an operation";
    return {};
  }

  std::mt19937_64 rng_;
  Model model_;
  Strings ev_;
  SessionRegistry reg_;
  std::vector<std::string> sessionIds_;
  std::vector<std::string> roomIds_;
  std::vector<std::string> userIds_;
  std::vector<SessionHandle> stale_;
  std::string lastOp_;
  std::size_t step_ = 0;
  std::size_t opsRun_ = 0;
  std::map<Result, std::size_t> seen_;
};

std::size_t modelSteps() {
  if (const char* env = std::getenv("ROOMKEEPER_MODEL_STEPS")) {
    const long v = std::atol(env);
    if (v > 0) return static_cast<std::size_t>(v);
  }
  return 25000;
}

TEST_CASE("randomized model test: the registry matches std::map/std::set",
          "[registry][model]") {
  const std::size_t steps = modelSteps();
  std::size_t total = 0;
  std::map<Result, std::size_t> seen;
  for (std::uint64_t seed : {1u, 2u, 3u, 20240611u, 987654321u}) {
    ModelRun run(seed);
    const std::string err = run.run(steps);
    INFO("seed " << seed);
    REQUIRE(err == "");
    total += run.opsRun();
    for (const auto& [r, n] : run.resultsSeen()) seen[r] += n;
  }
  CHECK(total >= 5 * steps);
  // The generator reaches every outcome the model predicts.
  for (Result r : {Result::kOk, Result::kAlreadyDone, Result::kInvalidId,
                   Result::kNotConnected, Result::kStaleHandle, Result::kAlreadyConnected,
                   Result::kTooManyRooms, Result::kTooManySessions, Result::kRoomFull,
                   Result::kDenied, Result::kUserMismatch}) {
    INFO("outcome " << roomkeeper::toString(r));
    CHECK(seen[r] >= (steps >= 1000 ? 20u : 0u));
  }
}

}  // namespace

TEST_CASE("a user with very many sessions (no per-user limit): each unlink is exact",
          "[registry][hardening]") {
  Limits limits;
  limits.maxSessionsPerUser = 0;
  SessionRegistry reg({}, limits);
  const int n = 20000;
  for (int i = 0; i < n; ++i)
    REQUIRE(reg.connect("s" + std::to_string(i), "busy-user") == Result::kOk);
  CHECK(reg.sessionCountOfUser("busy-user") == static_cast<std::size_t>(n));
  // Leave in a scrambled order; the user's list stays exactly the rest.
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = (i * 7919) % n;  // 7919 is prime: a permutation
  for (int k = 0; k < n; ++k) {
    REQUIRE(reg.disconnect("s" + std::to_string(order[k])) == Result::kOk);
    if (k % 4999 == 0) {
      const std::vector<std::string> left = reg.sessionsOfUser("busy-user");
      REQUIRE(left.size() == static_cast<std::size_t>(n - k - 1));
      std::set<std::string> unique(left.begin(), left.end());
      CHECK(unique.size() == left.size());
      for (int j = k + 1; j < std::min(n, k + 50); ++j)
        CHECK(unique.count("s" + std::to_string(order[j])) == 1);
    }
  }
  const RegistryStats st = reg.getMemoryStats();
  CHECK(st.users == 0);
  CHECK(st.sessions == 0);
  CHECK(st.bytes == 0);
}

TEST_CASE("a session slot at the last 32-bit generation is retired: stale stays stale",
          "[registry][hardening]") {
  SessionRegistry reg;
  REQUIRE(reg.connect("keep") == Result::kOk);  // slot 0, live throughout
  REQUIRE(reg.connect("pin") == Result::kOk);   // slot 1
  roomkeeper::SessionHandle first;
  REQUIRE(reg.connect("x", "", &first) == Result::kOk);  // slot 2
  REQUIRE(reg.disconnect("x") == Result::kOk);
  // Jump the free slot to three short of the maximum (2^32 connects).
  roomkeeper::detail::TestAccess::ageSessions(reg, std::numeric_limits<std::uint32_t>::max() - 3);
  REQUIRE(reg.disconnect("pin") == Result::kOk);  // past 2^31: pins the pages
  std::vector<roomkeeper::SessionHandle> old{first};
  for (int i = 0; i < 3; ++i) {
    roomkeeper::SessionHandle h;
    REQUIRE(reg.connect("x", "", &h) == Result::kOk);
    CHECK(h.index == first.index);
    old.push_back(h);
    REQUIRE(reg.disconnect("x") == Result::kOk);
  }
  CHECK(old.back().generation == std::numeric_limits<std::uint32_t>::max());
  for (int i = 0; i < 50; ++i) {
    roomkeeper::SessionHandle h;
    REQUIRE(reg.connect("x", "", &h) == Result::kOk);
    CHECK(h.index != first.index);
    for (const roomkeeper::SessionHandle& o : old) {
      CHECK_FALSE(o == h);
      CHECK_FALSE(reg.isConnected(o));
      CHECK(reg.trackRoom(o, "r") == Result::kStaleHandle);
    }
    REQUIRE(reg.disconnect("x") == Result::kOk);
  }
  CHECK(reg.getMemoryStats().sessions == 1);
  CHECK(reg.disconnect("keep") == Result::kOk);
  CHECK(reg.getMemoryStats().sessions == 0);
}
