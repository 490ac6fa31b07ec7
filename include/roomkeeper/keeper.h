// SPDX-License-Identifier: MIT
// File: roomkeeper/keeper.h
//
// Keeper: a session's whole life in one object -- connect (auth deadline
// armed), authenticate, joins, typing, disconnect in the right order,
// shutdown -- over a SessionRegistry, a TypingTimerManager and the
// connection timers, all on one TimerService. Its statistics prove that
// nothing is left behind. This is what most servers should use.
//
//   roomkeeper::KeeperCallbacks cb;
//   cb.leave = [&](auto session, auto room) { transport.leave(session, room); };
//   cb.emit = [&](auto session, auto event, auto json) { transport.send(...); };
//   cb.closeSession = [&](auto session, auto reason) { transport.close(...); };
//   cb.persist = [&](const roomkeeper::PersistCall& c) { return db.write(c); };
//   roomkeeper::Keeper keeper(std::move(cb));
//   keeper.connect("sock-17");                 // 30 s to authenticate
//   keeper.authenticate("sock-17", "user-3");
//   keeper.trackRoom("sock-17", "thread:42");
//   keeper.startTyping("sock-17", "42");       // emits, persists, 5 s clear
//   keeper.disconnect("sock-17");              // everything goes
//   ... in the loop: keeper.advance(); sleep until keeper.nextDeadline()
//
// Disconnect order (disconnect() and forceCleanup()):
//   1. disconnecting(session, rooms) observer, with the rooms as they were;
//   2. the connection timer is cancelled;
//   3. typing timers cleared, typingStopped emitted for each indicator that
//      ends, persistence told; the kTypingStoppedAll wildcard when this is
//      the user's last session;
//   4. every room left: host leave(session, room) per room;
//   5. room tracking cleared;
//   6. the session, its user link and every map entry are gone
//      (userOffline for the user's last session).
// A second disconnect, or one of an unknown id, returns kNotConnected and
// does nothing -- including one made from the session's own disconnect
// callbacks, which run after the session is gone (kClosing is returned only
// if a call reaches the Keeper while the sequence itself is running).
//
// States and calls: before authenticate(), trackRoom and startTyping return
// kNotAuthenticated. After shutdown() every mutating call returns kShutDown
// and every count is 0.
//
// Thread safety: thread-compatible and loop-affine, like the registry. For
// a thread pool use SyncKeeper (sync_keeper.h), which wraps a Keeper.
// Callbacks: host callbacks run after the state change they report, on the
// calling thread (for timer events: the thread calling advance()), in the
// order of the changes, never while an internal container is iterated; they
// may call back into the Keeper (nested changes are applied at once, their
// callbacks run after the current one returns); a callback that throws is
// caught, counted (MemoryStats::callbackErrors) and logged, and the sequence
// goes on. Complexity: as the components; disconnect is O(rooms + typing
// indicators of that session + members of the thread rooms those indicators
// notify), independent of how many other sessions exist.
#ifndef ROOMKEEPER_KEEPER_H_
#define ROOMKEEPER_KEEPER_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "roomkeeper/bus.h"
#include "roomkeeper/callbacks.h"
#include "roomkeeper/rate_limits.h"
#include "roomkeeper/result.h"
#include "roomkeeper/session_registry.h"
#include "roomkeeper/timer_service.h"
#include "roomkeeper/typing_timer_manager.h"

namespace roomkeeper {

struct KeeperCallbacks {
  /// The transport's leave, once per membership that ends.
  std::function<void(std::string_view session, std::string_view room)> leave;
  /// Send an event (typingStarted, typingStopped, serverShutdown) to a session.
  std::function<void(std::string_view session, std::string_view event,
                     std::string_view payload)>
      emit;
  /// Ask the transport to close a session: "auth_timeout" or "shutdown".
  /// The Keeper has already forgotten the session, or will right after.
  std::function<void(std::string_view session, std::string_view reason)> closeSession;
  /// Typing persistence (see TypingTimerManager); false = retry later.
  PersistFn persist;
  LogFn log;
  /// Observers.
  std::function<void(std::string_view session, const std::vector<std::string>& rooms)>
      disconnecting;
  std::function<void(std::string_view user)> userOnline;
  std::function<void(std::string_view user)> userOffline;
  std::function<void(std::string_view room)> roomCreated;
  std::function<void(std::string_view room)> roomDeleted;
};

struct KeeperOptions {
  Limits limits;
  TypingOptions typing;
  Millis authTimeout{30000};  // 0 = no auth deadline
  // Leak warnings (log, kWarning), at most one per kind per warnInterval,
  // checked after each connect, join and typing start and by
  // checkThresholds(). The defaults are relative to what is connected, so a
  // healthy day of any size logs none, and each names the leak it points to:
  //  * typing: typing indicators > warnTypingPerSession x authenticated
  //    sessions, and > warnTypingTimers (a floor against noise at small
  //    counts). A normal client types in one thread at a time; a host that
  //    starts typing and never stops (or never lets it clear) crosses it.
  //  * memberships: tracked rooms > warnRoomsPerConnection x sessions, and
  //    > warnTrackedRooms. Crosses when a host joins rooms and never leaves
  //    them (a dispatch client holds ~7: role, user, crew, jobs, thread).
  //  * no connection: checkTransport(open) -- the host's own count of open
  //    transport connections -- finds more than warnSessionsWithoutConnection
  //    sessions the transport no longer has (a missing disconnect).
  //  * connections: an absolute cap, off by default.
  // A ratio of 0 makes that warning absolute (its floor alone); a floor of
  // SIZE_MAX turns it off.
  double warnTypingPerSession = 2.0;
  std::size_t warnTypingTimers = 100;
  double warnRoomsPerConnection = 16.0;
  std::size_t warnTrackedRooms = 1000;
  std::size_t warnSessionsWithoutConnection = 16;
  std::size_t warnConnections = 0;  // 0 = off
  Millis warnInterval{60000};
  // A periodic one-line stats log on the timer service; 0 = off.
  Millis statsLogInterval{0};
  /// Per session, user and client address (rate_limits.h); all off by
  /// default.
  RateLimits rateLimits;
  /// Must outlive the Keeper; nullptr = SteadyClock.
  const Clock* clock = nullptr;
  /// Several Keepers as one (roomkeeper::cluster): see bus.h for what
  /// changes. Not owned; must outlive the Keeper. nullptr = on its own.
  Bus* bus = nullptr;
};

/// Everything the Keeper holds, O(1) from counters.
struct MemoryStats {
  std::size_t connectedClients = 0;   // sessions connected
  std::size_t authenticated = 0;      // of which bound to a user
  std::size_t userSockets = 0;        // users with >= 1 session (user -> sessions)
  std::size_t connectionTimers = 0;   // auth deadlines armed
  std::size_t typingTimers = 0;       // typing indicators (one timer each)
  std::size_t trackedRooms = 0;       // memberships (session, room)
  std::size_t sessionsWithRooms = 0;
  std::size_t rooms = 0;              // non-empty rooms
  std::size_t totalEntries = 0;       // sum of the map entries above
  std::size_t timersPending = 0;      // every timer on the service
  std::size_t pendingPersistence = 0;
  std::uint64_t persistDelivered = 0;
  std::uint64_t persistFailures = 0;
  std::uint64_t persistDropped = 0;
  std::uint64_t callbackErrors = 0;
  std::uint64_t authTimeouts = 0;
  std::uint64_t forcedCleanups = 0;
  // Callback messages (an emit, an observer call, a log line) that could
  // not be queued because memory ran out. The state change each would have
  // reported was made regardless; nothing is left half-done.
  std::uint64_t eventsDropped = 0;
  // Rate limits (rate_limits.h): calls refused with kRateLimited, by limit,
  // and the address and user keys tracked (in totalEntries too).
  std::size_t rateLimitKeys = 0;
  std::uint64_t rateLimitedConnects = 0;    // connectsPerAddress
  std::uint64_t rateLimitedConcurrent = 0;  // maxSessionsPerAddress
  std::uint64_t rateLimitedJoins = 0;       // joinsPerSession
  std::uint64_t rateLimitedTyping = 0;      // typingPerSession
  std::uint64_t rateLimitedHost = 0;        // host kinds (allow), all together
  std::uint64_t rateLimitedKeysFull = 0;    // a new key with maxKeys reached
  std::size_t bytes = 0;              // heap bytes held (index, timers, typing, limits)
};

/// Several Keepers, one per event loop (docs/design.md "Threads"): their
/// statistics add up to the process's. Every field is summed; `rooms`
/// counts a room once per Keeper that has members in it.
MemoryStats& operator+=(MemoryStats& a, const MemoryStats& b) noexcept;
/// Prometheus text and JSON for any statistics (a sum, one loop's): what
/// Keeper::prometheusText() and statsJson() print for their own.
std::string prometheusText(const MemoryStats& stats);
std::string statsJson(const MemoryStats& stats);

/// What shutdown() did.
struct ShutdownReport {
  /// kOk: this call shut down. Refused, nothing done: kShutDown (already
  /// shut down), kBusy (called from inside a registry visitor), kOutOfMemory.
  Result result = Result::kOk;
  std::size_t sessionsClosed = 0;
  std::size_t timersCancelled = 0;
  std::size_t persistUndelivered = 0;  // each logged at error level
};

class Keeper final : public BusTarget, public detail::TrackRooms<Keeper> {
 public:
  Keeper();
  explicit Keeper(KeeperCallbacks callbacks, KeeperOptions options = {});
  /// Destroying a Keeper from inside one of its own callbacks (closeSession
  /// during shutdown, say) cannot be made safe -- the call that runs the
  /// callback still needs the object -- so it is refused loudly: a message
  /// on stderr, then std::abort(). Destroy it after the call returns.
  ~Keeper();
  Keeper(const Keeper&) = delete;
  Keeper& operator=(const Keeper&) = delete;

  /// A new transport session, not yet authenticated; arms the auth
  /// deadline. kOk; kAlreadyConnected; kInvalidId; kShutDown. O(1).
  /// With `handle`, stores a SessionHandle for the handle-based calls below.
  /// With a ClientAddress, the session counts against that address's
  /// limits (rate_limits.h): kRateLimited, nothing done, when a limit says
  /// no. Without one it is limited per session and user only.
  Result connect(std::string_view session);
  Result connect(std::string_view session, SessionHandle* handle);
  Result connect(std::string_view session, ClientAddress from,
                 SessionHandle* handle = nullptr);
  /// Binds the user and cancels the auth deadline. kOk; kAlreadyDone (same
  /// user); kUserMismatch; kNotConnected; kTooManySessions; kInvalidId;
  /// kRateLimited (user keys at RateLimits::maxKeys, none idle). O(1).
  Result authenticate(std::string_view session, std::string_view user);
  /// connect + authenticate, for transports that authenticate in the
  /// handshake.
  Result connectAuthenticated(std::string_view session, std::string_view user);
  Result connectAuthenticated(std::string_view session, std::string_view user,
                              SessionHandle* handle);
  Result connectAuthenticated(std::string_view session, std::string_view user,
                              ClientAddress from, SessionHandle* handle = nullptr);

  /// As SessionRegistry, plus kShutDown, kNotAuthenticated for trackRoom
  /// (leaving needs no authentication), and kRateLimited (joinsPerSession,
  /// which counts joins and leaves together). From inside a registry
  /// visitor (registry().forEachMember and friends) every mutating Keeper
  /// call is refused: kBusy (0 or an empty report for the counting ones).
  Result trackRoom(std::string_view session, std::string_view room);
  Result untrackRoom(std::string_view session, std::string_view room);
  std::size_t clearRoomTracking(std::string_view session);
  /// std::size_t trackRooms(session, rooms, std::vector<Result>* results =
  /// nullptr), by id or by handle: trackRoom() for each of `rooms` in
  /// order, with the same results, events and rate limiting, each room's
  /// events delivered before the next; the rooms' lookups are started
  /// together so that their cache misses overlap. Returns how many joined
  /// (kOk); `results`, if given, receives each room's Result. As
  /// SessionRegistry::trackRooms (what `rooms` may be, exceptions).
  using detail::TrackRooms<Keeper>::trackRooms;

  /// As TypingTimerManager, plus kShutDown, kNotAuthenticated and
  /// kRateLimited (typingPerSession) for startTyping.
  Result startTyping(std::string_view session, std::string_view thread);
  Result stopTyping(std::string_view session, std::string_view thread);

  /// A host kind of rate limit (RateLimits::kinds[kind]: a chat message,
  /// say): takes a token from the session's, its user's or its address's
  /// bucket. kOk (also when the kind has no limit, or an address kind for a
  /// session without an address); kRateLimited (nothing taken);
  /// kUnknownKind; kNotConnected / kStaleHandle; kNotAuthenticated (a user
  /// kind before authenticate); kShutDown. O(1), allocates nothing.
  Result allow(std::string_view session, RateKindId kind);
  Result allow(SessionHandle session, RateKindId kind);
  /// How many allow() calls of a host kind were refused (0 if unknown).
  std::uint64_t rateLimited(RateKindId kind) const noexcept;

  /// The same calls by SessionHandle (from connect): no hashing of the
  /// session id; a handle of a session that has gone gets kStaleHandle,
  /// even if the same id has connected again.
  Result trackRoom(SessionHandle session, std::string_view room);
  Result untrackRoom(SessionHandle session, std::string_view room);
  Result startTyping(SessionHandle session, std::string_view thread);
  Result stopTyping(SessionHandle session, std::string_view thread);
  Result disconnect(SessionHandle session);
  Result forceCleanup(SessionHandle session);
  std::size_t clearRoomTracking(SessionHandle session);
  /// The handle of a live session, or the null handle.
  SessionHandle handleOf(std::string_view session) const;

  /// The whole disconnect sequence (see above). kOk; kNotConnected;
  /// kClosing; kShutDown.
  Result disconnect(std::string_view session);
  /// The same cleanup for a session the transport lost without a close
  /// event; counted in MemoryStats::forcedCleanups.
  Result forceCleanup(std::string_view session);
  /// Cancels every timer, emits "serverShutdown" to every session and asks
  /// the host to close it, runs each session's disconnect sequence, makes a
  /// last persistence attempt. Afterwards every count is 0 and every call is
  /// refused with kShutDown. A second call does nothing.
  ShutdownReport shutdown();
  bool isShutDown() const noexcept;

  /// Sends `event` to the broadcast targets through the emit callback.
  std::size_t broadcast(const BroadcastTargets& targets, std::string_view event,
                        std::string_view payload);

  /// Host loop: fire what is due (see TimerService::advance).
  std::size_t advance();
  std::size_t advance(SteadyTime now,
                      std::size_t maxFire = static_cast<std::size_t>(-1));
  std::optional<SteadyTime> nextDeadline() const noexcept;

  MemoryStats getMemoryStats() const noexcept;
  /// Prometheus text exposition (roomkeeper_* gauges and counters).
  std::string prometheusText() const;
  /// The same statistics as one JSON object.
  std::string statsJson() const;
  /// The host's count of open transport connections (sockets it has not
  /// yet reported to disconnect/forceCleanup), for the "no connection"
  /// warning; call it now and then (a /stats request, a periodic tick).
  /// Returns how many warnings were logged (0 or 1, rate-limited). O(1).
  std::size_t checkTransport(std::size_t openConnections);
  /// Logs the threshold warnings now (still rate-limited). Returns how many
  /// warnings were logged.
  std::size_t checkThresholds();

  /// Bus commands (see bus.h): made by a bus backend, on this Keeper's
  /// thread, for what happened behind another Keeper. Each delivers to
  /// local sessions only and never reports back to the bus. After
  /// shutdown() they do nothing (0).
  /// The targets' local members get `event` through emit. Returns how many.
  std::size_t relayBroadcast(const BroadcastTargets& targets, std::string_view event,
                             std::string_view payload) override;
  /// The user's first session in the cluster connected (online) or its last
  /// one went: userOnline / userOffline.
  void relayPresence(std::string_view user, bool online) override;
  /// Another Keeper's indicator of `user` in `thread` started or ended:
  /// typingStarted / typingStopped to the thread room's local members
  /// (not to the user's own sessions), unless this Keeper has the user
  /// typing there itself (its own indicator speaks for it). A start for a
  /// thread whose room has no member here is not remembered: its stop is
  /// then sent to no one (see bus.h). Returns how many sessions were sent
  /// to.
  std::size_t relayTyping(std::string_view user, std::string_view thread,
                          bool started) override;
  /// The user's last session in the cluster went, and it was here: the
  /// kTypingStoppedAll persistence call, unless the user has connected
  /// here again since. Returns true if it was queued.
  bool relayUserGone(std::string_view user) override;
  /// Reports the whole local state to the bus again, as the events that
  /// made it: sessionUp per authenticated session, joined per membership,
  /// typing(started) per user indicator -- for a bus whose shared view was
  /// lost (a Redis restart, a node fenced and re-registered). Queued and run
  /// like every event. Returns how many events; 0 without a bus.
  /// O(sessions + memberships + indicators).
  std::size_t replayToBus() override;
  /// This Keeper's members of `room` (registry().roomSize / membersOf).
  std::size_t localRoomSize(std::string_view room) const override;
  std::vector<std::string> localRoomMembers(std::string_view room) const override;

  /// Read-only views of the parts.
  const SessionRegistry& registry() const noexcept;
  const TypingTimerManager& typing() const noexcept;
  const TimerService& timers() const noexcept;

 private:
  friend class SyncKeeper;
  friend class detail::TrackRooms<Keeper>;
  template <typename Id> Result trackRoomImpl(Id session, std::string_view room);
  // trackRooms(): starts the lookups of a chunk of rooms (a hint).
  void prefetchRooms(const std::string_view* rooms, std::size_t n) noexcept;
  template <typename Id> Result untrackRoomImpl(Id session, std::string_view room);
  template <typename Id> Result startTypingImpl(Id session, std::string_view thread);
  template <typename Id> Result stopTypingImpl(Id session, std::string_view thread);
  template <typename Id> Result disconnectImpl(Id session, bool forced);
  template <typename Id> Result allowImpl(Id session, RateKindId kind);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_KEEPER_H_
