// SPDX-License-Identifier: MIT
// File: src/typing_impl.h -- TypingTimerManager's private state.
#ifndef ROOMKEEPER_SRC_TYPING_IMPL_H_
#define ROOMKEEPER_SRC_TYPING_IMPL_H_

#include <deque>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "internal.h"
#include "registry_impl.h"
#include "roomkeeper/typing_timer_manager.h"

namespace roomkeeper {

struct TypingKey {
  std::string user;
  std::string thread;
  static std::size_t heapBytesOf(const std::string& u, const std::string& t) {
    return (u.capacity() > 15 ? u.capacity() + 1 : 0) +
           (t.capacity() > 15 ? t.capacity() + 1 : 0);
  }
};
struct TypingKeyView {
  std::string_view user;
  std::string_view thread;
};
struct TypingKeyHash {
  using is_transparent = void;
  std::size_t operator()(const TypingKey& k) const noexcept;
  std::size_t operator()(const TypingKeyView& k) const noexcept;
};
struct TypingKeyEq {
  using is_transparent = void;
  template <typename A, typename B>
  bool operator()(const A& a, const B& b) const noexcept {
    return std::string_view(a.user) == std::string_view(b.user) &&
           std::string_view(a.thread) == std::string_view(b.thread);
  }
};

/// One (user, thread) typing indicator.
struct Indicator {
  std::string user;  // the user id, or the session id of an anonymous session
  std::string thread;
  TimerHandle timer;
  std::vector<SessionHandle> sessions;  // the user's sessions typing in it
  bool live = false;
  std::size_t heapBytes() const noexcept {
    return TypingKey::heapBytesOf(user, thread) + sessions.capacity() * sizeof(SessionHandle);
  }
};

struct SessionTyping {
  std::vector<std::uint32_t> entries;
};

struct PersistEntry {
  std::uint64_t seq = 0;
  PersistCall call{PersistOp::kTypingStarted, {}, {}};
};

struct TypingTimerManager::Impl {
  Impl(SessionRegistry& r, TimerService& t, TypingCallbacks c, TypingOptions o);
  ~Impl();

  std::string_view userKeyOf(std::uint32_t s) const;
  Result start(std::string_view session, std::string_view thread);
  Result stop(std::string_view session, std::string_view thread);
  bool addSession(std::uint32_t idx, SessionHandle sh);
  void unlinkSession(std::uint32_t idx, std::uint64_t key);
  void end(std::uint32_t idx, std::uint32_t typer);
  void onExpire(TimerHandle h, std::uint32_t idx);
  std::size_t clearSession(std::uint32_t s);
  std::size_t onDisconnect(std::uint32_t s);
  std::size_t clearAll();
  void releaseIdle();
  void emitToThread(std::uint32_t s, std::string_view userKey, std::string_view thread,
                    const std::string& event);
  void persist(PersistOp op, std::string_view user, std::string_view thread);
  void scheduleDrain(std::uint64_t upTo);
  std::size_t drain(bool force, std::uint64_t upTo);
  std::size_t discardPersistence();
  std::size_t finalFlush();
  void reportError(std::string_view where) noexcept;
  TypingStats stats() const noexcept;

  SessionRegistry& registry;
  SessionRegistry::Impl& reg;
  TimerService& timers;
  TypingCallbacks cb;
  TypingOptions opt;
  std::size_t bytes = 0;
  std::vector<Indicator> entries;
  std::vector<std::uint32_t> freeEntries;
  absl::flat_hash_map<TypingKey, std::uint32_t, TypingKeyHash, TypingKeyEq,
                      detail::CountingAllocator<std::pair<const TypingKey, std::uint32_t>>>
      index;
  absl::flat_hash_map<std::uint64_t, SessionTyping, absl::Hash<std::uint64_t>,
                      std::equal_to<std::uint64_t>,
                      detail::CountingAllocator<std::pair<const std::uint64_t, SessionTyping>>>
      bySession;
  TimerHandlerId expireHandler = 0;
  TimerHandlerId retryHandler = 0;
  // Persistence.
  std::deque<PersistEntry> queue;
  std::uint64_t persistSeq = 0;
  bool inflight = false;
  std::uint64_t drainUpTo = 0;  // calls with seq <= this are due for delivery
  TimerHandle retryTimer;
  Millis backoff{100};
  std::uint64_t delivered_ = 0;
  std::uint64_t failures = 0;
  std::uint64_t dropped_ = 0;
  std::uint64_t callbackErrors = 0;
  std::recursive_mutex* mu = nullptr;  // SyncKeeper's lock, when there is one
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_SRC_TYPING_IMPL_H_
