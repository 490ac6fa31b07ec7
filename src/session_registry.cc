// SPDX-License-Identifier: MIT
#include "roomkeeper/session_registry.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <exception>
#include <new>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "fmt/format.h"
#include "lock.h"
#include "registry_impl.h"

namespace roomkeeper {

using detail::Entry;
using detail::Event;
using detail::kNone;

namespace {

bool validId(std::string_view id, const Limits& limits) noexcept {
  return !id.empty() && id.size() <= limits.maxIdLength;
}

}  // namespace

// ---------------------------------------------------------------- Impl ---

SessionRegistry::Impl::Impl(RegistryCallbacks c, Limits l)
    : cb(std::move(c)),
      limits(l),
      sessionSlots(&bytes),
      roomSlots(&bytes),
      userSlots(&bytes),
      sessionIndex(0, SessionHash{&sessionSlots}, SessionEq{&sessionSlots},
                   detail::CountingAllocator<std::uint32_t>(&bytes)),
      roomIndex(0, RoomHash{&roomSlots}, RoomEq{&roomSlots},
                detail::CountingAllocator<std::uint32_t>(&bytes)),
      userIndex(0, UserHash{&userSlots}, UserEq{&userSlots},
                detail::CountingAllocator<std::uint32_t>(&bytes)) {
  wantMembershipEvents = static_cast<bool>(cb.leave) || static_cast<bool>(cb.roomLeft);
}

SessionRegistry::Impl::~Impl() = default;

std::uint32_t SessionRegistry::Impl::findSession(std::string_view id) const {
  // The newest session first: a connect is followed by calls naming it (its
  // authentication, its rooms), and its slot was just written. The last
  // byte is compared before the rest, so another id of the same length
  // costs about nothing here.
  if (newest != kNone) {
    const std::string_view n = sessionSlots[newest].name.view();
    if (n.size() == id.size() && !id.empty() && n.back() == id.back() && n == id) return newest;
  }
  auto it = sessionIndex.find(id);
  return it == sessionIndex.end() ? kNone : *it;
}
std::uint32_t SessionRegistry::Impl::findRoom(std::string_view id) const {
  auto it = roomIndex.find(id);
  return it == roomIndex.end() ? kNone : *it;
}
std::uint32_t SessionRegistry::Impl::findUser(std::string_view id) const {
  auto it = userIndex.find(id);
  return it == userIndex.end() ? kNone : *it;
}

void SessionRegistry::Impl::reportError(std::string_view where) noexcept {
  {
    detail::MaybeLock g(mu);
    ++callbackErrors;
  }
  if (!cb.log) return;
  std::string msg;
  try {
    try {
      throw;
    } catch (const std::exception& e) {
      msg = fmt::format("roomkeeper: {} callback threw: {}", where, e.what());
    } catch (...) {
      msg = fmt::format("roomkeeper: {} callback threw a non-exception", where);
    }
    cb.log(LogLevel::kError, msg);
  } catch (...) {
    // A log callback that throws while reporting is counted once more.
    detail::MaybeLock g(mu);
    ++callbackErrors;
  }
}

void SessionRegistry::Impl::deliver(Event& ev) noexcept {
  try {
    switch (static_cast<EventKind>(ev.kind)) {
      case EventKind::kMembershipEnded:
        if (cb.leave) {
          try {
            cb.leave(ev.a, ev.b);
          } catch (...) {
            reportError("leave");
          }
        }
        if (cb.roomLeft) cb.roomLeft(ev.b, ev.a);
        break;
      case EventKind::kRoomCreated:
        if (cb.roomCreated) cb.roomCreated(ev.b);
        break;
      case EventKind::kRoomJoined:
        if (cb.roomJoined) cb.roomJoined(ev.b, ev.a);
        break;
      case EventKind::kRoomDeleted:
        if (cb.roomDeleted) cb.roomDeleted(ev.b);
        break;
      case EventKind::kUserOnline:
        if (cb.userOnline) cb.userOnline(ev.a);
        break;
      case EventKind::kUserOffline:
        if (cb.userOffline) cb.userOffline(ev.a);
        break;
      case EventKind::kCustom:
        if (ev.fn) ev.fn();
        break;
    }
  } catch (...) {
    reportError(ev.kind == static_cast<std::uint8_t>(EventKind::kCustom)
                    ? std::string_view("host")
                    : std::string_view("observer"));
  }
}

void SessionRegistry::Impl::pushEvent(EventKind kind, std::string_view a,
                                      std::string_view b) noexcept {
  events.tryPush([&](Event& ev) {
    ev.kind = static_cast<std::uint8_t>(kind);
    ev.a.assign(a.data(), a.size());
    ev.b.assign(b.data(), b.size());
  });
}

void SessionRegistry::Impl::undoConnect(std::uint32_t s) noexcept {
  eraseSession(s);
  sessionSlots[s].name.reset(&bytes);
  freeSessionSlot(s);
}

void SessionRegistry::Impl::freeSessionSlot(std::uint32_t s) noexcept {
  SessionSlot& slot = sessionSlots[s];
  slot.state = SessionState::kFree;  // the generation stays: stale stays stale
  // A slot at the last generation is never reused (retired: 48 bytes after
  // 2^32 - 1 sessions in it). Past half the range one slot is retired as a
  // pin, so the pages (and every slot's generation) are kept from then on
  // and the floor below never nears the maximum.
  const bool pin = maxGeneration >= kGenerationPinAt && !pinned;
  if (slot.generation == std::numeric_limits<std::uint32_t>::max() || pin) {
    pinned = pinned || pin;  // retired: never released, never reused
  } else {
    sessionSlots.release(s);
    // Every page returned: the next slots start above every issued handle.
    if (sessionSlots.highWater() == 0) generationFloor = maxGeneration;
  }
  // The last session gone: the index hands its table back (bytes to 0).
  if (sessionIndex.empty()) {
    SessionIndex fresh(0, SessionHash{&sessionSlots}, SessionEq{&sessionSlots},
                       detail::CountingAllocator<std::uint32_t>(&bytes));
    sessionIndex.swap(fresh);
  }
}

bool SessionRegistry::Impl::isMember(std::uint32_t s, std::uint32_t r) const {
  const detail::EntryList& rooms = sessionSlots[s].rooms;
  const detail::EntryList& members = roomSlots[r].members;
  if (rooms.size() <= members.size()) {
    for (std::uint32_t i = 0; i < rooms.size(); ++i)
      if (rooms[i].slot == r) return true;
  } else {
    for (std::uint32_t i = 0; i < members.size(); ++i)
      if (members[i].slot == s) return true;
  }
  return false;
}

bool SessionRegistry::Impl::userFull(std::string_view user) const {
  const std::uint32_t u = findUser(user);
  return u != kNone && ((limits.maxSessionsPerUser != 0 &&
                         userSlots[u].sessions.size() >= limits.maxSessionsPerUser) ||
                        userSlots[u].sessions.size() >= kMaxUserSessions);
}

Result SessionRegistry::Impl::checkConnect(std::string_view session,
                                           std::string_view user) const {
  if (iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  if (!validId(session, limits)) return Result::kInvalidId;
  if (!user.empty() && user.size() > limits.maxIdLength) return Result::kInvalidId;
  if (findSession(session) != kNone) return Result::kAlreadyConnected;
  if (!user.empty() && userFull(user)) return Result::kTooManySessions;
  return Result::kOk;
}

Result SessionRegistry::Impl::connect(std::string_view session,
                                      std::string_view user,
                                      SessionHandle* handle) {
  if (const Result c = checkConnect(session, user); c != Result::kOk) return c;

  // Allocate everything first; on failure undo and report, state unchanged.
  std::uint32_t s = kNone;
  bool newUser = false;
  try {
    s = sessionSlots.alloc();
    SessionSlot& slot = sessionSlots[s];
    slot.name.assign(session, &bytes);
    sessionIndex.insert(s);
    newest = s;  // (eraseSession() clears it)
  } catch (const std::bad_alloc&) {
    if (s != kNone) {
      sessionSlots[s].name.reset(&bytes);
      sessionSlots.release(s);
    }
    return Result::kOutOfMemory;
  }
  SessionSlot& slot = sessionSlots[s];
  // Above every generation this slot ever had (it keeps its last one while
  // free) and above every one issued before the pages were last returned.
  // Never wraps: a slot that reaches the maximum is retired when it frees.
  slot.generation = std::max(slot.generation, generationFloor) + 1;
  maxGeneration = std::max(maxGeneration, slot.generation);
  slot.state = SessionState::kLive;
  slot.user = kNone;
  if (!user.empty()) {
    Result r = linkUser(s, user, &newUser);
    if (r != Result::kOk) {
      undoConnect(s);
      return r;
    }
  }
  if (handle) *handle = SessionHandle{s, slot.generation};
  if (newUser && cb.userOnline) pushEvent(EventKind::kUserOnline, user, {});
  return Result::kOk;
}

Result SessionRegistry::Impl::linkUser(std::uint32_t s, std::string_view user,
                                       bool* newUser) {
  std::uint32_t u = findUser(user);
  *newUser = false;
  if (u == kNone) {
    try {
      u = userSlots.alloc();
      userSlots[u].name.assign(user, &bytes);
      userIndex.insert(u);
    } catch (const std::bad_alloc&) {
      if (u != kNone) {
        userSlots[u].name.reset(&bytes);
        userSlots.release(u);
      }
      return Result::kOutOfMemory;
    }
    *newUser = true;
  } else if ((limits.maxSessionsPerUser != 0 &&
              userSlots[u].sessions.size() >= limits.maxSessionsPerUser) ||
             userSlots[u].sessions.size() >= kMaxUserSessions) {
    return Result::kTooManySessions;
  }
  UserSlot& us = userSlots[u];
  if (!us.sessions.reserveOneMore(&bytes)) {
    if (*newUser) {
      userIndex.erase(u);
      us.name.reset(&bytes);
      userSlots.release(u);
    }
    return Result::kOutOfMemory;
  }
  // Below kMaxUserSessions (checked above): fits the 24-bit field.
  sessionSlots[s].userPos = us.sessions.push(Entry{s, 0}) & 0xFFFFFFu;
  sessionSlots[s].user = u;
  return Result::kOk;
}

void SessionRegistry::Impl::unlinkUser(std::uint32_t s) {
  SessionSlot& slot = sessionSlots[s];
  const std::uint32_t u = slot.user;
  if (u == kNone) return;
  UserSlot& us = userSlots[u];
  // Swap-remove at the session's own position, fixing the moved session's.
  const std::uint32_t pos = slot.userPos;
  const std::uint32_t last = us.sessions.size() - 1;
  if (pos != last) {
    const Entry moved = us.sessions[last];
    us.sessions[pos] = moved;
    sessionSlots[moved.slot].userPos = pos & 0xFFFFFFu;
  }
  us.sessions.pop(&bytes);
  slot.user = kNone;
  if (us.sessions.empty()) {
    if (cb.userOffline) pushEvent(EventKind::kUserOffline, us.name.view(), {});
    userIndex.erase(u);
    us.name.reset(&bytes);
    us.sessions.release(&bytes);
    userSlots.release(u);
  }
}

Result SessionRegistry::Impl::checkBind(std::string_view session,
                                        std::string_view user) const {
  if (iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  const std::uint32_t s = findSession(session);
  if (s == kNone) return Result::kNotConnected;
  if (!validId(user, limits)) return Result::kInvalidId;
  const SessionSlot& slot = sessionSlots[s];
  if (slot.state == SessionState::kClosing) return Result::kClosing;
  if (slot.user != kNone) {
    return userSlots[slot.user].name.view() == user ? Result::kAlreadyDone
                                                    : Result::kUserMismatch;
  }
  if (userFull(user)) return Result::kTooManySessions;
  return Result::kOk;
}

Result SessionRegistry::Impl::bindUser(std::string_view session,
                                       std::string_view user) {
  if (const Result c = checkBind(session, user); c != Result::kOk) return c;
  const std::uint32_t s = findSession(session);
  bool newUser = false;
  const Result r = linkUser(s, user, &newUser);
  if (r != Result::kOk) return r;
  if (newUser && cb.userOnline) pushEvent(EventKind::kUserOnline, user, {});
  return Result::kOk;
}

void SessionRegistry::Impl::prefetchRooms(const std::string_view* rooms,
                                          std::size_t n) const noexcept {
  // Three rounds, each issuing the loads of every room before waiting on
  // any: the index's control bytes and slot numbers, then (find) the room's
  // slot with its name, then the end of its member list where the join
  // writes. Only a hint: track() then does the real work, unchanged.
  const std::size_t m = n < detail::kTrackRoomsChunk ? n : detail::kTrackRoomsChunk;
  bool valid[detail::kTrackRoomsChunk];
  for (std::size_t i = 0; i < m; ++i) {
    valid[i] = validId(rooms[i], limits);
    if (valid[i]) roomIndex.prefetch(rooms[i]);
  }
  std::uint32_t found[detail::kTrackRoomsChunk];
  for (std::size_t i = 0; i < m; ++i) found[i] = valid[i] ? findRoom(rooms[i]) : kNone;
  for (std::size_t i = 0; i < m; ++i) {
    if (found[i] == kNone) continue;
    const detail::EntryList& members = roomSlots[found[i]].members;
    if (!members.empty()) __builtin_prefetch(&members.back(), 1);
  }
}

Result SessionRegistry::Impl::track(std::uint32_t s, std::string_view room) {
  if (iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  if (s == kNone) return Result::kNotConnected;
  if (sessionSlots[s].state == SessionState::kClosing) return Result::kClosing;
  if (!validId(room, limits)) return Result::kInvalidId;
  const std::uint32_t gen = sessionSlots[s].generation;

  bool asked = false;
  std::string roomCopy;
  for (;;) {
    std::uint32_t r = findRoom(room);
    if (r != kNone && isMember(s, r)) return Result::kAlreadyDone;
    SessionSlot& ss = sessionSlots[s];
    if (ss.rooms.size() >= limits.maxRoomsPerSession) return Result::kTooManyRooms;
    if (r != kNone && limits.maxMembersPerRoom != 0 &&
        roomSlots[r].members.size() >= limits.maxMembersPerRoom)
      return Result::kRoomFull;
    if (cb.canJoin && !asked) {
      asked = true;
      bool allowed = false;
      // The hook may call back in and free what either view points to (the
      // session's own name if it disconnects it; a room named by a view of
      // registry storage): pass copies, and keep using the room's copy.
      const std::string sessionCopy(ss.name.view());
      roomCopy.assign(room.data(), room.size());
      room = roomCopy;
      try {
        allowed = cb.canJoin(sessionCopy, room);
      } catch (...) {
        reportError("canJoin");
        allowed = false;
      }
      if (!allowed) return Result::kDenied;
      // The hook may have called back in: check everything again.
      if (s >= sessionSlots.highWater() || sessionSlots[s].state == SessionState::kFree ||
          sessionSlots[s].generation != gen)
        return Result::kNotConnected;
      if (sessionSlots[s].state == SessionState::kClosing) return Result::kClosing;
      continue;
    }

    // Allocate first; nothing is visible until every allocation succeeded
    // (the event queue included: room for roomCreated and roomJoined).
    if (!events.reserveMore(2)) return Result::kOutOfMemory;
    if (!ss.rooms.reserveOneMore(&bytes)) return Result::kOutOfMemory;
    bool created = false;
    if (r == kNone) {
      try {
        r = roomSlots.alloc();
        roomSlots[r].name.assign(room, &bytes);
        roomIndex.insert(r);
        created = true;
      } catch (const std::bad_alloc&) {
        if (r != kNone) {
          roomSlots[r].name.reset(&bytes);
          roomSlots.release(r);
        }
        return Result::kOutOfMemory;
      }
    }
    RoomSlot& rs = roomSlots[r];
    if (!rs.members.reserveOneMore(&bytes)) {
      if (created) {
        roomIndex.erase(r);
        rs.name.reset(&bytes);
        roomSlots.release(r);
      }
      return Result::kOutOfMemory;
    }
    const std::uint32_t posInSession = ss.rooms.size();
    const std::uint32_t posInRoom = rs.members.push(Entry{s, posInSession});
    ss.rooms.push(Entry{r, posInRoom});
    ++memberships;
    if (posInSession == 0) ++sessionsWithRooms;
    if (created && cb.roomCreated) pushEvent(EventKind::kRoomCreated, {}, room);
    if (cb.roomJoined) pushEvent(EventKind::kRoomJoined, ss.name.view(), room);
    return Result::kOk;
  }
}

void SessionRegistry::Impl::leaveRoomSide(std::uint32_t s, Entry e) noexcept {
  // The room side of one membership: events, the room's member list, the
  // room itself if it empties. The session's own list is the caller's.
  const std::uint32_t r = e.slot;
  RoomSlot& rs = roomSlots[r];
  if (wantMembershipEvents)
    pushEvent(EventKind::kMembershipEnded, sessionSlots[s].name.view(), rs.name.view());
  // Swap-remove from the room's member list, fixing the mirror entry.
  const std::uint32_t lastR = rs.members.size() - 1;
  if (e.pos != lastR) {
    const Entry moved = rs.members[lastR];
    rs.members[e.pos] = moved;
    sessionSlots[moved.slot].rooms[moved.pos].pos = e.pos;
  }
  rs.members.pop(&bytes);
  --memberships;
  if (rs.members.empty()) {
    if (cb.roomDeleted) pushEvent(EventKind::kRoomDeleted, {}, rs.name.view());
    roomIndex.erase(r);
    rs.name.reset(&bytes);
    rs.members.release(&bytes);
    roomSlots.release(r);
    if (roomIndex.empty()) {
      RoomIndex fresh(0, RoomHash{&roomSlots}, RoomEq{&roomSlots},
                      detail::CountingAllocator<std::uint32_t>(&bytes));
      roomIndex.swap(fresh);
    }
  }
}

void SessionRegistry::Impl::removeMembership(std::uint32_t s, std::uint32_t pos) {
  const Entry e = sessionSlots[s].rooms[pos];
  leaveRoomSide(s, e);
  // The session's list keeps join order (socket.io's): the rooms after
  // `pos` move up one, and their mirrors in the rooms are told. O(rooms of
  // the session after pos), bounded by Limits::maxRoomsPerSession.
  detail::EntryList& mine = sessionSlots[s].rooms;
  const std::uint32_t n = mine.size();
  for (std::uint32_t i = pos + 1; i < n; ++i) {
    const Entry moved = mine[i];
    mine[i - 1] = moved;
    roomSlots[moved.slot].members[moved.pos].pos = i - 1;
  }
  mine.pop(&bytes);
  if (mine.empty()) --sessionsWithRooms;
}

Result SessionRegistry::Impl::untrack(std::uint32_t s, std::string_view room) {
  if (iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  if (s == kNone) return Result::kNotConnected;
  if (!validId(room, limits)) return Result::kInvalidId;
  const std::uint32_t r = findRoom(room);
  if (r == kNone) return Result::kAlreadyDone;
  const detail::EntryList& rooms = sessionSlots[s].rooms;
  for (std::uint32_t i = 0; i < rooms.size(); ++i) {
    if (rooms[i].slot == r) {
      removeMembership(s, i);
      return Result::kOk;
    }
  }
  return Result::kAlreadyDone;
}

std::size_t SessionRegistry::Impl::clearRooms(std::uint32_t s) {
  // Leaving a room touches the room's slot, its member list at two places
  // and the session of the member moved into the hole: dependent cache
  // misses, room after room. Ask for all of them up front so that they
  // overlap instead of queuing (the removals below are unchanged).
  const detail::EntryList& mine = sessionSlots[s].rooms;
  if (mine.size() > 1) {
    for (std::uint32_t i = 0; i < mine.size(); ++i)
      __builtin_prefetch(&roomSlots[mine[i].slot]);
    for (std::uint32_t i = 0; i < mine.size(); ++i) {
      const RoomSlot& rs = roomSlots[mine[i].slot];
      const detail::EntryList& m = rs.members;
      __builtin_prefetch(&m[mine[i].pos], 1);
      __builtin_prefetch(&m.back(), 1);
      // A room this session is the last member of is erased from the
      // index: its probe's control bytes and slot numbers too.
      if (m.size() == 1) roomIndex.prefetch(rs.name.view());
    }
    for (std::uint32_t i = 0; i < mine.size(); ++i) {
      const detail::EntryList& m = roomSlots[mine[i].slot].members;
      __builtin_prefetch(&sessionSlots[m.back().slot], 1);
    }
    for (std::uint32_t i = 0; i < mine.size(); ++i) {
      const Entry moved = roomSlots[mine[i].slot].members.back();
      __builtin_prefetch(&sessionSlots[moved.slot].rooms[moved.pos], 1);
    }
  }
  // In join order, as socket.io leaves them; the session's own list is
  // released in one go at the end.
  const std::uint32_t n = sessionSlots[s].rooms.size();
  if (n == 0) return 0;
  for (std::uint32_t i = 0; i < n; ++i) leaveRoomSide(s, sessionSlots[s].rooms[i]);
  sessionSlots[s].rooms.release(&bytes);
  --sessionsWithRooms;
  return n;
}

Result SessionRegistry::Impl::disconnect(std::uint32_t s) {
  if (iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  if (s == kNone) return Result::kNotConnected;
  if (sessionSlots[s].state == SessionState::kClosing) return Result::kClosing;
  sessionSlots[s].state = SessionState::kClosing;
  if (cb.disconnecting) {
    // Synchronous: the host sees the rooms before they go. Anything already
    // queued is delivered first, so the host sees events in order.
    flush();
    const std::string name(sessionSlots[s].name.view());
    try {
      cb.disconnecting(name);
    } catch (...) {
      reportError("disconnecting");
    }
  }
  finishDisconnect(s);
  return Result::kOk;
}

void SessionRegistry::Impl::finishDisconnect(std::uint32_t s) {
  // The session's own index entry is erased last; fetch it while the rooms
  // are being left rather than wait for it then.
  sessionIndex.prefetch(sessionSlots[s].name.view());
  clearRooms(s);
  unlinkUser(s);
  SessionSlot& slot = sessionSlots[s];
  eraseSession(s);
  slot.name.reset(&bytes);
  slot.rooms.release(&bytes);
  freeSessionSlot(s);
  if (userIndex.empty() && userIndex.capacity() > 0) {
    UserIndex fresh(0, UserHash{&userSlots}, UserEq{&userSlots},
                    detail::CountingAllocator<std::uint32_t>(&bytes));
    userIndex.swap(fresh);
  }
}

std::size_t SessionRegistry::Impl::forEachTarget(
    const BroadcastTargets& targets,
    detail::FunctionRef<void(std::string_view)> visit) {
  // A copy of each name: the visitor may change the registry (the walk
  // skips whoever it removed).
  std::string name;
  return forEachTargetSlot(targets, [&](std::uint32_t s) {
    name.assign(sessionSlots[s].name.view());
    visit(name);
  });
}

std::size_t SessionRegistry::Impl::forEachTargetSlot(
    const BroadcastTargets& targets, detail::FunctionRef<void(std::uint32_t)> visit) {
  // Two fresh stamps: one marks excluded sessions, one marks targets taken.
  markCounter += 2;
  if (markCounter < 2) {  // wrapped: reset every mark
    for (std::size_t i = 0; i < sessionSlots.highWater(); ++i)
      sessionSlots[static_cast<std::uint32_t>(i)].mark = 0;
    markCounter = 2;
  }
  const std::uint32_t excluded = markCounter - 1;
  const std::uint32_t taken = markCounter;
  for (std::string_view room : targets.except) {
    const std::uint32_t r = findRoom(room);
    if (r == kNone) continue;
    const detail::EntryList& m = roomSlots[r].members;
    for (std::uint32_t i = 0; i < m.size(); ++i) sessionSlots[m[i].slot].mark = excluded;
  }
  if (!targets.sender.empty()) {
    const std::uint32_t s = findSession(targets.sender);
    if (s != kNone) sessionSlots[s].mark = excluded;
  }
  std::vector<SessionHandle> chosen;
  if (targets.rooms.empty()) {
    // No room named: every session (socket.io's io.emit / io.except().emit).
    chosen.reserve(sessionIndex.size());
    for (const std::uint32_t s : sessionIndex) {
      const SessionSlot& ss = sessionSlots[s];
      if (ss.state == SessionState::kLive && ss.mark != excluded)
        chosen.push_back(SessionHandle{s, ss.generation});
    }
  }
  for (std::string_view room : targets.rooms) {
    const std::uint32_t r = findRoom(room);
    if (r == kNone) continue;
    const detail::EntryList& m = roomSlots[r].members;
    for (std::uint32_t i = 0; i < m.size(); ++i) {
      SessionSlot& ss = sessionSlots[m[i].slot];
      if (ss.mark == excluded || ss.mark == taken) continue;
      ss.mark = taken;
      chosen.push_back(SessionHandle{m[i].slot, ss.generation});
    }
  }
  std::size_t n = 0;
  for (SessionHandle h : chosen) {
    if (fromHandle(h) == kNone) continue;  // gone while we were visiting
    visit(h.index);
    ++n;
  }
  return n;
}

std::size_t SessionRegistry::Impl::clearAll() {
  std::size_t n = 0;
  // Collect first: disconnecting mutates the index we would iterate.
  std::vector<SessionHandle> all;
  all.reserve(sessionIndex.size());
  for (std::uint32_t s : sessionIndex)
    if (sessionSlots[s].state == SessionState::kLive)
      all.push_back(SessionHandle{s, sessionSlots[s].generation});
  for (SessionHandle h : all) {
    const std::uint32_t s = fromHandle(h);
    if (s == kNone || sessionSlots[s].state != SessionState::kLive) continue;
    sessionSlots[s].state = SessionState::kClosing;
    finishDisconnect(s);
    ++n;
  }
  return n;
}

// ------------------------------------------------------------- Public ---

namespace {
struct IterGuard {
  std::atomic<int>& n;
  explicit IterGuard(std::atomic<int>& c) : n(c) { n.fetch_add(1, std::memory_order_relaxed); }
  ~IterGuard() { n.fetch_sub(1, std::memory_order_relaxed); }
};
}  // namespace

SessionRegistry::SessionRegistry() : SessionRegistry(RegistryCallbacks{}) {}
SessionRegistry::SessionRegistry(RegistryCallbacks callbacks, Limits limits)
    : impl_(std::make_unique<Impl>(std::move(callbacks), limits)) {}
SessionRegistry::~SessionRegistry() = default;
SessionRegistry::SessionRegistry(SessionRegistry&&) noexcept = default;
SessionRegistry& SessionRegistry::operator=(SessionRegistry&&) noexcept = default;

Result SessionRegistry::connect(std::string_view session, std::string_view user) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const Result r = impl_->connect(session, user, nullptr);
  impl_->flush();
  return r;
}
Result SessionRegistry::connect(std::string_view session, std::string_view user,
                                SessionHandle* handle) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const Result r = impl_->connect(session, user, handle);
  impl_->flush();
  return r;
}
Result SessionRegistry::bindUser(std::string_view session, std::string_view user) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const Result r = impl_->bindUser(session, user);
  impl_->flush();
  return r;
}
Result SessionRegistry::disconnect(std::string_view session) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  if (impl_->iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  const Result r = impl_->disconnect(impl_->findSession(session));
  impl_->flush();
  return r;
}
Result SessionRegistry::disconnect(SessionHandle session) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  if (impl_->iterating.load(std::memory_order_relaxed) > 0) return Result::kBusy;
  const std::uint32_t s = impl_->fromHandle(session);
  if (s == kNone) return Result::kStaleHandle;
  const Result r = impl_->disconnect(s);
  impl_->flush();
  return r;
}
Result SessionRegistry::trackRoom(std::string_view session, std::string_view room) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const Result r = impl_->track(impl_->findSession(session), room);
  impl_->flush();
  return r;
}
Result SessionRegistry::trackRoom(SessionHandle session, std::string_view room) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->fromHandle(session);
  if (s == kNone) return Result::kStaleHandle;
  const Result r = impl_->track(s, room);
  impl_->flush();
  return r;
}
void SessionRegistry::prefetchRooms(const std::string_view* rooms, std::size_t n) noexcept {
  if (impl_) impl_->prefetchRooms(rooms, n);  // moved-from: trackRoom refuses
}

Result SessionRegistry::untrackRoom(std::string_view session, std::string_view room) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const Result r = impl_->untrack(impl_->findSession(session), room);
  impl_->flush();
  return r;
}
Result SessionRegistry::untrackRoom(SessionHandle session, std::string_view room) {
  if (!impl_) return Result::kShutDown;  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->fromHandle(session);
  if (s == kNone) return Result::kStaleHandle;
  const Result r = impl_->untrack(s, room);
  impl_->flush();
  return r;
}
std::size_t SessionRegistry::clearRoomTracking(std::string_view session) {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  if (impl_->iterating.load(std::memory_order_relaxed) > 0) return 0;
  const std::uint32_t s = impl_->findSession(session);
  if (s == kNone) return 0;
  const std::size_t n = impl_->clearRooms(s);
  impl_->flush();
  return n;
}
std::size_t SessionRegistry::clearRoomTracking(SessionHandle session) {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  if (impl_->iterating.load(std::memory_order_relaxed) > 0) return 0;
  const std::uint32_t s = impl_->fromHandle(session);
  if (s == kNone) return 0;
  const std::size_t n = impl_->clearRooms(s);
  impl_->flush();
  return n;
}
std::size_t SessionRegistry::clear() {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  if (impl_->iterating.load(std::memory_order_relaxed) > 0) return 0;
  const std::size_t n = impl_->clearAll();
  impl_->flush();
  return n;
}

bool SessionRegistry::isConnected(std::string_view session) const {
  if (!impl_) return false;  // moved-from: holds nothing, refuses everything
  return impl_->findSession(session) != kNone;
}
bool SessionRegistry::isConnected(SessionHandle session) const {
  if (!impl_) return false;  // moved-from: holds nothing, refuses everything
  return impl_->fromHandle(session) != kNone;
}
SessionHandle SessionRegistry::handleOf(std::string_view session) const {
  if (!impl_) return {};  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->findSession(session);
  if (s == kNone) return {};
  return SessionHandle{s, impl_->sessionSlots[s].generation};
}
std::string_view SessionRegistry::idOf(SessionHandle session) const {
  if (!impl_) return {};  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->fromHandle(session);
  return s == kNone ? std::string_view() : impl_->sessionSlots[s].name.view();
}
std::string_view SessionRegistry::userOf(std::string_view session) const {
  if (!impl_) return {};  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->findSession(session);
  if (s == kNone) return {};
  const std::uint32_t u = impl_->sessionSlots[s].user;
  return u == kNone ? std::string_view() : impl_->userSlots[u].name.view();
}
bool SessionRegistry::isMember(std::string_view session, std::string_view room) const {
  if (!impl_) return false;  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->findSession(session);
  if (s == kNone) return false;
  const std::uint32_t r = impl_->findRoom(room);
  return r != kNone && impl_->isMember(s, r);
}
std::size_t SessionRegistry::roomSize(std::string_view room) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::uint32_t r = impl_->findRoom(room);
  return r == kNone ? 0 : impl_->roomSlots[r].members.size();
}
std::size_t SessionRegistry::roomCount(std::string_view session) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->findSession(session);
  return s == kNone ? 0 : impl_->sessionSlots[s].rooms.size();
}
bool SessionRegistry::roomExists(std::string_view room) const {
  if (!impl_) return false;  // moved-from: holds nothing, refuses everything
  return impl_->findRoom(room) != kNone;
}

std::size_t SessionRegistry::forEachMemberImpl(
    std::string_view room, detail::FunctionRef<void(std::string_view)> visit) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::uint32_t r = impl_->findRoom(room);
  if (r == kNone) return 0;
  IterGuard guard(impl_->iterating);
  const detail::EntryList& m = impl_->roomSlots[r].members;
  const std::uint32_t n = m.size();
  for (std::uint32_t i = 0; i < n; ++i)
    visit(impl_->sessionSlots[m[i].slot].name.view());
  return n;
}
std::size_t SessionRegistry::forEachRoomOfImpl(
    std::string_view session, detail::FunctionRef<void(std::string_view)> visit) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::uint32_t s = impl_->findSession(session);
  if (s == kNone) return 0;
  IterGuard guard(impl_->iterating);
  const detail::EntryList& rooms = impl_->sessionSlots[s].rooms;
  const std::uint32_t n = rooms.size();
  for (std::uint32_t i = 0; i < n; ++i)
    visit(impl_->roomSlots[rooms[i].slot].name.view());
  return n;
}
std::size_t SessionRegistry::forEachSessionOfUserImpl(
    std::string_view user, detail::FunctionRef<void(std::string_view)> visit) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::uint32_t u = impl_->findUser(user);
  if (u == kNone) return 0;
  IterGuard guard(impl_->iterating);
  const detail::EntryList& ss = impl_->userSlots[u].sessions;
  const std::uint32_t n = ss.size();
  for (std::uint32_t i = 0; i < n; ++i)
    visit(impl_->sessionSlots[ss[i].slot].name.view());
  return n;
}
std::size_t SessionRegistry::forEachSessionImpl(
    detail::FunctionRef<void(std::string_view)> visit) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  IterGuard guard(impl_->iterating);
  std::size_t n = 0;
  for (std::uint32_t s : impl_->sessionIndex) {
    visit(impl_->sessionSlots[s].name.view());
    ++n;
  }
  return n;
}
std::size_t SessionRegistry::forEachTargetImpl(
    const BroadcastTargets& targets, detail::FunctionRef<void(std::string_view)> visit) {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::size_t n = impl_->forEachTarget(targets, visit);
  impl_->flush();
  return n;
}

std::vector<std::string> SessionRegistry::roomsOf(std::string_view session) const {
  std::vector<std::string> out;
  forEachRoomOf(session, [&](std::string_view r) { out.emplace_back(r); });
  return out;
}
std::vector<std::string> SessionRegistry::membersOf(std::string_view room) const {
  std::vector<std::string> out;
  forEachMember(room, [&](std::string_view s) { out.emplace_back(s); });
  return out;
}
std::vector<std::string> SessionRegistry::sessionsOfUser(std::string_view user) const {
  std::vector<std::string> out;
  forEachSessionOfUser(user, [&](std::string_view s) { out.emplace_back(s); });
  return out;
}
std::size_t SessionRegistry::sessionCountOfUser(std::string_view user) const {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  const std::uint32_t u = impl_->findUser(user);
  return u == kNone ? 0 : impl_->userSlots[u].sessions.size();
}

std::size_t SessionRegistry::broadcast(const BroadcastTargets& targets,
                                       std::string_view event,
                                       std::string_view payload) {
  if (!impl_) return 0;  // moved-from: holds nothing, refuses everything
  if (!impl_->cb.emit) return 0;
  Impl& im = *impl_;
  const std::size_t n = im.forEachTarget(targets, [&](std::string_view s) {
    try {
      im.cb.emit(s, event, payload);
    } catch (...) {
      im.reportError("emit");
    }
  });
  im.flush();
  return n;
}

void detail::TestAccess::ageSessions(SessionRegistry& registry, std::uint32_t g) {
  SessionRegistry::Impl& im = *registry.impl_;
  for (std::size_t i = 0; i < im.sessionSlots.highWater(); ++i) {
    SessionSlot& slot = im.sessionSlots[static_cast<std::uint32_t>(i)];
    if (slot.state == SessionState::kFree) slot.generation = g;
  }
  im.generationFloor = std::max(im.generationFloor, g);
  im.maxGeneration = std::max(im.maxGeneration, g);
}

RegistryStats SessionRegistry::getMemoryStats() const noexcept {
  if (!impl_) return {};  // moved-from: holds nothing, refuses everything
  RegistryStats st;
  st.sessions = impl_->sessionIndex.size();
  st.users = impl_->userIndex.size();
  st.rooms = impl_->roomIndex.size();
  st.memberships = impl_->memberships;
  st.sessionsWithRooms = impl_->sessionsWithRooms;
  st.bytes = impl_->bytes;
  st.callbackErrors = impl_->callbackErrors;
  return st;
}
const Limits& SessionRegistry::limits() const noexcept {
  static const Limits kDefaults{};
  return impl_ ? impl_->limits : kDefaults;
}

}  // namespace roomkeeper
