// SPDX-License-Identifier: MIT
// File: roomkeeper/bus.h
//
// Bus: the one seam between a Keeper and whatever spans several Keepers --
// several server processes on Redis, or several event loops in one process
// (roomkeeper::cluster, include/roomkeeper/cluster/). Events go out through
// this interface; commands come back in through the Keeper's relay*()
// calls. Nothing else of the Keeper is reachable from a bus.
//
//   events out (Keeper -> Bus)          commands in (Bus -> Keeper)
//   sessionUp / sessionDown             relayPresence(user, online)
//   joined / left                       relayBroadcast(targets, event, payload)
//   typing(user, thread, started)       relayTyping(user, thread, started)
//   broadcast(targets, event, payload)  relayUserGone(user)
//   query: typingElsewhere(user, thread) replayToBus()
//                                       localRoomSize / localRoomMembers
//
// With a bus (KeeperOptions::bus) a Keeper changes three things:
//   * presence is the bus's: the Keeper no longer calls userOnline /
//     userOffline for its own first and last session of a user; it reports
//     each authenticated session up and down, and the bus calls
//     relayPresence() on every Keeper when the user's first session
//     anywhere connects and when the last one anywhere goes;
//   * typing indicators of users (never of anonymous sessions, which are
//     local) are announced to the bus. The Keeper remembers which (user,
//     thread) its members have been told typingStarted for, whether by its
//     own indicator or by relayTyping(), and tells them each start and each
//     stop once, whichever news comes first; its own stop is told only when
//     no other Keeper has the user typing there (typingElsewhere), so that
//     one user typing on two devices behind two Keepers is one indicator.
//     A bus sends relayTyping() for the user's first start and last stop in
//     the whole cluster to every other Keeper, and a stop also to the one
//     that made it if that one held its own stop back (typingElsewhere was
//     true when it asked). A relayed start for a thread whose room has no
//     member behind this Keeper tells no one and is not remembered, so its
//     stop tells no one either (a member who joins in between hears
//     neither);
//   * the kTypingStoppedAll wildcard is not persisted when the user's last
//     local session goes: the bus calls relayUserGone() on that Keeper when
//     the user's last session in the whole cluster has gone.
// broadcast() hands the targets to the bus, then delivers to local
// members: both are queued by the call, the bus's first, and run in that
// order when the Keeper's queue is delivered (before the call returns,
// unless it was made from inside a callback or another thread of a
// SyncKeeper is delivering), so the other Keepers' members can be on their
// way while this Keeper's are told (relayBroadcast delivers locally only,
// and never back to the bus).
//
// Calls: every event is made on the Keeper's thread, after the change it
// reports, in the order of the changes, with no Keeper lock held (it is
// queued with the host callbacks; under a SyncKeeper, one thread at a time
// delivers them, in that order). typingElsewhere() is the exception: it
// is asked synchronously while the Keeper changes state (under SyncKeeper's
// lock), so it must be fast, must not block, and must not call the Keeper.
// It is asked once for each stop of a user's indicator, right before the
// Keeper announces it (typing(..., false)); true means the Keeper does not
// tell its members of that stop, and counts on the bus's stop edge.
// A bus must never throw; a throwing bus is caught and counted as a
// callback error. A bus is not owned by the Keeper and must outlive it.
// Commands must be made on the Keeper's own thread (post them there).
#ifndef ROOMKEEPER_BUS_H_
#define ROOMKEEPER_BUS_H_

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "roomkeeper/session_registry.h"

namespace roomkeeper {

/// An owning copy of one broadcast, for a bus that keeps it past the call
/// (queued for another loop, encoded for Redis).
struct BroadcastMessage {
  std::vector<std::string> rooms, except;
  std::string sender, event, payload;

  static BroadcastMessage copyOf(const BroadcastTargets& t, std::string_view event,
                                 std::string_view payload) {
    BroadcastMessage m;
    m.rooms.assign(t.rooms.begin(), t.rooms.end());
    m.except.assign(t.except.begin(), t.except.end());
    m.sender = std::string(t.sender);
    m.event = std::string(event);
    m.payload = std::string(payload);
    return m;
  }
  /// Views into this message (valid while it lives).
  BroadcastTargets targets() const {
    BroadcastTargets t;
    t.rooms.assign(rooms.begin(), rooms.end());
    t.except.assign(except.begin(), except.end());
    t.sender = sender;
    return t;
  }
};

/// Commands in, as one interface: Keeper and SyncKeeper both implement it
/// (see Keeper's relay* calls), so a backend binds to either. A plain
/// Keeper must be called on its own thread; a SyncKeeper from any.
class BusTarget {
 public:
  virtual std::size_t relayBroadcast(const BroadcastTargets& targets, std::string_view event,
                                     std::string_view payload) = 0;
  virtual void relayPresence(std::string_view user, bool online) = 0;
  virtual std::size_t relayTyping(std::string_view user, std::string_view thread,
                                  bool started) = 0;
  virtual bool relayUserGone(std::string_view user) = 0;
  virtual std::size_t replayToBus() = 0;
  /// Queries about this Keeper's own sessions, for a bus that answers room
  /// questions by asking every Keeper instead of mirroring memberships
  /// (Bus::wantsMemberships() false): on the Keeper's own thread.
  virtual std::size_t localRoomSize(std::string_view room) const = 0;
  virtual std::vector<std::string> localRoomMembers(std::string_view room) const = 0;

 protected:
  ~BusTarget() = default;
};

class Bus {
 public:
  virtual ~Bus() = default;

  // ---- Events out ---------------------------------------------------------

  /// A session was bound to a user (authenticate, connectAuthenticated).
  virtual void sessionUp(std::string_view session, std::string_view user) = 0;
  /// An authenticated session is gone: its rooms were left (left() for
  /// each, before this) and its typing ended.
  virtual void sessionDown(std::string_view session, std::string_view user) = 0;
  /// A membership started / ended (for every reason: untrackRoom,
  /// clearRoomTracking, disconnect, shutdown). Only if wantsMemberships().
  virtual void joined(std::string_view session, std::string_view room) = 0;
  virtual void left(std::string_view session, std::string_view room) = 0;
  /// Asked once, when the Keeper is made. False: the bus does not keep a
  /// copy of the memberships (it sends every broadcast to every Keeper and
  /// asks each Keeper's localRoomSize/localRoomMembers), so the Keeper does
  /// not report joined/left at all -- the in-process backend, where a copy
  /// would cost more than the Keeper's own bookkeeping.
  virtual bool wantsMemberships() const noexcept { return true; }
  /// A local typing indicator of `user` in `thread` started or ended.
  virtual void typing(std::string_view user, std::string_view thread, bool started) = 0;
  /// Keeper::broadcast() was called; the local members are told right
  /// after this call returns (the next event in the Keeper's queue).
  virtual void broadcast(const BroadcastTargets& targets, std::string_view event,
                         std::string_view payload) = 0;

  // ---- Query --------------------------------------------------------------

  /// True while another Keeper (another node or loop) has `user` typing in
  /// `thread`, as far as this bus knows now. See the rules above.
  virtual bool typingElsewhere(std::string_view user,
                               std::string_view thread) const noexcept = 0;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_BUS_H_
