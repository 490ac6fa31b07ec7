// SPDX-License-Identifier: MIT
// File: src/keeper_impl.h -- Keeper's private state (shared with SyncKeeper).
#ifndef ROOMKEEPER_SRC_KEEPER_IMPL_H_
#define ROOMKEEPER_SRC_KEEPER_IMPL_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "rate_limiter.h"
#include "registry_impl.h"
#include "roomkeeper/keeper.h"
#include "typing_impl.h"

namespace roomkeeper {

struct Keeper::Impl {
  using ConnTimers =
      absl::flat_hash_map<std::uint64_t, TimerHandle, absl::Hash<std::uint64_t>,
                          std::equal_to<std::uint64_t>,
                          detail::CountingAllocator<std::pair<const std::uint64_t, TimerHandle>>>;
  Impl(KeeperCallbacks c, KeeperOptions o);
  ~Impl();

  Result connect(std::string_view session, std::string_view address, SessionHandle* out);
  Result connectAuthenticated(std::string_view session, std::string_view user,
                              std::string_view address, SessionHandle* out);
  /// Both connects' rate-limit step: kOk (*p prepared, or no limits), or
  /// the refusal to return with nothing changed.
  Result prepareLimits(std::string_view session, std::string_view user,
                       std::string_view address, detail::RateLimiter::Prepared* p);
  /// Logs a rate-limit warning that came due (at most one per warnInterval).
  void warnRefusal(std::uint32_t slot, const detail::RefusalWarning& w) noexcept;
  Result authenticate(std::string_view session, std::string_view user);
  Result checkAuthenticated(std::string_view session,
                            std::uint32_t* slot = nullptr) const;
  Result checkAuthenticated(SessionHandle session, std::uint32_t* slot) const;
  Result checkAuthenticatedSlot(std::uint32_t s, std::uint32_t* slot) const;
  Result disconnectSlot(std::uint32_t s);
  /// Inside a registry visitor (forEachMember and friends): mutations that
  /// could free what the visitor walks are refused (kBusy).
  bool busy() const noexcept { return reg.iterating.load(std::memory_order_relaxed) > 0; }
  // Every session-addressed call exists by id and by handle; both resolve
  // to a slot (or the refusal to return) and share one body.
  template <typename Id>
  std::uint32_t slotOf(Id id, Result* why) const {
    if constexpr (std::is_same_v<Id, SessionHandle>) {
      const std::uint32_t s = reg.fromHandle(id);
      if (s == detail::kNone) *why = Result::kStaleHandle;
      return s;
    } else {
      const std::uint32_t s = reg.findSession(id);
      if (s == detail::kNone) *why = Result::kNotConnected;
      return s;
    }
  }
  Result disconnect(std::string_view session);
  /// Both clearRoomTracking overloads: 0 when shut down, busy or unknown.
  std::size_t clearRoomTrackingSlot(std::uint32_t s);
  void runDisconnect(std::uint32_t s);
  void releaseConnTimersIfEmpty();
  ShutdownReport shutdown();
  void onAuthTimeout(TimerHandle h, std::uint32_t slot);
  /// Never throw: out of memory, the message is dropped and counted
  /// (false).
  bool queue(std::function<void()> fn) noexcept;
  void queueLog(LogLevel level, std::string msg) noexcept;
  void logStats();
  /// The bus's sessionUp, queued (no bus: nothing).
  void queueSessionUp(std::string_view session, std::string_view user) noexcept;
  /// A broadcast's local members, collected (null: nobody to tell). May
  /// throw (out of memory) with nothing queued.
  std::shared_ptr<detail::FanOut> collectLocal(const BroadcastTargets& targets,
                                               std::string_view event, std::string_view payload);
  /// Queues the emits of a collected fan-out as one event; its count.
  std::size_t queueFanOut(std::shared_ptr<detail::FanOut> f) noexcept;
  std::size_t maybeWarn();
  MemoryStats stats() const noexcept;

  KeeperCallbacks cb;
  KeeperOptions opt;
  TimerService timers;
  SessionRegistry registry;
  SessionRegistry::Impl& reg;
  TypingTimerManager typing;
  detail::RateLimiter limiter;
  std::size_t connBytes = 0;
  ConnTimers connTimers;
  TimerHandlerId authHandler = 0;
  TimerHandlerId statsHandler = 0;
  TimerHandle statsTimer;
  std::optional<SteadyTime> lastWarnTyping, lastWarnRooms, lastWarnConnections,
      lastWarnTransport, lastWarnRate;
  std::size_t checkTransport(std::size_t open);
  bool warnDue(std::optional<SteadyTime>& last);
  std::size_t authenticatedSessions = 0;  // sessions bound to a user (O(1) stats)
  std::uint64_t authTimeouts = 0;
  std::uint64_t forcedCleanups = 0;
  bool shut = false;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_SRC_KEEPER_IMPL_H_
