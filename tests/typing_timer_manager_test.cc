// SPDX-License-Identifier: MIT
//
// TypingTimerManager: the 5 s auto-clear, restart, stop, one indicator per
// user per thread, who hears typingStarted/typingStopped, the wildcard
// persistence call, limits, invalid ids, and that every count (and the byte
// count) comes back when everything is gone. Each behaviour is checked on
// the standalone manager (SessionRegistry + TimerService) and through
// Keeper. Time is a ManualClock: nothing here sleeps.
#include <roomkeeper/keeper.h>
#include <roomkeeper/session_registry.h>
#include <roomkeeper/timer_service.h>
#include <roomkeeper/typing_timer_manager.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstddef>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace Catch {
template <>
struct StringMaker<roomkeeper::Result> {
  static std::string convert(roomkeeper::Result r) {
    return std::string(roomkeeper::toString(r));
  }
};
}  // namespace Catch

namespace {

using roomkeeper::Keeper;
using roomkeeper::KeeperCallbacks;
using roomkeeper::KeeperOptions;
using roomkeeper::LogLevel;
using roomkeeper::ManualClock;
using roomkeeper::Millis;
using roomkeeper::PersistCall;
using roomkeeper::PersistOp;
using roomkeeper::Result;
using roomkeeper::SessionRegistry;
using roomkeeper::TimerService;
using roomkeeper::TypingCallbacks;
using roomkeeper::TypingOptions;
using roomkeeper::TypingStats;
using roomkeeper::TypingTimerManager;

struct Emit {
  std::string to, event, payload;
};

std::string payloadOf(std::string_view thread, std::string_view user) {
  return "{\"threadId\":\"" + std::string(thread) + "\",\"userId\":\"" +
         std::string(user) + "\"}";
}

std::string describe(const TypingStats& s) {
  std::ostringstream o;
  o << "indicators=" << s.indicators << " timers=" << s.timers
    << " sessionsTyping=" << s.sessionsTyping << " persistPending=" << s.persistPending
    << " bytes=" << s.bytes;
  return o.str();
}

bool sameState(const TypingStats& a, const TypingStats& b) {
  return a.indicators == b.indicators && a.timers == b.timers &&
         a.sessionsTyping == b.sessionsTyping && a.persistPending == b.persistPending &&
         a.persistDelivered == b.persistDelivered && a.bytes == b.bytes;
}

// What both rigs record.
struct Recorder {
  std::vector<Emit> emits;
  std::vector<PersistCall> persisted;
  std::vector<std::string> logs;

  std::size_t count(std::string_view event) const {
    return static_cast<std::size_t>(std::count_if(
        emits.begin(), emits.end(), [&](const Emit& e) { return e.event == event; }));
  }
  std::vector<std::string> recipients(std::string_view event) const {
    std::vector<std::string> out;
    for (const Emit& e : emits)
      if (e.event == event) out.push_back(e.to);
    std::sort(out.begin(), out.end());
    return out;
  }
  std::size_t persistCount(PersistOp op) const {
    return static_cast<std::size_t>(
        std::count_if(persisted.begin(), persisted.end(),
                      [&](const PersistCall& c) { return c.op == op; }));
  }
  void clear() {
    emits.clear();
    persisted.clear();
  }
};

// TypingTimerManager on its own SessionRegistry and TimerService.
struct StandaloneRig {
  static constexpr const char* kName = "standalone";
  // The rigs test everything but the membership rule (its own cases below
  // run with the default), so their typers need not join the thread room.
  explicit StandaloneRig(TypingOptions o = {})
      : typing(reg, timers, callbacks(), withoutMembershipRule(std::move(o))) {}
  static TypingOptions withoutMembershipRule(TypingOptions o) {
    o.requireMembership = false;
    return o;
  }

  TypingCallbacks callbacks() {
    TypingCallbacks cb;
    cb.emit = [this](std::string_view to, std::string_view ev, std::string_view p) {
      rec.emits.push_back({std::string(to), std::string(ev), std::string(p)});
    };
    cb.persist = [this](const PersistCall& c) {
      rec.persisted.push_back(c);
      return true;
    };
    cb.log = [this](LogLevel, std::string_view m) { rec.logs.emplace_back(m); };
    return cb;
  }

  Result connect(std::string_view s, std::string_view u) { return reg.connect(s, u); }
  Result join(std::string_view s, std::string_view room) {
    return reg.trackRoom(s, room);
  }
  Result start(std::string_view s, std::string_view t) {
    return typing.startTyping(s, t);
  }
  Result stop(std::string_view s, std::string_view t) { return typing.stopTyping(s, t); }
  Result disconnect(std::string_view s) {
    typing.onDisconnect(s);
    return reg.disconnect(s);
  }
  void advanceMs(long ms) {
    clock.advanceBy(Millis(ms));
    timers.advance();
  }
  bool isTyping(std::string_view u, std::string_view t) const {
    return typing.isTyping(u, t);
  }
  TypingStats stats() const { return typing.stats(); }
  std::size_t timersPending() const { return timers.size(); }

  Recorder rec;
  ManualClock clock;
  TimerService timers{&clock};
  SessionRegistry reg;
  TypingTimerManager typing;
};

// The same through Keeper (sessions authenticated in the handshake).
struct KeeperRig {
  static constexpr const char* kName = "keeper";
  explicit KeeperRig(TypingOptions o = {}) : keeper(callbacks(), options(std::move(o))) {}

  KeeperCallbacks callbacks() {
    KeeperCallbacks cb;
    cb.emit = [this](std::string_view to, std::string_view ev, std::string_view p) {
      rec.emits.push_back({std::string(to), std::string(ev), std::string(p)});
    };
    cb.persist = [this](const PersistCall& c) {
      rec.persisted.push_back(c);
      return true;
    };
    cb.log = [this](LogLevel, std::string_view m) { rec.logs.emplace_back(m); };
    return cb;
  }
  KeeperOptions options(TypingOptions o) {
    KeeperOptions k;
    k.typing = StandaloneRig::withoutMembershipRule(std::move(o));
    k.clock = &clock;
    return k;
  }

  Result connect(std::string_view s, std::string_view u) {
    return keeper.connectAuthenticated(s, u);
  }
  Result join(std::string_view s, std::string_view room) {
    return keeper.trackRoom(s, room);
  }
  Result start(std::string_view s, std::string_view t) {
    return keeper.startTyping(s, t);
  }
  Result stop(std::string_view s, std::string_view t) { return keeper.stopTyping(s, t); }
  Result disconnect(std::string_view s) { return keeper.disconnect(s); }
  void advanceMs(long ms) {
    clock.advanceBy(Millis(ms));
    keeper.advance();
  }
  bool isTyping(std::string_view u, std::string_view t) const {
    return keeper.typing().isTyping(u, t);
  }
  TypingStats stats() const { return keeper.typing().stats(); }
  std::size_t timersPending() const { return keeper.timers().size(); }

  Recorder rec;
  ManualClock clock;
  Keeper keeper;
};

// alice on a1 (and a2), bob on b1, all in thread:42.
template <typename Rig>
void aliceAndBob(Rig& rig, bool secondDevice = false) {
  REQUIRE(rig.connect("a1", "alice") == Result::kOk);
  REQUIRE(rig.connect("b1", "bob") == Result::kOk);
  REQUIRE(rig.join("a1", "thread:42") == Result::kOk);
  REQUIRE(rig.join("b1", "thread:42") == Result::kOk);
  if (secondDevice) {
    REQUIRE(rig.connect("a2", "alice") == Result::kOk);
    REQUIRE(rig.join("a2", "thread:42") == Result::kOk);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("typing clears itself at exactly the timeout", "[typing]",
                   StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  REQUIRE(rig.isTyping("alice", "42"));
  REQUIRE(rig.rec.emits.size() == 1);
  CHECK(rig.rec.emits[0].to == "b1");
  CHECK(rig.rec.emits[0].event == "typingStarted");
  CHECK(rig.rec.emits[0].payload == payloadOf("42", "alice"));
  REQUIRE(rig.rec.persisted.size() == 1);
  CHECK(rig.rec.persisted[0].op == PersistOp::kTypingStarted);
  CHECK(rig.rec.persisted[0].user == "alice");
  CHECK(rig.rec.persisted[0].thread == "42");
  CHECK(rig.stats().timers == 1);

  rig.advanceMs(4999);
  CHECK(rig.isTyping("alice", "42"));
  CHECK(rig.rec.count("typingStopped") == 0);
  CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 0);

  rig.advanceMs(1);  // 5000 ms: due now, and delivered by this advance
  CHECK_FALSE(rig.isTyping("alice", "42"));
  CHECK(rig.rec.recipients("typingStopped") == std::vector<std::string>{"b1"});
  REQUIRE(rig.rec.emits.size() == 2);
  CHECK(rig.rec.emits[1].payload == payloadOf("42", "alice"));
  REQUIRE(rig.rec.persisted.size() == 2);
  CHECK(rig.rec.persisted[1].op == PersistOp::kTypingStopped);
  CHECK(rig.rec.persisted[1].user == "alice");
  CHECK(rig.rec.persisted[1].thread == "42");
  const TypingStats st = rig.stats();
  CHECK(st.indicators == 0);
  CHECK(st.timers == 0);
  CHECK(st.sessionsTyping == 0);
  CHECK(st.persistPending == 0);
  CHECK(st.persistDelivered == 2);

  // Nothing more happens later.
  rig.advanceMs(60000);
  CHECK(rig.rec.emits.size() == 2);
  CHECK(rig.rec.persisted.size() == 2);
}

TEMPLATE_TEST_CASE("a repeated startTyping pushes the auto-clear back", "[typing]",
                   StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  rig.advanceMs(3000);
  CHECK(rig.start("a1", "42") == Result::kAlreadyDone);  // a keystroke
  CHECK(rig.rec.emits.size() == 1);                      // no second typingStarted
  CHECK(rig.rec.persisted.size() == 1);
  CHECK(rig.stats().indicators == 1);
  CHECK(rig.stats().timers == 1);

  rig.advanceMs(2000);  // 5000 ms after the first start: not yet
  CHECK(rig.isTyping("alice", "42"));
  rig.advanceMs(2999);  // 7999
  CHECK(rig.isTyping("alice", "42"));
  CHECK(rig.rec.count("typingStopped") == 0);
  rig.advanceMs(1);  // 8000 = 3000 + 5000
  CHECK_FALSE(rig.isTyping("alice", "42"));
  CHECK(rig.rec.count("typingStopped") == 1);
  CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 1);
}

TEMPLATE_TEST_CASE("stopTyping twice: kOk then kAlreadyDone, one typingStopped",
                   "[typing]", StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  rig.rec.clear();
  CHECK(rig.stop("a1", "42") == Result::kOk);
  CHECK(rig.stop("a1", "42") == Result::kAlreadyDone);
  CHECK_FALSE(rig.isTyping("alice", "42"));
  CHECK(rig.rec.recipients("typingStopped") == std::vector<std::string>{"b1"});
  CHECK(rig.rec.emits.size() == 1);
  CHECK(rig.rec.persisted.size() == 1);
  CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 1);
  CHECK(rig.stats().timers == 0);
  CHECK(rig.timersPending() == 0);  // the auto-clear was cancelled, not left behind
  // Stopping a thread nobody types in is also kAlreadyDone.
  CHECK(rig.stop("b1", "42") == Result::kAlreadyDone);
  rig.advanceMs(10000);
  CHECK(rig.rec.emits.size() == 1);
  CHECK(rig.rec.persisted.size() == 1);
}

TEMPLATE_TEST_CASE("two devices of one user in one thread are one indicator", "[typing]",
                   StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig, /*secondDevice=*/true);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  CHECK(rig.start("a2", "42") == Result::kAlreadyDone);
  CHECK(rig.rec.count("typingStarted") == 1);
  CHECK(rig.rec.recipients("typingStarted") == std::vector<std::string>{"b1"});
  CHECK(rig.rec.persistCount(PersistOp::kTypingStarted) == 1);
  TypingStats st = rig.stats();
  CHECK(st.indicators == 1);
  CHECK(st.timers == 1);
  CHECK(st.sessionsTyping == 2);

  SECTION("stopTyping from either device ends the user's indicator once") {
    CHECK(rig.stop("a2", "42") == Result::kOk);
    CHECK(rig.stop("a1", "42") == Result::kAlreadyDone);
    CHECK(rig.rec.count("typingStopped") == 1);
    CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 1);
    st = rig.stats();
    CHECK(st.indicators == 0);
    CHECK(st.sessionsTyping == 0);
  }
  SECTION("the auto-clear ends it once, 5 s after the later keystroke") {
    rig.advanceMs(2000);
    CHECK(rig.start("a2", "42") == Result::kAlreadyDone);
    rig.advanceMs(4999);
    CHECK(rig.isTyping("alice", "42"));
    rig.advanceMs(1);
    CHECK_FALSE(rig.isTyping("alice", "42"));
    CHECK(rig.rec.count("typingStopped") == 1);
    CHECK(rig.stats().sessionsTyping == 0);
  }
  SECTION("one device leaving keeps the indicator; the last one ends it") {
    REQUIRE(rig.disconnect("a1") == Result::kOk);
    CHECK(rig.isTyping("alice", "42"));
    CHECK(rig.rec.count("typingStopped") == 0);
    CHECK(rig.stats().sessionsTyping == 1);
    REQUIRE(rig.disconnect("a2") == Result::kOk);
    CHECK_FALSE(rig.isTyping("alice", "42"));
    CHECK(rig.rec.count("typingStopped") == 1);
    CHECK(rig.stats().sessionsTyping == 0);
  }
}

TEMPLATE_TEST_CASE("typing events go to the thread room, never to the typer's sessions",
                   "[typing]", StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig, /*secondDevice=*/true);
  REQUIRE(rig.connect("a3", "alice") == Result::kOk);  // alice, not in the room
  REQUIRE(rig.connect("c1", "carol") == Result::kOk);  // other rooms only
  REQUIRE(rig.join("c1", "thread:420") == Result::kOk);
  REQUIRE(rig.join("c1", "job:42") == Result::kOk);
  REQUIRE(rig.connect("d1", "dave") == Result::kOk);
  REQUIRE(rig.join("d1", "thread:42") == Result::kOk);
  REQUIRE(rig.join("d1", "job:42") == Result::kOk);
  REQUIRE(rig.connect("d2", "dave") == Result::kOk);  // dave's second device
  REQUIRE(rig.join("d2", "thread:42") == Result::kOk);

  REQUIRE(rig.start("a1", "42") == Result::kOk);
  const std::vector<std::string> expected{"b1", "d1", "d2"};
  CHECK(rig.rec.recipients("typingStarted") == expected);
  for (const Emit& e : rig.rec.emits) CHECK(e.payload == payloadOf("42", "alice"));
  REQUIRE(rig.stop("a2", "42") == Result::kOk);  // stopped from the other device
  CHECK(rig.rec.recipients("typingStopped") == expected);

  // Bob typing: alice's sessions in the room hear it, bob does not.
  rig.rec.clear();
  REQUIRE(rig.start("b1", "42") == Result::kOk);
  CHECK(rig.rec.recipients("typingStarted") ==
        (std::vector<std::string>{"a1", "a2", "d1", "d2"}));

  // A thread whose room has no members: nobody hears it, persistence still does.
  rig.rec.clear();
  REQUIRE(rig.start("a1", "9") == Result::kOk);
  CHECK(rig.rec.emits.empty());
  CHECK(rig.rec.persistCount(PersistOp::kTypingStarted) == 1);
}

TEMPLATE_TEST_CASE(
    "the wildcard persistence call comes with the user's last session only", "[typing]",
    StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig, /*secondDevice=*/true);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  REQUIRE(rig.start("a1", "7") == Result::kOk);
  rig.rec.clear();

  REQUIRE(rig.disconnect("a1") == Result::kOk);
  // a1's indicators end (a2 never typed in them), but alice is still online.
  CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 2);
  CHECK(rig.rec.persistCount(PersistOp::kTypingStoppedAll) == 0);
  CHECK_FALSE(rig.isTyping("alice", "42"));
  CHECK_FALSE(rig.isTyping("alice", "7"));

  rig.rec.clear();
  REQUIRE(rig.disconnect("a2") == Result::kOk);
  REQUIRE(rig.rec.persisted.size() == 1);
  CHECK(rig.rec.persisted[0].op == PersistOp::kTypingStoppedAll);
  CHECK(rig.rec.persisted[0].user == "alice");
  CHECK(rig.rec.persisted[0].thread.empty());

  // bob never typed: his last session still sends the wildcard (the
  // original's stopTyping('*', user) on every authenticated disconnect).
  rig.rec.clear();
  REQUIRE(rig.disconnect("b1") == Result::kOk);
  REQUIRE(rig.rec.persisted.size() == 1);
  CHECK(rig.rec.persisted[0].op == PersistOp::kTypingStoppedAll);
  CHECK(rig.rec.persisted[0].user == "bob");
}

TEMPLATE_TEST_CASE("maxTypingPerSession refuses with kTooManyRooms, changing nothing",
                   "[typing]", StandaloneRig, KeeperRig) {
  TypingOptions o;
  o.maxTypingPerSession = 2;
  TestType rig(o);
  INFO(TestType::kName);
  aliceAndBob(rig, /*secondDevice=*/true);
  REQUIRE(rig.start("a1", "1") == Result::kOk);
  REQUIRE(rig.start("a1", "2") == Result::kOk);
  REQUIRE(rig.start("a2", "42") == Result::kOk);  // alice types in 42 on a2
  const TypingStats before = rig.stats();
  const std::size_t emits = rig.rec.emits.size();
  const std::size_t persisted = rig.rec.persisted.size();
  const std::size_t pending = rig.timersPending();

  rig.advanceMs(1000);
  CHECK(rig.start("a1", "3") == Result::kTooManyRooms);   // a new indicator
  CHECK(rig.start("a1", "42") == Result::kTooManyRooms);  // joining alice's on a2
  const TypingStats after = rig.stats();
  INFO("before: " << describe(before) << "\nafter: " << describe(after));
  CHECK(sameState(before, after));
  CHECK(rig.rec.emits.size() == emits);
  CHECK(rig.rec.persisted.size() == persisted);
  CHECK(rig.timersPending() == pending);
  CHECK_FALSE(rig.isTyping("alice", "3"));

  // The refused call did not push 42's auto-clear back: it ends at 5000.
  rig.advanceMs(3999);
  CHECK(rig.isTyping("alice", "42"));
  rig.advanceMs(1);
  CHECK_FALSE(rig.isTyping("alice", "42"));
  CHECK_FALSE(rig.isTyping("alice", "1"));
  // Room again: a1 may start a third thread now.
  CHECK(rig.start("a1", "3") == Result::kOk);
}

TEMPLATE_TEST_CASE("invalid thread ids and unknown sessions are refused", "[typing]",
                   StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  aliceAndBob(rig);
  const TypingStats before = rig.stats();
  CHECK(rig.start("a1", "") == Result::kInvalidId);
  CHECK(rig.start("a1", std::string(256, 't')) == Result::kInvalidId);
  CHECK(rig.stop("a1", "") == Result::kInvalidId);
  CHECK(rig.stop("a1", std::string(256, 't')) == Result::kInvalidId);
  CHECK(rig.start("nobody", "42") == Result::kNotConnected);
  CHECK(rig.stop("nobody", "42") == Result::kNotConnected);
  CHECK(rig.start("", "42") == Result::kNotConnected);
  CHECK(sameState(before, rig.stats()));
  CHECK(rig.rec.emits.empty());
  CHECK(rig.rec.persisted.empty());
  CHECK(rig.timersPending() == 0);

  // The longest valid id is fine.
  CHECK(rig.start("a1", std::string(255, 't')) == Result::kOk);
  CHECK(rig.isTyping("alice", std::string(255, 't')));

  // After disconnect: kNotConnected, and nothing is allocated.
  REQUIRE(rig.disconnect("a1") == Result::kOk);
  const TypingStats gone = rig.stats();
  CHECK(rig.start("a1", "42") == Result::kNotConnected);
  CHECK(rig.stop("a1", "42") == Result::kNotConnected);
  CHECK(sameState(gone, rig.stats()));
}

TEMPLATE_TEST_CASE("every count and the bytes come back when everything is gone",
                   "[typing]", StandaloneRig, KeeperRig) {
  TestType rig;
  INFO(TestType::kName);
  const TypingStats empty = rig.stats();
  CHECK(empty.indicators == 0);

  auto workload = [&](int round) {
    const std::string longThread(40, static_cast<char>('a' + round));  // on the heap
    for (int i = 0; i < 20; ++i) {
      const std::string s = "s" + std::to_string(i);
      const std::string u = "user-with-a-long-name-" + std::to_string(i % 7);
      REQUIRE(rig.connect(s, u) == Result::kOk);
      REQUIRE(rig.join(s, "thread:" + longThread) == Result::kOk);
      for (int t = 0; t < 5; ++t) {
        const Result r = rig.start(s, longThread + std::to_string(t));
        REQUIRE(roomkeeper::ok(r));
      }
    }
    const TypingStats busy = rig.stats();
    CHECK(busy.indicators == 7 * 5);
    CHECK(busy.sessionsTyping == 20);
    CHECK(busy.bytes > empty.bytes);
    // Some stop, some expire, the rest go with their sessions.
    for (int i = 0; i < 7; ++i)
      CHECK(rig.stop("s" + std::to_string(i), longThread + "0") == Result::kOk);
    rig.advanceMs(1000);
    for (int i = 0; i < 20; i += 3)
      CHECK(roomkeeper::ok(rig.start("s" + std::to_string(i), longThread + "1")));
    rig.advanceMs(4500);  // those not restarted expired
    for (int i = 0; i < 20; ++i)
      REQUIRE(rig.disconnect("s" + std::to_string(i)) == Result::kOk);
  };

  workload(0);
  const TypingStats after1 = rig.stats();
  INFO("empty: " << describe(empty) << "\nafter one round: " << describe(after1));
  CHECK(after1.indicators == 0);
  CHECK(after1.timers == 0);
  CHECK(after1.sessionsTyping == 0);
  CHECK(after1.persistPending == 0);
  CHECK(rig.timersPending() == 0);
  CHECK(after1.bytes == empty.bytes);

  workload(1);
  const TypingStats after2 = rig.stats();
  INFO("after two rounds: " << describe(after2));
  CHECK(after2.indicators == 0);
  CHECK(after2.bytes == empty.bytes);
  CHECK(after2.persistDelivered == rig.rec.persisted.size());
}

TEST_CASE("clearTypingTimers(session) ends only that session's indicators", "[typing]") {
  StandaloneRig rig;
  aliceAndBob(rig, /*secondDevice=*/true);
  REQUIRE(rig.start("a1", "1") == Result::kOk);
  REQUIRE(rig.start("a1", "2") == Result::kOk);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  CHECK(rig.start("a2", "42") == Result::kAlreadyDone);  // a2 keeps 42 alive
  REQUIRE(rig.start("b1", "1") == Result::kOk);
  REQUIRE(rig.start("b1", "3") == Result::kOk);
  // Many unrelated sessions typing: clearing one session does not touch them.
  for (int i = 0; i < 50; ++i) {
    const std::string s = "x" + std::to_string(i);
    REQUIRE(rig.connect(s, "user" + std::to_string(i)) == Result::kOk);
    REQUIRE(rig.start(s, "1") == Result::kOk);
  }
  rig.rec.clear();

  CHECK(rig.typing.clearTypingTimers("a1") == 3);
  CHECK_FALSE(rig.isTyping("alice", "1"));
  CHECK_FALSE(rig.isTyping("alice", "2"));
  CHECK(rig.isTyping("alice", "42"));  // still typed on a2
  CHECK(rig.isTyping("bob", "1"));
  CHECK(rig.isTyping("bob", "3"));
  for (int i = 0; i < 50; ++i) CHECK(rig.isTyping("user" + std::to_string(i), "1"));
  CHECK(rig.rec.count("typingStopped") == 0);  // threads 1 and 2 have no room members
  CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 2);
  CHECK(rig.rec.persistCount(PersistOp::kTypingStoppedAll) == 0);
  const TypingStats st = rig.stats();
  CHECK(st.indicators == 1 + 2 + 50);
  CHECK(st.sessionsTyping == 1 + 1 + 50);  // a2, b1, the x's

  // Repeat and unknown: nothing.
  CHECK(rig.typing.clearTypingTimers("a1") == 0);
  CHECK(rig.typing.clearTypingTimers("nobody") == 0);
  CHECK(rig.reg.isConnected("a1"));  // the session stays connected
  // a1 may type again.
  CHECK(rig.start("a1", "2") == Result::kOk);

  // The last contributor of 42 clears: it ends, thread:42 hears it.
  rig.rec.clear();
  CHECK(rig.typing.clearTypingTimers("a2") == 1);
  CHECK_FALSE(rig.isTyping("alice", "42"));
  CHECK(rig.rec.recipients("typingStopped") == std::vector<std::string>{"b1"});
}

TEST_CASE("standalone: clearAll ends every indicator", "[typing]") {
  StandaloneRig rig;
  aliceAndBob(rig);
  REQUIRE(rig.start("a1", "42") == Result::kOk);
  REQUIRE(rig.start("b1", "42") == Result::kOk);
  REQUIRE(rig.start("b1", "7") == Result::kOk);
  rig.rec.clear();
  CHECK(rig.typing.clearAll() == 3);
  CHECK(rig.stats().indicators == 0);
  CHECK(rig.stats().sessionsTyping == 0);
  CHECK(rig.timersPending() == 0);
  CHECK(rig.rec.persistCount(PersistOp::kTypingStopped) == 3);
  CHECK(rig.typing.clearAll() == 0);
}

// A bare manager on its own registry and timers, no membership required.
struct BareTyping {
  static roomkeeper::TypingOptions options() {
    roomkeeper::TypingOptions o;
    o.requireMembership = false;
    return o;
  }
  roomkeeper::ManualClock clock;
  roomkeeper::SessionRegistry reg;
  roomkeeper::TimerService timers{&clock};
  roomkeeper::TypingTimerManager typing{reg, timers, {}, options()};
};

TEST_CASE_METHOD(BareTyping, "standalone: typing started anonymously still stops after bindUser",
                 "[typing]") {
  REQUIRE(reg.connect("s1") == roomkeeper::Result::kOk);
  REQUIRE(typing.startTyping("s1", "T") == roomkeeper::Result::kOk);
  REQUIRE(reg.bindUser("s1", "u1") == roomkeeper::Result::kOk);
  // An anonymous indicator is the session's own, not a user's.
  CHECK_FALSE(typing.isTyping("s1", "T"));
  CHECK(typing.stats().indicators == 1);
  CHECK(typing.stopTyping("s1", "T") == roomkeeper::Result::kOk);
  CHECK(typing.stats().indicators == 0);
  // Typing again now starts the user's own indicator.
  CHECK(typing.startTyping("s1", "T") == roomkeeper::Result::kOk);
  CHECK(typing.isTyping("u1", "T"));
  CHECK(typing.stats().indicators == 1);
  typing.onDisconnect("s1");
  CHECK(reg.disconnect("s1") == roomkeeper::Result::kOk);
  CHECK(typing.stats().indicators == 0);
  CHECK(typing.stats().sessionsTyping == 0);
}

// The manager keeps each session's typing list beside the registry's slot,
// by slot and session generation. A host that skips onDisconnect (a misuse)
// leaves a list behind in that slot; the slot's next session must not see
// it, and it must not be counted twice nor keep its bytes once it is gone.
TEST_CASE_METHOD(BareTyping,
                 "standalone: a skipped onDisconnect leaves nothing to the slot's next session",
                 "[typing]") {
  const std::size_t emptyBytes = typing.stats().bytes;

  roomkeeper::SessionHandle h1, h2;
  REQUIRE(reg.connect("s1", {}, &h1) == Result::kOk);
  REQUIRE(typing.startTyping("s1", "T") == Result::kOk);
  REQUIRE(typing.startTyping("s1", "U") == Result::kOk);
  CHECK(typing.stats().sessionsTyping == 1);
  CHECK(typing.stats().bytes > emptyBytes);
  REQUIRE(reg.disconnect("s1") == Result::kOk);  // typing.onDisconnect skipped

  REQUIRE(reg.connect("s2", {}, &h2) == Result::kOk);
  REQUIRE(h2.index == h1.index);  // the same slot, a later session
  // s2 has no indicator of its own: s1's list is not s2's.
  CHECK(typing.stopTyping("s2", "T") == Result::kAlreadyDone);
  CHECK(typing.clearTypingTimers("s2") == 0);
  CHECK(typing.stats().indicators == 2);  // s1's run on until they expire
  // s2 types: its own list replaces s1's, and one session is typing.
  CHECK(typing.startTyping("s2", "T") == Result::kOk);
  CHECK(typing.stats().indicators == 3);
  CHECK(typing.stats().sessionsTyping == 1);
  CHECK(typing.stopTyping("s2", "U") == Result::kAlreadyDone);  // s1's, not s2's

  // Every indicator expires; s1's find their session gone and touch nothing.
  clock.advanceBy(std::chrono::seconds(5));
  timers.advance(clock.now());
  const TypingStats st = typing.stats();
  CHECK(st.indicators == 0);
  CHECK(st.sessionsTyping == 0);
  CHECK(st.bytes == emptyBytes);  // the list pages went with the last typer
  typing.onDisconnect("s2");
  CHECK(reg.disconnect("s2") == Result::kOk);
  CHECK(typing.stats().bytes == emptyBytes);
}

// The same misuse when no later session types: the left list empties as
// its indicators end, whether the slot is free (its pages gone with the
// last session) or held by a session that never types.
TEST_CASE_METHOD(BareTyping,
                 "standalone: a list left by a skipped onDisconnect empties as its indicators end",
                 "[typing]") {
  const std::size_t emptyBytes = typing.stats().bytes;
  SECTION("the slot stays free") {
    REQUIRE(reg.connect("s1") == Result::kOk);
    REQUIRE(typing.startTyping("s1", "T") == Result::kOk);
    REQUIRE(reg.disconnect("s1") == Result::kOk);  // typing.onDisconnect skipped
  }
  SECTION("the slot's next session never types") {
    roomkeeper::SessionHandle h1, h2;
    REQUIRE(reg.connect("s1", {}, &h1) == Result::kOk);
    REQUIRE(typing.startTyping("s1", "T") == Result::kOk);
    REQUIRE(reg.disconnect("s1") == Result::kOk);  // typing.onDisconnect skipped
    REQUIRE(reg.connect("s2", {}, &h2) == Result::kOk);
    REQUIRE(h2.index == h1.index);
  }
  CHECK(typing.stats().sessionsTyping == 1);
  clock.advanceBy(std::chrono::seconds(5));
  timers.advance(clock.now());
  const TypingStats st = typing.stats();
  CHECK(st.indicators == 0);
  CHECK(st.sessionsTyping == 0);
  CHECK(st.bytes == emptyBytes);
}
