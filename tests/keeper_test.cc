// SPDX-License-Identifier: MIT
//
// Keeper: the documented disconnect order, idempotence, calls after
// disconnect, authentication and its deadline, forceCleanup, shutdown (also
// from inside callbacks), throwing callbacks at every step, the persistence
// retry queue (backoff, order, bound, last attempt), threshold warnings and
// their rate limit, the Prometheus/JSON exports and the periodic stats log.
// Time is a ManualClock: nothing here sleeps.
#include <roomkeeper/keeper.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "test_support.h"


namespace {

using roomkeeper::BroadcastTargets;
using roomkeeper::Bus;
using roomkeeper::Keeper;
using roomkeeper::KeeperCallbacks;
using roomkeeper::KeeperOptions;
using roomkeeper::LogLevel;
using roomkeeper::ManualClock;
using roomkeeper::MemoryStats;
using roomkeeper::Millis;
using roomkeeper::PersistCall;
using roomkeeper::PersistOp;
using roomkeeper::Result;
using roomkeeper::ShutdownReport;

std::string persistLine(const PersistCall& c) {
  return "persist " + std::string(roomkeeper::toString(c.op)) + " " + c.user + " " +
         c.thread;
}
std::string persistLine(PersistOp op, std::string_view user, std::string_view thread) {
  return persistLine(PersistCall{op, std::string(user), std::string(thread)});
}

// A Keeper whose every callback is recorded, in order, into `calls`.
struct Rig {
  explicit Rig(KeeperOptions o = {}) {
    o.clock = &clock;
    // The membership rule has its own cases; here typers need not join.
    o.typing.requireMembership = false;
    keeper = std::make_unique<Keeper>(callbacks(), std::move(o));
  }

  KeeperCallbacks callbacks() {
    KeeperCallbacks cb;
    cb.leave = [this](std::string_view s, std::string_view r) {
      hit("leave", "leave " + std::string(s) + " " + std::string(r));
      if (onLeave) onLeave(s, r);
    };
    cb.emit = [this](std::string_view s, std::string_view ev, std::string_view p) {
      std::string line = "emit " + std::string(s) + " " + std::string(ev);
      if (ev == "typingStarted" || ev == "typingStopped") line += " " + threadOf(p);
      if (ev == "serverShutdown") payloads.emplace_back(p);
      hit("emit", line);
      if (onEmit) onEmit(s, ev);
    };
    cb.closeSession = [this](std::string_view s, std::string_view reason) {
      hit("closeSession", "close " + std::string(s) + " " + std::string(reason));
      if (onClose) onClose(s);
    };
    cb.persist = [this](const PersistCall& c) {
      ++persistAttempts;
      attemptTimes.push_back(clock.now());
      if (onPersist) onPersist(c);
      if (throwOn.count("persist")) throw std::runtime_error("persist boom");
      if (failPersist > 0) {
        --failPersist;
        return false;
      }
      if (persistDown) return false;
      calls.push_back(persistLine(c));
      delivered.push_back(c);
      return true;
    };
    cb.log = [this](LogLevel level, std::string_view m) {
      logs.emplace_back(level, std::string(m));
    };
    cb.disconnecting = [this](std::string_view s, const std::vector<std::string>& rooms) {
      std::string line = "disconnecting " + std::string(s) + " [";
      for (std::size_t i = 0; i < rooms.size(); ++i) line += (i ? "," : "") + rooms[i];
      hit("disconnecting", line + "]");
      if (onDisconnecting) onDisconnecting(s);
    };
    cb.userOnline = [this](std::string_view u) {
      hit("userOnline", "online " + std::string(u));
    };
    cb.userOffline = [this](std::string_view u) {
      hit("userOffline", "offline " + std::string(u));
    };
    cb.roomCreated = [this](std::string_view r) {
      hit("roomCreated", "created " + std::string(r));
    };
    cb.roomDeleted = [this](std::string_view r) {
      hit("roomDeleted", "deleted " + std::string(r));
    };
    return cb;
  }

  static std::string threadOf(std::string_view payload) {
    // {"threadId":"42","userId":"alice"} -> 42
    const std::string_view key = "{\"threadId\":\"";
    if (payload.substr(0, key.size()) != key) return "?";
    const std::size_t end = payload.find('"', key.size());
    return std::string(payload.substr(key.size(), end - key.size()));
  }

  void hit(const std::string& step, std::string line) {
    calls.push_back(std::move(line));
    if (throwOn.count(step)) throw std::runtime_error(step + " boom");
  }

  void advanceMs(long ms) {
    clock.advanceBy(Millis(ms));
    keeper->advance();
  }
  // Advances 1 ms at a time (so every timer fires at its own time).
  void stepMs(long ms) {
    for (long i = 0; i < ms; ++i) advanceMs(1);
  }
  MemoryStats stats() const { return keeper->getMemoryStats(); }
  std::size_t logCount(LogLevel level, std::string_view needle) const {
    return static_cast<std::size_t>(
        std::count_if(logs.begin(), logs.end(), [&](const auto& l) {
          return l.first == level && l.second.find(needle) != std::string::npos;
        }));
  }
  std::size_t callCount(std::string_view line) const {
    return static_cast<std::size_t>(std::count(calls.begin(), calls.end(), line));
  }

  ManualClock clock;
  std::vector<std::string> calls;
  std::vector<std::string> payloads;
  std::vector<std::pair<LogLevel, std::string>> logs;
  std::vector<PersistCall> delivered;
  std::vector<roomkeeper::SteadyTime> attemptTimes;
  std::set<std::string> throwOn;
  int failPersist = 0;       // the next N attempts return false
  bool persistDown = false;  // every attempt returns false
  int persistAttempts = 0;
  std::function<void(std::string_view, std::string_view)> onLeave;
  std::function<void(std::string_view, std::string_view)> onEmit;
  std::function<void(const PersistCall&)> onPersist;
  std::function<void(std::string_view)> onDisconnecting;
  std::function<void(std::string_view)> onClose;
  std::unique_ptr<Keeper> keeper;
};


// alice on a1 in thread:42, thread:7 and job:1, typing in 42 and 7; bob on
// b1 in thread:42 and thread:7.
void standardScene(Rig& rig) {
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a1", "alice") == Result::kOk);
  REQUIRE(k.connectAuthenticated("b1", "bob") == Result::kOk);
  REQUIRE(k.trackRoom("a1", "thread:42") == Result::kOk);
  REQUIRE(k.trackRoom("a1", "thread:7") == Result::kOk);
  REQUIRE(k.trackRoom("a1", "job:1") == Result::kOk);
  REQUIRE(k.trackRoom("b1", "thread:42") == Result::kOk);
  REQUIRE(k.trackRoom("b1", "thread:7") == Result::kOk);
  REQUIRE(k.startTyping("a1", "42") == Result::kOk);
  REQUIRE(k.startTyping("a1", "7") == Result::kOk);
}

// ------------------------------------------------------------- JSON ---

// A flat {"key":number,...} object; false on anything else.
bool parseFlatJson(const std::string& s, std::map<std::string, double>* out) {
  std::size_t i = 0;
  auto ws = [&] {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  };
  ws();
  if (i >= s.size() || s[i++] != '{') return false;
  ws();
  if (i < s.size() && s[i] == '}') return ++i, ws(), i == s.size();
  for (;;) {
    ws();
    if (i >= s.size() || s[i++] != '"') return false;
    const std::size_t k = i;
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\') return false;  // no escapes in our keys
      ++i;
    }
    if (i >= s.size()) return false;
    const std::string key = s.substr(k, i - k);
    ++i;
    ws();
    if (i >= s.size() || s[i++] != ':') return false;
    ws();
    const char* begin = s.c_str() + i;
    char* end = nullptr;
    const double v = std::strtod(begin, &end);
    if (end == begin) return false;
    i += static_cast<std::size_t>(end - begin);
    if (!out->emplace(key, v).second) return false;  // duplicate key
    ws();
    if (i >= s.size()) return false;
    if (s[i] == ',') {
      ++i;
      continue;
    }
    if (s[i++] != '}') return false;
    ws();
    return i == s.size();
  }
}

std::map<std::string, double> expectedByJsonKey(const MemoryStats& s) {
  auto d = [](auto v) { return static_cast<double>(v); };
  return {{"connectedClients", d(s.connectedClients)},
          {"authenticated", d(s.authenticated)},
          {"userSockets", d(s.userSockets)},
          {"connectionTimers", d(s.connectionTimers)},
          {"typingTimers", d(s.typingTimers)},
          {"trackedRooms", d(s.trackedRooms)},
          {"sessionsWithRooms", d(s.sessionsWithRooms)},
          {"rooms", d(s.rooms)},
          {"totalEntries", d(s.totalEntries)},
          {"timersPending", d(s.timersPending)},
          {"pendingPersistence", d(s.pendingPersistence)},
          {"persistDelivered", d(s.persistDelivered)},
          {"persistFailures", d(s.persistFailures)},
          {"persistDropped", d(s.persistDropped)},
          {"callbackErrors", d(s.callbackErrors)},
          {"authTimeouts", d(s.authTimeouts)},
          {"forcedCleanups", d(s.forcedCleanups)},
          {"eventsDropped", d(s.eventsDropped)},
          {"rateLimitKeys", d(s.rateLimitKeys)},
          {"rateLimitedConnects", d(s.rateLimitedConnects)},
          {"rateLimitedConcurrent", d(s.rateLimitedConcurrent)},
          {"rateLimitedJoins", d(s.rateLimitedJoins)},
          {"rateLimitedTyping", d(s.rateLimitedTyping)},
          {"rateLimitedHost", d(s.rateLimitedHost)},
          {"rateLimitedKeysFull", d(s.rateLimitedKeysFull)},
          {"bytes", d(s.bytes)}};
}

std::map<std::string, double> expectedByMetric(const MemoryStats& s) {
  auto d = [](auto v) { return static_cast<double>(v); };
  return {{"roomkeeper_connected_clients", d(s.connectedClients)},
          {"roomkeeper_authenticated_sessions", d(s.authenticated)},
          {"roomkeeper_user_sockets", d(s.userSockets)},
          {"roomkeeper_connection_timers", d(s.connectionTimers)},
          {"roomkeeper_typing_timers", d(s.typingTimers)},
          {"roomkeeper_tracked_rooms", d(s.trackedRooms)},
          {"roomkeeper_sessions_with_rooms", d(s.sessionsWithRooms)},
          {"roomkeeper_rooms", d(s.rooms)},
          {"roomkeeper_total_entries", d(s.totalEntries)},
          {"roomkeeper_timers_pending", d(s.timersPending)},
          {"roomkeeper_persistence_pending", d(s.pendingPersistence)},
          {"roomkeeper_persistence_delivered_total", d(s.persistDelivered)},
          {"roomkeeper_persistence_failures_total", d(s.persistFailures)},
          {"roomkeeper_persistence_dropped_total", d(s.persistDropped)},
          {"roomkeeper_callback_errors_total", d(s.callbackErrors)},
          {"roomkeeper_auth_timeouts_total", d(s.authTimeouts)},
          {"roomkeeper_forced_cleanups_total", d(s.forcedCleanups)},
          {"roomkeeper_events_dropped_total", d(s.eventsDropped)},
          {"roomkeeper_rate_limit_keys", d(s.rateLimitKeys)},
          {"roomkeeper_rate_limited_connects_total", d(s.rateLimitedConnects)},
          {"roomkeeper_rate_limited_concurrent_total", d(s.rateLimitedConcurrent)},
          {"roomkeeper_rate_limited_joins_total", d(s.rateLimitedJoins)},
          {"roomkeeper_rate_limited_typing_total", d(s.rateLimitedTyping)},
          {"roomkeeper_rate_limited_host_total", d(s.rateLimitedHost)},
          {"roomkeeper_rate_limited_keys_full_total", d(s.rateLimitedKeysFull)},
          {"roomkeeper_bytes", d(s.bytes)}};
}

// A Keeper with a bit of everything, so that most statistics are non-zero
// and different from each other.
void busyScene(Rig& rig) {
  Keeper& k = *rig.keeper;
  rig.failPersist = 2;
  for (int i = 0; i < 6; ++i) {
    const std::string s = "s" + std::to_string(i);
    REQUIRE(k.connectAuthenticated(s, "u" + std::to_string(i % 4)) == Result::kOk);
    for (int r = 0; r <= i; ++r)
      REQUIRE(k.trackRoom(s, "room:" + std::to_string(r)) == Result::kOk);
  }
  REQUIRE(k.startTyping("s0", "1") == Result::kOk);
  REQUIRE(k.startTyping("s1", "1") == Result::kOk);
  REQUIRE(k.startTyping("s2", "2") == Result::kOk);
  REQUIRE(k.connect("anon1") == Result::kOk);
  REQUIRE(k.connect("anon2") == Result::kOk);
  REQUIRE(k.connect("late") == Result::kOk);
  REQUIRE(k.forceCleanup("s5") == Result::kOk);
  rig.throwOn.insert("leave");
  REQUIRE(k.untrackRoom("s4", "room:0") == Result::kOk);  // one callback error
  rig.throwOn.clear();
  rig.advanceMs(30000);  // auth deadlines: anon1, anon2, late; typing auto-clears
  REQUIRE(k.connect("anon3") == Result::kOk);
  REQUIRE(k.startTyping("s3", "3") == Result::kOk);
  rig.persistDown = true;
  REQUIRE(k.startTyping("s4", "4") == Result::kOk);  // pending persistence
}

}  // namespace

// ------------------------------------------------------- Disconnect ---

TEST_CASE("disconnect runs the documented order", "[keeper]") {
  Rig rig;
  standardScene(rig);
  rig.calls.clear();
  REQUIRE(rig.keeper->disconnect("a1") == Result::kOk);

  // 1. disconnecting with the rooms as they were; 3. typing (each
  // indicator: typingStopped to the thread room, then persistence), the
  // wildcard for alice's last session; 4. every room left (job:1 empties);
  // 6. userOffline last.
  const std::vector<std::string> head{
      "disconnecting a1 [thread:42,thread:7,job:1]",
      "emit b1 typingStopped 42",
      persistLine(PersistOp::kTypingStopped, "alice", "42"),
      "emit b1 typingStopped 7",
      persistLine(PersistOp::kTypingStopped, "alice", "7"),
      persistLine(PersistOp::kTypingStoppedAll, "alice", ""),
  };
  INFO([&] {
    std::string all;
    for (const auto& c : rig.calls) all += "  " + c + "\n";
    return "calls:\n" + all;
  }());
  REQUIRE(rig.calls.size() == head.size() + 4 + 1);
  CHECK(std::vector<std::string>(rig.calls.begin(), rig.calls.begin() + 6) == head);
  // The leaves: one per room, in any order; job:1 is deleted right after
  // its last member leaves.
  std::vector<std::string> leaves(rig.calls.begin() + 6, rig.calls.begin() + 10);
  const auto job = std::find(leaves.begin(), leaves.end(), "leave a1 job:1");
  REQUIRE(job != leaves.end());
  REQUIRE(job + 1 != leaves.end());
  CHECK(*(job + 1) == "deleted job:1");
  std::sort(leaves.begin(), leaves.end());
  CHECK(leaves == (std::vector<std::string>{"deleted job:1", "leave a1 job:1",
                                            "leave a1 thread:42", "leave a1 thread:7"}));
  CHECK(rig.calls.back() == "offline alice");

  const MemoryStats st = rig.stats();
  CHECK(st.connectedClients == 1);
  CHECK(st.authenticated == 1);
  CHECK(st.userSockets == 1);
  CHECK(st.typingTimers == 0);
  CHECK(st.trackedRooms == 2);
  CHECK(st.rooms == 2);
  CHECK(st.connectionTimers == 0);
  CHECK_FALSE(rig.keeper->registry().isConnected("a1"));
}

TEST_CASE("disconnect of one device of several: no wildcard, no userOffline",
          "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a1", "alice") == Result::kOk);
  REQUIRE(k.connectAuthenticated("a2", "alice") == Result::kOk);
  REQUIRE(k.trackRoom("a1", "thread:1") == Result::kOk);
  REQUIRE(k.trackRoom("a2", "thread:1") == Result::kOk);
  REQUIRE(k.startTyping("a1", "1") == Result::kOk);
  REQUIRE(k.startTyping("a2", "1") == Result::kAlreadyDone);
  rig.calls.clear();
  REQUIRE(k.disconnect("a1") == Result::kOk);
  CHECK(rig.calls ==
        (std::vector<std::string>{"disconnecting a1 [thread:1]", "leave a1 thread:1"}));
  CHECK(k.typing().isTyping("alice", "1"));  // a2 still types
  rig.calls.clear();
  REQUIRE(k.disconnect("a2") == Result::kOk);
  CHECK(rig.calls == (std::vector<std::string>{
                         "disconnecting a2 [thread:1]",
                         persistLine(PersistOp::kTypingStopped, "alice", "1"),
                         persistLine(PersistOp::kTypingStoppedAll, "alice", ""),
                         "leave a2 thread:1", "deleted thread:1", "offline alice"}));
}

TEST_CASE("a second disconnect is kNotConnected and calls nothing", "[keeper]") {
  Rig rig;
  standardScene(rig);
  REQUIRE(rig.keeper->disconnect("a1") == Result::kOk);
  const MemoryStats before = rig.stats();
  rig.calls.clear();
  rig.logs.clear();
  CHECK(rig.keeper->disconnect("a1") == Result::kNotConnected);
  CHECK(rig.keeper->forceCleanup("a1") == Result::kNotConnected);
  CHECK(rig.keeper->disconnect("never") == Result::kNotConnected);
  CHECK(rig.keeper->disconnect("") == Result::kNotConnected);
  CHECK(rig.calls.empty());
  CHECK(rig.logs.empty());
  CHECK(rig.stats() == before);
}

TEST_CASE("calls after disconnect are kNotConnected and change nothing", "[keeper]") {
  Rig rig;
  standardScene(rig);
  REQUIRE(rig.keeper->disconnect("a1") == Result::kOk);
  const MemoryStats before = rig.stats();
  rig.calls.clear();
  Keeper& k = *rig.keeper;
  CHECK(k.trackRoom("a1", "thread:42") == Result::kNotConnected);
  CHECK(k.trackRoom("a1", "new-room") == Result::kNotConnected);
  CHECK(k.untrackRoom("a1", "thread:42") == Result::kNotConnected);
  CHECK(k.clearRoomTracking("a1") == 0);
  CHECK(k.startTyping("a1", "42") == Result::kNotConnected);
  CHECK(k.stopTyping("a1", "42") == Result::kNotConnected);
  CHECK(k.authenticate("a1", "alice") == Result::kNotConnected);
  CHECK(rig.stats() == before);
  CHECK(rig.calls.empty());
  CHECK_FALSE(k.registry().roomExists("new-room"));
  // The id may connect again, as a new session.
  CHECK(k.connect("a1") == Result::kOk);
  CHECK(k.registry().roomCount("a1") == 0);
}

TEST_CASE("a disconnect from inside the session's own disconnect callbacks does nothing",
          "[keeper]") {
  Rig rig;
  standardScene(rig);
  std::vector<Result> inner;
  rig.onDisconnecting = [&](std::string_view s) {
    inner.push_back(rig.keeper->disconnect(s));
    inner.push_back(rig.keeper->trackRoom(s, "again"));
  };
  rig.onLeave = [&](std::string_view s, std::string_view) {
    inner.push_back(rig.keeper->disconnect(s));
  };
  rig.calls.clear();
  REQUIRE(rig.keeper->disconnect("a1") == Result::kOk);
  REQUIRE(inner.size() == 2 + 3);
  // keeper.h documents kClosing here; callbacks run after the state change,
  // so by then the session is gone and the answer is kNotConnected. Either
  // way: refused, and no second sequence.
  for (const Result r : inner) {
    INFO(roomkeeper::toString(r));
    CHECK((r == Result::kClosing || r == Result::kNotConnected));
  }
  CHECK(rig.callCount("disconnecting a1 [thread:42,thread:7,job:1]") == 1);
  CHECK(rig.callCount("offline alice") == 1);
  CHECK_FALSE(rig.keeper->registry().roomExists("again"));
}

// ------------------------------------------------------ Authentication ---

TEST_CASE("trackRoom and startTyping need authentication", "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connect("s1") == Result::kOk);
  CHECK(k.connect("s1") == Result::kAlreadyConnected);
  CHECK(k.connect("") == Result::kInvalidId);
  const MemoryStats before = rig.stats();
  CHECK(k.trackRoom("s1", "room") == Result::kNotAuthenticated);
  CHECK(k.startTyping("s1", "42") == Result::kNotAuthenticated);
  CHECK(rig.stats() == before);
  CHECK(before.connectedClients == 1);
  CHECK(before.authenticated == 0);
  CHECK(before.connectionTimers == 1);

  CHECK(k.authenticate("nobody", "alice") == Result::kNotConnected);
  CHECK(k.authenticate("s1", "") == Result::kInvalidId);
  REQUIRE(k.authenticate("s1", "alice") == Result::kOk);
  CHECK(k.authenticate("s1", "alice") == Result::kAlreadyDone);
  CHECK(k.authenticate("s1", "bob") == Result::kUserMismatch);
  CHECK(rig.stats().authenticated == 1);
  CHECK(rig.stats().connectionTimers == 0);
  CHECK(k.trackRoom("s1", "room") == Result::kOk);
  CHECK(k.startTyping("s1", "42") == Result::kOk);
}

TEST_CASE("a refused connectAuthenticated leaves nothing and calls nothing", "[keeper]") {
  KeeperOptions o;
  o.limits.maxSessionsPerUser = 1;
  Rig rig(o);
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a1", "alice") == Result::kOk);
  const MemoryStats before = rig.stats();
  rig.calls.clear();
  CHECK(k.connectAuthenticated("a2", "alice") == Result::kTooManySessions);
  CHECK(k.connectAuthenticated("a3", "") == Result::kInvalidId);
  CHECK(k.connectAuthenticated("a4", std::string(256, 'u')) == Result::kInvalidId);
  CHECK(k.connectAuthenticated("a1", "alice") == Result::kAlreadyConnected);
  CHECK(rig.calls.empty());
  CHECK(rig.stats() == before);
  CHECK_FALSE(k.registry().isConnected("a2"));
  CHECK(before.authenticated == 1);
  CHECK(before.connectionTimers == 0);
  rig.advanceMs(60000);
  CHECK(rig.calls.empty());
}

TEST_CASE("the auth deadline closes the session at 30 s, not before", "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connect("s1") == Result::kOk);
  CHECK(rig.stats().connectionTimers == 1);
  CHECK(rig.stats().timersPending == 1);
  rig.advanceMs(29999);
  CHECK(rig.callCount("close s1 auth_timeout") == 0);
  CHECK(k.registry().isConnected("s1"));
  CHECK(rig.stats().authTimeouts == 0);

  // closeSession: the Keeper has already forgotten the session.
  bool connectedInClose = true;
  rig.onClose = [&](std::string_view s) {
    connectedInClose = k.registry().isConnected(s);
  };
  rig.advanceMs(1);
  CHECK(rig.callCount("close s1 auth_timeout") == 1);
  CHECK(rig.callCount("disconnecting s1 []") == 1);
  CHECK_FALSE(connectedInClose);
  const MemoryStats st = rig.stats();
  CHECK(st.authTimeouts == 1);
  requireEmpty(st);
  CHECK(st.timersPending == 0);
  CHECK(rig.logCount(LogLevel::kInfo, "did not authenticate") == 1);

  // Later: nothing more.
  rig.calls.clear();
  rig.advanceMs(60000);
  CHECK(rig.calls.empty());
  CHECK(rig.stats().authTimeouts == 1);
}

TEST_CASE("authenticate cancels the auth deadline", "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connect("s1") == Result::kOk);
  REQUIRE(k.connect("s2") == Result::kOk);
  rig.advanceMs(29999);
  REQUIRE(k.authenticate("s1", "alice") == Result::kOk);
  CHECK(rig.stats().connectionTimers == 1);  // s2's
  rig.advanceMs(1);
  CHECK(rig.callCount("close s2 auth_timeout") == 1);
  rig.advanceMs(120000);
  CHECK(rig.callCount("close s1 auth_timeout") == 0);
  CHECK(k.registry().isConnected("s1"));
  CHECK(rig.stats().authTimeouts == 1);
  CHECK(rig.stats().connectionTimers == 0);
  CHECK(rig.stats().timersPending == 0);
  // A disconnect before the deadline cancels it too.
  REQUIRE(k.connect("s3") == Result::kOk);
  REQUIRE(k.disconnect("s3") == Result::kOk);
  CHECK(rig.stats().connectionTimers == 0);
  CHECK(rig.stats().timersPending == 0);
  rig.advanceMs(30000);
  CHECK(rig.callCount("close s3 auth_timeout") == 0);
}

TEST_CASE("authTimeout 0 arms no deadline", "[keeper]") {
  KeeperOptions o;
  o.authTimeout = Millis(0);
  Rig rig(o);
  REQUIRE(rig.keeper->connect("s1") == Result::kOk);
  CHECK(rig.stats().connectionTimers == 0);
  CHECK(rig.stats().timersPending == 0);
  rig.advanceMs(3600 * 1000);
  CHECK(rig.keeper->registry().isConnected("s1"));
}

// ------------------------------------------------------- forceCleanup ---

TEST_CASE("forceCleanup runs the disconnect sequence and counts it", "[keeper]") {
  Rig rig;
  standardScene(rig);
  rig.calls.clear();
  REQUIRE(rig.keeper->forceCleanup("a1") == Result::kOk);
  CHECK(rig.calls.front() == "disconnecting a1 [thread:42,thread:7,job:1]");
  CHECK(rig.callCount("leave a1 job:1") == 1);
  CHECK(rig.callCount(persistLine(PersistOp::kTypingStoppedAll, "alice", "")) == 1);
  CHECK(rig.calls.back() == "offline alice");
  CHECK(rig.stats().forcedCleanups == 1);
  CHECK(rig.keeper->forceCleanup("a1") == Result::kNotConnected);
  CHECK(rig.stats().forcedCleanups == 1);
  REQUIRE(rig.keeper->forceCleanup("b1") == Result::kOk);
  CHECK(rig.stats().forcedCleanups == 2);
  requireEmpty(rig.stats());
}

// ----------------------------------------------------------- Shutdown ---

TEST_CASE("shutdown tells everyone, closes everything, refuses everything", "[keeper]") {
  Rig rig;
  standardScene(rig);
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a2", "alice") == Result::kOk);
  REQUIRE(k.connect("anon") == Result::kOk);  // auth deadline armed
  rig.calls.clear();

  const ShutdownReport rep = k.shutdown();
  CHECK(rep.sessionsClosed == 4);
  CHECK(rep.persistUndelivered == 0);
  CHECK(rep.timersCancelled >= 3);  // two typing timers and one auth deadline
  for (const char* s : {"a1", "a2", "b1", "anon"}) {
    INFO(s);
    CHECK(rig.callCount("emit " + std::string(s) + " serverShutdown") == 1);
    CHECK(rig.callCount("close " + std::string(s) + " shutdown") == 1);
  }
  for (const std::string& p : rig.payloads)
    CHECK(p.find("Server is shutting down") != std::string::npos);
  CHECK(rig.callCount("offline alice") == 1);
  CHECK(rig.callCount("offline bob") == 1);
  CHECK(rig.callCount(persistLine(PersistOp::kTypingStoppedAll, "alice", "")) == 1);
  CHECK(rig.callCount(persistLine(PersistOp::kTypingStopped, "alice", "42")) == 1);
  const MemoryStats st = rig.stats();
  requireEmpty(st);
  CHECK(st.timersPending == 0);
  CHECK(k.isShutDown());

  rig.calls.clear();
  CHECK(k.connect("x") == Result::kShutDown);
  CHECK(k.authenticate("a1", "alice") == Result::kShutDown);
  CHECK(k.connectAuthenticated("x", "alice") == Result::kShutDown);
  CHECK(k.trackRoom("a1", "r") == Result::kShutDown);
  CHECK(k.untrackRoom("a1", "r") == Result::kShutDown);
  CHECK(k.clearRoomTracking("a1") == 0);
  CHECK(k.startTyping("a1", "1") == Result::kShutDown);
  CHECK(k.stopTyping("a1", "1") == Result::kShutDown);
  CHECK(k.disconnect("a1") == Result::kShutDown);
  CHECK(k.forceCleanup("a1") == Result::kShutDown);
  BroadcastTargets everyone;
  everyone.rooms = {"thread:42"};
  CHECK(k.broadcast(everyone, "x", "{}") == 0);
  rig.advanceMs(100000);
  CHECK(k.checkThresholds() == 0);
  const ShutdownReport again = k.shutdown();
  CHECK(again.sessionsClosed == 0);
  CHECK(again.timersCancelled == 0);
  CHECK(again.persistUndelivered == 0);
  CHECK(rig.calls.empty());
  CHECK(rig.stats() == st);
}

TEST_CASE("shutdown from inside callbacks", "[keeper]") {
  Rig rig;
  standardScene(rig);
  REQUIRE(rig.keeper->connect("anon") == Result::kOk);
  Keeper& k = *rig.keeper;
  ShutdownReport inner;
  int shutdowns = 0;
  auto shutdownOnce = [&] {
    if (shutdowns == 0) {
      ++shutdowns;
      inner = k.shutdown();
    }
  };

  SECTION("from a leave callback during disconnect") {
    rig.onLeave = [&](std::string_view, std::string_view) { shutdownOnce(); };
    CHECK(k.disconnect("a1") == Result::kOk);
    CHECK(inner.sessionsClosed == 2);  // b1 and anon; a1 was already gone
  }
  SECTION("from an emit callback during advance()") {
    rig.onEmit = [&](std::string_view, std::string_view ev) {
      if (ev == "typingStopped") shutdownOnce();
    };
    rig.advanceMs(5000);  // the auto-clear emits typingStopped to b1
    CHECK(inner.sessionsClosed == 3);
    CHECK(rig.callCount("close a1 shutdown") == 1);
  }
  SECTION("from a persist callback") {
    rig.onPersist = [&](const PersistCall&) { shutdownOnce(); };
    CHECK(k.stopTyping("a1", "42") == Result::kOk);
    CHECK(inner.sessionsClosed == 3);
  }
  SECTION("from the disconnecting observer") {
    rig.onDisconnecting = [&](std::string_view) { shutdownOnce(); };
    CHECK(k.forceCleanup("a1") == Result::kOk);
    CHECK(inner.sessionsClosed == 2);
  }
  CHECK(shutdowns == 1);
  CHECK(k.isShutDown());
  CHECK(rig.callCount("close b1 shutdown") == 1);
  CHECK(rig.callCount("close anon shutdown") == 1);
  CHECK(rig.callCount("offline alice") == 1);
  CHECK(rig.callCount("offline bob") == 1);
  const MemoryStats st = rig.stats();
  requireEmpty(st);
  CHECK(st.timersPending == 0);
  CHECK(st.callbackErrors == 0);
  CHECK(k.connect("x") == Result::kShutDown);
  rig.advanceMs(60000);
  requireEmpty(rig.stats());
}

// ------------------------------------------------- Throwing callbacks ---

TEST_CASE("a broadcast tells each member once, in order, whatever an emit does",
          "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  for (const char* s : {"m1", "m2", "m3", "m4", "out"}) {
    REQUIRE(k.connectAuthenticated(s, std::string("u-") + s) == Result::kOk);
    if (std::string(s) != "out") REQUIRE(k.trackRoom(s, "r") == Result::kOk);
  }
  // m1's emit disconnects m3, who is still to be told; m2's emit throws.
  rig.onEmit = [&](std::string_view s, std::string_view ev) {
    if (ev != "x") return;
    if (s == "m1") CHECK(k.disconnect("m3") == Result::kOk);
    if (s == "m2") throw std::runtime_error("m2 boom");
  };
  rig.calls.clear();
  BroadcastTargets t;
  t.rooms = {"r"};
  CHECK(k.broadcast(t, "x", "{}") == 4);
  std::vector<std::string> emits;
  std::size_t leaveM3 = rig.calls.size(), lastEmit = 0;
  for (std::size_t i = 0; i < rig.calls.size(); ++i) {
    if (rig.calls[i].rfind("emit ", 0) == 0 && rig.calls[i].size() > 7 &&
        rig.calls[i].compare(rig.calls[i].size() - 2, 2, " x") == 0) {
      emits.push_back(rig.calls[i]);
      lastEmit = i;
    }
    if (rig.calls[i] == "leave m3 r") leaveM3 = std::min(leaveM3, i);
  }
  // The members chosen at the call, each once, in membership order: m3's
  // disconnect (made during the fan-out) comes after the whole fan-out.
  CHECK(emits == std::vector<std::string>{"emit m1 x", "emit m2 x", "emit m3 x", "emit m4 x"});
  REQUIRE(leaveM3 < rig.calls.size());
  CHECK(leaveM3 > lastEmit);
  const MemoryStats st = rig.stats();
  CHECK(st.callbackErrors == 1);
  CHECK(rig.logCount(LogLevel::kError, "m2 boom") == 1);
  CHECK(st.connectedClients == 4);
  CHECK(st.trackedRooms == 3);
}

namespace {
// A bus that records what it is told into a call log (a Keeper's only bus
// in this file: no other Keeper, so every query answers "no one else").
struct RecordingBus final : Bus {
  std::vector<std::string>* calls = nullptr;
  void note(std::string line) {
    if (calls) calls->push_back(std::move(line));
  }
  void sessionUp(std::string_view, std::string_view) override {}
  void sessionDown(std::string_view, std::string_view) override {}
  void joined(std::string_view, std::string_view) override {}
  void left(std::string_view, std::string_view) override {}
  void typing(std::string_view, std::string_view, bool) override {}
  void broadcast(const BroadcastTargets& t, std::string_view event,
                 std::string_view payload) override {
    note("bus " + std::string(t.rooms.empty() ? "" : t.rooms[0]) + " " + std::string(event) +
         " " + std::string(payload));
  }
  bool typingElsewhere(std::string_view, std::string_view) const noexcept override {
    return false;
  }
};
}  // namespace

TEST_CASE("with a bus, a broadcast is handed to the bus before any local member is told",
          "[keeper]") {
  RecordingBus bus;
  KeeperOptions o;
  o.bus = &bus;
  Rig rig(o);
  bus.calls = &rig.calls;
  Keeper& k = *rig.keeper;
  for (const char* s : {"m1", "m2"}) {
    REQUIRE(k.connectAuthenticated(s, std::string("u-") + s) == Result::kOk);
    REQUIRE(k.trackRoom(s, "r") == Result::kOk);
  }
  rig.calls.clear();
  BroadcastTargets t;
  t.rooms = {"r"};
  CHECK(k.broadcast(t, "x", "{}") == 2);
  CHECK(rig.calls == std::vector<std::string>{"bus r x {}", "emit m1 x", "emit m2 x"});
  // Relayed from the bus: local members only, never back to the bus.
  rig.calls.clear();
  CHECK(k.relayBroadcast(t, "y", "{}") == 2);
  CHECK(rig.calls == std::vector<std::string>{"emit m1 y", "emit m2 y"});

  // A relayed typing start: the thread room's members but the typer's own
  // sessions, counted per member (one queued event for all of them); an
  // emit that throws does not keep the next member from being told.
  for (const char* s : {"m1", "m2"}) REQUIRE(k.trackRoom(s, "thread:5") == Result::kOk);
  REQUIRE(k.connectAuthenticated("m1b", "u-m1") == Result::kOk);  // m1's other device
  REQUIRE(k.trackRoom("m1b", "thread:5") == Result::kOk);
  REQUIRE(k.connectAuthenticated("m3", "u-m3") == Result::kOk);
  REQUIRE(k.trackRoom("m3", "thread:5") == Result::kOk);
  rig.onEmit = [&](std::string_view s, std::string_view ev) {
    if (s == "m2" && ev == "typingStarted") throw std::runtime_error("m2 boom");
  };
  rig.calls.clear();
  CHECK(k.relayTyping("u-m1", "5", true) == 2);
  CHECK(rig.calls == std::vector<std::string>{"emit m2 typingStarted 5", "emit m3 typingStarted 5"});
  CHECK(rig.stats().callbackErrors == 1);
  rig.onEmit = nullptr;
  rig.calls.clear();
  CHECK(k.relayTyping("u-m1", "5", false) == 2);
  CHECK(rig.calls == std::vector<std::string>{"emit m2 typingStopped 5", "emit m3 typingStopped 5"});
}

TEST_CASE("a callback that throws at any step leaves nothing half-cleaned", "[keeper]") {
  const std::string step =
      GENERATE(as<std::string>{}, "leave", "emit", "persist", "disconnecting",
               "userOffline", "closeSession", "roomDeleted");
  INFO("throwing: " << step);
  Rig rig;
  standardScene(rig);
  REQUIRE(rig.keeper->connect("anon") == Result::kOk);
  rig.calls.clear();
  rig.logs.clear();
  rig.delivered.clear();
  rig.throwOn.insert(step);

  REQUIRE(rig.keeper->disconnect("a1") == Result::kOk);
  rig.advanceMs(30000);  // anon's auth deadline: closeSession
  REQUIRE(rig.keeper->disconnect("b1") == Result::kOk);

  // Every step still ran, whichever threw.
  for (const std::string& line :
       {std::string("disconnecting a1 [thread:42,thread:7,job:1]"),
        std::string("emit b1 typingStopped 42"), std::string("emit b1 typingStopped 7"),
        std::string("leave a1 thread:42"), std::string("leave a1 thread:7"),
        std::string("leave a1 job:1"), std::string("deleted job:1"),
        std::string("offline alice"), std::string("close anon auth_timeout"),
        std::string("disconnecting anon []"), std::string("leave b1 thread:42"),
        std::string("offline bob")}) {
    INFO(line);
    CHECK(rig.callCount(line) == 1);
  }
  MemoryStats st = rig.stats();
  CHECK(st.callbackErrors >= 1);
  CHECK(rig.logCount(LogLevel::kError, "threw") >= 1);
  CHECK(rig.logCount(LogLevel::kError, "threw") ==
        static_cast<std::size_t>(st.callbackErrors));
  CHECK(st.connectedClients == 0);
  CHECK(st.userSockets == 0);
  CHECK(st.typingTimers == 0);
  CHECK(st.trackedRooms == 0);
  CHECK(st.rooms == 0);
  CHECK(st.connectionTimers == 0);
  CHECK(st.totalEntries == 0);

  // Persistence calls are retried until delivered, in order.
  rig.throwOn.clear();
  rig.stepMs(60000);
  st = rig.stats();
  requireEmpty(st);
  CHECK(st.timersPending == 0);
  const std::vector<std::string> expected{
      persistLine(PersistOp::kTypingStopped, "alice", "42"),
      persistLine(PersistOp::kTypingStopped, "alice", "7"),
      persistLine(PersistOp::kTypingStoppedAll, "alice", ""),
      persistLine(PersistOp::kTypingStoppedAll, "bob", ""),
  };
  std::vector<std::string> got;
  for (const PersistCall& c : rig.delivered) got.push_back(persistLine(c));
  CHECK(got == expected);
}

TEST_CASE("a throwing callback during shutdown still ends everything", "[keeper]") {
  const std::string step =
      GENERATE(as<std::string>{}, "leave", "emit", "closeSession", "userOffline");
  INFO("throwing: " << step);
  Rig rig;
  standardScene(rig);
  REQUIRE(rig.keeper->connect("anon") == Result::kOk);
  rig.throwOn.insert(step);
  const ShutdownReport rep = rig.keeper->shutdown();
  CHECK(rep.sessionsClosed == 3);
  requireEmpty(rig.stats());
  CHECK(rig.stats().callbackErrors >= 1);
  CHECK(rig.callCount("close anon shutdown") == 1);
  CHECK(rig.callCount("emit b1 serverShutdown") == 1);
}

// -------------------------------------------------------- Persistence ---

TEST_CASE("persistence failing N times is retried with backoff, in order", "[keeper]") {
  const int n = GENERATE(1, 2, 5, 8);
  INFO("failures: " << n);
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a1", "alice") == Result::kOk);
  REQUIRE(k.connectAuthenticated("b1", "bob") == Result::kOk);
  rig.failPersist = n;
  REQUIRE(k.startTyping("a1", "1") == Result::kOk);
  REQUIRE(k.startTyping("a1", "2") == Result::kOk);
  REQUIRE(k.startTyping("b1", "1") == Result::kOk);
  REQUIRE(k.stopTyping("a1", "1") == Result::kOk);
  REQUIRE(k.stopTyping("b1", "1") == Result::kOk);
  CHECK(rig.persistAttempts == 1);  // the first failed; the rest wait behind it
  CHECK(rig.stats().pendingPersistence == 5);
  CHECK(rig.stats().persistFailures == 1);
  CHECK(rig.stats().timersPending == 2);  // alice's thread 2, the retry

  // The retries come at 100, 200, 400, ... ms after each failure.
  std::size_t maxPending = 0;
  for (int ms = 0; ms < 60000; ++ms) {
    rig.advanceMs(1);
    const MemoryStats st = rig.stats();
    maxPending = std::max(maxPending, st.pendingPersistence);
    if (rig.persistAttempts <= n) CHECK(st.pendingPersistence > 0);
    if (rig.persistAttempts > n && st.pendingPersistence == 0 && st.typingTimers == 0)
      break;
  }
  CHECK(maxPending >= 5);
  const MemoryStats st = rig.stats();
  CHECK(st.pendingPersistence == 0);
  CHECK(st.persistFailures == static_cast<std::uint64_t>(n));
  CHECK(st.persistDelivered == 6);
  CHECK(st.timersPending == 0);
  REQUIRE(rig.attemptTimes.size() == static_cast<std::size_t>(n) + 6);
  long expectedGap = 100;
  for (int i = 1; i <= n; ++i) {
    const auto gap =
        std::chrono::duration_cast<Millis>(rig.attemptTimes[i] - rig.attemptTimes[i - 1]);
    INFO("retry " << i);
    CHECK(gap.count() == expectedGap);
    expectedGap = std::min(expectedGap * 2, 30000L);
  }
  const std::vector<std::string> expected{
      persistLine(PersistOp::kTypingStarted, "alice", "1"),
      persistLine(PersistOp::kTypingStarted, "alice", "2"),
      persistLine(PersistOp::kTypingStarted, "bob", "1"),
      persistLine(PersistOp::kTypingStopped, "alice", "1"),
      persistLine(PersistOp::kTypingStopped, "bob", "1"),
      persistLine(PersistOp::kTypingStopped, "alice", "2"),  // the auto-clear
  };
  std::vector<std::string> got;
  for (const PersistCall& c : rig.delivered) got.push_back(persistLine(c));
  CHECK(got == expected);
}

TEST_CASE("the persistence queue is bounded: the oldest call is dropped and logged",
          "[keeper]") {
  KeeperOptions o;
  o.typing.maxPendingPersist = 3;
  Rig rig(o);
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a1", "alice") == Result::kOk);
  rig.persistDown = true;
  for (int t = 1; t <= 6; ++t)
    REQUIRE(k.startTyping("a1", std::to_string(t)) == Result::kOk);
  MemoryStats st = rig.stats();
  CHECK(st.pendingPersistence == 3);
  CHECK(st.persistDropped == 3);
  CHECK(rig.logCount(LogLevel::kError, "persistence queue full") == 3);
  CHECK(rig.logCount(LogLevel::kError, "dropped typing_started user=alice thread=1") ==
        1);

  rig.persistDown = false;
  rig.stepMs(200);
  st = rig.stats();
  CHECK(st.pendingPersistence == 0);
  std::vector<std::string> got;
  for (const PersistCall& c : rig.delivered) got.push_back(persistLine(c));
  CHECK(got ==
        (std::vector<std::string>{persistLine(PersistOp::kTypingStarted, "alice", "4"),
                                  persistLine(PersistOp::kTypingStarted, "alice", "5"),
                                  persistLine(PersistOp::kTypingStarted, "alice", "6")}));
}

TEST_CASE("shutdown makes a last persistence attempt and reports what is undelivered",
          "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("a1", "alice") == Result::kOk);
  rig.persistDown = true;
  REQUIRE(k.startTyping("a1", "1") == Result::kOk);
  REQUIRE(k.startTyping("a1", "2") == Result::kOk);
  CHECK(rig.stats().pendingPersistence == 2);

  SECTION("still failing: every call reported and logged") {
    const ShutdownReport rep = k.shutdown();
    // started 1, started 2, stopped 1, stopped 2, the wildcard.
    CHECK(rep.persistUndelivered == 5);
    CHECK(rig.logCount(LogLevel::kError, "undelivered persistence call") == 5);
    CHECK(rig.delivered.empty());
  }
  SECTION("recovered: the last attempt delivers everything, ignoring backoff") {
    rig.persistDown = false;  // the retry is 100 ms away; shutdown does not wait
    const ShutdownReport rep = k.shutdown();
    CHECK(rep.persistUndelivered == 0);
    std::vector<std::string> got;
    for (const PersistCall& c : rig.delivered) got.push_back(persistLine(c));
    const std::vector<std::string> expected{
        persistLine(PersistOp::kTypingStarted, "alice", "1"),
        persistLine(PersistOp::kTypingStarted, "alice", "2"),
        persistLine(PersistOp::kTypingStopped, "alice", "1"),
        persistLine(PersistOp::kTypingStopped, "alice", "2"),
        persistLine(PersistOp::kTypingStoppedAll, "alice", ""),
    };
    CHECK(got == expected);
  }
  const MemoryStats st = rig.stats();
  requireEmpty(st);  // "afterwards every count is 0"
  CHECK(st.timersPending == 0);
  const int attempts = rig.persistAttempts;
  rig.advanceMs(120000);
  CHECK(rig.persistAttempts == attempts);  // no retry after shutdown
}

// ----------------------------------------------------------- Warnings ---

TEST_CASE("threshold warnings are logged and rate-limited", "[keeper]") {
  KeeperOptions o;
  o.warnTypingTimers = 2;
  o.warnTypingPerSession = 0.0;  // absolute
  o.warnRoomsPerConnection = 2.0;
  o.warnTrackedRooms = 0;
  o.warnConnections = 2;
  o.warnInterval = Millis(60000);
  o.authTimeout = Millis(0);
  Rig rig(o);
  Keeper& k = *rig.keeper;
  auto warnings = [&](std::string_view needle) {
    return rig.logCount(LogLevel::kWarning, needle);
  };

  SECTION("connections") {
    REQUIRE(k.connectAuthenticated("s1", "u") == Result::kOk);
    REQUIRE(k.connectAuthenticated("s2", "u") == Result::kOk);
    CHECK(warnings("connection count") == 0);
    REQUIRE(k.connectAuthenticated("s3", "u") == Result::kOk);  // 3 > 2
    CHECK(warnings("high connection count: 3") == 1);
    REQUIRE(k.connectAuthenticated("s4", "u") == Result::kOk);
    CHECK(k.checkThresholds() == 0);  // within the interval: nothing
    CHECK(warnings("connection count") == 1);
    rig.clock.advanceBy(Millis(59999));
    CHECK(k.checkThresholds() == 0);
    rig.clock.advanceBy(Millis(1));
    CHECK(k.checkThresholds() == 1);
    CHECK(warnings("high connection count: 4") == 1);
    CHECK(k.checkThresholds() == 0);
  }
  SECTION("typing timers") {
    REQUIRE(k.connectAuthenticated("s1", "u") == Result::kOk);
    REQUIRE(k.connectAuthenticated("s2", "v") == Result::kOk);
    REQUIRE(k.startTyping("s1", "1") == Result::kOk);
    REQUIRE(k.startTyping("s1", "2") == Result::kOk);
    CHECK(warnings("typing timer") == 0);
    REQUIRE(k.startTyping("s2", "1") == Result::kOk);  // 3 > 2
    CHECK(warnings("high typing timer count: 3") == 1);
    REQUIRE(k.startTyping("s2", "2") == Result::kOk);
    CHECK(warnings("typing timer") == 1);
    rig.clock.advanceBy(Millis(4000));  // timers due, not fired: still 4
    CHECK(k.checkThresholds() == 0);
    rig.clock.advanceBy(Millis(60000));
    CHECK(k.checkThresholds() == 1);
    CHECK(warnings("high typing timer count: 4") == 1);
  }
  SECTION("tracked rooms per connection") {
    REQUIRE(k.connectAuthenticated("s1", "u") == Result::kOk);
    REQUIRE(k.trackRoom("s1", "r1") == Result::kOk);
    REQUIRE(k.trackRoom("s1", "r2") == Result::kOk);
    CHECK(warnings("room tracking exceeds") == 0);
    REQUIRE(k.trackRoom("s1", "r3") == Result::kOk);  // 3 > 2 x 1
    CHECK(
        warnings(
            "room tracking exceeds expected ratio: 3 tracked rooms for 1 connections") ==
        1);
    REQUIRE(k.trackRoom("s1", "r4") == Result::kOk);
    CHECK(k.checkThresholds() == 0);
    CHECK(warnings("room tracking exceeds") == 1);
    rig.clock.advanceBy(Millis(60000));
    CHECK(k.checkThresholds() == 1);
    CHECK(warnings("room tracking exceeds") == 2);
  }
  SECTION("below every threshold: nothing") {
    REQUIRE(k.connectAuthenticated("s1", "u") == Result::kOk);
    REQUIRE(k.trackRoom("s1", "r1") == Result::kOk);
    REQUIRE(k.startTyping("s1", "1") == Result::kOk);
    rig.clock.advanceBy(Millis(600000));
    CHECK(k.checkThresholds() == 0);
    CHECK(rig.logs.empty());
  }
}

TEST_CASE("the default thresholds are relative, with the original's numbers as floors",
          "[keeper]") {
  const KeeperOptions o;
  CHECK(o.warnTypingTimers == 100);
  CHECK(o.warnTypingPerSession == 2.0);
  CHECK(o.warnRoomsPerConnection == 16.0);
  CHECK(o.warnTrackedRooms == 1000);
  CHECK(o.warnSessionsWithoutConnection == 16);
  CHECK(o.warnConnections == 0);
  CHECK(o.authTimeout == Millis(30000));
  CHECK(o.typing.timeout == Millis(5000));
  CHECK(o.statsLogInterval == Millis(0));
}

// ------------------------------------------------------------ Exports ---

TEST_CASE("prometheusText parses back to getMemoryStats()", "[keeper]") {
  Rig rig;
  busyScene(rig);
  const MemoryStats st = rig.stats();
  CHECK(st.authTimeouts == 3);
  CHECK(st.forcedCleanups == 1);
  CHECK(st.callbackErrors == 1);
  CHECK(st.pendingPersistence > 0);
  CHECK(st.persistFailures >= 2);
  const std::string text = rig.keeper->prometheusText();
  INFO(text);
  REQUIRE(!text.empty());
  CHECK(text.back() == '\n');

  std::map<std::string, double> values;
  std::map<std::string, std::string> types;
  std::set<std::string> helps;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    INFO(line);
    REQUIRE(!line.empty());
    if (line.rfind("# HELP ", 0) == 0) {
      const std::string rest = line.substr(7);
      const std::size_t sp = rest.find(' ');
      REQUIRE(sp != std::string::npos);
      CHECK(rest.size() > sp + 1);  // a help text
      CHECK(helps.insert(rest.substr(0, sp)).second);
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      const std::string rest = line.substr(7);
      const std::size_t sp = rest.find(' ');
      REQUIRE(sp != std::string::npos);
      const std::string name = rest.substr(0, sp), type = rest.substr(sp + 1);
      CHECK((type == "gauge" || type == "counter"));
      CHECK(types.emplace(name, type).second);
      continue;
    }
    REQUIRE(line[0] != '#');
    const std::size_t sp = line.find(' ');
    REQUIRE(sp != std::string::npos);
    const std::string name = line.substr(0, sp), number = line.substr(sp + 1);
    REQUIRE(name.rfind("roomkeeper_", 0) == 0);
    for (const char c : name)
      CHECK((std::islower(static_cast<unsigned char>(c)) || c == '_'));
    // The HELP and TYPE lines come before the sample.
    CHECK(helps.count(name) == 1);
    CHECK(types.count(name) == 1);
    char* end = nullptr;
    const double v = std::strtod(number.c_str(), &end);
    REQUIRE(end == number.c_str() + number.size());
    CHECK(values.emplace(name, v).second);
    if (types[name] == "counter") CHECK(name.size() > 6);
    if (types[name] == "counter") CHECK(name.compare(name.size() - 6, 6, "_total") == 0);
  }
  CHECK(values == expectedByMetric(st));
  CHECK(helps.size() == values.size());
  CHECK(types.size() == values.size());
}

TEST_CASE("statsJson parses back to getMemoryStats()", "[keeper]") {
  Rig rig;
  SECTION("empty") {}
  SECTION("busy") { busyScene(rig); }
  const MemoryStats st = rig.stats();
  const std::string json = rig.keeper->statsJson();
  INFO(json);
  std::map<std::string, double> values;
  REQUIRE(parseFlatJson(json, &values));
  CHECK(values == expectedByJsonKey(st));
}

TEST_CASE("statsLogInterval logs one line every interval; 0 never", "[keeper]") {
  SECTION("every second") {
    KeeperOptions o;
    o.statsLogInterval = Millis(1000);
    Rig rig(o);
    REQUIRE(rig.keeper->connectAuthenticated("s1", "u") == Result::kOk);
    auto lines = [&] { return rig.logCount(LogLevel::kInfo, "roomkeeper: clients="); };
    CHECK(rig.stats().timersPending == 1);
    rig.stepMs(999);
    CHECK(lines() == 0);
    rig.stepMs(1);
    CHECK(lines() == 1);
    CHECK(rig.logCount(LogLevel::kInfo, "clients=1 users=1") == 1);
    rig.stepMs(1000);
    CHECK(lines() == 2);
    rig.stepMs(8000);
    CHECK(lines() == 10);
    rig.stepMs(999);
    CHECK(lines() == 10);
    REQUIRE(rig.keeper->disconnect("s1") == Result::kOk);
    rig.stepMs(1);
    CHECK(lines() == 11);
    CHECK(rig.logCount(LogLevel::kInfo, "clients=0 users=0") == 1);
    rig.keeper->shutdown();
    rig.stepMs(5000);
    CHECK(lines() == 11);  // stops with shutdown
    CHECK(rig.stats().timersPending == 0);
  }
  SECTION("0: off") {
    Rig rig;
    REQUIRE(rig.keeper->connectAuthenticated("s1", "u") == Result::kOk);
    rig.stepMs(20000);
    CHECK(rig.logCount(LogLevel::kInfo, "roomkeeper: clients=") == 0);
    CHECK(rig.stats().timersPending == 0);
  }
}

// -------------------------------------------------------------- Memory ---

TEST_CASE("every count returns to 0 and bytes stop growing after a workload",
          "[keeper]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  auto round = [&] {
    for (int i = 0; i < 40; ++i) {
      const std::string s = "session-with-a-long-id-" + std::to_string(i);
      REQUIRE(k.connect(s) == Result::kOk);
      if (i % 5 == 4) continue;  // left to the auth deadline
      REQUIRE(k.authenticate(s, "user-" + std::to_string(i % 9)) == Result::kOk);
      for (int r = 0; r < 6; ++r)
        REQUIRE(k.trackRoom(s, "thread:a-long-thread-id-" +
                                   std::to_string((i + r) % 11)) == Result::kOk);
      REQUIRE(
          roomkeeper::ok(k.startTyping(s, "a-long-thread-id-" + std::to_string(i % 11))));
    }
    rig.advanceMs(5000);
    for (int i = 0; i < 40; i += 2)
      (void)k.disconnect("session-with-a-long-id-" + std::to_string(i));
    rig.advanceMs(30000);
    for (int i = 1; i < 40; i += 2)
      (void)k.forceCleanup("session-with-a-long-id-" + std::to_string(i));
    rig.advanceMs(1000);
  };
  round();
  const MemoryStats first = rig.stats();
  requireEmpty(first);
  CHECK(first.timersPending == 0);
  round();
  round();
  const MemoryStats third = rig.stats();
  requireEmpty(third);
  INFO("first: " << Catch::StringMaker<MemoryStats>::convert(first));
  INFO("third: " << Catch::StringMaker<MemoryStats>::convert(third));
  CHECK(third.bytes == first.bytes);
}

TEST_CASE("handle-based calls match the id-based ones and go stale exactly",
          "[keeper][handle]") {
  roomkeeper::ManualClock clock;
  roomkeeper::KeeperOptions opt;
  opt.clock = &clock;
  opt.typing.requireMembership = false;  // not about the membership rule
  std::vector<std::string> left;
  roomkeeper::KeeperCallbacks cb;
  cb.leave = [&](std::string_view s, std::string_view r) {
    left.push_back(std::string(s) + ">" + std::string(r));
  };
  roomkeeper::Keeper k(cb, opt);
  roomkeeper::SessionHandle h;
  REQUIRE(k.connect("sock-1", &h) == roomkeeper::Result::kOk);
  CHECK(h.valid());
  CHECK(k.handleOf("sock-1") == h);
  CHECK(k.trackRoom(h, "job:1") == roomkeeper::Result::kNotAuthenticated);
  REQUIRE(k.authenticate("sock-1", "u1") == roomkeeper::Result::kOk);
  CHECK(k.trackRoom(h, "job:1") == roomkeeper::Result::kOk);
  CHECK(k.trackRoom(h, "job:1") == roomkeeper::Result::kAlreadyDone);
  CHECK(k.registry().isMember("sock-1", "job:1"));
  CHECK(k.startTyping(h, "7") == roomkeeper::Result::kOk);
  CHECK(k.startTyping(h, "7") == roomkeeper::Result::kAlreadyDone);
  CHECK(k.stopTyping(h, "7") == roomkeeper::Result::kOk);
  CHECK(k.untrackRoom(h, "job:1") == roomkeeper::Result::kOk);
  CHECK(k.trackRoom(h, "job:2") == roomkeeper::Result::kOk);
  CHECK(k.disconnect(h) == roomkeeper::Result::kOk);
  CHECK(left == std::vector<std::string>{"sock-1>job:1", "sock-1>job:2"});
  // Stale, even after the same id reconnects.
  CHECK(k.disconnect(h) == roomkeeper::Result::kStaleHandle);
  roomkeeper::SessionHandle h2;
  REQUIRE(k.connectAuthenticated("sock-1", "u1", &h2) == roomkeeper::Result::kOk);
  CHECK(h2 != h);
  const roomkeeper::MemoryStats before = k.getMemoryStats();
  CHECK(k.trackRoom(h, "job:3") == roomkeeper::Result::kStaleHandle);
  CHECK(k.startTyping(h, "7") == roomkeeper::Result::kStaleHandle);
  CHECK(k.stopTyping(h, "7") == roomkeeper::Result::kStaleHandle);
  CHECK(k.untrackRoom(h, "job:3") == roomkeeper::Result::kStaleHandle);
  CHECK(k.forceCleanup(h) == roomkeeper::Result::kStaleHandle);
  CHECK(k.getMemoryStats().trackedRooms == before.trackedRooms);
  CHECK(k.getMemoryStats().bytes == before.bytes);
  CHECK(k.forceCleanup(h2) == roomkeeper::Result::kOk);
  CHECK(k.getMemoryStats().forcedCleanups == 1);
  CHECK(k.getMemoryStats().connectedClients == 0);
}

TEST_CASE("Keeper calls from inside a registry visitor are refused, not undefined",
          "[keeper][reentrancy]") {
  roomkeeper::ManualClock clock;
  roomkeeper::KeeperOptions opt;
  opt.clock = &clock;
  roomkeeper::Keeper k(roomkeeper::KeeperCallbacks{}, opt);
  for (int i = 0; i < 6; ++i) {
    const std::string s = "sock-" + std::to_string(i);
    REQUIRE(k.connectAuthenticated(s, "u" + std::to_string(i)) == roomkeeper::Result::kOk);
    REQUIRE(k.trackRoom(s, "r") == roomkeeper::Result::kOk);
  }
  const roomkeeper::MemoryStats before = k.getMemoryStats();
  std::vector<roomkeeper::Result> results;
  std::size_t visited = k.registry().forEachMember("r", [&](std::string_view s) {
    results.push_back(k.disconnect(s));
    results.push_back(k.forceCleanup(s));
    results.push_back(k.startTyping(s, "t"));
    results.push_back(k.stopTyping(s, "t"));
    results.push_back(k.trackRoom(s, "other"));
    results.push_back(k.untrackRoom(s, "r"));
    CHECK(k.clearRoomTracking(s) == 0);
    CHECK(k.advance() == 0);
    CHECK(k.shutdown().sessionsClosed == 0);
  });
  CHECK(visited == 6);
  for (const roomkeeper::Result r : results) CHECK(r == roomkeeper::Result::kBusy);
  visited = k.registry().forEachSession([&](std::string_view s) {
    CHECK(k.disconnect(s) == roomkeeper::Result::kBusy);
  });
  CHECK(visited == 6);
  CHECK_FALSE(k.isShutDown());
  const roomkeeper::MemoryStats after = k.getMemoryStats();
  CHECK(after.connectedClients == before.connectedClients);
  CHECK(after.trackedRooms == before.trackedRooms);
  CHECK(after.typingTimers == 0);
  CHECK(after.bytes == before.bytes);
}

// ---- Hardening (issue #10) ----------------------------------------------

TEST_CASE("Millis::max() means never, for every duration option", "[keeper][hardening]") {
  ManualClock clock;
  KeeperOptions o;
  o.clock = &clock;
  o.authTimeout = Millis::max();
  o.typing.timeout = Millis::max();
  o.typing.retryInitial = Millis::max();
  o.typing.retryMax = Millis::max();
  o.warnInterval = Millis::max();
  o.statsLogInterval = Millis::max();
  o.typing.requireMembership = false;
  int closed = 0, logs = 0;
  KeeperCallbacks cb;
  cb.closeSession = [&](std::string_view, std::string_view) { ++closed; };
  cb.persist = [](const PersistCall&) { return false; };  // retried "never"
  cb.log = [&](LogLevel, std::string_view) { ++logs; };
  Keeper k(cb, o);
  REQUIRE(k.connect("anon") == Result::kOk);
  REQUIRE(k.connectAuthenticated("s1", "u1") == Result::kOk);
  REQUIRE(k.startTyping("s1", "7") == Result::kOk);
  for (int i = 0; i < 3; ++i) {
    clock.advanceBy(std::chrono::hours(24 * 365));
    k.advance();
  }
  CHECK(closed == 0);
  CHECK(k.registry().isConnected("anon"));
  CHECK(k.getMemoryStats().typingTimers == 1);
  CHECK(k.getMemoryStats().authTimeouts == 0);
  CHECK(k.getMemoryStats().persistFailures == 1);  // one attempt, no retry yet
  CHECK(k.nextDeadline().has_value());
}

TEST_CASE("an anonymous session whose id is a user id is not that user",
          "[keeper][hardening]") {
  Rig rig;
  Keeper& k = *rig.keeper;
  REQUIRE(k.connectAuthenticated("s1", "alice") == Result::kOk);
  REQUIRE(k.startTyping("s1", "7") == Result::kOk);
  REQUIRE(k.connect("alice") == Result::kOk);  // anonymous, id "alice"
  rig.calls.clear();
  CHECK(k.stopTyping("alice", "7") == Result::kAlreadyDone);
  CHECK(k.typing().isTyping("alice", "7"));
  CHECK(rig.calls.empty());  // nothing emitted, nothing persisted
  CHECK(k.disconnect("alice") == Result::kOk);
  CHECK(k.typing().isTyping("alice", "7"));
  // Standalone, an anonymous indicator never joins or ends a user's.
  ManualClock clock;
  roomkeeper::SessionRegistry reg;
  roomkeeper::TimerService timers(&clock);
  roomkeeper::TypingOptions to;
  to.requireMembership = false;
  std::vector<PersistCall> persisted;
  roomkeeper::TypingCallbacks tc;
  tc.persist = [&](const PersistCall& c) {
    persisted.push_back(c);
    return true;
  };
  roomkeeper::TypingTimerManager typing(reg, timers, tc, to);
  REQUIRE(reg.connect("bob-session", "bob") == Result::kOk);
  REQUIRE(reg.connect("bob") == Result::kOk);
  REQUIRE(typing.startTyping("bob-session", "T") == Result::kOk);
  CHECK(typing.startTyping("bob", "T") == Result::kOk);  // its own indicator
  CHECK(typing.stats().indicators == 2);
  CHECK(typing.stopTyping("bob", "T") == Result::kOk);
  CHECK(typing.isTyping("bob", "T"));  // the user's indicator is untouched
  // Only the user's start was persisted: anonymous indicators never are.
  REQUIRE(persisted.size() == 1);
  CHECK(persisted[0].user == "bob");
}

TEST_CASE("startTyping needs membership of the thread's room by default",
          "[keeper][hardening]") {
  ManualClock clock;
  KeeperOptions o;
  o.clock = &clock;
  std::vector<std::string> emits;
  int persisted = 0;
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view s, std::string_view e, std::string_view) {
    emits.push_back(std::string(s) + ":" + std::string(e));
  };
  cb.persist = [&](const PersistCall&) {
    ++persisted;
    return true;
  };
  Keeper k(cb, o);
  REQUIRE(k.connectAuthenticated("s1", "u1") == Result::kOk);
  REQUIRE(k.connectAuthenticated("s2", "u2") == Result::kOk);
  REQUIRE(k.trackRoom("s2", "thread:9") == Result::kOk);
  const MemoryStats before = k.getMemoryStats();
  CHECK(k.startTyping("s1", "9") == Result::kNotMember);
  CHECK(toString(Result::kNotMember) == "not_member");
  CHECK(emits.empty());
  CHECK(persisted == 0);
  CHECK(k.getMemoryStats() == before);
  REQUIRE(k.trackRoom("s1", "thread:9") == Result::kOk);
  CHECK(k.startTyping("s1", "9") == Result::kOk);
  CHECK(emits == std::vector<std::string>{"s2:typingStarted"});
  CHECK(persisted == 1);
}

TEST_CASE("the persistence queue stays within its bound with a call in flight",
          "[keeper][hardening]") {
  for (std::size_t bound : {0u, 1u, 2u, 3u}) {
    INFO("maxPendingPersist " << bound);
    ManualClock clock;
    KeeperOptions o;
    o.clock = &clock;
    o.typing.maxPendingPersist = bound;
    o.typing.requireMembership = false;
    Keeper* kp = nullptr;
    std::size_t maxSeen = 0;
    int calls = 0;
    KeeperCallbacks cb;
    cb.persist = [&](const PersistCall&) {
      // While this call is in flight, more calls are made.
      if (++calls == 1) {
        for (int i = 0; i < 10; ++i) {
          (void)kp->startTyping("s1", std::to_string(i));
          maxSeen = std::max(maxSeen, kp->getMemoryStats().pendingPersistence);
        }
      }
      return true;
    };
    Keeper k(cb, o);
    kp = &k;
    REQUIRE(k.connectAuthenticated("s1", "u1") == Result::kOk);
    REQUIRE(k.startTyping("s1", "first") == Result::kOk);
    CHECK(maxSeen <= std::max<std::size_t>(bound, 2));
    CHECK(k.getMemoryStats().persistDropped > 0);
  }
}

TEST_CASE("bytes return to 0 after an auth timeout takes the last session",
          "[keeper][hardening]") {
  ManualClock clock;
  KeeperOptions o;
  o.clock = &clock;
  Keeper k({}, o);
  REQUIRE(k.getMemoryStats().bytes == 0);
  REQUIRE(k.connect("s1") == Result::kOk);
  CHECK(k.getMemoryStats().bytes > 0);
  clock.advanceBy(std::chrono::seconds(31));
  k.advance();
  CHECK(k.getMemoryStats().authTimeouts == 1);
  requireEmpty(k.getMemoryStats());
  CHECK(k.getMemoryStats().bytes == 0);
}

TEST_CASE("bytes count the persistence queue", "[keeper][hardening]") {
  ManualClock clock;
  KeeperOptions o;
  o.clock = &clock;
  o.typing.requireMembership = false;
  bool up = false;
  KeeperCallbacks cb;
  cb.persist = [&](const PersistCall&) { return up; };
  Keeper k(cb, o);
  REQUIRE(k.connectAuthenticated("s1", "a-user-id-longer-than-fifteen") == Result::kOk);
  const std::size_t base = k.getMemoryStats().bytes;
  for (int i = 0; i < 50; ++i) {
    REQUIRE(k.startTyping("s1", "a-thread-longer-than-fifteen-" + std::to_string(i)) ==
            Result::kOk);
    REQUIRE(k.stopTyping("s1", "a-thread-longer-than-fifteen-" + std::to_string(i)) ==
            Result::kOk);
  }
  const MemoryStats st = k.getMemoryStats();
  REQUIRE(st.pendingPersistence == 100);
  // Each waiting call holds at least its two long strings.
  CHECK(st.bytes >= base + 100 * (30 + 29));
  up = true;
  clock.advanceBy(std::chrono::minutes(1));
  k.advance();
  CHECK(k.getMemoryStats().pendingPersistence == 0);
  CHECK(k.disconnect("s1") == Result::kOk);
  CHECK(k.getMemoryStats().bytes == 0);
}

TEST_CASE("shutdown's report says why it did nothing", "[keeper][hardening]") {
  Keeper k;
  REQUIRE(k.connectAuthenticated("s1", "u1") == Result::kOk);
  ShutdownReport inVisitor{Result::kOk};
  k.registry().forEachSession([&](std::string_view) { inVisitor = k.shutdown(); });
  CHECK(inVisitor.result == Result::kBusy);
  const ShutdownReport first = k.shutdown();
  CHECK(first.result == Result::kOk);
  CHECK(first.sessionsClosed == 1);
  CHECK(k.shutdown().result == Result::kShutDown);
}

// Runs `f` in a child process; true if the child died of SIGABRT.
#include <sys/wait.h>
#include <unistd.h>
static bool abortsInChild(const std::function<void()>& f) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::freopen("/dev/null", "w", stderr);
    f();
    std::_Exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

TEST_CASE("destroying a Keeper from its own callback is refused loudly",
          "[keeper][hardening]") {
  CHECK(abortsInChild([] {
    Keeper* k = nullptr;
    KeeperCallbacks cb;
    cb.closeSession = [&](std::string_view, std::string_view) { delete k; };
    k = new Keeper(cb);
    (void)k->connectAuthenticated("s1", "u1");
    (void)k->shutdown();
  }));
  // Destroyed after the call returns: fine.
  CHECK_FALSE(abortsInChild([] {
    auto k = std::make_unique<Keeper>();
    (void)k->connectAuthenticated("s1", "u1");
    (void)k->shutdown();
    k.reset();
  }));
}

TEST_CASE("a moved-from registry is empty and refuses, never crashes",
          "[keeper][hardening]") {
  roomkeeper::SessionRegistry a;
  REQUIRE(a.connect("s1", "u1") == Result::kOk);
  REQUIRE(a.trackRoom("s1", "r") == Result::kOk);
  roomkeeper::SessionRegistry b(std::move(a));
  CHECK(b.isMember("s1", "r"));
  const roomkeeper::RegistryStats st = a.getMemoryStats();  // NOLINT: use after move
  CHECK(st.sessions == 0);
  CHECK(st.bytes == 0);
  CHECK(a.connect("s2") == Result::kShutDown);
  CHECK(a.trackRoom("s1", "r") == Result::kShutDown);
  CHECK_FALSE(a.isConnected("s1"));
  CHECK(a.roomsOf("s1").empty());
  CHECK(a.forEachSession([](std::string_view) {}) == 0);
  CHECK(a.clearRoomTracking("s1") == 0);
  CHECK(a.limits().maxRoomsPerSession == roomkeeper::Limits{}.maxRoomsPerSession);
  a = std::move(b);  // revived
  CHECK(a.isMember("s1", "r"));
}

// ---- Leak warnings with the default thresholds (issue #16) --------------

namespace {
// A dispatch day at `n` sessions with the default options: every session
// logged in, in its role, user and crew rooms, 3 job rooms and a thread,
// half of them typing. Returns the warnings logged.
struct Day {
  ManualClock clock;
  std::vector<std::string> warnings;
  std::unique_ptr<Keeper> k;
  explicit Day(std::size_t n) {
    KeeperOptions o;
    o.clock = &clock;
    KeeperCallbacks cb;
    cb.log = [this](LogLevel l, std::string_view m) {
      if (l == LogLevel::kWarning) warnings.emplace_back(m);
    };
    k = std::make_unique<Keeper>(cb, o);
    for (std::size_t i = 0; i < n; ++i) {
      const std::string s = "sock-" + std::to_string(i), u = "user-" + std::to_string(i);
      const std::string thread = std::to_string(i % 500);
      REQUIRE(k->connect(s) == Result::kOk);
      REQUIRE(k->authenticate(s, u) == Result::kOk);
      for (const std::string& r :
           {std::string(i % 10 == 0 ? "role:dispatcher" : "role:crew"), "user:" + u,
            "crew:" + std::to_string(i % 300), "job:" + std::to_string(i % 2000),
            "job:" + std::to_string((i + 7) % 2000), "job:" + std::to_string((i + 13) % 2000),
            "thread:" + thread})
        REQUIRE(k->trackRoom(s, r) == Result::kOk);
      if (i % 2 == 0) REQUIRE(k->startTyping(s, thread) == Result::kOk);
    }
  }
  std::size_t count(std::string_view needle) const {
    return static_cast<std::size_t>(std::count_if(
        warnings.begin(), warnings.end(),
        [&](const std::string& w) { return w.find(needle) != std::string::npos; }));
  }
};
}  // namespace

TEST_CASE("a normal dispatch day at 20,000 sessions logs no leak warning",
          "[keeper][warnings]") {
  Day day(20000);
  CHECK(day.k->checkTransport(20000) == 0);
  day.clock.advanceBy(std::chrono::minutes(2));
  CHECK(day.k->checkThresholds() == 0);
  CHECK(day.warnings.empty());
  // And at a small size, too.
  Day small(50);
  CHECK(small.k->checkThresholds() == 0);
  CHECK(small.warnings.empty());
}

TEST_CASE("injected leaks each log their own warning", "[keeper][warnings]") {
  Day day(2000);
  REQUIRE(day.warnings.empty());
  SECTION("typing started and never stopped") {
    // A host that starts typing in every thread a session is in and never
    // stops it (keeping it alive): 10 indicators per session.
    for (int i = 0; i < 600; ++i) {
      const std::string s = "sock-" + std::to_string(i);
      for (int t = 0; t < 10; ++t) {
        const std::string thread = "leak-" + std::to_string(t);
        REQUIRE(day.k->trackRoom(s, "thread:" + thread) == Result::kOk);
        REQUIRE(day.k->startTyping(s, thread) == Result::kOk);
      }
    }
    CHECK(day.count("high typing timer count") == 1);
    CHECK(day.count("room tracking") == 0);
  }
  SECTION("rooms joined and never left") {
    // Every job room ever opened stays joined: 40 per session.
    for (int i = 0; i < 2000; ++i)
      for (int j = 0; j < 33; ++j)
        REQUIRE(day.k->trackRoom("sock-" + std::to_string(i), "old-job:" + std::to_string(j)) ==
                Result::kOk);
    CHECK(day.count("room tracking exceeds") == 1);
    CHECK(day.count("typing") == 0);
  }
  SECTION("sessions whose connection is gone") {
    // The transport closed 100 sockets and never told the Keeper.
    CHECK(day.k->checkTransport(2000 - 100) == 1);
    CHECK(day.count("100 entries have no connection") == 1);
    CHECK(day.k->checkTransport(1900) == 0);  // rate-limited
    CHECK(day.count("room tracking") + day.count("typing") == 0);
  }
  SECTION("a few closes in flight are not a leak") {
    CHECK(day.k->checkTransport(2000 - 16) == 0);
    CHECK(day.warnings.empty());
  }
}
