// SPDX-License-Identifier: MIT
// File: tests/rate_limits_test.cc -- KeeperOptions::rateLimits: refusals,
// refill on a ManualClock, key lifetimes, the maxKeys policy, statistics.
#include <roomkeeper/roomkeeper.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <vector>

#include "test_support.h"

using namespace roomkeeper;
using namespace std::chrono_literals;

namespace {

struct Fixture {
  ManualClock clock;
  std::vector<std::string> logs;
  std::vector<std::string> emits;
  KeeperOptions opt;
  Fixture() {
    opt.clock = &clock;
    opt.authTimeout = Millis{0};
  }
  KeeperCallbacks callbacks() {
    KeeperCallbacks cb;
    cb.log = [this](LogLevel level, std::string_view m) {
      if (level == LogLevel::kWarning) logs.emplace_back(m);
    };
    cb.emit = [this](std::string_view s, std::string_view e, std::string_view) {
      emits.push_back(std::string(s) + ":" + std::string(e));
    };
    return cb;
  }
};

// Everything a refused call must leave as it was.
bool sameState(const MemoryStats& a, const MemoryStats& b) {
  return a.connectedClients == b.connectedClients && a.authenticated == b.authenticated &&
         a.trackedRooms == b.trackedRooms && a.typingTimers == b.typingTimers &&
         a.timersPending == b.timersPending && a.rateLimitKeys == b.rateLimitKeys &&
         a.bytes == b.bytes;
}

}  // namespace

TEST_CASE("connections per address: a flood from one address is refused, others served",
          "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.connectsPerAddress = {1, 3};  // 1/s, bursts of 3
  Keeper k(f.callbacks(), f.opt);
  const ClientAddress a{"10.0.0.1"}, b{"10.0.0.2"};
  for (int i = 0; i < 3; ++i) REQUIRE(k.connect("a" + std::to_string(i), a) == Result::kOk);
  const MemoryStats before = k.getMemoryStats();
  CHECK(k.connect("a3", a) == Result::kRateLimited);
  CHECK(k.connectAuthenticated("a4", "u", a) == Result::kRateLimited);
  CHECK_FALSE(k.registry().isConnected("a3"));
  CHECK(sameState(before, k.getMemoryStats()));
  CHECK(k.getMemoryStats().rateLimitedConnects == 2);
  // Another address is not affected, nor a session without an address.
  for (int i = 0; i < 3; ++i) CHECK(k.connect("b" + std::to_string(i), b) == Result::kOk);
  CHECK(k.connect("plain") == Result::kOk);
  // One token a second comes back, never more than the burst.
  f.clock.advanceBy(999ms);
  CHECK(k.connect("a3", a) == Result::kRateLimited);
  f.clock.advanceBy(1ms);
  CHECK(k.connect("a3", a) == Result::kOk);
  CHECK(k.connect("a4", a) == Result::kRateLimited);
  f.clock.advanceBy(60s);
  for (int i = 5; i < 8; ++i) CHECK(k.connect("a" + std::to_string(i), a) == Result::kOk);
  CHECK(k.connect("a8", a) == Result::kRateLimited);
  // A connect refused for another reason takes no token.
  f.clock.advanceBy(60s);
  CHECK(k.connect("a0", a) == Result::kAlreadyConnected);
  CHECK(k.connect("", a) == Result::kInvalidId);
  for (int i = 8; i < 11; ++i) CHECK(k.connect("a" + std::to_string(i), a) == Result::kOk);
  CHECK(k.getMemoryStats().rateLimitKeys == 2);
}

TEST_CASE("sessions open at once per address", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.maxSessionsPerAddress = 2;
  Keeper k(f.callbacks(), f.opt);
  const ClientAddress a{"192.0.2.7"};
  REQUIRE(k.connect("s1", a) == Result::kOk);
  REQUIRE(k.connectAuthenticated("s2", "u", a) == Result::kOk);
  CHECK(k.connect("s3", a) == Result::kRateLimited);
  CHECK(k.getMemoryStats().rateLimitedConcurrent == 1);
  CHECK(k.connect("s3", ClientAddress{"192.0.2.8"}) == Result::kOk);
  REQUIRE(k.disconnect("s1") == Result::kOk);
  CHECK(k.connect("s4", a) == Result::kOk);
  CHECK(k.connect("s5", a) == Result::kRateLimited);
  REQUIRE(k.forceCleanup("s2") == Result::kOk);
  CHECK(k.connect("s5", a) == Result::kOk);
}

TEST_CASE("joins and leaves per session refill at the configured rate", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.joinsPerSession = {10, 5};  // one every 100 ms, bursts of 5
  Keeper k(f.callbacks(), f.opt);
  REQUIRE(k.connectAuthenticated("s", "u") == Result::kOk);
  REQUIRE(k.connectAuthenticated("t", "v") == Result::kOk);
  // Refused for another reason: no token taken.
  for (int i = 0; i < 10; ++i) CHECK(k.trackRoom("s", "") == Result::kInvalidId);
  for (int i = 0; i < 5; ++i) CHECK(k.trackRoom("s", "r" + std::to_string(i)) == Result::kOk);
  const MemoryStats before = k.getMemoryStats();
  CHECK(k.trackRoom("s", "r5") == Result::kRateLimited);
  CHECK(k.untrackRoom("s", "r0") == Result::kRateLimited);  // leaves count too
  CHECK_FALSE(k.registry().isMember("s", "r5"));
  CHECK(k.registry().isMember("s", "r0"));
  CHECK(sameState(before, k.getMemoryStats()));
  CHECK(k.getMemoryStats().rateLimitedJoins == 2);
  // The other session has its own bucket.
  for (int i = 0; i < 5; ++i) CHECK(k.trackRoom("t", "r" + std::to_string(i)) == Result::kOk);
  f.clock.advanceBy(100ms);
  CHECK(k.untrackRoom("s", "r0") == Result::kOk);
  CHECK(k.trackRoom("s", "r5") == Result::kRateLimited);
  f.clock.advanceBy(10s);  // full again: 5, not 100
  for (int i = 5; i < 10; ++i) CHECK(k.trackRoom("s", "r" + std::to_string(i)) == Result::kOk);
  CHECK(k.trackRoom("s", "r10") == Result::kRateLimited);
  // Disconnect is never limited, and takes everything.
  CHECK(k.disconnect("s") == Result::kOk);
  CHECK(k.disconnect("t") == Result::kOk);
  requireEmpty(k.getMemoryStats());
}

TEST_CASE("typing starts per session, restarts included", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.typingPerSession = {2, 2};
  Keeper k(f.callbacks(), f.opt);
  REQUIRE(k.connectAuthenticated("s", "u") == Result::kOk);
  REQUIRE(k.connectAuthenticated("m", "w") == Result::kOk);
  REQUIRE(k.trackRoom("m", "thread:1") == Result::kOk);
  REQUIRE(k.trackRoom("s", "thread:1") == Result::kOk);
  REQUIRE(k.trackRoom("s", "thread:2") == Result::kOk);
  CHECK(k.startTyping("s", "1") == Result::kOk);
  CHECK(k.startTyping("s", "1") == Result::kAlreadyDone);  // a restart takes a token
  const std::size_t emitted = f.emits.size();
  const MemoryStats before = k.getMemoryStats();
  CHECK(k.startTyping("s", "2") == Result::kRateLimited);
  CHECK(sameState(before, k.getMemoryStats()));
  CHECK(k.getMemoryStats().rateLimitedTyping == 1);
  CHECK(k.typing().isTyping("u", "1"));
  CHECK_FALSE(k.typing().isTyping("u", "2"));
  k.advance();
  CHECK(f.emits.size() == emitted);  // nothing told
  CHECK(k.stopTyping("s", "1") == Result::kOk);  // stopping is never limited
  f.clock.advanceBy(500ms);
  CHECK(k.startTyping("s", "2") == Result::kOk);
}

TEST_CASE("host kinds: per session, per user and per address", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.kinds = {{"message", RateScope::kSession, {1, 2}},
                            {"upload", RateScope::kUser, {1, 1}},
                            {"report", RateScope::kAddress, {1, 1}},
                            {"free", RateScope::kSession, {}}};
  Keeper k(f.callbacks(), f.opt);
  SessionHandle h1;
  REQUIRE(k.connect("s1", ClientAddress{"a"}, &h1) == Result::kOk);
  REQUIRE(k.connect("s2", ClientAddress{"a"}) == Result::kOk);
  REQUIRE(k.connect("s3") == Result::kOk);
  // Per session.
  CHECK(k.allow("s1", 0) == Result::kOk);
  CHECK(k.allow(h1, 0) == Result::kOk);
  CHECK(k.allow("s1", 0) == Result::kRateLimited);
  CHECK(k.allow("s2", 0) == Result::kOk);
  // Per user: not before authenticate; two sessions of a user share one.
  CHECK(k.allow("s1", 1) == Result::kNotAuthenticated);
  REQUIRE(k.authenticate("s1", "ann") == Result::kOk);
  REQUIRE(k.authenticate("s3", "ann") == Result::kOk);
  REQUIRE(k.authenticate("s2", "bob") == Result::kOk);
  CHECK(k.allow("s1", 1) == Result::kOk);
  CHECK(k.allow("s3", 1) == Result::kRateLimited);
  CHECK(k.allow("s2", 1) == Result::kOk);
  // Per address: s1 and s2 share "a"; s3 has no address, so no limit.
  CHECK(k.allow("s2", 2) == Result::kOk);
  CHECK(k.allow("s1", 2) == Result::kRateLimited);
  CHECK(k.allow("s3", 2) == Result::kOk);
  CHECK(k.allow("s3", 2) == Result::kOk);
  // No limit configured for the kind.
  for (int i = 0; i < 100; ++i) CHECK(k.allow("s1", 3) == Result::kOk);
  // Bad input.
  CHECK(k.allow("s1", 4) == Result::kUnknownKind);
  CHECK(k.allow("nobody", 0) == Result::kNotConnected);
  REQUIRE(k.disconnect("s1") == Result::kOk);
  CHECK(k.allow(h1, 0) == Result::kStaleHandle);
  CHECK(k.rateLimited(0) == 1);
  CHECK(k.rateLimited(1) == 1);
  CHECK(k.rateLimited(2) == 1);
  CHECK(k.rateLimited(9) == 0);
  CHECK(k.getMemoryStats().rateLimitedHost == 3);
  // The user's bucket outlives its sessions until it is full again: a
  // reconnect does not reset it.
  REQUIRE(k.disconnect("s3") == Result::kOk);
  REQUIRE(k.connectAuthenticated("s4", "ann") == Result::kOk);
  CHECK(k.allow("s4", 1) == Result::kRateLimited);
  f.clock.advanceBy(1s);
  CHECK(k.allow("s4", 1) == Result::kOk);
  const std::string prom = k.prometheusText();
  CHECK(prom.find("roomkeeper_rate_limited_host_total 4\n") != std::string::npos);
  CHECK(prom.find("roomkeeper_rate_limited_kind_total{kind=\"upload\"} 2\n") != std::string::npos);
  const std::string json = k.statsJson();
  CHECK(json.find("\"rateLimitedHost\":4") != std::string::npos);
  CHECK(json.find("\"rateLimitedKinds\":{\"message\":1,\"upload\":2,\"report\":1,\"free\":0}}") !=
        std::string::npos);
}

TEST_CASE("idle keys are forgotten on the timer service; bytes return to the start",
          "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.connectsPerAddress = {2, 4};
  f.opt.rateLimits.kinds = {{"upload", RateScope::kUser, {1, 10}}};
  Keeper k(f.callbacks(), f.opt);
  const MemoryStats start = k.getMemoryStats();
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 300; ++i) {
      const std::string s = "s" + std::to_string(i);
      REQUIRE(k.connectAuthenticated(s, "user-" + std::to_string(i % 50),
                                     ClientAddress{"10.1." + std::to_string(i % 100)}) ==
              Result::kOk);
      CHECK(k.allow(s, 0) == Result::kOk);
    }
    CHECK(k.getMemoryStats().rateLimitKeys == 150);
    for (int i = 0; i < 300; ++i) REQUIRE(k.disconnect("s" + std::to_string(i)) == Result::kOk);
    // Kept while a bucket is not full: 3 connects per address, 6 uploads
    // per user were taken.
    const MemoryStats gone = k.getMemoryStats();
    CHECK(gone.rateLimitKeys == 150);
    CHECK(gone.timersPending == 150);  // one forget timer each
    f.clock.advanceBy(1500ms);  // addresses full again (3 tokens at 2/s)
    k.advance();
    CHECK(k.getMemoryStats().rateLimitKeys == 50);
    f.clock.advanceBy(5s);  // users full again (6 tokens at 1/s)
    k.advance();
    const MemoryStats end = k.getMemoryStats();
    requireEmpty(end);
    CHECK(end.timersPending == 0);
    CHECK(end.bytes == start.bytes);
  }
}

TEST_CASE("a flood of distinct addresses stays within maxKeys", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.connectsPerAddress = {1, 1};
  f.opt.rateLimits.maxKeys = 64;
  Keeper k(f.callbacks(), f.opt);
  // Idle keys make room: the longest idle goes first.
  for (int i = 0; i < 10000; ++i) {
    const std::string s = "f" + std::to_string(i);
    REQUIRE(k.connect(s, ClientAddress{"198.51." + std::to_string(i)}) == Result::kOk);
    REQUIRE(k.disconnect(s) == Result::kOk);
    REQUIRE(k.getMemoryStats().rateLimitKeys <= 64);
  }
  CHECK(k.getMemoryStats().rateLimitKeys == 64);
  // The newest idle key was kept: its limit holds.
  CHECK(k.connect("again", ClientAddress{"198.51.9999"}) == Result::kRateLimited);
  // Keys held by live sessions are never forgotten: with all 64 held, a new
  // address is refused and nothing changes.
  for (int i = 0; i < 64; ++i)
    REQUIRE(k.connect("live" + std::to_string(i), ClientAddress{"203.0." + std::to_string(i)}) ==
            Result::kOk);
  const MemoryStats before = k.getMemoryStats();
  CHECK(k.connect("one-more", ClientAddress{"203.0.99"}) == Result::kRateLimited);
  CHECK(sameState(before, k.getMemoryStats()));
  CHECK(k.getMemoryStats().rateLimitedKeysFull == 1);
  // A known address is still served.
  CHECK(k.disconnect("live0") == Result::kOk);
  f.clock.advanceBy(2s);
  CHECK(k.connect("live0", ClientAddress{"203.0.0"}) == Result::kOk);
}

TEST_CASE("one key refused again and again: one warning per interval", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.connectsPerAddress = {1, 1};
  f.opt.rateLimits.typingPerSession = {1, 1};
  f.opt.rateLimits.warnAfterRefusals = 5;
  f.opt.warnInterval = Millis{60000};
  Keeper k(f.callbacks(), f.opt);
  REQUIRE(k.connect("s0", ClientAddress{"10.9.9.9"}) == Result::kOk);
  for (int i = 0; i < 20; ++i)
    CHECK(k.connect("x" + std::to_string(i), ClientAddress{"10.9.9.9"}) == Result::kRateLimited);
  REQUIRE(f.logs.size() == 1);
  CHECK(f.logs[0].find("'10.9.9.9' refused 5 times in a row (connections per second)") !=
        std::string::npos);
  // A session's own bucket names the session, once the interval has passed.
  REQUIRE(k.authenticate("s0", "u") == Result::kOk);
  REQUIRE(k.trackRoom("s0", "thread:1") == Result::kOk);
  REQUIRE(k.startTyping("s0", "1") == Result::kOk);
  for (int i = 0; i < 5; ++i) CHECK(k.startTyping("s0", "1") == Result::kRateLimited);
  CHECK(f.logs.size() == 1);  // within the interval: not again
  f.clock.advanceBy(61s);
  REQUIRE(ok(k.startTyping("s0", "1")));  // the run starts over
  for (int i = 0; i < 5; ++i) CHECK(k.startTyping("s0", "1") == Result::kRateLimited);
  REQUIRE(f.logs.size() == 2);
  CHECK(f.logs[1].find("session s0 refused 5 times in a row (typing starts)") !=
        std::string::npos);
}

TEST_CASE("rate limits: options out of range and shutdown", "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.connectsPerAddress = {-5, 3};  // off
  f.opt.rateLimits.joinsPerSession = {1, 0};      // a burst below 1 is 1
  f.opt.rateLimits.typingPerSession = {std::numeric_limits<double>::quiet_NaN(), 1};  // off
  Keeper k(f.callbacks(), f.opt);
  for (int i = 0; i < 10; ++i)
    CHECK(k.connectAuthenticated("s" + std::to_string(i), "u", ClientAddress{"a"}) ==
          Result::kOk);
  CHECK(k.trackRoom("s0", "thread:1") == Result::kOk);
  CHECK(k.trackRoom("s0", "q") == Result::kRateLimited);
  for (int i = 0; i < 10; ++i) CHECK(ok(k.startTyping("s0", "1")));
  const ShutdownReport rep = k.shutdown();
  CHECK(rep.result == Result::kOk);
  requireEmpty(k.getMemoryStats());
  CHECK(k.getMemoryStats().timersPending == 0);
  CHECK(k.allow("s0", 0) == Result::kShutDown);
  CHECK(k.connect("z", ClientAddress{"a"}) == Result::kShutDown);
  CHECK(toString(Result::kRateLimited) == "rate_limited");
  CHECK(toString(Result::kUnknownKind) == "unknown_kind");
}

TEST_CASE("a connect refused for its user key neither evicts nor resets an address",
          "[ratelimit]") {
  Fixture f;
  f.opt.rateLimits.maxKeys = 1;
  f.opt.rateLimits.connectsPerAddress = {1, 1};
  f.opt.rateLimits.kinds = {{"upload", RateScope::kUser, {1, 1}}};
  Keeper k(f.callbacks(), f.opt);
  REQUIRE(k.connectAuthenticated("a", "U1") == Result::kOk);  // the one user key
  REQUIRE(k.connect("x1", ClientAddress{"X"}) == Result::kOk);
  REQUIRE(k.disconnect("x1") == Result::kOk);  // X idle, its bucket empty
  CHECK(k.connect("x2", ClientAddress{"X"}) == Result::kRateLimited);
  const MemoryStats before = k.getMemoryStats();
  // Y would need a second address key (X is idle: it could make room) and a
  // second user key (none idle): refused before anything is made.
  CHECK(k.connectAuthenticated("b", "U2", ClientAddress{"Y"}) == Result::kRateLimited);
  CHECK(sameState(before, k.getMemoryStats()));
  CHECK(k.getMemoryStats().rateLimitedKeysFull == 1);
  CHECK(k.connect("x2", ClientAddress{"X"}) == Result::kRateLimited);  // X's limit holds
}

TEST_CASE("client addresses: bad ones are refused", "[ratelimit]") {
  Fixture f;
  f.opt.limits.maxIdLength = 16;
  f.opt.rateLimits.maxSessionsPerAddress = 1;
  Keeper k(f.callbacks(), f.opt);
  const std::string longAddress(17, '1');
  CHECK(k.connect("s", ClientAddress{longAddress}) == Result::kInvalidId);
  CHECK(k.connectAuthenticated("s", "u", ClientAddress{longAddress}) == Result::kInvalidId);
  requireEmpty(k.getMemoryStats());
  CHECK(k.connect("s", ClientAddress{std::string(16, '1')}) == Result::kOk);
  // An empty address is "no address": not limited per address.
  CHECK(k.connect("t", ClientAddress{""}) == Result::kOk);
  CHECK(k.connect("v", ClientAddress{""}) == Result::kOk);
}

// Keeper::trackRooms is one trackRoom per room: the same results (the rate
// limit, authentication, bad ids, a session that goes mid-list), emits,
// warnings and state, on twin Keepers.
TEST_CASE("trackRooms gives the results of one trackRoom per room, rate limit included",
          "[ratelimit]") {
  const bool byHandle = GENERATE(false, true);
  INFO((byHandle ? "by handle" : "by id"));
  Fixture fOne, fMany;
  fOne.opt.rateLimits.joinsPerSession = {10, 12};
  fMany.opt.rateLimits.joinsPerSession = {10, 12};
  // A roomCreated observer that disconnects the session when room "q" is
  // made: every later room of the list finds no session.
  Keeper* kOne = nullptr;
  Keeper* kMany = nullptr;
  KeeperCallbacks cbOne = fOne.callbacks(), cbMany = fMany.callbacks();
  cbOne.roomCreated = [&](std::string_view r) {
    if (r == "q") (void)kOne->disconnect("t");
  };
  cbMany.roomCreated = [&](std::string_view r) {
    if (r == "q") (void)kMany->disconnect("t");
  };
  Keeper one(cbOne, fOne.opt), many(cbMany, fMany.opt);
  kOne = &one;
  kMany = &many;
  // 20 names, more than one chunk of 16.
  std::vector<std::string> rooms{"a", "", "b", "a"};
  for (char c = 'c'; c <= 'r'; ++c) rooms.emplace_back(1, c);
  for (Keeper* k : {&one, &many}) {
    REQUIRE(k->connect("anon") == Result::kOk);
    REQUIRE(k->connectAuthenticated("s", "u") == Result::kOk);
  }
  // One trackRoom per room on `one`, trackRooms on `many` (by id or by
  // handle), for session `s`: the results must be the same.
  std::vector<Result> got;
  const auto twin = [&](const std::string& s, const std::vector<std::string>& list) {
    std::vector<Result> expected;
    const SessionHandle hOne = one.handleOf(s), hMany = many.handleOf(s);
    for (const std::string& r : list)
      expected.push_back(byHandle ? one.trackRoom(hOne, r) : one.trackRoom(s, r));
    const std::size_t n =
        byHandle ? many.trackRooms(hMany, list, &got) : many.trackRooms(s, list, &got);
    CHECK(got == expected);
    return n;
  };
  // Before authentication: every room refused, nothing taken.
  CHECK(twin("anon", rooms) == 0);
  CHECK(std::count(got.begin(), got.end(), Result::kNotAuthenticated) == 20);
  const std::size_t joined = twin("s", rooms);
  // a, b, c ... k joined (11); 'a' again is kAlreadyDone and takes a token
  // (a call carried out), the empty id takes none; then the bucket of 12 is
  // empty for the last 7.
  CHECK(joined == 11);
  CHECK(got[1] == Result::kInvalidId);
  CHECK(got[3] == Result::kAlreadyDone);
  CHECK(std::count(got.begin(), got.end(), Result::kRateLimited) == 7);
  CHECK(many.getMemoryStats().rateLimitedJoins == one.getMemoryStats().rateLimitedJoins);
  CHECK(sameState(many.getMemoryStats(), one.getMemoryStats()));
  CHECK(many.registry().roomsOf("s") == one.registry().roomsOf("s"));
  // A session that goes in the middle of the list: k ... r for a fresh
  // session (8 rooms, within its bucket of 12); making 'q' disconnects it.
  for (Keeper* k : {&one, &many}) REQUIRE(k->connectAuthenticated("t", "v") == Result::kOk);
  CHECK(twin("t", std::vector<std::string>(rooms.begin() + 12, rooms.end())) == 7);
  CHECK(got[7] == (byHandle ? Result::kStaleHandle : Result::kNotConnected));
  CHECK_FALSE(many.registry().isConnected("t"));
  CHECK(fMany.emits == fOne.emits);
  CHECK(fMany.logs == fOne.logs);
  CHECK(sameState(many.getMemoryStats(), one.getMemoryStats()));
}
