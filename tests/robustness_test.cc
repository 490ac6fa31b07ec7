// SPDX-License-Identifier: MIT
// Hostile input, fault injection and allocation failure. Each hostile-input
// case is a row of docs/robustness.md: input -> result -> state after.
#include <roomkeeper/roomkeeper.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_support.h"

using namespace roomkeeper;
using namespace std::chrono_literals;

// A sanitizer runtime supplies its own operator new/delete; replacing them
// here would fight it, so the allocation-failure case runs in the plain
// builds only (scripts/test.sh, the C++20 build).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define ROOMKEEPER_TEST_REPLACES_NEW 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define ROOMKEEPER_TEST_REPLACES_NEW 0
#endif
#endif
#ifndef ROOMKEEPER_TEST_REPLACES_NEW
#define ROOMKEEPER_TEST_REPLACES_NEW 1
#endif

#if ROOMKEEPER_TEST_REPLACES_NEW
// ---- A replaceable operator new that can be told to fail ---------------
// GCC 12 sees the malloc behind operator new and the free behind delete
// and warns about the pair it built itself.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
// Only array new fails: that is how roomkeeper allocates its slab pages.
// Abseil's hash tables (plain operator new) are not exception-safe when
// their allocator throws, so failures there are out of scope (see
// docs/robustness.md).
std::atomic<bool> gFailArrayNew{false};
// > 0: counts plain allocations down; the one that takes it to 0 fails
// (once). Every allocation point of a sequence can be hit in turn.
std::atomic<long> gFailCountdown{0};
// Bytes requested from plain operator new, for the fan-out cost test.
std::atomic<std::size_t> gBytesNew{0};
void* plainNew(std::size_t n) {
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
}  // namespace
void* operator new(std::size_t n) {
  if (gFailCountdown.load(std::memory_order_relaxed) > 0 &&
      gFailCountdown.fetch_sub(1, std::memory_order_relaxed) == 1)
    throw std::bad_alloc();
  gBytesNew.fetch_add(n, std::memory_order_relaxed);
  return plainNew(n);
}
void* operator new[](std::size_t n) {
  if (gFailArrayNew.load(std::memory_order_relaxed)) throw std::bad_alloc();
  return plainNew(n);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#endif  // ROOMKEEPER_TEST_REPLACES_NEW

namespace {

bool sameCounts(const RegistryStats& a, const RegistryStats& b) {
  return a.sessions == b.sessions && a.users == b.users && a.rooms == b.rooms &&
         a.memberships == b.memberships && a.sessionsWithRooms == b.sessionsWithRooms &&
         a.bytes == b.bytes;
}

bool sameCounts(const MemoryStats& a, const MemoryStats& b) {
  return a.connectedClients == b.connectedClients && a.userSockets == b.userSockets &&
         a.connectionTimers == b.connectionTimers && a.typingTimers == b.typingTimers &&
         a.trackedRooms == b.trackedRooms && a.rooms == b.rooms && a.bytes == b.bytes &&
         a.totalEntries == b.totalEntries;
}


// A registry with some state, so "unchanged" means something.
SessionRegistry populated() {
  SessionRegistry reg;
  REQUIRE(reg.connect("sock-1", "user-1") == Result::kOk);
  REQUIRE(reg.connect("sock-2", "user-1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-2", "job:1") == Result::kOk);
  return reg;
}

}  // namespace

// ---- Hostile input: one case per row of docs/robustness.md --------------

TEST_CASE("hostile: empty ids are refused and change nothing", "[robustness]") {
  SessionRegistry reg = populated();
  const RegistryStats before = reg.getMemoryStats();
  CHECK(reg.connect("", "user-9") == Result::kInvalidId);
  CHECK(reg.trackRoom("sock-1", "") == Result::kInvalidId);
  CHECK(reg.untrackRoom("sock-1", "") == Result::kInvalidId);
  CHECK(reg.trackRoom("", "job:1") == Result::kNotConnected);
  CHECK(reg.bindUser("sock-1", "") == Result::kInvalidId);
  CHECK(sameCounts(before, reg.getMemoryStats()));
}

TEST_CASE("hostile: a 1 MB room name is refused without allocating", "[robustness]") {
  SessionRegistry reg = populated();
  const std::string huge(1 << 20, 'r');
  const RegistryStats before = reg.getMemoryStats();
  CHECK(reg.trackRoom("sock-1", huge) == Result::kInvalidId);
  CHECK(reg.connect(huge, "u") == Result::kInvalidId);
  CHECK(reg.connect("sock-9", huge) == Result::kInvalidId);
  CHECK_FALSE(reg.roomExists(huge));
  CHECK(sameCounts(before, reg.getMemoryStats()));
  // Exactly at the limit is fine, one byte over is not.
  const std::string at(reg.limits().maxIdLength, 'x');
  CHECK(reg.trackRoom("sock-1", at) == Result::kOk);
  CHECK(reg.trackRoom("sock-1", at + "x") == Result::kInvalidId);
}

TEST_CASE("hostile: embedded NUL and invalid UTF-8 are opaque bytes", "[robustness]") {
  SessionRegistry reg = populated();
  const std::string nulRoom("job\0:1", 6);
  const std::string badUtf8("\xff\xfe\xc0\x80room", 8);
  CHECK(reg.trackRoom("sock-1", nulRoom) == Result::kOk);
  CHECK(reg.trackRoom("sock-1", badUtf8) == Result::kOk);
  // Distinct from their prefixes: no truncation at NUL.
  CHECK(reg.isMember("sock-1", nulRoom));
  CHECK_FALSE(reg.isMember("sock-1", std::string("job")));
  CHECK(reg.roomSize("job:1") == 2);
  const std::vector<std::string> rooms = reg.roomsOf("sock-1");
  CHECK(std::count(rooms.begin(), rooms.end(), nulRoom) == 1);
  CHECK(std::count(rooms.begin(), rooms.end(), badUtf8) == 1);
  CHECK(reg.disconnect("sock-1") == Result::kOk);
  CHECK_FALSE(reg.roomExists(nulRoom));
  CHECK_FALSE(reg.roomExists(badUtf8));
}

TEST_CASE("hostile: unknown session, double disconnect, join after disconnect",
          "[robustness]") {
  SessionRegistry reg = populated();
  SessionHandle h = reg.handleOf("sock-2");
  RegistryStats before = reg.getMemoryStats();
  CHECK(reg.trackRoom("sock-404", "job:1") == Result::kNotConnected);
  CHECK(reg.untrackRoom("sock-404", "job:1") == Result::kNotConnected);
  CHECK(reg.clearRoomTracking("sock-404") == 0);
  CHECK(reg.disconnect("sock-404") == Result::kNotConnected);
  CHECK(sameCounts(before, reg.getMemoryStats()));

  CHECK(reg.disconnect("sock-2") == Result::kOk);
  before = reg.getMemoryStats();
  CHECK(reg.disconnect("sock-2") == Result::kNotConnected);
  CHECK(reg.disconnect(h) == Result::kStaleHandle);
  CHECK(reg.trackRoom("sock-2", "job:2") == Result::kNotConnected);  // the late join
  CHECK(reg.trackRoom(h, "job:2") == Result::kStaleHandle);
  CHECK_FALSE(reg.roomExists("job:2"));
  CHECK(sameCounts(before, reg.getMemoryStats()));
  // Reconnecting the same id does not revive the old handle.
  CHECK(reg.connect("sock-2", "user-1") == Result::kOk);
  CHECK(reg.trackRoom(h, "job:3") == Result::kStaleHandle);
}

TEST_CASE("hostile: rooms beyond the per-session cap", "[robustness]") {
  Limits limits;
  limits.maxRoomsPerSession = 128;
  SessionRegistry reg(RegistryCallbacks{}, limits);
  REQUIRE(reg.connect("sock-1") == Result::kOk);
  for (int i = 0; i < 128; ++i)
    REQUIRE(reg.trackRoom("sock-1", "room:" + std::to_string(i)) == Result::kOk);
  const RegistryStats before = reg.getMemoryStats();
  for (int i = 128; i < 1128; ++i)
    CHECK(reg.trackRoom("sock-1", "room:" + std::to_string(i)) == Result::kTooManyRooms);
  CHECK(reg.trackRoom("sock-1", "room:5") == Result::kAlreadyDone);  // still idempotent
  CHECK(sameCounts(before, reg.getMemoryStats()));
}

TEST_CASE("hostile: sessions beyond the per-user cap", "[robustness]") {
  Limits limits;
  limits.maxSessionsPerUser = 3;
  SessionRegistry reg(RegistryCallbacks{}, limits);
  for (int i = 0; i < 3; ++i)
    REQUIRE(reg.connect("sock-" + std::to_string(i), "user-1") == Result::kOk);
  const RegistryStats before = reg.getMemoryStats();
  CHECK(reg.connect("sock-3", "user-1") == Result::kTooManySessions);
  CHECK_FALSE(reg.isConnected("sock-3"));
  CHECK(sameCounts(before, reg.getMemoryStats()));
  REQUIRE(reg.connect("sock-4") == Result::kOk);
  const RegistryStats mid = reg.getMemoryStats();
  CHECK(reg.bindUser("sock-4", "user-1") == Result::kTooManySessions);
  CHECK(sameCounts(mid, reg.getMemoryStats()));
  CHECK(reg.sessionCountOfUser("user-1") == 3);
}

TEST_CASE("hostile: a million typing starts in one thread from one session",
          "[robustness]") {
  ManualClock clock;
  std::size_t started = 0, persisted = 0;
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view, std::string_view ev, std::string_view) {
    if (ev == "typingStarted") ++started;
  };
  cb.persist = [&](const PersistCall&) {
    ++persisted;
    return true;
  };
  KeeperOptions opt;
  opt.clock = &clock;
  opt.typing.requireMembership = false;  // not about the membership rule
  Keeper k(cb, opt);
  REQUIRE(k.connectAuthenticated("sock-1", "user-1") == Result::kOk);
  REQUIRE(k.connectAuthenticated("sock-2", "user-2") == Result::kOk);
  REQUIRE(k.trackRoom("sock-2", "thread:7") == Result::kOk);
  REQUIRE(k.startTyping("sock-1", "7") == Result::kOk);
  const MemoryStats after1 = k.getMemoryStats();
  for (int i = 1; i < 1000000; ++i) REQUIRE(k.startTyping("sock-1", "7") == Result::kAlreadyDone);
  const MemoryStats afterMillion = k.getMemoryStats();
  CHECK(sameCounts(after1, afterMillion));  // one indicator, one timer, no growth
  CHECK(afterMillion.typingTimers == 1);
  CHECK(afterMillion.timersPending == 1);
  CHECK(started == 1);
  CHECK(persisted == 1);
  clock.advanceBy(5s);
  k.advance();
  CHECK(k.getMemoryStats().typingTimers == 0);
}

TEST_CASE("hostile: time going backwards fires nothing early and loses nothing",
          "[robustness]") {
  ManualClock clock(SteadyTime{} + 1h);
  TimerService timers(&clock);
  std::vector<std::uint32_t> fired;
  const auto h = timers.addHandler([&](TimerHandle, std::uint32_t d) { fired.push_back(d); });
  (void)timers.arm(100ms, h, 1);
  clock.advanceBy(50ms);
  timers.advance();
  clock.set(SteadyTime{} + 30min);  // a big step back
  CHECK(timers.advance() == 0);
  // Armed while the clock reads the past: the reading is clamped to the
  // wheel's time (1h+50ms), so it is due at 1h+60ms, not at once.
  (void)timers.arm(10ms, h, 2);
  CHECK(timers.advance() == 0);
  CHECK(fired.empty());
  clock.set(SteadyTime{} + 1h + 59ms);
  CHECK(timers.advance() == 0);
  clock.set(SteadyTime{} + 1h + 60ms);
  CHECK(timers.advance() == 1);
  CHECK(fired == std::vector<std::uint32_t>{2});
  clock.set(SteadyTime{} + 1h + 99ms);
  CHECK(timers.advance() == 0);  // timer 1 (1h+100ms) never early
  clock.set(SteadyTime{} + 1h + 100ms);
  CHECK(timers.advance() == 1);
  CHECK(fired == std::vector<std::uint32_t>{2, 1});
  CHECK(timers.size() == 0);
}

// ---- Fault injection: every callback throwing at every position ----------

namespace {

enum class Sequence { kDisconnect, kShutdown, kAutoClear, kAuthTimeout };

struct Faults {
  std::string kind;  // which callback throws
  int position;      // on its n-th call (0-based)
  int calls = 0;
  int logged = 0;
  void maybeThrow(const std::string& k) {
    if (k == kind && calls++ == position) throw std::runtime_error("injected " + k);
  }
};

// Runs one sequence with one callback throwing at one position; returns
// how many times that callback was called (to know when to stop).
int runWithFault(Sequence seq, const std::string& kind, int position) {
  ManualClock clock;
  Faults f{kind, position};
  int seen = 0;
  KeeperCallbacks cb;
  cb.leave = [&](std::string_view, std::string_view) {
    if (kind == "leave") ++seen;
    f.maybeThrow("leave");
  };
  cb.emit = [&](std::string_view, std::string_view, std::string_view) {
    if (kind == "emit") ++seen;
    f.maybeThrow("emit");
  };
  cb.persist = [&](const PersistCall&) {
    if (kind == "persist") ++seen;
    f.maybeThrow("persist");
    return true;
  };
  cb.closeSession = [&](std::string_view, std::string_view) {
    if (kind == "closeSession") ++seen;
    f.maybeThrow("closeSession");
  };
  cb.disconnecting = [&](std::string_view, const std::vector<std::string>&) {
    if (kind == "disconnecting") ++seen;
    f.maybeThrow("disconnecting");
  };
  cb.userOffline = [&](std::string_view) {
    if (kind == "userOffline") ++seen;
    f.maybeThrow("userOffline");
  };
  cb.roomDeleted = [&](std::string_view) {
    if (kind == "roomDeleted") ++seen;
    f.maybeThrow("roomDeleted");
  };
  cb.log = [&](LogLevel, std::string_view) { ++f.logged; };
  KeeperOptions opt;
  opt.clock = &clock;
  opt.typing.requireMembership = false;  // not about the membership rule
  Keeper k(cb, opt);
  for (int i = 0; i < 3; ++i) {
    const std::string s = "sock-" + std::to_string(i);
    REQUIRE(k.connectAuthenticated(s, "user-" + std::to_string(i % 2)) == Result::kOk);
    REQUIRE(k.trackRoom(s, "thread:1") == Result::kOk);
    REQUIRE(k.trackRoom(s, "job:" + std::to_string(i)) == Result::kOk);
    REQUIRE(ok(k.startTyping(s, "1")));
  }
  REQUIRE(k.connect("sock-anon") == Result::kOk);
  // Reset counts: only the sequence under test matters.
  seen = 0;
  f.calls = 0;
  const std::uint64_t errorsBefore = k.getMemoryStats().callbackErrors;
  switch (seq) {
    case Sequence::kDisconnect:
      for (int i = 0; i < 3; ++i) CHECK(k.disconnect("sock-" + std::to_string(i)) == Result::kOk);
      CHECK(k.disconnect("sock-anon") == Result::kOk);
      break;
    case Sequence::kShutdown:
      (void)k.shutdown();
      break;
    case Sequence::kAutoClear:
      clock.advanceBy(5s);
      k.advance();
      CHECK(k.getMemoryStats().typingTimers == 0);
      for (int i = 0; i < 3; ++i) CHECK(k.disconnect("sock-" + std::to_string(i)) == Result::kOk);
      break;
    case Sequence::kAuthTimeout:
      for (int i = 0; i < 3; ++i) CHECK(k.disconnect("sock-" + std::to_string(i)) == Result::kOk);
      clock.advanceBy(30s);
      k.advance();
      CHECK_FALSE(k.registry().isConnected("sock-anon"));
      break;
  }
  if (seq != Sequence::kShutdown) (void)k.disconnect("sock-anon");
  // A persistence call that threw is retried with backoff: nothing is lost.
  for (int i = 0; i < 120 && k.getMemoryStats().pendingPersistence > 0; ++i) {
    clock.advanceBy(1s);
    k.advance();
  }
  const MemoryStats st = k.getMemoryStats();
  requireEmpty(st);
  if (f.calls > position) {  // the fault really fired
    CHECK(st.callbackErrors == errorsBefore + 1);
    CHECK(f.logged >= 1);
  }
  return seen;
}

}  // namespace

TEST_CASE("fault injection: a callback throwing anywhere leaves nothing behind",
          "[robustness][faults]") {
  const std::vector<std::pair<Sequence, const char*>> sequences = {
      {Sequence::kDisconnect, "disconnect"},
      {Sequence::kShutdown, "shutdown"},
      {Sequence::kAutoClear, "auto-clear"},
      {Sequence::kAuthTimeout, "auth timeout"}};
  const std::vector<std::string> kinds = {"leave",        "emit",          "persist",
                                          "closeSession", "disconnecting", "userOffline",
                                          "roomDeleted"};
  int runs = 0;
  for (const auto& [seq, name] : sequences) {
    for (const std::string& kind : kinds) {
      // Position 0, 1, 2, ... until the callback is called fewer times.
      for (int pos = 0; pos < 64; ++pos) {
        INFO(name << ": " << kind << " throws on call #" << pos);
        const int calls = runWithFault(seq, kind, pos);
        ++runs;
        if (calls <= pos) break;
      }
    }
  }
  CHECK(runs > 40);
}

TEST_CASE("fault injection: persistence failing N times then recovering delivers all",
          "[robustness][faults]") {
  ManualClock clock;
  int failuresLeft = 7;
  std::vector<std::string> delivered;
  KeeperCallbacks cb;
  cb.persist = [&](const PersistCall& c) {
    if (failuresLeft > 0) {
      --failuresLeft;
      return false;
    }
    delivered.push_back(std::string(toString(c.op)) + ":" + c.user + ":" + c.thread);
    return true;
  };
  KeeperOptions opt;
  opt.clock = &clock;
  opt.typing.requireMembership = false;  // not about the membership rule
  Keeper k(cb, opt);
  REQUIRE(k.connectAuthenticated("sock-1", "u1") == Result::kOk);
  REQUIRE(k.startTyping("sock-1", "a") == Result::kOk);
  REQUIRE(k.stopTyping("sock-1", "a") == Result::kOk);
  REQUIRE(k.startTyping("sock-1", "b") == Result::kOk);
  REQUIRE(k.disconnect("sock-1") == Result::kOk);
  CHECK(k.getMemoryStats().pendingPersistence == 5);
  for (int i = 0; i < 200 && k.getMemoryStats().pendingPersistence > 0; ++i) {
    clock.advanceBy(1s);
    k.advance();
  }
  CHECK(delivered == std::vector<std::string>{
                         "typing_started:u1:a", "typing_stopped:u1:a", "typing_started:u1:b",
                         "typing_stopped:u1:b", "typing_stopped_all:u1:"});
  CHECK(k.getMemoryStats().persistFailures == 7);
  CHECK(k.getMemoryStats().persistDropped == 0);
}

// ---- Allocation failure -------------------------------------------------

#if ROOMKEEPER_TEST_REPLACES_NEW
TEST_CASE("allocation failure: a slab page that cannot be had leaves no half-state",
          "[robustness][oom]") {
  SessionRegistry reg;
  // The first session needs a session page: refused cleanly.
  gFailArrayNew.store(true);
  CHECK(reg.connect("sock-1", "user-1") == Result::kOutOfMemory);
  gFailArrayNew.store(false);
  RegistryStats st = reg.getMemoryStats();
  CHECK(st.sessions == 0);
  CHECK(st.users == 0);
  CHECK_FALSE(reg.isConnected("sock-1"));

  // With a session, the first room needs a room page: refused cleanly.
  REQUIRE(reg.connect("sock-1") == Result::kOk);
  const RegistryStats before = reg.getMemoryStats();
  gFailArrayNew.store(true);
  CHECK(reg.trackRoom("sock-1", "job:1") == Result::kOutOfMemory);
  // A user needs a user page: refused cleanly, the session stays anonymous.
  CHECK(reg.bindUser("sock-1", "user-1") == Result::kOutOfMemory);
  gFailArrayNew.store(false);
  CHECK(sameCounts(before, reg.getMemoryStats()));
  CHECK_FALSE(reg.roomExists("job:1"));
  CHECK(reg.userOf("sock-1").empty());

  // And afterwards everything works and returns to zero.
  CHECK(reg.trackRoom("sock-1", "job:1") == Result::kOk);
  CHECK(reg.bindUser("sock-1", "user-1") == Result::kOk);
  CHECK(reg.disconnect("sock-1") == Result::kOk);
  st = reg.getMemoryStats();
  CHECK(st.sessions == 0);
  CHECK(st.rooms == 0);
  CHECK(st.bytes == 0);
}
#endif  // ROOMKEEPER_TEST_REPLACES_NEW

// ---- Allocation failure at every point of a sequence -------------------

#if ROOMKEEPER_TEST_REPLACES_NEW

namespace {
struct Recorded {
  std::vector<std::string> leaves, emits, logs;
  std::vector<PersistCall> persisted;
  KeeperCallbacks callbacks() {
    KeeperCallbacks cb;
    cb.leave = [this](std::string_view s, std::string_view r) {
      leaves.push_back(std::string(s) + ">" + std::string(r));
    };
    cb.emit = [this](std::string_view s, std::string_view e, std::string_view) {
      emits.push_back(std::string(s) + ":" + std::string(e));
    };
    cb.persist = [this](const PersistCall& c) {
      persisted.push_back(c);
      return true;
    };
    cb.disconnecting = [](std::string_view, const std::vector<std::string>&) {};
    cb.log = [this](LogLevel, std::string_view m) { logs.emplace_back(m); };
    return cb;
  }
};
}  // namespace

TEST_CASE("allocation failure at every point of a disconnect: the session still goes",
          "[robustness][oom]") {
  bool reachedTheEnd = false;
  for (long k = 1; k < 400 && !reachedTheEnd; ++k) {
    INFO("allocation " << k << " fails");
    ManualClock clock;
    Recorded rec;
    KeeperOptions opt;
    opt.clock = &clock;
    Keeper keeper(rec.callbacks(), opt);
    // Long names: every copy of them is a heap allocation that can fail.
    const std::string thread = "a-thread-id-longer-than-fifteen";
    REQUIRE(keeper.connectAuthenticated("session-alpha-0123456789", "user-alpha-0123456789") ==
            Result::kOk);
    REQUIRE(keeper.connectAuthenticated("session-beta-0123456789", "user-beta-0123456789") ==
            Result::kOk);
    for (const char* room : {"job:room-name-longer-than-fifteen", "crew:another-long-room"})
      REQUIRE(keeper.trackRoom("session-alpha-0123456789", room) == Result::kOk);
    REQUIRE(keeper.trackRoom("session-alpha-0123456789", "thread:" + thread) == Result::kOk);
    REQUIRE(keeper.trackRoom("session-beta-0123456789", "thread:" + thread) == Result::kOk);
    REQUIRE(keeper.startTyping("session-alpha-0123456789", thread) == Result::kOk);

    gFailCountdown.store(k);
    const Result r = keeper.disconnect("session-alpha-0123456789");
    reachedTheEnd = gFailCountdown.exchange(0) > 0;  // no allocation failed
    CHECK(r == Result::kOk);
    const MemoryStats st = keeper.getMemoryStats();
    CHECK(st.connectedClients == 1);
    CHECK(st.authenticated == 1);
    CHECK(st.userSockets == 1);
    CHECK(st.typingTimers == 0);
    CHECK(st.trackedRooms == 1);
    CHECK(st.rooms == 1);
    INFO(Catch::StringMaker<MemoryStats>::convert(st));
    CHECK(st.timersPending == (st.pendingPersistence > 0 ? 1u : 0u));  // a retry
    CHECK_FALSE(keeper.registry().isConnected("session-alpha-0123456789"));
    CHECK(keeper.disconnect("session-alpha-0123456789") == Result::kNotConnected);
    // Whatever was delivered names a real session and room, never "".
    for (const std::string& l : rec.leaves) CHECK(l.rfind("session-alpha-0123456789>", 0) == 0);
    for (const std::string& l : rec.leaves) CHECK(l.size() > std::string("session-alpha-0123456789>").size());
    // The failure shows: a message the library could not queue (counted),
    // a host callback (the recorder's own copies) that threw and was
    // caught, or a persistence call left queued for its retry.
    if (!reachedTheEnd)
      CHECK(st.eventsDropped + st.persistDropped + st.callbackErrors + st.persistFailures +
                st.pendingPersistence >=
            1);
    // The rest still works and everything returns to zero.
    CHECK(keeper.disconnect("session-beta-0123456789") == Result::kOk);
    clock.advanceBy(std::chrono::minutes(2));  // any persistence retry is delivered
    keeper.advance();
    requireEmpty(keeper.getMemoryStats());
    CHECK(keeper.getMemoryStats().bytes == 0);
  }
  CHECK(reachedTheEnd);
}

TEST_CASE("allocation failure in connect and startTyping: all or nothing",
          "[robustness][oom]") {
  ManualClock clock;
  Recorded rec;
  KeeperOptions opt;
  opt.clock = &clock;
  // (a) The auth deadline needs the first timer page: if it cannot be had,
  // the connect is refused and leaves nothing (never a session that can
  // never time out). Tables warmed first: Abseil's tables are out of scope
  // (docs/robustness.md).
  {
    Keeper keeper(rec.callbacks(), opt);
    for (int i = 0; i < 5; ++i)
      REQUIRE(keeper.connectAuthenticated("warm-" + std::to_string(i), "u") == Result::kOk);
    const MemoryStats before = keeper.getMemoryStats();
    REQUIRE(before.timersPending == 0);
    gFailArrayNew.store(true);
    CHECK(keeper.connect("session-gamma") == Result::kOutOfMemory);
    gFailArrayNew.store(false);
    CHECK(sameCounts(before, keeper.getMemoryStats()));
    CHECK_FALSE(keeper.registry().isConnected("session-gamma"));
    CHECK(keeper.connect("session-gamma") == Result::kOk);
    CHECK(keeper.getMemoryStats().connectionTimers == 1);
  }
  // (b) A new indicator, every plain allocation failing in turn: either it
  // exists with its timer, or nothing changed.
  bool typingDone = false;
  for (long k = 1; k < 200 && !typingDone; ++k) {
    INFO("allocation " << k << " fails");
    Keeper keeper(rec.callbacks(), opt);
    const std::string thread = "thread-0123456789abcdef";
    REQUIRE(keeper.connectAuthenticated("typer-0123456789abcdef", "user-0123456789abcdef") ==
            Result::kOk);
    REQUIRE(keeper.connectAuthenticated("helper", "helper") == Result::kOk);
    REQUIRE(keeper.trackRoom("typer-0123456789abcdef", "thread:" + thread) == Result::kOk);
    for (const char* t : {"w1", "w2", "w3"}) {
      REQUIRE(keeper.trackRoom("helper", std::string("thread:") + t) == Result::kOk);
      REQUIRE(keeper.startTyping("helper", t) == Result::kOk);
    }
    REQUIRE(keeper.stopTyping("helper", "w1") == Result::kOk);
    REQUIRE(keeper.stopTyping("helper", "w2") == Result::kOk);
    const MemoryStats before = keeper.getMemoryStats();
    gFailCountdown.store(k);
    const Result t = keeper.startTyping("typer-0123456789abcdef", thread);
    typingDone = gFailCountdown.exchange(0) > 0;
    const MemoryStats st = keeper.getMemoryStats();
    if (t == Result::kOk) {
      CHECK(st.typingTimers == 2);
      // Never an indicator without its timer (and a persistence retry if
      // the recorder's own copy failed).
      CHECK(keeper.timers().size() == 2 + (st.pendingPersistence > 0 ? 1u : 0u));
    } else {
      CHECK(t == Result::kOutOfMemory);
      CHECK(st.typingTimers == before.typingTimers);
      CHECK(keeper.timers().size() == before.timersPending);
      CHECK(st.bytes == before.bytes);
    }
    clock.advanceBy(6s);  // an indicator always clears itself
    keeper.advance();
    CHECK(keeper.getMemoryStats().typingTimers == 0);
  }
  CHECK(typingDone);
}

TEST_CASE("trackRooms when an allocation fails: the rooms before it keep their results",
          "[robustness][oom]") {
  // canJoin copies the session's and the room's names (longer than the
  // small-string buffer here), so every plain allocation of the call can
  // fail in turn: the results vector's reserve, a copy, an event. The rooms
  // exist beforehand (another member): Abseil's tables are not
  // exception-safe when their allocator throws (docs/robustness.md), so
  // the call must not grow the room index.
  const std::string session = "session-0123456789abcdef";
  std::vector<std::string> rooms;
  for (int i = 0; i < 20; ++i) rooms.push_back("room-0123456789abcdef-" + std::to_string(i));
  bool finished = false;
  long threw = 0;
  for (long k = 1; k < 400 && !finished; ++k) {
    INFO("allocation " << k << " fails");
    RegistryCallbacks cb;
    cb.canJoin = [](std::string_view, std::string_view) { return true; };
    cb.roomJoined = [](std::string_view, std::string_view) {};
    SessionRegistry reg(cb);
    REQUIRE(reg.connect("other") == Result::kOk);
    for (const std::string& r : rooms) REQUIRE(reg.trackRoom("other", r) == Result::kOk);
    REQUIRE(reg.connect(session) == Result::kOk);
    std::vector<Result> results;
    std::size_t joined = 0;
    bool thrown = false;
    gFailCountdown.store(k);
    try {
      joined = reg.trackRooms(session, rooms, &results);
    } catch (const std::bad_alloc&) {
      thrown = true;
    }
    finished = gFailCountdown.exchange(0) > 0;
    const std::size_t ok =
        static_cast<std::size_t>(std::count(results.begin(), results.end(), Result::kOk));
    // Whatever failed: the session is in exactly the rooms reported joined,
    // in order, and a failure inside a join is reported as trackRoom would.
    CHECK(reg.roomCount(session) == ok);
    for (std::size_t i = 0; i < results.size(); ++i) {
      CHECK((results[i] == Result::kOk || results[i] == Result::kOutOfMemory));
      CHECK(reg.isMember(session, rooms[i]) == (results[i] == Result::kOk));
    }
    if (thrown) {
      ++threw;
      CHECK(results.size() < rooms.size());
    } else {
      CHECK(results.size() == rooms.size());
      CHECK(joined == ok);
    }
    // Nothing left behind.
    CHECK(reg.clearRoomTracking(session) == ok);
    REQUIRE(reg.disconnect(session) == Result::kOk);
    REQUIRE(reg.disconnect("other") == Result::kOk);
    CHECK(reg.getMemoryStats() == RegistryStats{});
  }
  CHECK(finished);
  CHECK(threw > 0);  // some failures did reach the caller as an exception
}

TEST_CASE("typing fan-out shares one payload: bytes do not grow with members x payload",
          "[robustness][oom]") {
  KeeperOptions opt;
  opt.limits.maxIdLength = 4096;
  Keeper keeper(
      [] {
        KeeperCallbacks cb;
        cb.emit = [](std::string_view, std::string_view, std::string_view) {};
        return cb;
      }(),
      opt);
  const std::string thread(2000, 't');  // a 2 KB payload
  const std::string room = "thread:" + thread;
  REQUIRE(keeper.connectAuthenticated("typer", "u0") == Result::kOk);
  REQUIRE(keeper.trackRoom("typer", room) == Result::kOk);
  for (int i = 0; i < 200; ++i) {
    const std::string s = "member-" + std::to_string(i);
    REQUIRE(keeper.connectAuthenticated(s, "u" + std::to_string(i + 1)) == Result::kOk);
    REQUIRE(keeper.trackRoom(s, room) == Result::kOk);
  }
  const std::size_t before = gBytesNew.load();
  REQUIRE(keeper.startTyping("typer", thread) == Result::kOk);
  const std::size_t used = gBytesNew.load() - before;
  INFO("bytes allocated by one start fanned out to 200 members: " << used);
  // One copy per member would be 200 x 2 KB = 400 KB.
  CHECK(used < 100 * 1024);
}
TEST_CASE("a call refused by a rate limit allocates nothing", "[robustness][ratelimit]") {
  ManualClock clock;
  KeeperOptions opt;
  opt.clock = &clock;
  opt.rateLimits.connectsPerAddress = {1, 1};
  opt.rateLimits.joinsPerSession = {1, 1};
  opt.rateLimits.typingPerSession = {1, 1};
  opt.rateLimits.kinds = {{"message", RateScope::kUser, {1, 1}}};
  opt.rateLimits.warnAfterRefusals = 0;  // the warning line would allocate
  Keeper keeper(KeeperCallbacks{}, opt);
  REQUIRE(keeper.connect("s", ClientAddress{"an-address-longer-than-sso"}) == Result::kOk);
  REQUIRE(keeper.authenticate("s", "a-user-name-longer-than-sso") == Result::kOk);
  REQUIRE(keeper.trackRoom("s", "thread:1") == Result::kOk);
  REQUIRE(keeper.startTyping("s", "1") == Result::kOk);
  REQUIRE(keeper.allow("s", 0) == Result::kOk);
  const std::size_t before = gBytesNew.load();
  for (int i = 0; i < 100; ++i) {
    CHECK(keeper.connect("t", ClientAddress{"an-address-longer-than-sso"}) ==
          Result::kRateLimited);
    CHECK(keeper.trackRoom("s", "thread:2") == Result::kRateLimited);
    CHECK(keeper.startTyping("s", "2") == Result::kRateLimited);
    CHECK(keeper.allow("s", 0) == Result::kRateLimited);
  }
  CHECK(gBytesNew.load() - before == 0);
}
#endif  // ROOMKEEPER_TEST_REPLACES_NEW
