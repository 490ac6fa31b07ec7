// SPDX-License-Identifier: MIT
// File: roomkeeper/timer_service.h
//
// TimerService: a hierarchical timing wheel for millions of short one-shot
// timers that are nearly always restarted or cancelled before they fire
// (typing indicators, auth deadlines).
//
// Time is an input. The service never reads the wall clock and starts no
// thread: it reads a Clock you give it (SteadyClock by default, a
// ManualClock in tests) when a timer is armed, and fires what is due when
// your loop calls advance(). Sleep until nextDeadline(), then advance():
//
//   roomkeeper::TimerService timers;                    // steady clock
//   auto h = timers.addHandler([](roomkeeper::TimerHandle, std::uint32_t id) {
//     std::printf("timer for %u fired\n", id);
//   });
//   roomkeeper::TimerHandle t = timers.arm(std::chrono::seconds(5), h, 42);
//   timers.restart(t, std::chrono::seconds(5));   // a keystroke: push back
//   ...
//   timers.advance();                              // in the host loop
//
// Resolution and lateness: 1 ms ticks. A deadline is rounded up to the next
// tick, so a timer NEVER fires early: it fires in the first advance(now)
// with now >= its deadline. It fires at most 1 ms after its deadline plus
// however late the host calls advance(); with a host that advances at
// nextDeadline(), that is within 1 ms.
//
// Order: due timers fire in deadline order, by tick. Within one tick, timers
// fire in the order they were armed, or restarted to an earlier tick (or
// from a due state). A restart to the same or a later tick is lazy: it only
// records the new deadline, and the timer stays where it was in the wheel
// until its old place comes up, when the wheel moves it on. So within its
// tick a timer restarted that way has no set place among the others (it
// keeps its old place when the tick did not change); timers 1 ms apart or
// more are always in deadline order. All due timers are detached from the
// wheel before the first callback runs.
//
// Re-entrancy: a callback may arm, restart or cancel any timer, its own
// included, or call anything else in roomkeeper. Cancelling a timer that is
// due in the same batch and has not run yet stops it from running. A timer
// armed or restarted by a callback never fires in the same advance() call,
// even with a zero delay: it fires in the next advance() (so a zero-delay
// re-arm cannot busy-loop inside one call). A callback that throws is caught,
// counted (callbackErrors()) and the batch goes on.
//
// Time that goes backwards is clamped (the wheel's time never decreases).
// After a stall the backlog fires in deadline order; advance(now, maxFire)
// bounds the callbacks run per call, the rest stay due for the next call.
//
// Memory: each timer is one 28-byte node in a paged slab (no allocation per
// timer once a page exists). Freed nodes are reused; pages are kept until
// shrinkToFit() (or destruction). TimerHandle carries the node's generation,
// so a stale handle (its timer fired or was cancelled, the node maybe
// reused) is a harmless no-op everywhere -- forever: a node whose 32-bit
// generation reaches the maximum is retired instead of wrapping (28 bytes
// per 2^32 - 1 timers in one node), and once any generation passes 2^31,
// shrinkToFit() keeps the pages so that no generation is ever issued twice.
//
// Thread safety: thread-compatible. Use it from one thread, or under the
// host's lock (TimerThread and SyncKeeper do the locking for you).
//
// Complexity: arm, restart, cancel O(1); nextDeadline O(levels) = O(1);
// advance O(timers fired + cascaded + levels).
#ifndef ROOMKEEPER_TIMER_SERVICE_H_
#define ROOMKEEPER_TIMER_SERVICE_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <ratio>
#include <type_traits>

#include "roomkeeper/callbacks.h"

namespace roomkeeper {

using SteadyTime = std::chrono::steady_clock::time_point;
using Millis = std::chrono::milliseconds;

namespace detail {
/// Not API: the first 16 bytes of a timer, which restart()'s inline case
/// reads and writes (src/timer_service.cc has the rest of the layout).
enum class TimerState : std::uint8_t { kFree, kWheel, kDue, kNextDue, kFiring };
struct alignas(16) TimerNode {
  std::uint32_t generation;
  std::uint32_t deadlineLo;  // deadline in ticks since the epoch, 48 bits
  std::uint16_t deadlineHi;
  std::uint16_t handler;
  TimerState state;
  std::uint8_t level;  // the wheel list holding it (a lazy restart's may
  std::uint8_t slot;   // be the list of an earlier deadline)
  std::uint8_t unused;
  std::uint64_t deadline() const noexcept {
    return (std::uint64_t{deadlineHi} << 32) | deadlineLo;
  }
  void setDeadline(std::uint64_t d) noexcept {
    deadlineLo = static_cast<std::uint32_t>(d);
    deadlineHi = static_cast<std::uint16_t>(d >> 32);  // d < 2^48
  }
};
/// Not API: what restart()'s inline case reads of the service, kept in the
/// TimerService object and updated by the library as it changes.
struct TimerView {
  static constexpr unsigned kPageBits = 12;  // 4096 nodes a slab page
  const SteadyTime* cell = nullptr;          // the clock's cell, or nullptr
  TimerNode* const* pages = nullptr;         // each page's first node
  std::uint32_t highWater = 0;               // nodes ever handed out
  std::int64_t lastAdvanceNs = 0;            // the latest time advanced to
  SteadyTime epoch{};                        // tick 0
  // The last (cell time, delay) a restart was asked for and the deadline
  // tick they make: restartSlow() keeps it, advance() clears it (the tick
  // also depends on lastAdvanceNs). A tick of 0 is no entry: every wheel
  // timer's deadline is at least 1, so the lazy case fails on it.
  SteadyTime cacheTime{};
  std::int64_t cacheDelay = 0;
  std::uint64_t cacheTick = 0;

  /// Nanoseconds from the epoch to t; a clock that went backwards is
  /// clamped to the latest time advanced to.
  std::uint64_t baseNs(SteadyTime t) const noexcept {
    std::int64_t base = 0;
    if (t > epoch) base = std::chrono::duration_cast<std::chrono::nanoseconds>(t - epoch).count();
    if (base < lastAdvanceNs) base = lastAdvanceNs;
    return static_cast<std::uint64_t>(base);
  }
  /// The tick of t + d for d > 0: ceil((base + d) / 1 ms) without overflowing.
  std::uint64_t tickAfter(SteadyTime t, std::int64_t d) const noexcept {
    return (baseNs(t) + static_cast<std::uint64_t>(d) + 999999u) / 1000000u;
  }
};

/// `d` in nanoseconds, saturated at nanoseconds::max() (and min()): a plain
/// conversion of Millis::max() overflows into the past. Integer arithmetic
/// for integer durations (one compare on the arm/restart path). O(1).
template <typename Rep, typename Period>
constexpr std::chrono::nanoseconds saturatingNanos(
    std::chrono::duration<Rep, Period> d) noexcept {
  using Ns = std::chrono::nanoseconds;
  using R = std::ratio_divide<Period, std::nano>;
  if constexpr (std::is_integral_v<Rep> && R::den == 1) {
    // A whole number of nanoseconds per tick: overflow iff |count| > max/num.
    constexpr Ns::rep kLimit = Ns::max().count() / R::num;
    if (d.count() > kLimit) return Ns::max();
    if constexpr (std::is_signed_v<Rep>) {
      if (d.count() < -kLimit) return Ns::min();
    }
    return Ns(static_cast<Ns::rep>(d.count()) * static_cast<Ns::rep>(R::num));
  } else {
    // Finer than a nanosecond, or floating point: checked in long double.
    using Wide = std::chrono::duration<long double, std::nano>;
    const Wide w = std::chrono::duration_cast<Wide>(d);
    if (w >= Wide(static_cast<long double>(Ns::max().count()))) return Ns::max();
    if (w <= Wide(static_cast<long double>(Ns::min().count()))) return Ns::min();
    return std::chrono::duration_cast<Ns>(d);
  }
}
}  // namespace detail

/// Where "now" comes from. Never the wall clock.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual SteadyTime now() const noexcept = 0;
  /// A clock whose time is one variable that its owner sets (ManualClock)
  /// returns that variable here, and the library reads it directly on its
  /// per-call paths (arm, restart, a keystroke) instead of calling now():
  /// no virtual call there. The contract: the variable lives as long as
  /// the clock and now() returns its value; cell() is asked once, when a
  /// component is built on the clock, and must keep returning the same
  /// pointer; the variable is read without any synchronisation, so it may
  /// only change on the thread that uses the component (or under the lock
  /// that guards it: SyncKeeper's). A clock that another thread moves
  /// returns nullptr here, the default, and now() is called every time.
  virtual const SteadyTime* cell() const noexcept { return nullptr; }
};

/// std::chrono::steady_clock.
class SteadyClock final : public Clock {
 public:
  SteadyTime now() const noexcept override {
    return std::chrono::steady_clock::now();
  }
  /// A process-wide instance (the default of every component).
  static SteadyClock& instance() noexcept;
};

/// A clock that moves only when told to: tests, simulations, benchmarks,
/// and an event loop's time for the current turn. A loop that reads the
/// steady clock once per turn and set()s it here (as libuv's uv_now() and
/// Node's timers do) saves a clock read per call, which can be most of the
/// cost of a keystroke's restart. Everything a turn arms or restarts then
/// counts from the turn's start. Set it on the loop's own thread (cell()).
class ManualClock final : public Clock {
 public:
  explicit ManualClock(SteadyTime start = SteadyTime{}) noexcept : now_(start) {}
  SteadyTime now() const noexcept override { return now_; }
  const SteadyTime* cell() const noexcept override { return &now_; }
  void set(SteadyTime t) noexcept { now_ = t; }
  void advanceBy(std::chrono::nanoseconds d) noexcept { now_ += d; }

 private:
  SteadyTime now_;
};

struct TimerHandle {
  std::uint32_t index = 0;
  std::uint32_t generation = 0;  // 0 = the null handle
  constexpr bool valid() const noexcept { return generation != 0; }
  friend constexpr bool operator==(TimerHandle a, TimerHandle b) noexcept {
    return a.index == b.index && a.generation == b.generation;
  }
  friend constexpr bool operator!=(TimerHandle a, TimerHandle b) noexcept {
    return !(a == b);
  }
};

/// What kind of callback a timer runs; registered once, shared by every
/// timer of that kind, so a timer carries 4 bytes of context instead of a
/// std::function.
using TimerHandlerId = std::uint16_t;

class TimerService {
 public:
  using Handler = std::function<void(TimerHandle, std::uint32_t data)>;

  /// `clock` must outlive the service; nullptr means SteadyClock.
  explicit TimerService(const Clock* clock = nullptr);
  ~TimerService();
  TimerService(const TimerService&) = delete;
  TimerService& operator=(const TimerService&) = delete;

  /// Registers a callback kind. Up to 65535 kinds at once (ids freed by
  /// removeHandler are reused); one more throws std::length_error (a
  /// programming error, not an input).
  TimerHandlerId addHandler(Handler handler);
  /// Unregisters a callback kind: every pending timer of that kind is
  /// cancelled (none fires), and the id may be handed out again by a later
  /// addHandler. False, doing nothing, for an unknown or removed id. From
  /// inside a timer callback of that very kind: the running callback
  /// finishes. O(timers ever allocated).
  bool removeHandler(TimerHandlerId handler);

  /// Arms a one-shot timer `delay` from clock.now() (a clock reading older
  /// than the latest time advanced to is clamped to it). A delay <= 0 makes it
  /// due at once: it fires in the next advance(). Any delay a nanoseconds
  /// can hold (~292 years) is kept exactly, to the tick; a deadline beyond
  /// SteadyTime::max() never fires.
  /// Returns the handle; the null handle only if `handler` is unknown.
  TimerHandle arm(std::chrono::nanoseconds delay, TimerHandlerId handler,
                  std::uint32_t data);
  /// Any other duration (Millis, seconds...) is converted saturating: a
  /// delay too long for nanoseconds (Millis::max(), "never") never fires.
  template <typename Rep, typename Period>
  TimerHandle arm(std::chrono::duration<Rep, Period> delay, TimerHandlerId handler,
                  std::uint32_t data) {
    return arm(detail::saturatingNanos(delay), handler, data);
  }

  /// Moves a pending (or due, not yet run) timer to `delay` from now, later
  /// or earlier. Returns false, doing nothing, for a stale handle (fired,
  /// cancelled, or never armed). O(1). To a later (or the same) tick it
  /// touches only the timer's own node -- a keystroke's restart costs one
  /// memory access --, and advance() moves the timer when its old deadline
  /// comes (see Order above). With a clock that has a cell (ManualClock)
  /// that case is compiled inline at the call (see the end of this file).
  inline bool restart(TimerHandle timer, std::chrono::nanoseconds delay) noexcept;
  /// As above; the delay is converted saturating (see arm()).
  template <typename Rep, typename Period>
  bool restart(TimerHandle timer, std::chrono::duration<Rep, Period> delay) {
    return restart(timer, detail::saturatingNanos(delay));
  }

  /// Cancels a pending or due-not-yet-run timer; it will not fire. Returns
  /// true if it was pending ("cancelled"), false for a stale handle
  /// (it had fired, was cancelled already, or never existed). O(1).
  bool cancel(TimerHandle timer) noexcept;

  /// True while the timer is armed and has not run or been cancelled.
  bool isPending(TimerHandle timer) const noexcept;
  /// The context a pending timer was armed with.
  std::optional<std::uint32_t> dataOf(TimerHandle timer) const noexcept;

  /// Cancels every timer; none fires. Returns how many were pending.
  std::size_t cancelAll() noexcept;

  /// A lower bound of the earliest pending deadline, or nullopt if none.
  /// Never later than the earliest deadline; it may be earlier: when the
  /// earliest timer sits in a coarse slot, it is the tick at which that slot
  /// must be refined (at most a few per second for second-range timers), and
  /// after a restart to a later deadline, it may be the old deadline, where
  /// the timer is moved on;
  /// advance() there fires nothing early, and nextDeadline() then tells the
  /// next. With timers due now, the earliest due deadline (<= now).
  std::optional<SteadyTime> nextDeadline() const noexcept;

  /// Fires every timer due at `now` (at most `maxFire` callbacks; the rest
  /// stay due for the next call). `now` earlier than a previous call is
  /// clamped. Returns the number of callbacks run.
  std::size_t advance(SteadyTime now,
                      std::size_t maxFire = std::numeric_limits<std::size_t>::max());
  /// advance(clock.now()).
  std::size_t advance();

  /// Timers due but not yet run: left by a bounded advance, or armed with a
  /// zero delay (or re-armed from a callback) since the last advance.
  std::size_t dueCount() const noexcept;
  /// Pending timers (armed, not fired, not cancelled), due ones included.
  std::size_t size() const noexcept;
  /// Heap bytes held for timers: slab pages and their page table (0 when
  /// no page is held). The handler table, a fixed cost per registered kind,
  /// is not included.
  std::size_t bytes() const noexcept;
  std::uint64_t callbackErrors() const noexcept;
  /// Returns every slab page to the allocator when no timer is pending
  /// (otherwise does nothing).
  void shrinkToFit();

  const Clock& clock() const noexcept;

  /// Set the log sink for caught callback exceptions.
  void setLog(LogFn log);

 private:
  friend struct detail::TestAccess;
  struct Impl;
  bool restartSlow(TimerHandle timer, std::chrono::nanoseconds delay) noexcept;
  detail::TimerView view_;
  std::unique_ptr<Impl> impl_;
};

// restart()'s common case: a keystroke pushes its timer back. In random
// order its cost is the one cache miss on the timer's node, and how many of
// those misses overlap from one call to the next depends on how few
// instructions lie between them, so with a clock that has a cell it is
// compiled here, at the call: one read of the time, one load of the node,
// one store. The deadline tick is the one the last restart computed for
// the same time and delay (every keystroke of a loop's turn): two compares
// instead of the arithmetic. Everything else (another clock, a new time or
// delay, a stale handle, a timer to relink, a due one) is restartSlow(), in
// the library. A handle of generation 0 (never valid) fails the state
// check: a node of that generation was never armed.
inline bool TimerService::restart(TimerHandle timer,
                                  std::chrono::nanoseconds delay) noexcept {
  const detail::TimerView& v = view_;
  if (v.cell != nullptr && *v.cell == v.cacheTime && delay.count() == v.cacheDelay &&
      timer.index < v.highWater) {
    const std::uint64_t d = v.cacheTick;
    detail::TimerNode& n =
        v.pages[timer.index >> detail::TimerView::kPageBits]
               [timer.index & ((1u << detail::TimerView::kPageBits) - 1)];
    if (n.generation == timer.generation && n.state == detail::TimerState::kWheel &&
        d >= n.deadline()) {
      // Lazy: the list it sits in comes up no later than its old deadline,
      // which is no later than the new one; there the wheel places it again
      // by its deadline. One access to the node, no list touched.
      n.setDeadline(d);
      return true;
    }
  }
  return restartSlow(timer, delay);
}

}  // namespace roomkeeper

#endif  // ROOMKEEPER_TIMER_SERVICE_H_
