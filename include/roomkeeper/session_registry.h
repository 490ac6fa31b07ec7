// SPDX-License-Identifier: MIT
// File: roomkeeper/session_registry.h
//
// SessionRegistry: the two-way index of sessions, users and rooms.
//
// A session (one WebSocket connection, "sock-17") exists from connect() to
// disconnect(), whether or not it is in any room, and may belong to a user
// ("user-3"); a user may have several sessions (tabs, devices). A session is
// in any number of rooms ("job:42") up to a limit. The registry answers both
// directions in time proportional to the answer: the rooms of a session, the
// members of a room.
//
// Use it directly when your server has its own timers; use roomkeeper::Keeper
// (keeper.h) to get typing and connection timers and the whole disconnect
// sequence in one object.
//
//   roomkeeper::SessionRegistry reg;           // no callbacks: nothing called
//   reg.connect("sock-17", "user-3");
//   reg.trackRoom("sock-17", "job:42");         // Result::kOk
//   reg.trackRoom("sock-17", "job:42");         // Result::kAlreadyDone
//   reg.disconnect("sock-17");                 // leaves job:42, forgets it
//   reg.trackRoom("sock-17", "job:7");          // Result::kNotConnected
//
// Memory layout: ids are interned. Each session, user and room is a slot in
// a paged slab, found by name through a hash set of 32-bit slot numbers.
// A membership is two 8-byte entries, one in the session's room list and
// one in the room's member list, each holding the other's position, so that
// join, leave and leave-all are O(1) per membership. A room's slot and name
// are freed the moment its last member leaves.
//
// Thread safety: thread-compatible. Const methods may run concurrently with
// each other; any mutating call needs exclusive access. Keep a registry on
// one thread (an event loop, an Asio strand) or use roomkeeper::SyncKeeper.
//
// Ownership and lifetime: every string_view argument is copied if kept; the
// registry never keeps a reference to the caller's buffers. Views passed to
// callbacks and visitors are valid only for the duration of that call.
//
// Callbacks: all optional. They run on the calling thread, after the state
// change they report is complete, in the order the changes happened
// (socket.io's order: roomCreated, roomJoined; leave, roomLeft, roomDeleted).
// A callback may call back into the registry (join, leave, disconnect,
// anything): the nested call changes state at once and its own events are
// delivered after the current callback returns, before the outermost call
// returns. The three synchronous hooks -- canJoin, disconnecting and the
// forEachTarget/broadcast visitor -- run while their call is in progress and
// not from the event queue, so a call made from them delivers its own events
// before it returns, and a nested disconnect's `disconnecting` runs at once. A callback that throws is caught: the error is counted in
// RegistryStats::callbackErrors and logged, and the remaining events are
// still delivered. No callback runs while an internal container is iterated.
//
// Complexity: connect, disconnect's per-room work, trackRoom, untrackRoom,
// isMember are O(1) expected (isMember and trackRoom scan the shorter of the
// session's room list and the room's member list, and untrackRoom moves the
// session's later rooms up one to keep join order; the session side is
// bounded by Limits::maxRoomsPerSession). clearRoomTracking and disconnect
// are O(rooms of that session). getMemoryStats is O(1).
#ifndef ROOMKEEPER_SESSION_REGISTRY_H_
#define ROOMKEEPER_SESSION_REGISTRY_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "roomkeeper/callbacks.h"
#include "roomkeeper/result.h"

namespace roomkeeper {

/// What one client may make the registry allocate. Exceeding one gets a
/// specific Result and changes nothing. 0 means unlimited where noted.
struct Limits {
  std::size_t maxRoomsPerSession = 128;  // kTooManyRooms (Centrifuge's 128)
  std::size_t maxIdLength = 255;         // kInvalidId, for session, user, room
  std::size_t maxSessionsPerUser = 64;   // kTooManySessions; 0 = unlimited
                                         // (up to 16,777,215; O(1) unlink)
  std::size_t maxMembersPerRoom = 0;     // kRoomFull; 0 = unlimited
};

/// Host callbacks and observers. Every member may be empty.
struct RegistryCallbacks {
  /// The transport's leave: called once for every membership that ends, for
  /// whatever reason (untrackRoom, clearRoomTracking, disconnect, shutdown).
  std::function<void(std::string_view session, std::string_view room)> leave;
  /// Send one event to one session (used by broadcast()).
  std::function<void(std::string_view session, std::string_view event,
                     std::string_view payload)>
      emit;
  /// Authorization: called synchronously inside trackRoom before a join that
  /// would change state; returning false (or throwing) refuses it with
  /// kDenied. It may call back into the registry; trackRoom re-checks the
  /// session and the limits after it returns.
  std::function<bool(std::string_view session, std::string_view room)> canJoin;
  /// Observers, in socket.io-adapter's order.
  std::function<void(std::string_view room)> roomCreated;
  std::function<void(std::string_view room, std::string_view session)>
      roomJoined;
  std::function<void(std::string_view room, std::string_view session)>
      roomLeft;
  std::function<void(std::string_view room)> roomDeleted;
  /// Presence per user: online when the user's first session connects,
  /// offline when the last one is gone (after its rooms are left).
  std::function<void(std::string_view user)> userOnline;
  std::function<void(std::string_view user)> userOffline;
  /// Called at the start of disconnect(), synchronously, while the session's
  /// rooms are still intact (socket.io's "disconnecting").
  std::function<void(std::string_view session)> disconnecting;
  LogFn log;
};

/// O(1) counts, kept as the registry goes (never a recount).
struct RegistryStats {
  std::size_t sessions = 0;           // connected sessions
  std::size_t users = 0;              // users with at least one session
  std::size_t rooms = 0;              // non-empty rooms
  std::size_t memberships = 0;        // (session, room) pairs
  std::size_t sessionsWithRooms = 0;  // sessions in at least one room
  std::size_t bytes = 0;              // heap bytes the registry holds
  std::uint64_t callbackErrors = 0;   // host callbacks that threw
};

/// Who receives a broadcast, with socket.io's semantics: the union of
/// `rooms` (each session once) -- every connected session when `rooms` is
/// empty (socket.io's io.emit) --, minus every member of an `except` room,
/// minus `sender` (may be empty).
struct BroadcastTargets {
  std::vector<std::string_view> rooms;
  std::vector<std::string_view> except;
  std::string_view sender;
};

namespace detail {
/// Whether iterating `Rooms` gives names that outlive the step (references
/// into the container, views, C strings): trackRooms() accepts only those.
template <typename Rooms>
inline constexpr bool kKeepsNames = [] {
  using Ref = decltype(*std::begin(std::declval<const Rooms&>()));
  return std::is_lvalue_reference_v<Ref> ||
         std::is_same_v<std::decay_t<Ref>, std::string_view> ||
         std::is_same_v<std::decay_t<Ref>, const char*>;
}();

/// How many names trackRooms() takes at a time (prefetchRooms' most).
inline constexpr std::size_t kTrackRoomsChunk = 16;

/// The trackRooms() calls of SessionRegistry, Keeper and SyncKeeper (the
/// same four in each): per chunk of up to 16 names (views on the stack),
/// Self::prefetchRooms(names, n) starts their lookups, then
/// Self::trackRoom(session, name) joins each in turn.
template <typename Self>
class TrackRooms {
 public:
  template <typename Rooms>
  std::size_t trackRooms(std::string_view session, const Rooms& rooms,
                         std::vector<Result>* results = nullptr) {
    return inChunks(session, rooms, results);
  }
  template <typename Rooms>
  std::size_t trackRooms(SessionHandle session, const Rooms& rooms,
                         std::vector<Result>* results = nullptr) {
    return inChunks(session, rooms, results);
  }
  std::size_t trackRooms(std::string_view session, std::initializer_list<std::string_view> rooms,
                         std::vector<Result>* results = nullptr) {
    return inChunks(session, rooms, results);
  }
  std::size_t trackRooms(SessionHandle session, std::initializer_list<std::string_view> rooms,
                         std::vector<Result>* results = nullptr) {
    return inChunks(session, rooms, results);
  }

 private:
  template <typename Id, typename Rooms>
  std::size_t inChunks(Id session, const Rooms& rooms, std::vector<Result>* results) {
    using std::begin;
    using std::end;
    // The names are kept as views until their chunk is joined, so they must
    // outlive the call: a range that makes each name on the fly would leave
    // the views dangling.
    static_assert(kKeepsNames<Rooms>,
                  "trackRooms: pass a container of strings or string_views (the names "
                  "must outlive the call)");
    if (results) {
      results->clear();
      // Before any join: the one allocation that may fail comes first, and
      // the push_back below cannot throw.
      results->reserve(static_cast<std::size_t>(std::distance(begin(rooms), end(rooms))));
    }
    Self& self = static_cast<Self&>(*this);
    constexpr std::size_t kChunk = kTrackRoomsChunk;
    std::string_view chunk[kChunk];
    std::size_t n = 0, joined = 0;
    auto drain = [&] {
      self.prefetchRooms(chunk, n);
      for (std::size_t i = 0; i < n; ++i) {
        // A throw (what trackRoom throws: out of memory copying a name for
        // canJoin) leaves the results of the rooms before it.
        const Result r = self.trackRoom(session, chunk[i]);
        if (results) results->push_back(r);
        if (r == Result::kOk) ++joined;
      }
      n = 0;
    };
    for (const auto& room : rooms) {
      chunk[n++] = std::string_view(room);
      if (n == kChunk) drain();
    }
    if (n > 0) drain();
    return joined;
  }
};
}  // namespace detail

class SessionRegistry : public detail::TrackRooms<SessionRegistry> {
 public:
  SessionRegistry();
  explicit SessionRegistry(RegistryCallbacks callbacks, Limits limits = {});
  ~SessionRegistry();
  /// Moving hands everything over. The moved-from registry holds nothing
  /// and is safe to use: queries answer as for an empty registry (stats all
  /// 0), mutating calls return kShutDown; assigning to it revives it.
  SessionRegistry(SessionRegistry&&) noexcept;
  SessionRegistry& operator=(SessionRegistry&&) noexcept;
  SessionRegistry(const SessionRegistry&) = delete;
  SessionRegistry& operator=(const SessionRegistry&) = delete;

  // ---- Sessions ---------------------------------------------------------

  /// Starts a session. `user` may be empty (bind one later with bindUser).
  /// kOk; kAlreadyConnected if the id is live; kInvalidId; kTooManySessions.
  /// Emits userOnline for the user's first session. O(1).
  Result connect(std::string_view session, std::string_view user = {});
  /// As connect(), and stores the handle for later handle-based calls.
  Result connect(std::string_view session, std::string_view user,
                 SessionHandle* handle);

  /// Binds an anonymous session to a user (authentication). kOk;
  /// kAlreadyDone if already bound to this user; kUserMismatch if bound to
  /// another; kNotConnected; kTooManySessions; kInvalidId. O(1).
  Result bindUser(std::string_view session, std::string_view user);

  /// Ends a session: disconnecting observer (rooms intact), then every room
  /// left (leave + roomLeft + roomDeleted per room), then the session and its
  /// user link are forgotten (userOffline for the user's last session).
  /// Afterwards the id is unknown: a late trackRoom gets kNotConnected and
  /// allocates nothing; a late call with the old handle gets kStaleHandle.
  /// kOk; kNotConnected for an unknown or already disconnected id (a repeat
  /// call does nothing); kClosing if called again from inside the session's
  /// own disconnecting callback. O(rooms of the session).
  Result disconnect(std::string_view session);
  Result disconnect(SessionHandle session);

  // ---- Rooms ------------------------------------------------------------

  /// Joins `session` to `room`, creating the room if new. Idempotent
  /// (kAlreadyDone, no events). Refused, changing nothing: kNotConnected,
  /// kStaleHandle, kClosing, kInvalidId (empty or too long room),
  /// kTooManyRooms, kRoomFull, kDenied (canJoin said no). O(1).
  Result trackRoom(std::string_view session, std::string_view room);
  Result trackRoom(SessionHandle session, std::string_view room);

  /// std::size_t trackRooms(session, rooms, std::vector<Result>* results =
  /// nullptr), by id or by handle: joins `session` to each of `rooms` (a
  /// container of strings or string_views, or a braced list; the names
  /// must outlive the call), in order, with the same results,
  /// events and canJoin calls as one trackRoom() per room, each room's
  /// events delivered before the next room is joined. The difference is
  /// speed: the rooms' index entries, slots and member lists are fetched
  /// together first, so that their cache misses overlap instead of coming
  /// one after another (a connect that joins a session's rooms). Returns
  /// how many joined (kOk); `results`, if given, receives each room's
  /// Result in order (replacing its contents; reserved before any join).
  /// If a join throws (what trackRoom throws: std::bad_alloc), the rooms
  /// before it are joined and have their results, the rest are not tried.
  /// O(rooms).
  using detail::TrackRooms<SessionRegistry>::trackRooms;

  /// Leaves one room (an unsubscribe handler). kOk; kAlreadyDone if not a
  /// member; kNotConnected; kStaleHandle; kInvalidId. Deletes the room if it
  /// empties. Never grows anything (it may shrink a list, which can call
  /// malloc for the smaller copy). O(1).
  Result untrackRoom(std::string_view session, std::string_view room);
  Result untrackRoom(SessionHandle session, std::string_view room);

  /// Leaves every room of the session; the session stays connected. Returns
  /// how many rooms were left (0 for an unknown session). Rooms are left in
  /// the order they were joined (socket.io's), as by disconnect. O(its rooms).
  std::size_t clearRoomTracking(std::string_view session);
  std::size_t clearRoomTracking(SessionHandle session);

  // ---- Queries (const; views valid until the next mutating call) ---------

  bool isConnected(std::string_view session) const;
  bool isConnected(SessionHandle session) const;
  /// The handle of a live session, or the null handle.
  SessionHandle handleOf(std::string_view session) const;
  /// The id of a live session's handle, or empty.
  std::string_view idOf(SessionHandle session) const;
  /// The user a session is bound to, or empty.
  std::string_view userOf(std::string_view session) const;
  bool isMember(std::string_view session, std::string_view room) const;
  /// Members of a room (0 if there is no such room). O(1).
  std::size_t roomSize(std::string_view room) const;
  /// Rooms of a session (0 if unknown). O(1).
  std::size_t roomCount(std::string_view session) const;
  bool roomExists(std::string_view room) const;

  /// Zero-copy visitors, for fan-out. They return how many items were
  /// visited. The visitor must not mutate the registry: a mutating call made
  /// from inside a visitor is refused with kBusy (0 for clearRoomTracking
  /// and clear) and changes nothing. Use forEachTarget to mutate as you go.
  template <typename F>
  std::size_t forEachMember(std::string_view room, F&& visit) const {
    return forEachMemberImpl(
        room, detail::FunctionRef<void(std::string_view)>(visit));
  }
  template <typename F>
  std::size_t forEachRoomOf(std::string_view session, F&& visit) const {
    return forEachRoomOfImpl(
        session, detail::FunctionRef<void(std::string_view)>(visit));
  }
  template <typename F>
  std::size_t forEachSessionOfUser(std::string_view user, F&& visit) const {
    return forEachSessionOfUserImpl(
        user, detail::FunctionRef<void(std::string_view)>(visit));
  }
  template <typename F>
  std::size_t forEachSession(F&& visit) const {
    return forEachSessionImpl(detail::FunctionRef<void(std::string_view)>(visit));
  }
  /// Copying conveniences.
  std::vector<std::string> roomsOf(std::string_view session) const;
  std::vector<std::string> membersOf(std::string_view room) const;
  std::vector<std::string> sessionsOfUser(std::string_view user) const;
  std::size_t sessionCountOfUser(std::string_view user) const;

  // ---- Broadcast --------------------------------------------------------

  /// Calls `visit(session)` once per target (see BroadcastTargets). The
  /// targets are computed first, then visited, so the visitor may call back
  /// into the registry; a target that disconnects before its turn is skipped.
  /// Returns the number visited. O(members of the named rooms).
  template <typename F>
  std::size_t forEachTarget(const BroadcastTargets& targets, F&& visit) {
    return forEachTargetImpl(
        targets, detail::FunctionRef<void(std::string_view)>(visit));
  }
  /// Sends `event` with `payload` through the `emit` callback to every
  /// target. Returns how many were sent (0 if no emit callback is set).
  std::size_t broadcast(const BroadcastTargets& targets, std::string_view event,
                        std::string_view payload);

  // ---- Statistics -------------------------------------------------------

  /// O(1), from counters kept as the registry changes.
  RegistryStats getMemoryStats() const noexcept;
  const Limits& limits() const noexcept;

  /// Leaves every room of every session (host `leave` per membership) and
  /// forgets every session, as disconnect() does but without calling the
  /// `disconnecting` hook; afterwards every count is 0. A session whose own
  /// disconnect is in progress is left to it. Returns the sessions ended.
  std::size_t clear();

 private:
  std::size_t forEachMemberImpl(
      std::string_view room,
      detail::FunctionRef<void(std::string_view)> visit) const;
  std::size_t forEachRoomOfImpl(
      std::string_view session,
      detail::FunctionRef<void(std::string_view)> visit) const;
  std::size_t forEachSessionOfUserImpl(
      std::string_view user,
      detail::FunctionRef<void(std::string_view)> visit) const;
  std::size_t forEachSessionImpl(
      detail::FunctionRef<void(std::string_view)> visit) const;
  std::size_t forEachTargetImpl(
      const BroadcastTargets& targets,
      detail::FunctionRef<void(std::string_view)> visit);
  // trackRooms(): starts the lookups of a chunk of rooms (a hint).
  void prefetchRooms(const std::string_view* rooms, std::size_t n) noexcept;

  friend class detail::TrackRooms<SessionRegistry>;
  friend class Keeper;
  friend class TypingTimerManager;
  friend class SyncKeeper;
  friend struct detail::TestAccess;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_SESSION_REGISTRY_H_
