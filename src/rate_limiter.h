// SPDX-License-Identifier: MIT
// File: src/rate_limiter.h -- the Keeper's rate limits (rate_limits.h).
//
// Buckets are GCRA time stamps (int64 nanoseconds since the limiter's
// epoch): a bucket whose stamp is <= now is full. Per-session buckets sit in
// flat arrays indexed by the registry's session slot; address and user keys
// in two KeyTables (a hash index to a record, records recycled through a
// free list, the idle ones -- no session -- in a list by the time they went
// idle, each with a timer that forgets it when its buckets are full).
//
// Every check is split in two: admit (reads, changes nothing) and take
// (writes the new stamp), so that the Keeper takes a token only for a call
// it then carries out.
#ifndef ROOMKEEPER_SRC_RATE_LIMITER_H_
#define ROOMKEEPER_SRC_RATE_LIMITER_H_

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "roomkeeper/rate_limits.h"
#include "roomkeeper/result.h"
#include "roomkeeper/timer_service.h"

namespace roomkeeper {
namespace detail {

constexpr std::uint32_t kNoKey = 0xffffffffu;

/// A bucket's constants, from a RateLimit.
struct Rule {
  std::int64_t interval = 0;   // ns per token; 0 = off
  std::int64_t tolerance = 0;  // (burst - 1) * interval
  bool on() const noexcept { return interval > 0; }
  /// GCRA: would a call at `now` be allowed? If so *next is the new stamp.
  bool admits(std::int64_t stamp, std::int64_t now, std::int64_t* next) const noexcept {
    const std::int64_t t = stamp > now ? stamp : now;
    if (t - now > tolerance) return false;
    // Saturating: a clock near the end of int64 nanoseconds stays there.
    *next = t > std::numeric_limits<std::int64_t>::max() - interval
                ? std::numeric_limits<std::int64_t>::max()
                : t + interval;
    return true;
  }
};

/// What a refusal is counted as (MemoryStats::rateLimited*).
enum class Refusal : std::uint8_t { kConnects, kConcurrent, kJoins, kTyping, kKeysFull, kHost };
constexpr int kRefusalKinds = 6;

/// A refusal that has just reached RateLimits::warnAfterRefusals in a row:
/// the Keeper logs it (it knows the session's name). `key` is the address
/// or user refused (empty for a session's own bucket), valid until the next
/// call; `kind` the host kind for Refusal::kHost.
struct RefusalWarning {
  bool due = false;
  Refusal why = Refusal::kConnects;
  std::string_view key;
  std::int64_t run = 0;
  RateKindId kind = 0;
};

class RateLimiter {
 public:
  /// `timers` runs the forget timers; the clock is read at every check.
  RateLimiter(const RateLimits& limits, const Clock& clock, TimerService& timers);
  ~RateLimiter();
  RateLimiter(const RateLimiter&) = delete;
  RateLimiter& operator=(const RateLimiter&) = delete;

  /// Anything configured at all (else the Keeper skips every check).
  bool any() const noexcept { return any_; }
  bool limitsUsers() const noexcept { return userStride_ > 0; }
  /// Nanoseconds since the limiter started, by the Keeper's clock (0 if
  /// the clock reads earlier).
  std::int64_t now() const noexcept {
    const SteadyTime t = cell_ ? *cell_ : clock_.now();
    if (t <= epoch_) return 0;
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t - epoch_).count();
  }

  // ---- a session's life: prepare (may refuse or throw), then commit ----
  /// The keys a connect or authenticate will hold.
  struct Prepared {
    std::uint32_t address = kNoKey;
    std::uint32_t user = kNoKey;
    bool addressIsNew = false;
    bool userIsNew = false;
  };
  /// Before a connect (`user` non-empty: connectAuthenticated): kOk or
  /// kRateLimited (counted, nothing changed: every check is made before
  /// anything is). On kOk the address's and the user's keys exist (made if
  /// new, full buckets) and the per-session arrays hold `slots` slots.
  /// Throws std::bad_alloc with nothing held (abandon is not needed).
  Result prepareConnect(std::string_view address, std::string_view user, std::size_t slots,
                        Prepared* p, RefusalWarning* warn);
  /// Before binding a user: the same for the user's key (kRateLimited when
  /// the table is full of users with sessions).
  Result prepareUser(std::string_view user, Prepared* p, RefusalWarning* warn);
  /// The registry said no: keys made for the call are forgotten again.
  void abandon(const Prepared& p) noexcept;
  /// The registry said yes: the session in `slot` holds the keys and takes
  /// a connect token (and a user, if prepared).
  void commitConnect(std::uint32_t slot, const Prepared& p) noexcept;
  void commitUser(std::uint32_t slot, const Prepared& p) noexcept;
  /// The session in `slot` is gone: its buckets, its hold on its keys.
  void release(std::uint32_t slot) noexcept;

  // ---- calls of a session ----
  static constexpr std::size_t kJoins = 0;
  static constexpr std::size_t kTyping = 1;
  /// A built-in session kind: true if allowed (or no limit), with the new
  /// stamp in *next; false = refused (counted).
  bool admit(std::uint32_t slot, std::size_t which, std::int64_t* next,
             RefusalWarning* warn) noexcept;
  void take(std::uint32_t slot, std::size_t which, std::int64_t next) noexcept;
  /// A host kind, checked and taken at once: kOk, kRateLimited,
  /// kUnknownKind, kNotAuthenticated (a user kind before authenticate).
  /// The common case (a session-scoped kind, allowed) is inline here.
  Result allow(std::uint32_t slot, RateKindId kind, RefusalWarning* warn) noexcept {
    if (kind < hostKinds_.size()) {
      const HostKind& hk = hostKinds_[kind];
      if (hk.scope == RateScope::kSession) {
        if (!hk.rule.on()) return Result::kOk;
        std::int64_t* row = sessionRow(slot);
        std::int64_t next;
        if (hk.rule.admits(row[hk.column], now(), &next)) {
          row[hk.column] = next;
          if (row[sessionStride_ - 1] != 0) row[sessionStride_ - 1] = 0;
          return Result::kOk;
        }
      }
    }
    return allowSlow(slot, kind, warn);
  }

  std::uint64_t refusals(Refusal why) const noexcept { return refusals_[int(why)]; }
  std::uint64_t hostRefusals(RateKindId kind) const noexcept {
    return kind < hostRefusals_.size() ? hostRefusals_[kind] : 0;
  }
  std::size_t keys() const noexcept;  // addresses + users tracked
  std::size_t bytes() const noexcept;
  const RateLimits& limits() const noexcept { return limits_; }
  /// Forgets every key and session (shutdown): timers cancelled, memory
  /// released.
  void clear() noexcept;

 private:
  struct KeyTable;
  Result allowSlow(std::uint32_t slot, RateKindId kind, RefusalWarning* warn) noexcept;
  void ensureSlots(std::size_t need);
  void releaseSessionArrays() noexcept;
  std::int64_t* sessionRow(std::uint32_t slot) noexcept {
    return sessionStamps_.data() + std::size_t{slot} * sessionStride_;
  }
  std::int64_t* runOf(std::uint32_t slot) noexcept { return sessionRow(slot) + sessionStride_ - 1; }
  void countWarn(std::int64_t* run, Refusal why, std::string_view key,
                 RefusalWarning* warn) noexcept;
  void onForget(std::uint32_t data);

  RateLimits limits_;
  const Clock& clock_;
  const SteadyTime* cell_;  // clock_.cell(): read without a virtual call
  SteadyTime epoch_;
  TimerService& timers_;
  TimerHandlerId forgetHandler_ = 0;
  bool any_ = false;
  Rule connect_;
  Rule builtin_[2];                        // joins, typing
  struct HostKind {
    Rule rule;
    std::uint32_t column = 0;  // in its scope's row of stamps
    RateScope scope = RateScope::kSession;
  };
  std::vector<HostKind> hostKinds_;
  std::size_t sessionStride_ = 2;          // joins, typing, session kinds, run
  std::size_t addressStride_ = 1;          // connect, address kinds
  std::size_t userStride_ = 0;             // user kinds
  bool tracksAddresses_ = false;
  // Per session slot (sized to the highest slot seen, released when the
  // last session goes).
  std::vector<std::int64_t> sessionStamps_;
  std::vector<std::uint32_t> sessionAddress_;
  std::vector<std::uint32_t> sessionUser_;
  std::size_t liveSessions_ = 0;
  std::unique_ptr<KeyTable> addresses_;
  std::unique_ptr<KeyTable> users_;
  std::uint64_t refusals_[kRefusalKinds] = {};
  std::int64_t keysFullRun_ = 0;
  std::vector<std::uint64_t> hostRefusals_;
};

}  // namespace detail
}  // namespace roomkeeper

#endif  // ROOMKEEPER_SRC_RATE_LIMITER_H_
