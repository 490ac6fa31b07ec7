// SPDX-License-Identifier: MIT
// File: roomkeeper/callbacks.h
//
// The small vocabulary shared by every roomkeeper component: log levels,
// a non-owning function reference used for zero-copy visitors, and the
// session handle returned by connect().
#ifndef ROOMKEEPER_CALLBACKS_H_
#define ROOMKEEPER_CALLBACKS_H_

#include <cstdint>
#include <functional>
#include <string_view>
#include <type_traits>
#include <utility>

namespace roomkeeper {

enum class LogLevel : std::uint8_t { kDebug, kInfo, kWarning, kError };

std::string_view toString(LogLevel level) noexcept;

/// The host's log sink. Called outside every internal lock, never while an
/// internal container is iterated. May be empty (nothing is logged).
using LogFn = std::function<void(LogLevel, std::string_view message)>;

/// A session as returned by connect(). Cheaper than the string id for
/// repeated calls (no hashing), and exact about staleness: once the session
/// has disconnected, every call with its handle returns kStaleHandle, even if
/// the same string id has connected again since.
struct SessionHandle {
  std::uint32_t index = 0;
  std::uint32_t generation = 0;  // 0 = the null handle
  constexpr bool valid() const noexcept { return generation != 0; }
  friend constexpr bool operator==(SessionHandle a, SessionHandle b) noexcept {
    return a.index == b.index && a.generation == b.generation;
  }
  friend constexpr bool operator!=(SessionHandle a, SessionHandle b) noexcept {
    return !(a == b);
  }
};

class TimerService;
class SessionRegistry;

namespace detail {

/// Test hooks, for tests/ only (not part of the API): set every free timer
/// node / session slot, and the base of new ones, to generation `g`, so the
/// 32-bit wrap can be reached without 2^32 operations.
struct TestAccess {
  static void ageTimers(TimerService& timers, std::uint32_t g);
  static void ageSessions(SessionRegistry& registry, std::uint32_t g);
};

/// A non-owning reference to a callable, for visitors that run inside one
/// call (absl::FunctionRef without making Abseil part of the API).
template <typename Sig>
class FunctionRef;

template <typename R, typename... Args>
class FunctionRef<R(Args...)> {
 public:
  template <typename F, typename = std::enable_if_t<!std::is_same_v<
                            std::decay_t<F>, FunctionRef>>>
  FunctionRef(F&& f) noexcept  // NOLINT: implicit by design
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, Args... args) -> R {
          return (*static_cast<std::remove_reference_t<F>*>(o))(
              std::forward<Args>(args)...);
        }) {}
  R operator()(Args... args) const {
    return call_(obj_, std::forward<Args>(args)...);
  }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

}  // namespace detail
}  // namespace roomkeeper

#endif  // ROOMKEEPER_CALLBACKS_H_
