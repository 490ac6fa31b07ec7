// SPDX-License-Identifier: MIT
// File: src/registry_impl.h -- SessionRegistry's private state, shared with
// Keeper (which drives the same event queue).
#ifndef ROOMKEEPER_SRC_REGISTRY_IMPL_H_
#define ROOMKEEPER_SRC_REGISTRY_IMPL_H_

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string_view>

#include "absl/container/flat_hash_set.h"
#include "internal.h"
#include "roomkeeper/session_registry.h"

namespace roomkeeper {

enum class SessionState : std::uint8_t { kFree, kLive, kClosing };

enum class EventKind : std::uint8_t {
  kMembershipEnded,  // host leave, then roomLeft observer
  kRoomCreated,
  kRoomJoined,
  kRoomDeleted,
  kUserOnline,
  kUserOffline,
  kCustom,  // Event::fn
};

// 48 bytes. A session's typing indicators are not here: the
// TypingTimerManager keeps them beside the slot (typing_impl.h), so a
// registry used without typing does not carry them.
struct SessionSlot {
  detail::Name name;
  detail::EntryList rooms;  // {room slot, position in room's members}
  std::uint32_t user = detail::kNone;
  std::uint32_t generation = 0;  // the last one issued (kept while free)
  std::uint32_t mark = 0;        // broadcast de-duplication stamp
  // Position in the user's session list (O(1) unlink however many sessions
  // a user has); 24 bits, so a user has at most kMaxUserSessions.
  std::uint32_t userPos : 24;
  SessionState state : 8;
  SessionSlot() noexcept : userPos(0), state(SessionState::kFree) {}
};
inline constexpr std::size_t kMaxUserSessions = (std::size_t{1} << 24) - 1;
static_assert(sizeof(SessionSlot) == 48, "a session slot is 48 bytes");
struct RoomSlot {
  detail::Name name;
  detail::EntryList members;  // {session slot, position in session's rooms}
};
struct UserSlot {
  detail::Name name;
  detail::EntryList sessions;  // {session slot, unused}
};

struct SessionRegistry::Impl {
  using SessionSlab = detail::Slab<SessionSlot, &SessionSlot::name>;
  using RoomSlab = detail::Slab<RoomSlot, &RoomSlot::name>;
  using UserSlab = detail::Slab<UserSlot, &UserSlot::name>;
  using SessionHash = detail::SlotHash<SessionSlab>;
  using SessionEq = detail::SlotEq<SessionSlab>;
  using RoomHash = detail::SlotHash<RoomSlab>;
  using RoomEq = detail::SlotEq<RoomSlab>;
  using UserHash = detail::SlotHash<UserSlab>;
  using UserEq = detail::SlotEq<UserSlab>;
  using SessionIndex = absl::flat_hash_set<std::uint32_t, SessionHash, SessionEq,
                                           detail::CountingAllocator<std::uint32_t>>;
  using RoomIndex = absl::flat_hash_set<std::uint32_t, RoomHash, RoomEq,
                                        detail::CountingAllocator<std::uint32_t>>;
  using UserIndex = absl::flat_hash_set<std::uint32_t, UserHash, UserEq,
                                        detail::CountingAllocator<std::uint32_t>>;

  Impl(RegistryCallbacks c, Limits l);
  ~Impl();

  std::uint32_t findSession(std::string_view id) const;
  std::uint32_t findRoom(std::string_view id) const;
  std::uint32_t findUser(std::string_view id) const;
  /// The handle's slot, or kNone if it is stale. Inline: every call by
  /// handle starts here.
  std::uint32_t fromHandle(SessionHandle h) const {
    if (!h.valid() || h.index >= sessionSlots.highWater()) return detail::kNone;
    const SessionSlot& s = sessionSlots[h.index];
    // A free slot keeps its last generation (so the next one is higher).
    if (s.state == SessionState::kFree || s.generation != h.generation) return detail::kNone;
    return h.index;
  }
  bool isMember(std::uint32_t s, std::uint32_t r) const;

  Result connect(std::string_view session, std::string_view user,
                 SessionHandle* handle);
  Result bindUser(std::string_view session, std::string_view user);
  /// What connect / bindUser would refuse before allocating anything
  /// (kOk: only an allocation failure is left), so that a caller with
  /// state of its own to prepare (the Keeper's rate limits) prepares it
  /// only for a call that will be made.
  Result checkConnect(std::string_view session, std::string_view user) const;
  Result checkBind(std::string_view session, std::string_view user) const;
  bool userFull(std::string_view user) const;
  Result linkUser(std::uint32_t s, std::string_view user, bool* newUser);
  void unlinkUser(std::uint32_t s);
  Result track(std::uint32_t s, std::string_view room);
  /// trackRooms(): fetches what joining these rooms will touch (a hint;
  /// at most detail::kTrackRoomsChunk rooms).
  void prefetchRooms(const std::string_view* rooms, std::size_t n) const noexcept;
  Result untrack(std::uint32_t s, std::string_view room);
  void removeMembership(std::uint32_t s, std::uint32_t pos);
  void leaveRoomSide(std::uint32_t s, detail::Entry e) noexcept;
  std::size_t clearRooms(std::uint32_t s);
  Result disconnect(std::uint32_t s);
  void finishDisconnect(std::uint32_t s);
  std::size_t clearAll();
  std::size_t forEachTarget(const BroadcastTargets& targets,
                            detail::FunctionRef<void(std::string_view)> visit);
  /// The same walk, by slot: for a visitor that changes nothing.
  std::size_t forEachTargetSlot(const BroadcastTargets& targets,
                                detail::FunctionRef<void(std::uint32_t)> visit);

  /// Never throws: out of memory, the event is dropped and counted.
  void pushEvent(EventKind kind, std::string_view a, std::string_view b) noexcept;
  /// Takes back a connect() that queued no event (its caller could not
  /// have what must go with it: a deadline, a user link). Silent: nothing
  /// had been told.
  void undoConnect(std::uint32_t s) noexcept;
  /// Takes session `s` out of the index (its name still set), and out of
  /// findSession()'s first guess: the one way a session leaves the index.
  void eraseSession(std::uint32_t s) noexcept {
    sessionIndex.erase(s);
    if (newest == s) newest = detail::kNone;
  }
  /// Marks a session slot free (its name and lists already released).
  void freeSessionSlot(std::uint32_t s) noexcept;
  void deliver(detail::Event& ev) noexcept;
  /// Delivers the queued events (inline: most calls queue none).
  void flush() noexcept {
    if (!events.empty()) events.drain([this](detail::Event& ev) { deliver(ev); });
  }
  /// Counts and logs the exception being handled; call inside catch. The
  /// count is taken under `mu` (SyncKeeper's lock) when there is one: a
  /// queued closure calls this after that lock was released.
  void reportError(std::string_view where) noexcept;

  RegistryCallbacks cb;
  Limits limits;
  bool wantMembershipEvents = false;
  std::size_t bytes = 0;  // declared before the containers that count into it
  SessionSlab sessionSlots;
  RoomSlab roomSlots;
  UserSlab userSlots;
  SessionIndex sessionIndex;
  // findSession()'s first guess: the session connected last, while it is in
  // the index (kNone once it leaves). Written only by connect() and
  // eraseSession(), so const lookups running at once only read it.
  std::uint32_t newest = detail::kNone;
  RoomIndex roomIndex;
  UserIndex userIndex;
  std::size_t memberships = 0;
  std::size_t sessionsWithRooms = 0;
  std::uint64_t callbackErrors = 0;
  std::recursive_mutex* mu = nullptr;  // SyncKeeper's lock, when there is one
  // Session generations (see freeSessionSlot): per slot, kept while free.
  static constexpr std::uint32_t kGenerationPinAt = 0x80000000u;
  std::uint32_t generationFloor = 0;  // every generation issued before the pages went
  std::uint32_t maxGeneration = 0;
  bool pinned = false;
  std::uint32_t markCounter = 0;
  mutable std::atomic<int> iterating{0};
  detail::EventQueue events;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_SRC_REGISTRY_IMPL_H_
