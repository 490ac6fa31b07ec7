// SPDX-License-Identifier: MIT
//
// TimerService with a ManualClock (never sleeping): firing exactly once and
// never early, restart and cancel in every state, extreme durations, order,
// stale handles, re-entrant and throwing callbacks, time going backwards,
// stalls, bounded advance over a million timers, nextDeadline, memory, and a
// randomized model test.
#include <roomkeeper/timer_service.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <catch2/catch.hpp>

namespace {

using namespace std::chrono_literals;
using roomkeeper::LogLevel;
using roomkeeper::ManualClock;
using roomkeeper::SteadyTime;
using roomkeeper::TimerHandle;
using roomkeeper::TimerHandlerId;
using roomkeeper::TimerService;
using std::chrono::hours;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;

// A start that is not the clock's zero, aligned on a millisecond.
const SteadyTime kStart = SteadyTime{} + hours(5);

/// Records (data, clock time) of every firing.
struct Log {
  struct Fire {
    std::uint32_t data;
    SteadyTime at;
    TimerHandle handle;
  };
  std::vector<Fire> fires;
  std::vector<std::uint32_t> data() const {
    std::vector<std::uint32_t> out;
    for (const Fire& f : fires) out.push_back(f.data);
    return out;
  }
};

TimerHandlerId recordInto(TimerService& timers, const ManualClock& clock, Log& log) {
  return timers.addHandler([&clock, &log](TimerHandle h, std::uint32_t d) {
    log.fires.push_back({d, clock.now(), h});
  });
}

// The ManualClock's time through now() only: no cell(), so the service
// calls now() on every arm and restart (the path every other clock takes).
class CalledClock final : public roomkeeper::Clock {
 public:
  explicit CalledClock(const ManualClock& c) : c_(c) {}
  SteadyTime now() const noexcept override { return c_.now(); }

 private:
  const ManualClock& c_;
};

std::uint64_t ceilMs(nanoseconds d) {
  const auto n = static_cast<std::uint64_t>(d.count());
  return (n + 999999u) / 1000000u;
}

// ------------------------------------------------------------ firing ---

TEST_CASE("a timer fires once, never early, within 1 ms when advanced in 1 ms steps",
          "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);

  // Arm at a later, millisecond-aligned time so ticks and steps line up.
  clock.advanceBy(17ms);
  CHECK(timers.advance() == 0);
  const SteadyTime armedAt = clock.now();

  std::vector<nanoseconds> delays = {
      1ns,          999999ns,     1ms,          1ms + 1ns,         1500us,
      2ms,          63ms,         64ms,         65ms,              100ms + 7ns,
      4095ms,       4096ms,       4097ms,       5s + 123456ns,     262143ms,
      262144ms,     262145ms + 1ns, 299999ms + 999999ns, 300s};
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<std::int64_t> any(1, 300'000'000'000LL);
  for (int i = 0; i < 300; ++i) delays.push_back(nanoseconds(any(rng)));
  std::vector<TimerHandle> handles;
  for (std::size_t i = 0; i < delays.size(); ++i)
    handles.push_back(timers.arm(delays[i], h, static_cast<std::uint32_t>(i)));
  CHECK(timers.size() == delays.size());

  std::size_t steps = 0;
  while (clock.now() < armedAt + 301s) {
    clock.advanceBy(1ms);
    timers.advance();
    ++steps;
  }
  CHECK(timers.size() == 0);
  REQUIRE(log.fires.size() == delays.size());
  std::vector<int> count(delays.size(), 0);
  for (const Log::Fire& f : log.fires) {
    const nanoseconds d = delays[f.data];
    INFO("delay " << d.count() << " ns, fired after " << (f.at - armedAt).count() << " ns");
    ++count[f.data];
    CHECK(f.at >= armedAt + d);          // never early
    CHECK(f.at < armedAt + d + 1ms);     // within one tick
    CHECK(f.handle == handles[f.data]);  // with the handle arm() returned
    CHECK_FALSE(timers.isPending(handles[f.data]));
  }
  for (int c : count) CHECK(c == 1);
  // Deadline order across the whole run.
  for (std::size_t i = 1; i < log.fires.size(); ++i)
    CHECK(log.fires[i - 1].at <= log.fires[i].at);
}

TEST_CASE("never early when the host's steps are not aligned on ticks", "[timer]") {
  ManualClock clock(kStart + 123457ns);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::int64_t> any(0, 20'000'000'000LL);
  std::vector<std::pair<SteadyTime, nanoseconds>> armed;
  for (int round = 0; round < 200; ++round) {
    clock.advanceBy(nanoseconds(std::uniform_int_distribution<int>(1, 3'000'000)(rng)));
    timers.advance();
    const nanoseconds d(any(rng));
    armed.emplace_back(clock.now(), d);
    (void)timers.arm(d, h, static_cast<std::uint32_t>(round));
  }
  while (timers.size() > 0) {
    clock.advanceBy(nanoseconds(std::uniform_int_distribution<int>(1, 2'500'000)(rng)));
    timers.advance();
  }
  REQUIRE(log.fires.size() == armed.size());
  for (const Log::Fire& f : log.fires) {
    const auto& [at, d] = armed[f.data];
    CHECK(f.at >= at + d);
    // One tick of rounding plus the host's step (at most 3 ms).
    CHECK(f.at < at + d + 1ms + 3ms);
  }
}

// ----------------------------------------------------------- restart ---

TEST_CASE("restart moves a timer later or earlier", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);

  SECTION("later") {
    const TimerHandle t = timers.arm(100ms, h, 1);
    clock.advanceBy(50ms);
    CHECK(timers.advance() == 0);
    CHECK(timers.restart(t, 100ms));
    CHECK(timers.isPending(t));
    clock.advanceBy(50ms);  // the old deadline
    CHECK(timers.advance() == 0);
    clock.advanceBy(49ms);
    CHECK(timers.advance() == 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    REQUIRE(log.fires.size() == 1);
    CHECK(log.fires[0].at == kStart + 150ms);
    CHECK(log.fires[0].handle == t);
  }
  SECTION("earlier") {
    const TimerHandle t = timers.arm(10s, h, 2);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 0);
    CHECK(timers.restart(t, 10ms));
    clock.advanceBy(9ms);
    CHECK(timers.advance() == 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(log.fires.at(0).at == kStart + 11ms);
    clock.advanceBy(20s);
    CHECK(timers.advance() == 0);  // the old 10 s deadline is gone
  }
  SECTION("many restarts (a keystroke each): fires once, after the last") {
    const TimerHandle t = timers.arm(5s, h, 3);
    for (int i = 0; i < 1000; ++i) {
      clock.advanceBy(100ms);
      CHECK(timers.advance() == 0);
      CHECK(timers.restart(t, 5s));
    }
    CHECK(timers.size() == 1);
    clock.advanceBy(5s);
    CHECK(timers.advance() == 1);
    CHECK(log.fires.at(0).at == kStart + 105s);
  }
  SECTION("moved later (kept in its old slot), then cancelled or moved earlier") {
    const TimerHandle t = timers.arm(100ms, h, 6);
    const TimerHandle u = timers.arm(100ms, h, 7);
    clock.advanceBy(30ms);
    CHECK(timers.restart(t, 300ms));  // lazy: now due at 330 ms
    CHECK(timers.restart(u, 300ms));
    CHECK(timers.cancel(t));          // found in the slot it was left in
    CHECK_FALSE(timers.isPending(t));
    CHECK(timers.restart(u, 50ms));   // earlier than 330: moved now, to 80 ms
    clock.advanceBy(49ms);
    CHECK(timers.advance() == 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{7});
    CHECK(log.fires.at(0).at == kStart + 80ms);
    clock.advanceBy(1s);
    CHECK(timers.advance() == 0);
    CHECK(timers.size() == 0);
  }
  SECTION("moved later across coarse slots: fires at the new deadline, once") {
    std::vector<TimerHandle> ts;
    for (std::uint32_t i = 0; i < 64; ++i) ts.push_back(timers.arm(5s, h, 100 + i));
    for (int round = 1; round <= 3; ++round) {
      clock.advanceBy(4s);
      CHECK(timers.advance() == 0);
      for (const TimerHandle& x : ts) CHECK(timers.restart(x, 5s));  // never fires
    }
    clock.advanceBy(4999ms);
    CHECK(timers.advance() == 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 64);
    for (const Log::Fire& f : log.fires) CHECK(f.at == kStart + 17s);
  }
  SECTION("a due timer not yet run, moved later, leaves the due set") {
    const TimerHandle a = timers.arm(5ms, h, 10);
    const TimerHandle b = timers.arm(5ms, h, 11);
    clock.advanceBy(5ms);
    CHECK(timers.advance(clock.now(), 1) == 1);
    CHECK(timers.dueCount() == 1);
    CHECK(timers.isPending(b));
    CHECK(timers.restart(b, 10ms));
    CHECK(timers.dueCount() == 0);
    CHECK(timers.advance() == 0);
    clock.advanceBy(10ms);
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{10, 11});
    CHECK(log.fires[1].at == kStart + 15ms);
    CHECK_FALSE(timers.restart(a, 1ms));  // fired
  }
  SECTION("a due timer restarted with zero delay stays due") {
    (void)timers.arm(5ms, h, 10);
    const TimerHandle b = timers.arm(5ms, h, 11);
    clock.advanceBy(5ms);
    CHECK(timers.advance(clock.now(), 1) == 1);
    CHECK(timers.restart(b, 0ns));
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{10, 11});
  }
  SECTION("stale handles are refused") {
    const TimerHandle t = timers.arm(1ms, h, 4);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK_FALSE(timers.restart(t, 1ms));  // fired
    const TimerHandle c = timers.arm(1ms, h, 5);
    CHECK(timers.cancel(c));
    CHECK_FALSE(timers.restart(c, 1ms));  // cancelled
    CHECK_FALSE(timers.restart(TimerHandle{}, 1ms));
    CHECK_FALSE(timers.restart(TimerHandle{123456, 7}, 1ms));
    CHECK(timers.size() == 0);
    clock.advanceBy(10ms);
    CHECK(timers.advance() == 0);
  }
}

// ------------------------------------------------------------ cancel ---

TEST_CASE("cancel in every state", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);

  SECTION("pending: true, and it never fires") {
    const TimerHandle t = timers.arm(10ms, h, 1);
    CHECK(timers.isPending(t));
    CHECK(timers.dataOf(t) == std::optional<std::uint32_t>(1));
    CHECK(timers.cancel(t));
    CHECK_FALSE(timers.isPending(t));
    CHECK_FALSE(timers.dataOf(t).has_value());
    CHECK(timers.size() == 0);
    clock.advanceBy(1h);
    CHECK(timers.advance() == 0);
    CHECK(log.fires.empty());
    CHECK_FALSE(timers.cancel(t));  // already cancelled
  }
  SECTION("due, not yet run after a bounded advance: true, and it never fires") {
    (void)timers.arm(5ms, h, 1);
    const TimerHandle b = timers.arm(5ms, h, 2);
    const TimerHandle c = timers.arm(5ms, h, 3);
    clock.advanceBy(6ms);
    CHECK(timers.advance(clock.now(), 1) == 1);
    CHECK(timers.dueCount() == 2);
    CHECK(timers.isPending(b));
    CHECK(timers.cancel(b));
    CHECK(timers.dueCount() == 1);
    CHECK(timers.size() == 1);
    CHECK_FALSE(timers.cancel(b));
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{1, 3});
    CHECK(timers.dueCount() == 0);
    CHECK_FALSE(timers.cancel(c));  // fired
  }
  SECTION("fired: false") {
    const TimerHandle t = timers.arm(1ms, h, 1);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK_FALSE(timers.cancel(t));
    CHECK_FALSE(timers.isPending(t));
  }
  SECTION("zero delay, before the advance: true") {
    const TimerHandle t = timers.arm(0ns, h, 1);
    CHECK(timers.cancel(t));
    CHECK(timers.dueCount() == 0);
    CHECK(timers.advance() == 0);
  }
  SECTION("its own handle, from inside its callback: false (it is running)") {
    bool result = true;
    bool pendingInside = true;
    TimerHandle self;
    const TimerHandlerId own = timers.addHandler([&](TimerHandle me, std::uint32_t) {
      CHECK(me == self);
      pendingInside = timers.isPending(me);
      result = timers.cancel(me);
    });
    self = timers.arm(1ms, own, 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK_FALSE(result);
    CHECK_FALSE(pendingInside);
    CHECK(timers.size() == 0);
  }
  SECTION("null and never-issued handles: false") {
    CHECK_FALSE(timers.cancel(TimerHandle{}));
    CHECK_FALSE(timers.cancel(TimerHandle{0, 1}));
    CHECK_FALSE(timers.cancel(TimerHandle{99999999, 3}));
    CHECK_FALSE(timers.isPending(TimerHandle{0, 1}));
  }
  SECTION("cancelAll") {
    for (std::uint32_t i = 0; i < 10; ++i) (void)timers.arm(milliseconds(i * 1000), h, i);
    CHECK(timers.cancelAll() == 10);
    CHECK(timers.size() == 0);
    CHECK(timers.dueCount() == 0);
    CHECK_FALSE(timers.nextDeadline().has_value());
    clock.advanceBy(1h);
    CHECK(timers.advance() == 0);
    CHECK(timers.cancelAll() == 0);
  }
}

// ---------------------------------------------------------- durations ---

TEST_CASE("zero and negative delays are due at once", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  clock.advanceBy(3ms);
  timers.advance();
  (void)timers.arm(0ns, h, 1);
  (void)timers.arm(-5s, h, 2);
  (void)timers.arm(nanoseconds::min(), h, 3);
  (void)timers.arm(-1ns, h, 4);
  REQUIRE(timers.nextDeadline().has_value());
  CHECK(*timers.nextDeadline() <= clock.now());
  // Fires in the next advance(), without the clock moving.
  CHECK(timers.advance() == 4);
  CHECK(log.data() == std::vector<std::uint32_t>{1, 2, 3, 4});
  for (const Log::Fire& f : log.fires) CHECK(f.at == kStart + 3ms);
  CHECK(timers.size() == 0);
  CHECK_FALSE(timers.nextDeadline().has_value());
}

TEST_CASE("huge delays: 100 years, and nanoseconds::max()", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  const nanoseconds century = hours(24 * 365 * 100);

  SECTION("100 years: not before, exactly at, via nextDeadline steps") {
    const TimerHandle t = timers.arm(century, h, 1);
    const SteadyTime deadline = kStart + century;
    int steps = 0;
    while (log.fires.empty()) {
      REQUIRE(++steps < 2000);
      const auto nd = timers.nextDeadline();
      REQUIRE(nd.has_value());
      CHECK(*nd > clock.now());
      CHECK(*nd <= deadline);
      clock.set(*nd);
      timers.advance();
    }
    CHECK(log.fires.size() == 1);
    CHECK(log.fires[0].at == deadline);
    CHECK_FALSE(timers.isPending(t));
  }
  SECTION("100 years: a big jump short of it, then to it") {
    (void)timers.arm(century, h, 1);
    clock.set(kStart + century - 1ms);
    CHECK(timers.advance() == 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
  }
  SECTION("nanoseconds::max(): pending, a deadline in the future, cancellable") {
    const TimerHandle t = timers.arm(nanoseconds::max(), h, 2);
    CHECK(timers.isPending(t));
    const auto nd = timers.nextDeadline();
    REQUIRE(nd.has_value());
    // Not in the past (a host sleeping until then must not spin).
    CHECK(*nd > clock.now());
    CHECK(*nd > kStart + century);
    clock.advanceBy(century);
    CHECK(timers.advance() == 0);
    CHECK(timers.isPending(t));
    // Its deadline lies beyond the largest time the clock can show.
    CHECK(timers.advance(SteadyTime::max()) == 0);
    CHECK(timers.isPending(t));
    CHECK(timers.cancel(t));
    CHECK(timers.size() == 0);
    CHECK(log.fires.empty());
  }
  SECTION("a short timer next to a huge one still fires on time") {
    (void)timers.arm(nanoseconds::max(), h, 1);
    (void)timers.arm(century, h, 2);
    (void)timers.arm(7ms, h, 3);
    clock.advanceBy(7ms);
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{3});
    CHECK(timers.size() == 2);
  }
}

// ------------------------------------------------------------- order ---

TEST_CASE("same deadline: timers fire in the order they were armed", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);

  const nanoseconds delay = GENERATE(0ns, 1ms, 50ms, 64ms, 5000ms, 300000ms, 20000000ms);
  INFO("delay " << delay.count());
  clock.advanceBy(3ms);
  timers.advance();
  std::vector<std::uint32_t> want;
  for (std::uint32_t i = 0; i < 200; ++i) {
    (void)timers.arm(delay, h, i);
    want.push_back(i);
  }
  SECTION("one jump") {
    clock.advanceBy(delay);
    CHECK(timers.advance() == 200);
  }
  SECTION("stepping via nextDeadline") {
    while (timers.size() > 0) {
      const auto nd = timers.nextDeadline();
      REQUIRE(nd.has_value());
      clock.set(std::max(clock.now(), *nd));
      timers.advance();
    }
  }
  CHECK(log.data() == want);
  for (const Log::Fire& f : log.fires) CHECK(f.at == kStart + 3ms + delay);
}

TEST_CASE("same deadline reached from different arm times; a restart to the same tick "
          "keeps its place",
          "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  // All due at kStart + 5000 ms, armed at different times (different levels).
  (void)timers.arm(5000ms, h, 0);
  clock.advanceBy(1000ms);
  timers.advance();
  (void)timers.arm(4000ms, h, 1);
  clock.advanceBy(3950ms);
  timers.advance();
  (void)timers.arm(50ms, h, 2);
  const TimerHandle x = timers.arm(50ms, h, 3);
  (void)timers.arm(50ms, h, 4);
  CHECK(timers.restart(x, 50ms));  // same tick: lazy, it stays before 4
  clock.advanceBy(50ms);
  CHECK(timers.advance() == 5);
  CHECK(log.data() == std::vector<std::uint32_t>{0, 1, 2, 3, 4});
}

// --------------------------------------------------- stale handles ---

TEST_CASE("stale handles never touch a newer timer in a reused node (ABA)", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);

  SECTION("after cancel") {
    const TimerHandle old = timers.arm(10ms, h, 1);
    REQUIRE(timers.cancel(old));
    const TimerHandle fresh = timers.arm(20ms, h, 2);
    REQUIRE(fresh.index == old.index);  // the node was reused: the ABA case
    CHECK(fresh != old);
    CHECK_FALSE(timers.isPending(old));
    CHECK_FALSE(timers.dataOf(old).has_value());
    CHECK_FALSE(timers.cancel(old));
    CHECK_FALSE(timers.restart(old, 1ms));
    CHECK(timers.isPending(fresh));
    CHECK(timers.dataOf(fresh) == std::optional<std::uint32_t>(2));
    clock.advanceBy(20ms);
    CHECK(timers.advance() == 1);
    REQUIRE(log.fires.size() == 1);
    CHECK(log.fires[0].data == 2);
    CHECK(log.fires[0].at == kStart + 20ms);
  }
  SECTION("after firing") {
    const TimerHandle old = timers.arm(1ms, h, 1);
    clock.advanceBy(1ms);
    REQUIRE(timers.advance() == 1);
    const TimerHandle fresh = timers.arm(5ms, h, 2);
    REQUIRE(fresh.index == old.index);
    CHECK_FALSE(timers.cancel(old));
    CHECK_FALSE(timers.restart(old, 0ns));
    CHECK(timers.isPending(fresh));
    clock.advanceBy(5ms);
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{1, 2});
  }
  SECTION("many generations of one node") {
    std::vector<TimerHandle> old;
    for (std::uint32_t i = 0; i < 1000; ++i) {
      const TimerHandle t = timers.arm(1ms, h, i);
      for (std::size_t k = old.size() > 20 ? old.size() - 20 : 0; k < old.size(); ++k) {
        CHECK_FALSE(timers.cancel(old[k]));
        CHECK(timers.isPending(t));
      }
      CHECK(timers.cancel(t));
      old.push_back(t);
    }
    CHECK(timers.size() == 0);
  }
  SECTION("after shrinkToFit frees the pages") {
    std::vector<TimerHandle> old;
    for (std::uint32_t i = 0; i < 5000; ++i) old.push_back(timers.arm(1s, h, i));
    CHECK(timers.cancelAll() == 5000);
    timers.shrinkToFit();
    // No page held: restart's inline case must not read one.
    for (const TimerHandle& t : old) CHECK_FALSE(timers.restart(t, 1s));
    std::vector<TimerHandle> fresh;
    for (std::uint32_t i = 0; i < 5000; ++i) fresh.push_back(timers.arm(2s, h, 100000 + i));
    for (const TimerHandle& t : old) {
      CHECK_FALSE(timers.isPending(t));
      CHECK_FALSE(timers.restart(t, 5s));  // would push a fresh timer back
      CHECK_FALSE(timers.cancel(t));
    }
    CHECK(timers.size() == 5000);
    clock.advanceBy(2s);
    CHECK(timers.advance() == 5000);
    for (const Log::Fire& f : log.fires) CHECK(f.data >= 100000);
  }
}

// ------------------------------------------------------ re-entrancy ---

TEST_CASE("callbacks may arm, restart and cancel timers", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId plain = recordInto(timers, clock, log);

  SECTION("cancel a sibling due in the same batch: it does not fire") {
    TimerHandle victim;
    bool cancelled = false;
    const TimerHandlerId killer = timers.addHandler([&](TimerHandle, std::uint32_t) {
      cancelled = timers.cancel(victim);
    });
    (void)timers.arm(5ms, killer, 0);
    victim = timers.arm(5ms, plain, 1);
    (void)timers.arm(5ms, plain, 2);
    clock.advanceBy(5ms);
    CHECK(timers.advance() == 2);
    CHECK(cancelled);
    CHECK(log.data() == std::vector<std::uint32_t>{2});
    clock.advanceBy(1s);
    CHECK(timers.advance() == 0);
    CHECK(timers.size() == 0);
  }
  SECTION("cancel a sibling due at a later tick of the same batch (after a stall)") {
    TimerHandle victim;
    const TimerHandlerId killer = timers.addHandler([&](TimerHandle, std::uint32_t) {
      CHECK(timers.cancel(victim));
    });
    (void)timers.arm(5ms, killer, 0);
    victim = timers.arm(700ms, plain, 1);
    clock.advanceBy(10s);
    CHECK(timers.advance() == 1);
    CHECK(log.fires.empty());
  }
  SECTION("restart a sibling due in the same batch: it waits for the next advance") {
    TimerHandle now0;
    TimerHandle later;
    const TimerHandlerId mover = timers.addHandler([&](TimerHandle, std::uint32_t) {
      CHECK(timers.restart(now0, 0ns));
      CHECK(timers.restart(later, 3ms));
    });
    (void)timers.arm(5ms, mover, 0);
    now0 = timers.arm(5ms, plain, 1);
    later = timers.arm(5ms, plain, 2);
    (void)timers.arm(5ms, plain, 3);
    clock.advanceBy(5ms);
    CHECK(timers.advance() == 2);  // mover and 3
    CHECK(log.data() == std::vector<std::uint32_t>{3});
    CHECK(timers.size() == 2);
    CHECK(timers.advance() == 1);  // 1, at the same time
    CHECK(log.data() == std::vector<std::uint32_t>{3, 1});
    clock.advanceBy(2ms);
    CHECK(timers.advance() == 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{3, 1, 2});
    CHECK(log.fires.back().at == kStart + 8ms);
  }
  SECTION("restart itself: the same handle fires again later") {
    int calls = 0;
    std::vector<SteadyTime> at;
    std::vector<TimerHandle> seen;
    const TimerHandlerId again = timers.addHandler([&](TimerHandle me, std::uint32_t) {
      at.push_back(clock.now());
      seen.push_back(me);
      if (++calls < 3) {
        CHECK(timers.restart(me, 10ms));
        CHECK(timers.isPending(me));
      }
    });
    const TimerHandle t = timers.arm(10ms, again, 0);
    for (int i = 0; i < 50; ++i) {
      clock.advanceBy(1ms);
      timers.advance();
      if (calls < 3) {
        CHECK(timers.size() == 1);
        CHECK(timers.isPending(t));
      }
    }
    CHECK(calls == 3);
    CHECK(at == std::vector<SteadyTime>{kStart + 10ms, kStart + 20ms, kStart + 30ms});
    CHECK(seen == std::vector<TimerHandle>{t, t, t});
    CHECK(timers.size() == 0);
    CHECK_FALSE(timers.isPending(t));
    CHECK_FALSE(timers.nextDeadline().has_value());
  }
  SECTION("restart itself with zero delay: not in the same advance (no busy loop)") {
    int calls = 0;
    const TimerHandlerId again = timers.addHandler([&](TimerHandle me, std::uint32_t) {
      ++calls;
      CHECK(timers.restart(me, 0ns));
    });
    (void)timers.arm(1ms, again, 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(calls == 1);
    CHECK(timers.size() == 1);
    CHECK(timers.advance() == 1);  // same time: the next advance
    CHECK(timers.advance() == 1);
    CHECK(calls == 3);
    CHECK(timers.size() == 1);
    CHECK(timers.cancelAll() == 1);
    CHECK(timers.size() == 0);
  }
  SECTION("restart itself, then cancel itself") {
    const TimerHandlerId fickle = timers.addHandler([&](TimerHandle me, std::uint32_t) {
      CHECK(timers.restart(me, 5ms));
      CHECK(timers.cancel(me));
      CHECK_FALSE(timers.isPending(me));
    });
    (void)timers.arm(1ms, fickle, 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(timers.size() == 0);
    clock.advanceBy(1s);
    CHECK(timers.advance() == 0);
  }
  SECTION("arm a zero-delay timer: fires on the next advance, not this one") {
    TimerHandle child;
    const TimerHandlerId parent = timers.addHandler([&](TimerHandle, std::uint32_t) {
      child = timers.arm(0ns, plain, 77);
      CHECK(timers.isPending(child));
    });
    (void)timers.arm(1ms, parent, 0);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(log.fires.empty());
    CHECK(timers.isPending(child));
    CHECK(timers.size() == 1);
    REQUIRE(timers.nextDeadline().has_value());
    CHECK(*timers.nextDeadline() <= clock.now());
    CHECK(timers.advance() == 1);  // same now
    CHECK(log.data() == std::vector<std::uint32_t>{77});
    CHECK(log.fires[0].at == kStart + 1ms);
  }
  SECTION("arm a timer whose deadline already passed in this batch's stall") {
    const TimerHandlerId parent = timers.addHandler([&](TimerHandle, std::uint32_t) {
      (void)timers.arm(1ms, plain, 5);  // due at 2 ms; the batch runs at 1 s
    });
    (void)timers.arm(1ms, parent, 0);
    clock.advanceBy(1s);
    CHECK(timers.advance() == 1);
    CHECK(log.fires.empty());
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 1);
    CHECK(log.data() == std::vector<std::uint32_t>{5});
  }
  SECTION("cancelAll from a callback: nothing else in the batch fires") {
    std::size_t cancelled = 0;
    const TimerHandlerId wipe = timers.addHandler([&](TimerHandle, std::uint32_t) {
      cancelled = timers.cancelAll();
    });
    (void)timers.arm(5ms, plain, 1);
    (void)timers.arm(5ms, wipe, 2);
    (void)timers.arm(5ms, plain, 3);
    (void)timers.arm(5ms, plain, 4);
    (void)timers.arm(6ms, plain, 5);
    (void)timers.arm(1h, plain, 6);
    clock.advanceBy(5ms);
    CHECK(timers.advance() == 2);
    CHECK(cancelled == 4);
    CHECK(log.data() == std::vector<std::uint32_t>{1});
    CHECK(timers.size() == 0);
    CHECK(timers.dueCount() == 0);
    clock.advanceBy(2h);
    CHECK(timers.advance() == 0);
  }
  SECTION("cancelAll from a callback during a stall batch, then re-arm") {
    const TimerHandlerId wipe = timers.addHandler([&](TimerHandle, std::uint32_t) {
      (void)timers.cancelAll();
      (void)timers.arm(0ns, plain, 100);
    });
    for (std::uint32_t i = 0; i < 10; ++i) (void)timers.arm(milliseconds(i + 1), plain, i);
    (void)timers.arm(3500us, wipe, 50);  // due at 4 ms, after 1..4
    clock.advanceBy(1s);
    CHECK(timers.advance() == 5);
    CHECK(log.data() == std::vector<std::uint32_t>{0, 1, 2, 3});
    CHECK(timers.size() == 1);
    CHECK(timers.advance() == 1);
    CHECK(log.fires.back().data == 100);
  }
  SECTION("a callback may register another handler") {
    // A small, trivially copyable lambda: std::function stores it inline,
    // so if the handler table moved while it runs, its captures would be
    // read from freed memory (AddressSanitizer reports it).
    std::vector<TimerHandlerId> added;
    const TimerHandlerId grow = timers.addHandler([&timers, &added](TimerHandle,
                                                                    std::uint32_t) {
      for (int i = 0; i < 64; ++i) {
        const TimerHandlerId id = timers.addHandler([](TimerHandle, std::uint32_t) {});
        added.push_back(id);
      }
    });
    (void)timers.arm(1ms, grow, 0);
    (void)timers.arm(1ms, grow, 1);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 2);
    CHECK(added.size() == 128);
  }
  SECTION("advance() from inside a callback fires nothing more") {
    std::size_t inner = 99;
    const TimerHandlerId nest = timers.addHandler([&](TimerHandle, std::uint32_t) {
      inner = timers.advance(clock.now() + 1h);
    });
    (void)timers.arm(1ms, nest, 0);
    (void)timers.arm(1ms, plain, 1);
    (void)timers.arm(10ms, plain, 2);
    clock.advanceBy(1ms);
    CHECK(timers.advance() == 2);
    CHECK(inner == 0);
    CHECK(log.data() == std::vector<std::uint32_t>{1});
    clock.advanceBy(9ms);
    CHECK(timers.advance() == 1);
  }
}

TEST_CASE("a callback that throws is counted and the batch goes on", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  std::vector<std::string> logged;
  timers.setLog([&](LogLevel level, std::string_view msg) {
    CHECK(level == LogLevel::kError);
    logged.emplace_back(msg);
  });
  const TimerHandlerId plain = recordInto(timers, clock, log);
  const TimerHandlerId bad = timers.addHandler([](TimerHandle, std::uint32_t d) {
    if (d == 0) throw std::runtime_error("handler exploded");
    throw 7;
  });
  (void)timers.arm(1ms, plain, 1);
  (void)timers.arm(1ms, bad, 0);
  (void)timers.arm(1ms, plain, 2);
  (void)timers.arm(2ms, bad, 1);
  (void)timers.arm(2ms, plain, 3);
  clock.advanceBy(5ms);
  CHECK(timers.advance() == 5);
  CHECK(log.data() == std::vector<std::uint32_t>{1, 2, 3});
  CHECK(timers.callbackErrors() == 2);
  REQUIRE(logged.size() == 2);
  CHECK(logged[0].find("handler exploded") != std::string::npos);
  CHECK(timers.size() == 0);
  // Still works afterwards.
  (void)timers.arm(1ms, plain, 4);
  clock.advanceBy(1ms);
  CHECK(timers.advance() == 1);

  // A log sink that throws is survived too.
  timers.setLog([](LogLevel, std::string_view) { throw std::runtime_error("log down"); });
  (void)timers.arm(1ms, bad, 0);
  (void)timers.arm(1ms, plain, 5);
  clock.advanceBy(1ms);
  CHECK(timers.advance() == 2);
  CHECK(timers.callbackErrors() >= 3);
  CHECK(log.fires.back().data == 5);
}

// ------------------------------------------------------------- time ---

TEST_CASE("time going backwards is clamped: nothing early, nothing lost", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  struct Armed {
    SteadyTime at;
    nanoseconds delay;
  };
  std::vector<Armed> armed;
  const auto arm = [&](nanoseconds d) {
    armed.push_back({clock.now(), d});
    (void)timers.arm(d, h, static_cast<std::uint32_t>(armed.size() - 1));
  };
  arm(100ms);  // 0
  arm(60ms);   // 1
  clock.set(kStart + 50ms);
  CHECK(timers.advance() == 0);
  // Backwards: explicit, then via the clock.
  CHECK(timers.advance(kStart + 10ms) == 0);
  CHECK(timers.advance(SteadyTime::min()) == 0);
  clock.set(kStart + 10ms);
  CHECK(timers.advance() == 0);
  CHECK(timers.size() == 2);
  // Armed while the clock is behind the wheel's time.
  arm(20ms);  // 2
  arm(0ns);   // 3: due at once
  arm(45ms);  // 4
  CHECK(timers.advance() == 1);  // only the zero-delay one
  CHECK(log.data() == std::vector<std::uint32_t>{3});
  // Step forward 1 ms at a time, with one more backwards jump on the way.
  bool jumped = false;
  while (clock.now() < kStart + 300ms) {
    clock.advanceBy(1ms);
    if (!jumped && clock.now() == kStart + 55ms) {
      jumped = true;
      clock.set(kStart + 30ms);
    }
    timers.advance();
  }
  CHECK(timers.size() == 0);
  REQUIRE(log.fires.size() == armed.size());  // nothing lost
  std::vector<int> count(armed.size(), 0);
  for (const Log::Fire& f : log.fires) {
    ++count[f.data];
    const Armed& a = armed[f.data];
    INFO("timer " << f.data << " fired " << (f.at - a.at).count() << " ns after arming");
    // Never early: at least the delay passed on the clock since arming.
    CHECK(f.at - a.at >= a.delay);
  }
  for (int c : count) CHECK(c == 1);
  // The ones armed before the jumps fire at their deadlines on the clock.
  for (const Log::Fire& f : log.fires) {
    if (f.data == 0) CHECK(f.at == kStart + 100ms);
    if (f.data == 1) CHECK(f.at == kStart + 60ms);
  }
}

// A TimerService on a ManualClock read through its cell (restart()'s
// inline case) or through now() (a clock without a cell), with one timer
// due at +20 ms whose firings are recorded.
struct OneTimerRig {
  explicit OneTimerRig(bool withCell)
      : timers(withCell ? static_cast<const roomkeeper::Clock*>(&clock) : &called) {}
  ManualClock clock{kStart};
  CalledClock called{clock};
  TimerService timers;
  std::vector<SteadyTime> fired;
  const TimerHandlerId h =
      timers.addHandler([this](TimerHandle, std::uint32_t) { fired.push_back(clock.now()); });
  const TimerHandle t = timers.arm(20ms, h, 0);  // due at +20 ms
  // Sets the clock to `from`, steps it 1 ms at a time to +60 ms, advancing
  // at each step, and returns when the timer fired (exactly once).
  SteadyTime onlyFiring(SteadyTime from) {
    clock.set(from);
    while (clock.now() < kStart + 60ms) {
      clock.advanceBy(1ms);
      timers.advance();
    }
    REQUIRE(fired.size() == 1);
    return fired[0];
  }
};

TEST_CASE("a restart while the clock is behind the wheel counts from the wheel's time",
          "[timer]") {
  // restart() has an inline case for a clock with a cell (ManualClock); the
  // same clamp must hold with it as on a clock read through now(). (Here the
  // restart finds no remembered tick for its time and runs restartSlow();
  // the next test covers a remembered tick.)
  const bool withCell = GENERATE(true, false);
  INFO((withCell ? "ManualClock, read through its cell" : "a clock read through now()"));
  OneTimerRig rig(withCell);
  rig.clock.set(kStart + 15ms);
  CHECK(rig.timers.advance() == 0);  // the wheel is at +15 ms
  rig.clock.set(kStart + 5ms);       // the clock goes back 10 ms
  // Later than +20 ms either way, so the lazy case: +15 + 20 = +35 ms, not
  // +5 + 20 = +25 ms.
  REQUIRE(rig.timers.restart(rig.t, 20ms));
  CHECK(rig.onlyFiring(kStart + 15ms) == kStart + 35ms);
}

TEST_CASE("restart's remembered deadline is dropped when the wheel's time moves",
          "[timer]") {
  // The inline restart reuses the tick of the last (time, delay) it was
  // asked for. The tick also depends on the wheel's time (a clock behind it
  // counts from it): an advance past the clock must drop the entry.
  const bool withCell = GENERATE(true, false);
  INFO((withCell ? "ManualClock, read through its cell" : "a clock read through now()"));
  OneTimerRig rig(withCell);
  REQUIRE(rig.timers.restart(rig.t, 20ms));       // +20 ms, remembered for (+0, 20 ms)
  REQUIRE(rig.timers.restart(rig.t, 20ms));       // the same, from the entry
  CHECK(rig.timers.advance(kStart + 10ms) == 0);  // the wheel at +10; the clock stays at +0
  // The same (time, delay) as the entry, but now +10 + 20 = +30 ms.
  REQUIRE(rig.timers.restart(rig.t, 20ms));
  CHECK(rig.onlyFiring(kStart + 10ms) == kStart + 30ms);
}

TEST_CASE("a 30 s stall: everything due fires in one advance, in deadline order",
          "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  std::mt19937_64 rng(3030);
  struct Expect {
    std::uint64_t tick;
    std::uint32_t seq;
  };
  std::vector<Expect> expect;
  const auto arm = [&](nanoseconds d) {
    const nanoseconds base = clock.now() - kStart;
    const std::uint64_t tick = d.count() <= 0 ? 0 : ceilMs(base + d);
    const auto seq = static_cast<std::uint32_t>(expect.size());
    expect.push_back({tick, seq});
    (void)timers.arm(d, h, seq);
  };
  std::uniform_int_distribution<std::int64_t> any(0, 30'000'000'000LL);
  for (int i = 0; i < 3000; ++i) arm(nanoseconds(any(rng)));
  for (int i = 0; i < 50; ++i) arm(12345ms);  // a crowd on one tick
  arm(30s);
  arm(0ns);
  // The clock moves on without the host advancing (a stall begins)...
  clock.advanceBy(3500us);
  for (int i = 0; i < 500; ++i) arm(nanoseconds(any(rng) - 3'500'000));
  // ...and later more far timers that must stay.
  arm(31s);
  arm(1h);
  const std::size_t lateOnes = 2;

  clock.set(kStart + 30s + 3500us);
  const std::size_t fired = timers.advance();
  CHECK(fired == expect.size() - lateOnes);
  CHECK(timers.size() == lateOnes);
  REQUIRE(log.fires.size() == fired);
  // In deadline (tick) order; within a tick, in arming order.
  std::vector<Expect> sortedExpect(expect.begin(), expect.end() - lateOnes);
  std::stable_sort(sortedExpect.begin(), sortedExpect.end(),
                   [](const Expect& a, const Expect& b) { return a.tick < b.tick; });
  std::vector<std::uint32_t> want;
  for (const Expect& e : sortedExpect) want.push_back(e.seq);
  CHECK(log.data() == want);
  for (const Log::Fire& f : log.fires)
    CHECK(kStart + milliseconds(expect[f.data].tick) <= f.at);
}

TEST_CASE("a million timers due at once, drained by bounded advances", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  constexpr std::uint32_t kN = 1'000'000;
  constexpr std::size_t kMax = 1000;
  std::vector<std::uint8_t> fired(kN, 0);
  std::uint32_t expectedNext = 0;
  bool inOrder = true;
  const TimerHandlerId h = timers.addHandler([&](TimerHandle, std::uint32_t d) {
    ++fired[d];
    if (d != expectedNext) inOrder = false;
    ++expectedNext;
  });
  for (std::uint32_t i = 0; i < kN; ++i) (void)timers.arm(10ms, h, i);
  CHECK(timers.size() == kN);
  clock.advanceBy(10ms);
  std::size_t remaining = kN;
  std::size_t calls = 0;
  bool bounded = true;
  bool dueTracks = true;
  bool deadlineNow = true;
  while (remaining > 0) {
    const std::size_t n = timers.advance(clock.now(), kMax);
    ++calls;
    if (n != std::min(kMax, remaining)) bounded = false;
    remaining -= n;
    if (timers.dueCount() != remaining || timers.size() != remaining) dueTracks = false;
    if (remaining > 0 && !(timers.nextDeadline() && *timers.nextDeadline() <= clock.now()))
      deadlineNow = false;
    if (calls > kN / kMax + 5) break;
  }
  CHECK(bounded);
  CHECK(dueTracks);
  CHECK(deadlineNow);
  CHECK(inOrder);
  CHECK(calls == kN / kMax);
  CHECK(remaining == 0);
  CHECK(std::all_of(fired.begin(), fired.end(), [](std::uint8_t c) { return c == 1; }));
  CHECK(timers.advance() == 0);
  CHECK(timers.size() == 0);
  CHECK(timers.dueCount() == 0);
}

TEST_CASE("bounded advance: maxFire 0 fires nothing, and the backlog keeps its order",
          "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  for (std::uint32_t i = 0; i < 10; ++i) (void)timers.arm(milliseconds(i + 1), h, i);
  clock.advanceBy(20ms);
  CHECK(timers.advance(clock.now(), 0) == 0);
  CHECK(timers.dueCount() == 10);
  CHECK(timers.advance(clock.now(), 3) == 3);
  // A timer armed now (zero delay) and one due later join behind the backlog.
  (void)timers.arm(0ns, h, 100);
  (void)timers.arm(1ms, h, 101);
  CHECK(timers.advance(clock.now(), 4) == 4);
  clock.advanceBy(1ms);
  CHECK(timers.advance() == 5);
  CHECK(log.data() ==
        std::vector<std::uint32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 101});
}

TEST_CASE("nextDeadline is never later than the earliest deadline, and stepping to it "
          "fires everything",
          "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  std::mt19937_64 rng(99);
  std::map<std::uint32_t, SteadyTime> deadline;  // data -> exact deadline
  std::map<std::uint32_t, TimerHandle> handle;
  std::size_t firedEarly = 0;
  std::size_t fired = 0;
  std::size_t cancelled = 0;
  const TimerHandlerId h = timers.addHandler([&](TimerHandle, std::uint32_t d) {
    if (clock.now() < deadline.at(d)) ++firedEarly;
    ++fired;
    deadline.erase(d);
    handle.erase(d);
  });
  CHECK_FALSE(timers.nextDeadline().has_value());
  std::uint32_t next = 0;
  const auto armRandom = [&] {
    const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
    std::int64_t maxNs = 64'000'000;  // within level 0-1
    if (kind >= 5) maxNs = 1LL << 40;  // ~18 minutes
    if (kind == 9) maxNs = 1LL << 52;  // ~52 days
    const nanoseconds d(std::uniform_int_distribution<std::int64_t>(1, maxNs)(rng));
    deadline[next] = clock.now() + d;
    handle[next] = timers.arm(d, h, next);
    ++next;
  };
  for (int i = 0; i < 500; ++i) armRandom();
  std::size_t steps = 0;
  while (!deadline.empty()) {
    REQUIRE(++steps < 100000);
    // The earliest deadline, rounded up to the 1 ms tick as the header says.
    SteadyTime earliest = SteadyTime::max();
    for (const auto& [d, t] : deadline)
      earliest = std::min(earliest, kStart + milliseconds(ceilMs(t - kStart)));
    const auto nd = timers.nextDeadline();
    REQUIRE(nd.has_value());
    REQUIRE(*nd <= earliest);
    REQUIRE(*nd > clock.now());  // nothing is due between advances
    clock.set(*nd);
    timers.advance();
    // Now and then cancel one, or arm more, on the way.
    if (steps % 7 == 0 && !handle.empty()) {
      auto it = handle.begin();
      std::advance(it, std::uniform_int_distribution<std::size_t>(0, handle.size() - 1)(rng));
      REQUIRE(timers.cancel(it->second));
      ++cancelled;
      deadline.erase(it->first);
      handle.erase(it);
    }
    if (steps % 11 == 0 && next < 800) armRandom();
  }
  CHECK(firedEarly == 0);
  CHECK(fired + cancelled == next);
  CHECK(timers.size() == 0);
  CHECK_FALSE(timers.nextDeadline().has_value());
}

// ------------------------------------------------------------ memory ---

TEST_CASE("size and bytes return to the start after shrinkToFit", "[timer]") {
  ManualClock clock(kStart);
  TimerService timers(&clock);
  Log log;
  const TimerHandlerId h = recordInto(timers, clock, log);
  const std::size_t bytes0 = timers.bytes();
  CHECK(timers.size() == 0);

  CHECK(timers.arm(1ms, static_cast<TimerHandlerId>(h + 1), 0) == TimerHandle{});
  CHECK(timers.size() == 0);

  std::vector<TimerHandle> hs;
  for (std::uint32_t i = 0; i < 100000; ++i) hs.push_back(timers.arm(milliseconds(i % 5000 + 1), h, i));
  CHECK(timers.size() == 100000);
  const std::size_t peak = timers.bytes();
  CHECK(peak > bytes0 + 100000 * 28 - 1);
  for (std::uint32_t i = 0; i < 100000; i += 2) CHECK(timers.cancel(hs[i]));
  CHECK(timers.size() == 50000);
  // shrinkToFit with timers pending changes nothing.
  timers.shrinkToFit();
  CHECK(timers.bytes() == peak);
  clock.advanceBy(5s);
  CHECK(timers.advance() == 50000);
  CHECK(timers.size() == 0);
  CHECK(timers.bytes() == peak);  // pages kept for reuse
  // Reuse: arming again allocates no new pages.
  for (std::uint32_t i = 0; i < 100000; ++i) hs[i] = timers.arm(1s, h, i);
  CHECK(timers.bytes() == peak);
  CHECK(timers.cancelAll() == 100000);
  timers.shrinkToFit();
  CHECK(timers.size() == 0);
  CHECK(timers.bytes() == bytes0);
  // Still usable.
  const TimerHandle t = timers.arm(1ms, h, 1);
  CHECK(timers.isPending(t));
  CHECK_FALSE(timers.isPending(hs[0]));
  clock.advanceBy(1ms);
  CHECK(timers.advance() == 1);
  timers.shrinkToFit();
  CHECK(timers.bytes() == bytes0);
}

// ------------------------------------------------------------- model ---

/// Runs random arm/restart/cancel/advance against a plain model that knows
/// each timer's deadline tick and arming sequence: every advance must fire
/// exactly the due timers (a bounded one: the earliest by tick), in tick
/// order; within a tick, the timers not restarted lazily (a restart to the
/// same or a later tick while in the wheel) fire in sequence order.
class TimerModelRun {
 public:
  // withCell false: the service reads the time through a CalledClock.
  explicit TimerModelRun(std::uint64_t seed, bool withCell = true)
      : rng_(seed),
        clock_(kStart + nanoseconds(seed % 1000000)),
        called_(clock_),
        timers_(withCell ? static_cast<const roomkeeper::Clock*>(&clock_) : &called_) {
    epoch_ = clock_.now();
    handler_ = timers_.addHandler([this](TimerHandle t, std::uint32_t d) {
      fired_.push_back(d);
      firedHandles_.push_back(t);
    });
  }

  std::string run(std::size_t steps) {
    for (std::size_t i = 0; i < steps; ++i) {
      std::string err = step();
      if (err.empty()) err = check();
      if (!err.empty()) return "step " + std::to_string(i) + " (" + op_ + "): " + err;
    }
    // Drain: everything left fires exactly once.
    fired_.clear();
    const std::size_t n = timers_.advance(SteadyTime::max() - hours(24 * 365));
    if (n != live_.size() || fired_.size() != live_.size() || timers_.size() != 0)
      return "the final drain fired " + std::to_string(n) + " of " +
             std::to_string(live_.size());
    return {};
  }

 private:
  struct Entry {
    std::uint64_t tick;
    std::uint64_t seq;
    TimerHandle handle;
    bool lazy = false;  // restarted lazily: its place within its tick is open
  };

  std::uint64_t floorTick(SteadyTime t) const {
    if (t <= epoch_) return 0;
    return static_cast<std::uint64_t>((t - epoch_).count()) / 1000000u;
  }
  std::uint64_t deadlineTick(nanoseconds d) const {
    if (d.count() <= 0) return wheel_;
    return ceilMs(clock_.now() - epoch_ + d);
  }
  nanoseconds randomDelay() {
    const int p = std::uniform_int_distribution<int>(0, 99)(rng_);
    if (p < 5) return 0ns;
    if (p < 7) return -nanoseconds(std::uniform_int_distribution<std::int64_t>(1, 1000000000)(rng_));
    if (p < 60) return nanoseconds(std::uniform_int_distribution<std::int64_t>(1, 5'000'000)(rng_));
    if (p < 90) return nanoseconds(std::uniform_int_distribution<std::int64_t>(1, 5'000'000'000)(rng_));
    return nanoseconds(std::uniform_int_distribution<std::int64_t>(1, 7'200'000'000'000)(rng_));
  }
  // A live handle, or a stale one, or null.
  TimerHandle anyHandle(std::uint32_t* data) {
    *data = kNoData;
    const int p = std::uniform_int_distribution<int>(0, 99)(rng_);
    if (p < 75 && !live_.empty()) {
      auto it = live_.begin();
      std::advance(it, std::uniform_int_distribution<std::size_t>(0, live_.size() - 1)(rng_));
      *data = it->first;
      return it->second.handle;
    }
    if (p < 97 && !stale_.empty())
      return stale_[std::uniform_int_distribution<std::size_t>(0, stale_.size() - 1)(rng_)];
    return TimerHandle{};
  }
  void retire(std::uint32_t data) {
    stale_.push_back(live_.at(data).handle);
    if (stale_.size() > 64) stale_.erase(stale_.begin());
    live_.erase(data);
  }

  std::string step() {
    const int p = std::uniform_int_distribution<int>(0, 99)(rng_);
    if (p < 30 && live_.size() < 400) {
      const nanoseconds d = randomDelay();
      op_ = "arm " + std::to_string(d.count());
      const std::uint32_t data = nextData_++;
      const TimerHandle t = timers_.arm(d, handler_, data);
      if (!t.valid()) return "arm gave a null handle";
      for (const TimerHandle& s : stale_)
        if (s == t) return "arm returned a handle equal to a stale one";
      live_[data] = Entry{deadlineTick(d), seq_++, t};
      return {};
    }
    if (p < 50) {
      std::uint32_t data;
      const TimerHandle t = anyHandle(&data);
      const nanoseconds d = randomDelay();
      op_ = "restart " + std::to_string(d.count());
      const bool want = data != kNoData;
      if (timers_.restart(t, d) != want) return "restart result differs";
      ++(want ? restarts_ : staleCalls_);
      if (want) {
        Entry& e = live_[data];
        const std::uint64_t tick = deadlineTick(d);
        if (e.tick > wheel_ && tick >= e.tick) {
          e.lazy = true;  // kept where it is; moved when its old slot comes up
          ++lazyRestarts_;
        } else {
          e.lazy = false;
          e.seq = seq_++;
        }
        e.tick = tick;
      }
      return {};
    }
    if (p < 65) {
      std::uint32_t data;
      const TimerHandle t = anyHandle(&data);
      op_ = "cancel";
      const bool want = data != kNoData;
      if (timers_.cancel(t) != want) return "cancel result differs";
      ++(want ? cancels_ : staleCalls_);
      if (want) retire(data);
      return {};
    }
    // Advance the clock (usually a little, sometimes a lot) and the wheel.
    const int q = std::uniform_int_distribution<int>(0, 99)(rng_);
    std::int64_t ns = std::uniform_int_distribution<std::int64_t>(0, 3'000'000)(rng_);
    if (q < 10) ns = std::uniform_int_distribution<std::int64_t>(0, 10'000'000'000)(rng_);
    if (q == 99) ns = std::uniform_int_distribution<std::int64_t>(0, 10'000'000'000'000)(rng_);
    clock_.advanceBy(nanoseconds(ns));
    const bool bounded = q >= 80 && q < 95;
    const std::size_t maxFire =
        bounded ? std::uniform_int_distribution<std::size_t>(0, 5)(rng_)
                : std::numeric_limits<std::size_t>::max();
    op_ = "advance +" + std::to_string(ns) + (bounded ? " max " + std::to_string(maxFire) : "");
    wheel_ = std::max(wheel_, floorTick(clock_.now()));
    std::vector<std::tuple<std::uint64_t, std::uint64_t, std::uint32_t>> due;
    for (const auto& [data, e] : live_)
      if (e.tick <= wheel_) due.emplace_back(e.tick, e.seq, data);
    std::sort(due.begin(), due.end());
    const std::size_t want = std::min(due.size(), maxFire);
    fired_.clear();
    firedHandles_.clear();
    const std::size_t n = timers_.advance(clock_.now(), maxFire);
    if (n != want || fired_.size() != want)
      return "advance fired " + std::to_string(n) + ", model says " + std::to_string(want);
    fires_ += n;
    if (bounded && timers_.dueCount() > 0) ++backlogs_;
    // Which timers: every due one, or (bounded) the earliest `want` by tick,
    // the last tick's group possibly in part.
    const std::uint64_t lastTick = want == 0 ? 0 : std::get<0>(due[want - 1]);
    std::uint64_t prevTick = 0, prevSeq = 0;
    bool prevOrdered = false;
    for (std::size_t i = 0; i < want; ++i) {
      const std::uint32_t data = fired_[i];
      const auto it = live_.find(data);
      if (it == live_.end()) return "fired a timer that is not live: " + std::to_string(data);
      const Entry& e = it->second;
      if (e.tick > wheel_) return "fired early: " + std::to_string(data);
      if (e.tick > lastTick) return "fired a later tick before an earlier one was done";
      if (firedHandles_[i] != e.handle) return "fired with another handle";
      if (i > 0 && e.tick < prevTick)
        return "firing order differs at " + std::to_string(i) + ": tick goes back";
      if (i == 0 || e.tick != prevTick) prevOrdered = false;
      if (!e.lazy) {
        if (prevOrdered && e.seq < prevSeq)
          return "firing order differs at " + std::to_string(i) + ": within a tick, " +
                 std::to_string(data) + " was armed before the one fired earlier";
        prevSeq = e.seq;
        prevOrdered = true;
      }
      prevTick = e.tick;
      retire(data);
    }
    // Nothing earlier than the last fired tick is left due.
    for (const auto& [data, e] : live_)
      if (e.tick <= wheel_ && e.tick < lastTick) return "left an earlier tick unfired";
    return {};
  }

  std::string check() {
    if (timers_.size() != live_.size())
      return "size " + std::to_string(timers_.size()) + ", model " + std::to_string(live_.size());
    std::size_t due = 0;
    std::uint64_t earliest = std::numeric_limits<std::uint64_t>::max();
    for (const auto& [data, e] : live_) {
      if (e.tick <= wheel_) ++due;
      earliest = std::min(earliest, e.tick);
      if (!timers_.isPending(e.handle)) return "a live timer is not pending";
      if (timers_.dataOf(e.handle) != std::optional<std::uint32_t>(data)) return "dataOf wrong";
    }
    if (timers_.dueCount() != due)
      return "dueCount " + std::to_string(timers_.dueCount()) + ", model " + std::to_string(due);
    for (const TimerHandle& s : stale_)
      if (timers_.isPending(s) || timers_.dataOf(s).has_value()) return "a stale handle resolves";
    const auto nd = timers_.nextDeadline();
    if (live_.empty()) {
      if (nd.has_value()) return "nextDeadline with nothing pending";
      return {};
    }
    if (!nd.has_value()) return "no nextDeadline with timers pending";
    const SteadyTime earliestTime = epoch_ + milliseconds(earliest);
    if (*nd > earliestTime) return "nextDeadline later than the earliest deadline";
    if (due > 0 && *nd > clock_.now()) return "a due timer but nextDeadline > now";
    if (due == 0 && *nd <= epoch_ + milliseconds(wheel_))
      return "nextDeadline not after the wheel's time with nothing due";
    return {};
  }

  static constexpr std::uint32_t kNoData = 0xFFFFFFFFu;

 public:
  std::size_t restarts_ = 0;
  std::size_t lazyRestarts_ = 0;
  std::size_t cancels_ = 0;
  std::size_t staleCalls_ = 0;
  std::size_t fires_ = 0;
  std::size_t backlogs_ = 0;

 private:
  std::mt19937_64 rng_;
  ManualClock clock_;
  CalledClock called_;
  TimerService timers_;
  SteadyTime epoch_;
  TimerHandlerId handler_ = 0;
  std::uint64_t wheel_ = 0;
  std::uint64_t seq_ = 0;
  std::uint32_t nextData_ = 0;
  std::map<std::uint32_t, Entry> live_;
  std::vector<TimerHandle> stale_;
  std::vector<std::uint32_t> fired_;
  std::vector<TimerHandle> firedHandles_;
  std::string op_;
};

TEST_CASE("randomized model test: the wheel matches a sorted model", "[timer][model]") {
  // A ManualClock gives the service its cell (restart's fast path reads the
  // time there); a clock without one takes the called path. Both must match.
  const bool withCell = GENERATE(true, false);
  INFO((withCell ? "ManualClock, read through its cell" : "a clock read through now()"));
  for (std::uint64_t seed : {11u, 12u, 13u, 14u, 15u}) {
    TimerModelRun run(seed, withCell);
    const std::string err = run.run(20000);
    INFO("seed " << seed);
    REQUIRE(err == "");
    // The generator reaches every case.
    CHECK(run.restarts_ > 500);
    CHECK(run.lazyRestarts_ > 100);
    CHECK(run.cancels_ > 500);
    CHECK(run.staleCalls_ > 100);
    CHECK(run.fires_ > 1000);
    CHECK(run.backlogs_ > 10);
  }
}

}  // namespace

TEST_CASE("a node at the last 32-bit generation is retired: stale stays stale",
          "[timer][hardening]") {
  ManualClock clock;
  TimerService ts(&clock);
  const TimerHandlerId h = ts.addHandler([](TimerHandle, std::uint32_t) {});
  const TimerHandle keep = ts.arm(1h, h, 0);  // node 0 stays pending
  const TimerHandle first = ts.arm(1h, h, 1);  // node 1
  REQUIRE(ts.cancel(first));
  // Jump node 1 to three short of the maximum instead of 2^32 re-arms.
  roomkeeper::detail::TestAccess::ageTimers(ts, std::numeric_limits<std::uint32_t>::max() - 3);
  std::vector<TimerHandle> old{first};
  for (int i = 0; i < 3; ++i) {
    const TimerHandle t = ts.arm(1h, h, 2);
    CHECK(t.index == first.index);  // reused while below the maximum
    old.push_back(t);
    REQUIRE(ts.cancel(t));
  }
  CHECK(old.back().generation == std::numeric_limits<std::uint32_t>::max());
  // The node is retired: new timers go elsewhere, old handles never match.
  for (int i = 0; i < 100; ++i) {
    const TimerHandle t = ts.arm(1h, h, 3);
    CHECK(t.index != first.index);
    CHECK(t.generation != 0);
    for (const TimerHandle& o : old) CHECK_FALSE(o == t);
  }
  for (const TimerHandle& o : old) {
    CHECK_FALSE(ts.isPending(o));
    CHECK_FALSE(ts.cancel(o));
    CHECK_FALSE(ts.restart(o, 1ms));
  }
  CHECK(ts.isPending(keep));
  CHECK(ts.size() == 101);
}

TEST_CASE("durations convert to nanoseconds saturating, exact below the limit",
          "[timer][hardening]") {
  using roomkeeper::detail::saturatingNanos;
  using Ns = std::chrono::nanoseconds;
  CHECK(saturatingNanos(roomkeeper::Millis::max()) == Ns::max());
  CHECK(saturatingNanos(roomkeeper::Millis::min()) == Ns::min());
  CHECK(saturatingNanos(std::chrono::hours::max()) == Ns::max());
  CHECK(saturatingNanos(roomkeeper::Millis(5000)) == Ns(5000000000));
  CHECK(saturatingNanos(std::chrono::seconds(-3)) == Ns(-3000000000));
  CHECK(saturatingNanos(Ns(7)) == Ns(7));
  // The largest whole count of milliseconds that fits, and one more.
  const auto fits = roomkeeper::Millis(Ns::max().count() / 1000000);
  CHECK(saturatingNanos(fits) == Ns(fits.count() * 1000000));
  CHECK(saturatingNanos(fits + roomkeeper::Millis(1)) == Ns::max());
  CHECK(saturatingNanos(std::chrono::duration<double>(1.5)) == Ns(1500000000));
  CHECK(saturatingNanos(std::chrono::duration<std::uint64_t, std::milli>(
            std::numeric_limits<std::uint64_t>::max())) == Ns::max());
}
