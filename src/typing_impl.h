// SPDX-License-Identifier: MIT
// File: src/typing_impl.h -- TypingTimerManager's private state.
#ifndef ROOMKEEPER_SRC_TYPING_IMPL_H_
#define ROOMKEEPER_SRC_TYPING_IMPL_H_

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "internal.h"
#include "registry_impl.h"
#include "roomkeeper/bus.h"
#include "roomkeeper/typing_timer_manager.h"

namespace roomkeeper {

/// Who an indicator belongs to: a user id, or (anon) the id of a session
/// not bound to a user. The two are separate key spaces: an anonymous
/// session whose id equals a user id is not that user.
struct TypingKeyView {
  std::string_view user;
  std::string_view thread;
  bool anon = false;
};

/// One (user, thread) typing indicator: 64 bytes in a paged slab.
struct Indicator {
  detail::Name user;  // the user id, or the session id of an anonymous session
  detail::Name thread;
  TimerHandle timer;
  detail::EntryList sessions;  // {session slot, session generation}
  bool live = false;
  bool anon = false;   // user is a session id (see TypingKeyView)
  bool shown = false;  // with a bus: the local members were told typingStarted
};
static_assert(sizeof(Indicator) == 64, "an indicator is 64 bytes");
using IndicatorSlab = detail::Slab<Indicator, &Indicator::user>;

/// A session's typing indicators, {indicator, 1 if started while the
/// session was anonymous}, kept beside the registry's session slot (by slot
/// number, in pages of kTypingListPage; when pages are made and go: see
/// holdLists). `generation` is the session's, of that slot: a list whose
/// generation is not the slot's current one is an earlier session's, which
/// the slot's session does not see.
struct TypingList {
  detail::EntryList list;
  std::uint32_t generation = 0;
};
inline constexpr std::uint32_t kTypingListPageBits = 10;
inline constexpr std::uint32_t kTypingListPage = 1u << kTypingListPageBits;

/// The (user, thread) index: 4-byte slot numbers, names looked up in the slab.
struct IndicatorHash {
  using is_transparent = void;
  const IndicatorSlab* slab;
  std::size_t operator()(std::uint32_t i) const noexcept;
  std::size_t operator()(const TypingKeyView& k) const noexcept;
};
struct IndicatorEq {
  using is_transparent = void;
  const IndicatorSlab* slab;
  bool operator()(std::uint32_t a, std::uint32_t b) const noexcept { return a == b; }
  bool operator()(std::uint32_t a, const TypingKeyView& b) const noexcept {
    const Indicator& e = (*slab)[a];
    return e.anon == b.anon && e.user.view() == b.user && e.thread.view() == b.thread;
  }
  bool operator()(const TypingKeyView& a, std::uint32_t b) const noexcept {
    return (*this)(b, a);
  }
};
using IndicatorIndex = absl::flat_hash_set<std::uint32_t, IndicatorHash, IndicatorEq,
                                           detail::CountingAllocator<std::uint32_t>>;

struct PersistEntry {
  std::uint64_t seq = 0;
  PersistCall call{PersistOp::kTypingStarted, {}, {}};
};

struct TypingTimerManager::Impl {
  Impl(SessionRegistry& r, TimerService& t, TypingCallbacks c, TypingOptions o);
  ~Impl();

  TypingKeyView keyOf(std::uint32_t s, std::string_view thread) const;
  bool isMemberOfThread(std::uint32_t s, std::string_view thread) const;
  Result start(std::string_view session, std::string_view thread);
  Result startSlot(std::uint32_t s, std::string_view thread);
  Result stop(std::string_view session, std::string_view thread);
  Result stopSlot(std::uint32_t s, std::string_view thread);
  bool addSession(std::uint32_t idx, std::uint32_t s);
  void unlinkSession(std::uint32_t idx, std::uint32_t sl, std::uint32_t gen);
  void end(std::uint32_t idx, std::uint32_t typer);
  void onExpire(TimerHandle h, std::uint32_t idx);
  std::size_t clearSession(std::uint32_t s);
  std::size_t onDisconnect(std::uint32_t s);
  std::size_t clearAll();
  void releaseIdle();
  /// `event` to the thread room's members but the typer's own sessions,
  /// as one queued event; how many members it is for.
  std::size_t emitToThread(std::uint32_t s, const TypingKeyView& key,
                           const std::string& event) noexcept;
  /// An indicator started or ended here: emitted to local members (unless
  /// the bus has the user typing there elsewhere) and told to the bus.
  void announce(std::uint32_t s, const TypingKeyView& key, bool started, Indicator& e) noexcept;
  /// Keeper::replayToBus: typing(started) for every user indicator.
  std::size_t replayToBus();
  /// Keeper::relayTyping.
  std::size_t relay(std::string_view user, std::string_view thread, bool started) noexcept;
  /// With a bus: marks (user, thread) as told to the local members (on) or
  /// no longer (off); true if that changed anything.
  bool markShown(std::string_view user, std::string_view thread, bool on);
  /// The thread's room (threadRoomPrefix + thread): its slot, or kNone
  /// when it has no member here. May throw (a name past 512 bytes).
  std::uint32_t threadRoomSlot(std::string_view thread) const;
  /// The user is offline everywhere: typingStopped for whatever of theirs
  /// the local members were still shown (a stop that never came).
  std::size_t forgetShown(std::string_view user) noexcept;
  void persist(PersistOp op, std::string_view user, std::string_view thread) noexcept;
  void undoStart(std::uint32_t idx) noexcept;
  /// Session slot s's typing list, or nullptr when its session has none
  /// (it never typed, or its page went while nobody typed). `s` must be a
  /// live session's slot (it reads the registry's slot). Inline: the
  /// keystroke path starts here.
  detail::EntryList* listOf(std::uint32_t s) noexcept {
    TypingList* t = listAt(s);
    return t != nullptr && t->generation == reg.sessionSlots[s].generation ? &t->list : nullptr;
  }
  /// Slot s's entry in `lists`, whichever session it belongs to; nullptr
  /// when its page is not made.
  TypingList* listAt(std::uint32_t s) noexcept {
    const std::uint32_t p = s >> kTypingListPageBits;
    if (p >= lists.size() || !lists[p]) return nullptr;
    return &lists[p][s & (kTypingListPage - 1)];
  }
  /// Session slot s's typing list, made if need be: its page, and an
  /// earlier session's list in the slot released. nullptr: out of memory.
  detail::EntryList* makeList(std::uint32_t s) noexcept;
  /// Once no session types (sessionsTyping is 0), every list page goes, so
  /// that bytes return to where they started; unless holdLists.
  void releaseListsIfIdle() noexcept {
    if (!holdLists) releaseLists();
  }
  /// Every list page goes, if no session types (every list is empty).
  void releaseLists() noexcept;
  void scheduleDrain(std::uint64_t upTo) noexcept;
  /// Arms the retry timer unless it is armed (out of memory: does nothing).
  void ensureRetry(Millis delay) noexcept;
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
  IndicatorSlab entries;
  IndicatorIndex index;
  std::size_t sessionsTyping = 0;  // sessions with a non-empty typing list
  std::vector<std::unique_ptr<TypingList[]>> lists;  // by session slot; null: not made
  // Standalone (false): a session's list is made at its first keystroke
  // and the pages go each time nobody types. Under a Keeper (true): the
  // list is made at connect (so a first keystroke writes no fresh page) and
  // the pages go with the last session (Keeper::Impl::runDisconnect), at
  // shutdown, or after a connect taken back when no session is left.
  bool holdLists = false;
  TimerHandlerId expireHandler = 0;
  TimerHandlerId retryHandler = 0;
  // Persistence.
  std::deque<PersistEntry> queue;
  std::size_t queueHeap = 0;  // heapOf() of every queued call, in stats().bytes
  static std::size_t heapOf(const PersistCall& c) noexcept;
  std::uint64_t persistSeq = 0;
  bool inflight = false;
  std::thread::id inflightThread;           // who delivers it (under mu)
  std::condition_variable_any inflightDone;  // inflight went false
  std::uint64_t drainUpTo = 0;  // calls with seq <= this are due for delivery
  TimerHandle retryTimer;
  Millis backoff{100};
  std::uint64_t delivered_ = 0;
  std::uint64_t failures = 0;
  std::uint64_t dropped_ = 0;
  std::uint64_t callbackErrors = 0;
  std::recursive_mutex* mu = nullptr;  // SyncKeeper's lock, when there is one
  Bus* bus = nullptr;                  // KeeperOptions::bus (see bus.h)
  // With a bus, what the local members were told typingStarted for and not
  // yet typingStopped: Indicator::shown for a (user, thread) with an
  // indicator here; this table, user -> threads, for one without (told by
  // another Keeper's relay, or an indicator here that ended while another
  // Keeper still had the user typing). Each start and each stop reaches a
  // member once, whichever Keeper's news comes first.
  absl::flat_hash_map<std::string, std::vector<std::string>> shown;
  std::size_t shownBytes = 0;  // in stats().bytes
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_SRC_TYPING_IMPL_H_
