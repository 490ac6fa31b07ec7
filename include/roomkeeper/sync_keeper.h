// SPDX-License-Identifier: MIT
// File: roomkeeper/sync_keeper.h
//
// SyncKeeper: a Keeper that may be called from many threads at once (an
// Asio io_context run by a thread pool), with an optional driver thread that
// fires the timers for hosts without a loop of their own.
//
// Design (see docs/design.md, "Threads"): one mutex around the Keeper.
// Every call takes the lock, makes its state change, collects the host
// callbacks that change produced, releases the lock, and only then runs the
// callbacks on the calling thread, in order. So:
//   * no host callback ever runs with the lock held;
//   * a callback may call back into the SyncKeeper from the same or any
//     thread without deadlock (the lock is free by then);
//   * callbacks of one call run in the order of its changes; callbacks of
//     calls on different threads may interleave -- except with a bus
//     (KeeperOptions::bus): then every call's callbacks and bus events join
//     one queue in the order of the changes, and one thread at a time runs
//     it (a call whose batch another thread is running returns at once, its
//     callbacks run there shortly after), so that a bus never hears a
//     stop before the start it follows.
// The single-threaded Keeper pays nothing for this: it has no lock at all.
//
// For speed on several cores, do not share one SyncKeeper: run one Keeper
// per event loop, joined by roomkeeper::cluster::InProcessHub (docs/design.md
// "Threads", roomkeeper-bench --workload dispatch_threads).
//
// The driver thread (startDriver/stopDriver) is started only when asked. It
// sleeps until the earliest deadline (woken early when a call arms an
// earlier one), calls advance(), and runs the resulting callbacks on itself.
// The destructor stops it. Do not call stopDriver() from a callback running
// on the driver thread (it would join itself): it returns false there.
//
// Thread safety: thread-safe. Ownership: owns its Keeper; the clock in
// KeeperOptions must outlive it and be safe to read from several threads
// (its now(); a Clock::cell() is read without synchronisation, so a clock
// that some thread moves while others call in must not have one).
#ifndef ROOMKEEPER_SYNC_KEEPER_H_
#define ROOMKEEPER_SYNC_KEEPER_H_

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "roomkeeper/keeper.h"

namespace roomkeeper {

class SyncKeeper final : public BusTarget, public detail::TrackRooms<SyncKeeper> {
 public:
  explicit SyncKeeper(KeeperCallbacks callbacks = {}, KeeperOptions options = {});
  /// Stops the driver. Destroying a SyncKeeper from inside one of its own
  /// callbacks (on the driver thread or any other) cannot be made safe --
  /// the call running the callback still needs the object -- so it is
  /// refused loudly: a message on stderr, then std::abort().
  ~SyncKeeper();
  SyncKeeper(const SyncKeeper&) = delete;
  SyncKeeper& operator=(const SyncKeeper&) = delete;

  /// Each as Keeper's, under the lock; callbacks after the lock is released.
  Result connect(std::string_view session);
  Result authenticate(std::string_view session, std::string_view user);
  Result connectAuthenticated(std::string_view session, std::string_view user);
  Result trackRoom(std::string_view session, std::string_view room);
  Result untrackRoom(std::string_view session, std::string_view room);
  std::size_t clearRoomTracking(std::string_view session);
  /// As Keeper::trackRooms, by id or by handle: one trackRoom() per room,
  /// each under the lock with its callbacks after it (another thread's
  /// call may come between two rooms, as between two trackRoom calls); the
  /// rooms' lookups are started together first, under the lock.
  using detail::TrackRooms<SyncKeeper>::trackRooms;
  Result startTyping(std::string_view session, std::string_view thread);
  Result stopTyping(std::string_view session, std::string_view thread);
  Result disconnect(std::string_view session);
  Result forceCleanup(std::string_view session);
  /// Stops the driver first, then as Keeper::shutdown.
  ShutdownReport shutdown();
  bool isShutDown() const;
  /// By SessionHandle, as Keeper's (handles are safe to use from any thread:
  /// a stale one gets kStaleHandle).
  Result connect(std::string_view session, SessionHandle* handle);
  Result connectAuthenticated(std::string_view session, std::string_view user,
                              SessionHandle* handle);
  /// With the client address, for the per-address rate limits.
  Result connect(std::string_view session, ClientAddress from, SessionHandle* handle = nullptr);
  Result connectAuthenticated(std::string_view session, std::string_view user,
                              ClientAddress from, SessionHandle* handle = nullptr);
  /// A host kind of rate limit (Keeper::allow).
  Result allow(std::string_view session, RateKindId kind);
  Result allow(SessionHandle session, RateKindId kind);
  Result trackRoom(SessionHandle session, std::string_view room);
  Result untrackRoom(SessionHandle session, std::string_view room);
  Result startTyping(SessionHandle session, std::string_view thread);
  Result stopTyping(SessionHandle session, std::string_view thread);
  Result disconnect(SessionHandle session);
  Result forceCleanup(SessionHandle session);
  std::size_t clearRoomTracking(SessionHandle session);
  SessionHandle handleOf(std::string_view session) const;
  std::size_t broadcast(const BroadcastTargets& targets, std::string_view event,
                        std::string_view payload);
  std::size_t advance();
  std::size_t advance(SteadyTime now, std::size_t maxFire = static_cast<std::size_t>(-1));
  std::optional<SteadyTime> nextDeadline() const;
  /// As Keeper::checkThresholds; the warnings are logged outside the lock.
  std::size_t checkThresholds();
  std::size_t checkTransport(std::size_t openConnections);

  /// Bus commands (bus.h), as Keeper's, under the lock; from any thread.
  std::size_t relayBroadcast(const BroadcastTargets& targets, std::string_view event,
                             std::string_view payload) override;
  void relayPresence(std::string_view user, bool online) override;
  std::size_t relayTyping(std::string_view user, std::string_view thread,
                          bool started) override;
  bool relayUserGone(std::string_view user) override;
  std::size_t replayToBus() override;
  std::size_t localRoomSize(std::string_view room) const override { return roomSize(room); }
  std::vector<std::string> localRoomMembers(std::string_view room) const override {
    return membersOf(room);
  }

  /// Queries, under the lock.
  bool isConnected(std::string_view session) const;
  bool isMember(std::string_view session, std::string_view room) const;
  std::size_t roomSize(std::string_view room) const;
  /// Copies, taken under the lock (views could not outlive it).
  std::vector<std::string> roomsOf(std::string_view session) const;
  std::vector<std::string> membersOf(std::string_view room) const;
  MemoryStats getMemoryStats() const;
  std::string prometheusText() const;
  std::string statsJson() const;

  /// The optional driver thread. startDriver: false if already running or
  /// shut down. stopDriver: false if not running or called on the driver
  /// thread itself.
  bool startDriver();
  bool stopDriver();
  bool driverRunning() const;

 private:
  friend class detail::TrackRooms<SyncKeeper>;
  // trackRooms(): starts the lookups of a chunk of rooms (a hint), under
  // the lock.
  void prefetchRooms(const std::string_view* rooms, std::size_t n);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_SYNC_KEEPER_H_
