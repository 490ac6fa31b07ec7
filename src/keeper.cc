// SPDX-License-Identifier: MIT
#include "roomkeeper/keeper.h"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <type_traits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "fmt/format.h"
#include "keeper_impl.h"

namespace roomkeeper {

namespace {

std::uint64_t pack(std::uint32_t index, std::uint32_t generation) noexcept {
  return (std::uint64_t{generation} << 32) | index;
}

RegistryCallbacks registryCallbacks(const KeeperCallbacks& k, Bus* bus) {
  RegistryCallbacks r;
  r.leave = k.leave;
  if (bus) {
    // Presence is the bus's (relayPresence); memberships are reported if
    // the bus keeps them.
    if (bus->wantsMemberships()) {
      r.roomJoined = [bus](std::string_view room, std::string_view session) {
        bus->joined(session, room);
      };
      r.roomLeft = [bus](std::string_view room, std::string_view session) {
        bus->left(session, room);
      };
    }
  } else {
    r.userOnline = k.userOnline;
    r.userOffline = k.userOffline;
  }
  r.roomCreated = k.roomCreated;
  r.roomDeleted = k.roomDeleted;
  r.log = k.log;
  return r;
}

TypingCallbacks typingCallbacks(const KeeperCallbacks& k) {
  TypingCallbacks t;
  t.emit = k.emit;
  t.persist = k.persist;
  t.log = k.log;
  return t;
}

}  // namespace

Keeper::Impl::Impl(KeeperCallbacks c, KeeperOptions o)
    : cb(std::move(c)),
      opt(std::move(o)),
      timers(opt.clock),
      registry(registryCallbacks(cb, opt.bus), opt.limits),
      reg(*registry.impl_),
      typing(registry, timers, typingCallbacks(cb), opt.typing),
      limiter(opt.rateLimits, timers.clock(), timers),
      connTimers(0, absl::Hash<std::uint64_t>{}, std::equal_to<std::uint64_t>{},
                 detail::CountingAllocator<std::pair<const std::uint64_t, TimerHandle>>(
                     &connBytes)) {
  // Through the queue: under SyncKeeper the log must not run under the lock.
  timers.setLog([this](LogLevel level, std::string_view msg) {
    queueLog(level, std::string(msg));
  });
  authHandler = timers.addHandler(
      [this](TimerHandle h, std::uint32_t slot) { onAuthTimeout(h, slot); });
  statsHandler = timers.addHandler([this](TimerHandle, std::uint32_t) {
    statsTimer = {};
    logStats();
    if (!shut && opt.statsLogInterval.count() > 0)
      statsTimer = timers.arm(opt.statsLogInterval, statsHandler, 0);
  });
  if (opt.statsLogInterval.count() > 0)
    statsTimer = timers.arm(opt.statsLogInterval, statsHandler, 0);
  typing.impl_->bus = opt.bus;
  typing.impl_->holdLists = true;
}

Keeper::Impl::~Impl() = default;

void Keeper::Impl::queueSessionUp(std::string_view session, std::string_view user) noexcept {
  if (!opt.bus) return;
  try {
    queue([bus = opt.bus, s = std::string(session), u = std::string(user)]() {
      bus->sessionUp(s, u);
    });
  } catch (...) {
    reg.events.countDropped();
  }
}

bool Keeper::Impl::queue(std::function<void()> fn) noexcept {
  return reg.events.tryPush([&](detail::Event& ev) {
    ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
    ev.fn = std::move(fn);
  });
}

void Keeper::Impl::queueLog(LogLevel level, std::string msg) noexcept {
  if (!cb.log) return;
  try {
    queue([this, level, m = std::move(msg)]() { cb.log(level, m); });
  } catch (...) {
    reg.events.countDropped();  // the closure could not be had
  }
}

void Keeper::Impl::onAuthTimeout(TimerHandle h, std::uint32_t slot) {
  if (slot >= reg.sessionSlots.highWater()) return;
  const SessionSlot& ss = reg.sessionSlots[slot];
  if (ss.state != SessionState::kLive) return;
  auto it = connTimers.find(pack(slot, ss.generation));
  if (it == connTimers.end() || it->second != h) return;
  connTimers.erase(it);
  ++authTimeouts;
  // The session goes whatever happens to the messages about it.
  try {
    const std::string name(ss.name.view());
    queueLog(LogLevel::kInfo,
             fmt::format("roomkeeper: session {} did not authenticate in time", name));
    if (cb.closeSession)
      queue([this, name]() { cb.closeSession(name, "auth_timeout"); });
  } catch (...) {
    reg.events.countDropped();
  }
  runDisconnect(slot);
}

Result Keeper::Impl::prepareLimits(std::string_view session, std::string_view user,
                                   std::string_view address,
                                   detail::RateLimiter::Prepared* p) {
  if (!limiter.any()) return Result::kOk;
  // The registry's own refusals first: the limiter prepares (and may make
  // a key) only for a connect that will be made; it checks both keys
  // (address and user) before it makes either.
  if (const Result c = reg.checkConnect(session, user); c != Result::kOk) return c;
  detail::RefusalWarning w;
  Result lr;
  try {
    lr = limiter.prepareConnect(address, user, reg.sessionSlots.highWater() + 1, p, &w);
  } catch (...) {
    limiter.abandon(*p);  // the session arrays, if they grew
    return Result::kOutOfMemory;
  }
  if (lr != Result::kOk) warnRefusal(detail::kNone, w);
  return lr;
}

Result Keeper::Impl::connect(std::string_view session, std::string_view address,
                             SessionHandle* out) {
  if (shut) return Result::kShutDown;
  if (address.size() > opt.limits.maxIdLength) return Result::kInvalidId;
  // The limits first (refused: nothing changed), then the registry; the
  // limiter's keys are taken only once the session exists.
  detail::RateLimiter::Prepared p;
  if (const Result lr = prepareLimits(session, {}, address, &p); lr != Result::kOk) return lr;
  SessionHandle h;
  const Result r = reg.connect(session, {}, &h);
  if (r != Result::kOk) {
    if (limiter.any()) limiter.abandon(p);
    return r;
  }
  (void)typing.impl_->makeList(h.index);  // out of memory: made at the first keystroke
  if (opt.authTimeout.count() > 0) {
    // A session without its deadline would never time out: if the timer
    // (a new timer page) or its table entry cannot be had, the connect is
    // taken back and refused.
    TimerHandle t;
    try {
      t = timers.arm(opt.authTimeout, authHandler, h.index);
      connTimers.emplace(pack(h.index, h.generation), t);
    } catch (...) {
      timers.cancel(t);
      reg.undoConnect(h.index);
      if (reg.sessionIndex.empty()) typing.impl_->releaseLists();
      if (limiter.any()) limiter.abandon(p);
      return Result::kOutOfMemory;
    }
  }
  if (limiter.any()) limiter.commitConnect(h.index, p);
  if (out) *out = h;
  maybeWarn();
  return Result::kOk;
}

Result Keeper::Impl::connectAuthenticated(std::string_view session, std::string_view user,
                                          std::string_view address, SessionHandle* out) {
  if (shut) return Result::kShutDown;
  if (user.empty() || address.size() > opt.limits.maxIdLength) return Result::kInvalidId;
  detail::RateLimiter::Prepared p;
  if (const Result lr = prepareLimits(session, user, address, &p); lr != Result::kOk) return lr;
  // One registry call: every refusal (id, limit) is checked before anything
  // is allocated, and a refused call calls nothing. No auth deadline.
  SessionHandle h;
  const Result r = reg.connect(session, user, &h);
  if (r != Result::kOk) {
    if (limiter.any()) limiter.abandon(p);
    return r;
  }
  (void)typing.impl_->makeList(h.index);  // out of memory: made at the first keystroke
  if (limiter.any()) limiter.commitConnect(h.index, p);
  if (out) *out = h;
  ++authenticatedSessions;
  queueSessionUp(session, user);
  maybeWarn();
  return Result::kOk;
}

Result Keeper::Impl::authenticate(std::string_view session, std::string_view user) {
  if (shut) return Result::kShutDown;
  detail::RateLimiter::Prepared p;
  if (limiter.limitsUsers()) {
    if (const Result c = reg.checkBind(session, user); c != Result::kOk) return c;
    detail::RefusalWarning w;
    Result lr;
    try {
      lr = limiter.prepareUser(user, &p, &w);
    } catch (...) {
      return Result::kOutOfMemory;
    }
    if (lr != Result::kOk) {
      warnRefusal(detail::kNone, w);
      return lr;
    }
  }
  const Result r = reg.bindUser(session, user);
  if (r != Result::kOk) {
    limiter.abandon(p);
    return r;
  }
  ++authenticatedSessions;
  queueSessionUp(session, user);
  const std::uint32_t s = reg.findSession(session);
  limiter.commitUser(s, p);
  auto it = connTimers.find(pack(s, reg.sessionSlots[s].generation));
  if (it != connTimers.end()) {
    timers.cancel(it->second);
    connTimers.erase(it);
    // Not for a table of a few slots: connect/authenticate pairs would
    // allocate and free it every time.
    if (connTimers.capacity() > 15) releaseConnTimersIfEmpty();
  }
  return Result::kOk;
}

Result Keeper::Impl::checkAuthenticated(std::string_view session,
                                        std::uint32_t* slot) const {
  if (shut) return Result::kShutDown;
  return checkAuthenticatedSlot(reg.findSession(session), slot);
}

Result Keeper::Impl::checkAuthenticated(SessionHandle session, std::uint32_t* slot) const {
  if (shut) return Result::kShutDown;
  const std::uint32_t s = reg.fromHandle(session);
  if (s == detail::kNone) return Result::kStaleHandle;
  return checkAuthenticatedSlot(s, slot);
}

Result Keeper::Impl::checkAuthenticatedSlot(std::uint32_t s, std::uint32_t* slot) const {
  if (s == detail::kNone) return Result::kNotConnected;
  if (reg.sessionSlots[s].state == SessionState::kClosing) return Result::kClosing;
  if (reg.sessionSlots[s].user == detail::kNone) return Result::kNotAuthenticated;
  if (slot) *slot = s;
  return Result::kOk;
}

void Keeper::Impl::runDisconnect(std::uint32_t s) {
  SessionSlot& ss = reg.sessionSlots[s];
  // Nothing below throws: every step that allocates (the observer's copy of
  // the rooms, each queued callback) gives up only its own message when
  // memory runs out, counted in MemoryStats::eventsDropped. The session
  // always goes, completely.
  // 1. The observer, with the rooms as they are now.
  if (cb.disconnecting) {
    try {
      std::string name(ss.name.view());
      std::vector<std::string> rooms;
      rooms.reserve(ss.rooms.size());
      for (std::uint32_t i = 0; i < ss.rooms.size(); ++i)
        rooms.emplace_back(reg.roomSlots[ss.rooms[i].slot].name.view());
      queue([this, name = std::move(name), rooms = std::move(rooms)]() {
        cb.disconnecting(name, rooms);
      });
    } catch (...) {
      reg.events.countDropped();
    }
  }
  ss.state = SessionState::kClosing;
  if (ss.user != detail::kNone) --authenticatedSessions;
  // The bus hears sessionDown after the leaves (queued by step 4). The
  // names are copied now: the slots go in step 6.
  std::function<void()> down;
  if (opt.bus && ss.user != detail::kNone) {
    try {
      down = [bus = opt.bus, name = std::string(ss.name.view()),
              user = std::string(reg.userSlots[ss.user].name.view())]() {
        bus->sessionDown(name, user);
      };
    } catch (...) {
      reg.events.countDropped();
    }
  }
  // 2. The connection timer.
  auto it = connTimers.find(pack(s, ss.generation));
  if (it != connTimers.end()) {
    timers.cancel(it->second);
    connTimers.erase(it);
  }
  // 3. Typing, with the wildcard for the user's last session.
  typing.impl_->onDisconnect(s);
  // The rate limits let go of the session (its address and user keys are
  // kept until their buckets are full again).
  if (limiter.any()) limiter.release(s);
  // 4-6. Rooms left, tracking cleared, session and user link gone.
  reg.finishDisconnect(s);
  if (down) queue(std::move(down));
  releaseConnTimersIfEmpty();
  // The last session gone and no timer left: the timer pages go too, so
  // that bytes return to where they started (no-op inside advance()).
  if (reg.sessionIndex.empty() && timers.size() == 0) timers.shrinkToFit();
  if (reg.sessionIndex.empty()) typing.impl_->releaseLists();
}

void Keeper::Impl::releaseConnTimersIfEmpty() {
  // A table that emptied keeps its capacity; hand it back so that bytes
  // follow what is held (authenticated sessions need no deadline).
  if (!connTimers.empty() || connTimers.capacity() == 0) return;
  ConnTimers fresh(0, absl::Hash<std::uint64_t>{}, std::equal_to<std::uint64_t>{},
                   detail::CountingAllocator<std::pair<const std::uint64_t, TimerHandle>>(
                       &connBytes));
  connTimers.swap(fresh);
}

Result Keeper::Impl::disconnect(std::string_view session) {
  if (shut) return Result::kShutDown;
  return disconnectSlot(reg.findSession(session));
}

Result Keeper::Impl::disconnectSlot(std::uint32_t s) {
  if (shut) return Result::kShutDown;
  if (busy()) return Result::kBusy;
  if (s == detail::kNone) return Result::kNotConnected;
  if (reg.sessionSlots[s].state == SessionState::kClosing) return Result::kClosing;
  runDisconnect(s);
  return Result::kOk;
}

ShutdownReport Keeper::Impl::shutdown() {
  ShutdownReport rep;
  if (shut) {
    rep.result = Result::kShutDown;
    return rep;
  }
  // The one allocation shutdown needs, made before anything changes.
  std::vector<SessionHandle> all;
  try {
    all.reserve(reg.sessionIndex.size());
  } catch (...) {
    rep.result = Result::kOutOfMemory;
    return rep;
  }
  shut = true;
  // Timers first: nothing may fire while we take everything down.
  for (auto& [key, t] : connTimers)
    if (timers.cancel(t)) ++rep.timersCancelled;
  connTimers.clear();
  rep.timersCancelled += typing.impl_->index.size();
  if (statsTimer.valid() && timers.cancel(statsTimer)) ++rep.timersCancelled;
  statsTimer = {};
  // Everyone hears it, and the transport is asked to close each session.
  for (const std::uint32_t s : reg.sessionIndex)
    if (reg.sessionSlots[s].state == SessionState::kLive)
      all.push_back(SessionHandle{s, reg.sessionSlots[s].generation});
  for (const SessionHandle h : all) {
    try {
      const std::string name(reg.sessionSlots[h.index].name.view());
      if (cb.emit)
        queue([this, name]() {
          cb.emit(name, "serverShutdown", R"({"message":"Server is shutting down"})");
        });
      if (cb.closeSession) queue([this, name]() { cb.closeSession(name, "shutdown"); });
    } catch (...) {
      reg.events.countDropped();
    }
  }
  for (const SessionHandle h : all) {
    const std::uint32_t s = reg.fromHandle(h);
    if (s == detail::kNone || reg.sessionSlots[s].state != SessionState::kLive) continue;
    runDisconnect(s);
    ++rep.sessionsClosed;
  }
  rep.timersCancelled += typing.impl_->clearAll();
  // Keys kept for their buckets go now, with their forget timers (for
  // Keeper and SyncKeeper alike).
  limiter.clear();
  return rep;
}

void Keeper::Impl::logStats() {
  const MemoryStats st = stats();
  queueLog(LogLevel::kInfo,
           fmt::format("roomkeeper: clients={} users={} connectionTimers={} typingTimers={} "
                       "trackedRooms={} rooms={} pendingPersistence={} bytes={}",
                       st.connectedClients, st.userSockets, st.connectionTimers,
                       st.typingTimers, st.trackedRooms, st.rooms, st.pendingPersistence,
                       st.bytes));
}

namespace {
// count > floor, and (ratio 0 or) count > ratio x base.
bool over(std::size_t count, std::size_t floor, double ratio, std::size_t base) noexcept {
  if (count <= floor) return false;
  return ratio <= 0.0 || static_cast<double>(count) > ratio * static_cast<double>(base);
}
}  // namespace

bool Keeper::Impl::warnDue(std::optional<SteadyTime>& last) {
  const SteadyTime now = timers.clock().now();
  if (last && now - *last < detail::saturatingNanos(opt.warnInterval)) return false;
  last = now;
  return true;
}

std::size_t Keeper::Impl::maybeWarn() {
  // Cheap integer checks first; the clock is read only when one trips.
  const std::size_t typingTimers = typing.impl_->index.size();
  const std::size_t sessions = reg.sessionIndex.size();
  const bool a = over(typingTimers, opt.warnTypingTimers, opt.warnTypingPerSession,
                      authenticatedSessions);
  const bool b = over(reg.memberships, opt.warnTrackedRooms, opt.warnRoomsPerConnection,
                      sessions);
  const bool c = opt.warnConnections != 0 && sessions > opt.warnConnections;
  if (!(a || b || c) || !cb.log) return 0;
  std::size_t n = 0;
  try {
    if (a && warnDue(lastWarnTyping)) {
      queueLog(LogLevel::kWarning,
               fmt::format("roomkeeper: high typing timer count: {} for {} authenticated "
                           "sessions (threshold {}x, at least {}) - potential memory leak: "
                           "typing started and never stopped?",
                           typingTimers, authenticatedSessions, opt.warnTypingPerSession,
                           opt.warnTypingTimers));
      ++n;
    }
    if (b && warnDue(lastWarnRooms)) {
      queueLog(LogLevel::kWarning,
               fmt::format("roomkeeper: room tracking exceeds expected ratio: {} tracked "
                           "rooms for {} connections (threshold {}x, at least {}) - rooms "
                           "joined and never left?",
                           reg.memberships, sessions, opt.warnRoomsPerConnection,
                           opt.warnTrackedRooms));
      ++n;
    }
    if (c && warnDue(lastWarnConnections)) {
      queueLog(LogLevel::kWarning,
               fmt::format("roomkeeper: high connection count: {} (threshold {})", sessions,
                           opt.warnConnections));
      ++n;
    }
  } catch (...) {
    reg.events.countDropped();  // no memory for the message
  }
  return n;
}

std::size_t Keeper::Impl::checkTransport(std::size_t open) {
  const std::size_t sessions = reg.sessionIndex.size();
  if (sessions <= open || sessions - open <= opt.warnSessionsWithoutConnection || !cb.log)
    return 0;
  if (!warnDue(lastWarnTransport)) return 0;
  try {
    queueLog(LogLevel::kWarning,
             fmt::format("roomkeeper: {} sessions tracked but the transport has {} "
                         "connections open: {} entries have no connection (threshold {}) - "
                         "potential memory leak: a disconnect or forceCleanup missing?",
                         sessions, open, sessions - open,
                         opt.warnSessionsWithoutConnection));
  } catch (...) {
    reg.events.countDropped();
    return 0;
  }
  return 1;
}

MemoryStats Keeper::Impl::stats() const noexcept {
  MemoryStats st;
  const RegistryStats r = registry.getMemoryStats();
  const TypingStats t = typing.stats();
  st.connectedClients = r.sessions;
  st.userSockets = r.users;
  st.authenticated = authenticatedSessions;
  st.connectionTimers = connTimers.size();
  st.typingTimers = t.timers;
  st.trackedRooms = r.memberships;
  st.sessionsWithRooms = r.sessionsWithRooms;
  st.rooms = r.rooms;
  st.rateLimitKeys = limiter.keys();
  st.rateLimitedConnects = limiter.refusals(detail::Refusal::kConnects);
  st.rateLimitedConcurrent = limiter.refusals(detail::Refusal::kConcurrent);
  st.rateLimitedJoins = limiter.refusals(detail::Refusal::kJoins);
  st.rateLimitedTyping = limiter.refusals(detail::Refusal::kTyping);
  st.rateLimitedHost = limiter.refusals(detail::Refusal::kHost);
  st.rateLimitedKeysFull = limiter.refusals(detail::Refusal::kKeysFull);
  st.totalEntries = st.connectedClients + st.userSockets + st.connectionTimers +
                    st.typingTimers + st.sessionsWithRooms + t.sessionsTyping +
                    st.rateLimitKeys;
  st.timersPending = timers.size();
  st.pendingPersistence = t.persistPending;
  st.persistDelivered = t.persistDelivered;
  st.persistFailures = t.persistFailures;
  st.persistDropped = t.persistDropped;
  st.callbackErrors = r.callbackErrors + t.callbackErrors + timers.callbackErrors();
  st.authTimeouts = authTimeouts;
  st.forcedCleanups = forcedCleanups;
  st.eventsDropped = reg.events.dropped();
  st.bytes = r.bytes + t.bytes + timers.bytes() + connBytes + limiter.bytes();
  return st;
}

// ------------------------------------------------------------- Public ---

Keeper::Keeper() : Keeper(KeeperCallbacks{}) {}
Keeper::Keeper(KeeperCallbacks callbacks, KeeperOptions options)
    : impl_(std::make_unique<Impl>(std::move(callbacks), std::move(options))) {}
Keeper::~Keeper() {
  if (impl_ && impl_->reg.events.running()) {
    std::fputs(
        "roomkeeper: a Keeper was destroyed from inside one of its own callbacks; "
        "destroy it after the call that runs the callback returns. Aborting.\n",
        stderr);
    std::abort();
  }
}

Result Keeper::connect(std::string_view session) { return connect(session, nullptr); }
Result Keeper::connect(std::string_view session, SessionHandle* handle) {
  const Result r = impl_->connect(session, {}, handle);
  impl_->reg.flush();
  return r;
}
Result Keeper::connect(std::string_view session, ClientAddress from, SessionHandle* handle) {
  const Result r = impl_->connect(session, from.address, handle);
  impl_->reg.flush();
  return r;
}
Result Keeper::authenticate(std::string_view session, std::string_view user) {
  const Result r = impl_->authenticate(session, user);
  impl_->reg.flush();
  return r;
}
Result Keeper::connectAuthenticated(std::string_view session, std::string_view user) {
  return connectAuthenticated(session, user, nullptr);
}
Result Keeper::connectAuthenticated(std::string_view session, std::string_view user,
                                    SessionHandle* handle) {
  const Result r = impl_->connectAuthenticated(session, user, {}, handle);
  impl_->reg.flush();
  return r;
}
Result Keeper::connectAuthenticated(std::string_view session, std::string_view user,
                                    ClientAddress from, SessionHandle* handle) {
  const Result r = impl_->connectAuthenticated(session, user, from.address, handle);
  impl_->reg.flush();
  return r;
}
template <typename Id>
Result Keeper::trackRoomImpl(Id session, std::string_view room) {
  std::uint32_t s = detail::kNone;
  Result r = impl_->checkAuthenticated(session, &s);
  if (r == Result::kOk) {
    // A token only for a call that is carried out (kOk or kAlreadyDone).
    std::int64_t next = 0;
    detail::RefusalWarning w;
    if (impl_->limiter.any() &&
        !impl_->limiter.admit(s, detail::RateLimiter::kJoins, &next, &w)) {
      impl_->warnRefusal(s, w);
      r = Result::kRateLimited;
    } else {
      r = impl_->reg.track(s, room);
      if (impl_->limiter.any() && ok(r))
        impl_->limiter.take(s, detail::RateLimiter::kJoins, next);
      if (r == Result::kOk) impl_->maybeWarn();
    }
  }
  impl_->reg.flush();
  return r;
}
template <typename Id>
Result Keeper::untrackRoomImpl(Id session, std::string_view room) {
  if (impl_->shut) return Result::kShutDown;
  Result why = Result::kOk;
  const std::uint32_t s = impl_->slotOf(session, &why);
  if (s == detail::kNone) return why;
  std::int64_t next = 0;
  detail::RefusalWarning w;
  if (impl_->limiter.any() &&
      !impl_->limiter.admit(s, detail::RateLimiter::kJoins, &next, &w)) {
    impl_->warnRefusal(s, w);
    impl_->reg.flush();
    return Result::kRateLimited;
  }
  const Result r = impl_->reg.untrack(s, room);
  if (impl_->limiter.any() && ok(r)) impl_->limiter.take(s, detail::RateLimiter::kJoins, next);
  impl_->reg.flush();
  return r;
}
template <typename Id>
Result Keeper::startTypingImpl(Id session, std::string_view thread) {
  if (impl_->busy()) return Result::kBusy;
  std::uint32_t s = detail::kNone;
  Result r = impl_->checkAuthenticated(session, &s);
  if (r == Result::kOk) {
    std::int64_t next = 0;
    detail::RefusalWarning w;
    if (impl_->limiter.any() &&
        !impl_->limiter.admit(s, detail::RateLimiter::kTyping, &next, &w)) {
      impl_->warnRefusal(s, w);
      r = Result::kRateLimited;
    } else {
      r = impl_->typing.impl_->startSlot(s, thread);
      if (impl_->limiter.any() && ok(r))
        impl_->limiter.take(s, detail::RateLimiter::kTyping, next);
      if (r == Result::kOk) impl_->maybeWarn();
    }
  }
  impl_->reg.flush();
  return r;
}
template <typename Id>
Result Keeper::stopTypingImpl(Id session, std::string_view thread) {
  if (impl_->shut) return Result::kShutDown;
  if (impl_->busy()) return Result::kBusy;
  Result why = Result::kOk;
  const std::uint32_t s = impl_->slotOf(session, &why);
  if (s == detail::kNone) return why;
  const Result r = impl_->typing.impl_->stopSlot(s, thread);
  impl_->reg.flush();
  return r;
}
template <typename Id>
Result Keeper::disconnectImpl(Id session, bool forced) {
  if (impl_->shut) return Result::kShutDown;
  Result why = Result::kOk;
  const std::uint32_t s = impl_->slotOf(session, &why);
  if (s == detail::kNone) return why;
  const Result r = impl_->disconnectSlot(s);
  if (r == Result::kOk && forced) ++impl_->forcedCleanups;
  impl_->reg.flush();
  return r;
}

Result Keeper::trackRoom(std::string_view session, std::string_view room) {
  return trackRoomImpl(session, room);
}
Result Keeper::trackRoom(SessionHandle session, std::string_view room) {
  return trackRoomImpl(session, room);
}
Result Keeper::untrackRoom(std::string_view session, std::string_view room) {
  return untrackRoomImpl(session, room);
}
void Keeper::prefetchRooms(const std::string_view* rooms, std::size_t n) noexcept {
  impl_->reg.prefetchRooms(rooms, n);
}
Result Keeper::untrackRoom(SessionHandle session, std::string_view room) {
  return untrackRoomImpl(session, room);
}
std::size_t Keeper::Impl::clearRoomTrackingSlot(std::uint32_t s) {
  if (shut || busy() || s == detail::kNone) return 0;
  const std::size_t n = reg.clearRooms(s);
  reg.flush();
  return n;
}
std::size_t Keeper::clearRoomTracking(SessionHandle session) {
  return impl_->clearRoomTrackingSlot(impl_->reg.fromHandle(session));
}
std::size_t Keeper::clearRoomTracking(std::string_view session) {
  return impl_->clearRoomTrackingSlot(impl_->reg.findSession(session));
}
Result Keeper::startTyping(std::string_view session, std::string_view thread) {
  return startTypingImpl(session, thread);
}
Result Keeper::startTyping(SessionHandle session, std::string_view thread) {
  return startTypingImpl(session, thread);
}
Result Keeper::stopTyping(std::string_view session, std::string_view thread) {
  return stopTypingImpl(session, thread);
}
Result Keeper::stopTyping(SessionHandle session, std::string_view thread) {
  return stopTypingImpl(session, thread);
}
Result Keeper::disconnect(std::string_view session) { return disconnectImpl(session, false); }
Result Keeper::disconnect(SessionHandle session) { return disconnectImpl(session, false); }
Result Keeper::forceCleanup(std::string_view session) { return disconnectImpl(session, true); }
Result Keeper::forceCleanup(SessionHandle session) { return disconnectImpl(session, true); }
SessionHandle Keeper::handleOf(std::string_view session) const {
  return impl_->registry.handleOf(session);
}
ShutdownReport Keeper::shutdown() {
  if (impl_->shut) return ShutdownReport{Result::kShutDown};
  if (impl_->busy()) return ShutdownReport{Result::kBusy};
  ShutdownReport rep = impl_->shutdown();
  if (rep.result != Result::kOk) return rep;
  impl_->reg.flush();
  rep.persistUndelivered = impl_->typing.flushPersistence();
  impl_->typing.impl_->discardPersistence();  // reported; every count is 0
  rep.timersCancelled += impl_->timers.cancelAll();
  impl_->timers.shrinkToFit();
  impl_->typing.impl_->releaseLists();
  return rep;
}
bool Keeper::isShutDown() const noexcept { return impl_->shut; }

std::shared_ptr<detail::FanOut> Keeper::Impl::collectLocal(const BroadcastTargets& targets,
                                                          std::string_view event,
                                                          std::string_view payload) {
  if (shut || !cb.emit) return nullptr;
  auto f = std::make_shared<detail::FanOut>();
  f->event.assign(event.data(), event.size());
  f->payload.assign(payload.data(), payload.size());
  reg.forEachTargetSlot(targets, [&](std::uint32_t s) { f->add(reg.sessionSlots[s].name.view()); });
  if (f->size() == 0) return nullptr;
  return f;
}

std::size_t Keeper::Impl::queueFanOut(std::shared_ptr<detail::FanOut> f) noexcept {
  if (!f) return 0;
  const std::size_t n = f->size();
  // One queued event for the whole fan-out. It runs where the members' own
  // events would have run; an emit that throws is counted and the next
  // member is still told.
  try {
    if (queue([this, f = std::move(f)]() {
          f->deliver(cb.emit, [this] { reg.reportError("host"); });
        }))
      return n;
  } catch (...) {
    reg.events.countDropped();  // the closure could not be had
  }
  return 0;  // dropped: nobody will be told
}

std::size_t Keeper::broadcast(const BroadcastTargets& targets, std::string_view event,
                              std::string_view payload) {
  Impl& im = *impl_;
  if (im.shut) return 0;
  // Collected first: out of memory, the call throws with nothing queued,
  // for the bus or for anyone here.
  std::shared_ptr<detail::FanOut> local = im.collectLocal(targets, event, payload);
  if (im.opt.bus) {
    // The bus next, so that the other Keepers' members are on their way
    // while this one's are told (its hand-off is queued ahead of the local
    // emits). The bus gets its own copy (the views are the caller's).
    try {
      auto msg = std::make_shared<const BroadcastMessage>(
          BroadcastMessage::copyOf(targets, event, payload));
      im.queue([bus = im.opt.bus, msg]() {
        bus->broadcast(msg->targets(), msg->event, msg->payload);
      });
    } catch (...) {
      im.reg.events.countDropped();
    }
  }
  const std::size_t n = im.queueFanOut(std::move(local));
  im.reg.flush();
  return n;
}

std::size_t Keeper::relayBroadcast(const BroadcastTargets& targets, std::string_view event,
                                   std::string_view payload) {
  std::size_t n = 0;
  try {
    n = impl_->queueFanOut(impl_->collectLocal(targets, event, payload));
  } catch (...) {
    impl_->reg.events.countDropped();
  }
  impl_->reg.flush();
  return n;
}

void Keeper::relayPresence(std::string_view user, bool online) {
  Impl& im = *impl_;
  if (im.shut) return;
  // Gone everywhere: a typingStopped that never came is sent now.
  if (!online) (void)im.typing.impl_->forgetShown(user);
  auto& fn = online ? im.cb.userOnline : im.cb.userOffline;
  if (fn) {
    try {
      im.queue([&fn, u = std::string(user)]() { fn(u); });
    } catch (...) {
      im.reg.events.countDropped();
    }
  }
  im.reg.flush();
}

std::size_t Keeper::relayTyping(std::string_view user, std::string_view thread,
                                bool started) {
  Impl& im = *impl_;
  if (im.shut) return 0;
  const std::size_t n = im.typing.impl_->relay(user, thread, started);
  im.reg.flush();
  return n;
}

std::size_t Keeper::replayToBus() {
  Impl& im = *impl_;
  if (im.shut || !im.opt.bus) return 0;
  Bus* bus = im.opt.bus;
  std::size_t n = 0;
  try {
    for (const std::uint32_t s : im.reg.sessionIndex) {
      const SessionSlot& ss = im.reg.sessionSlots[s];
      if (ss.state != SessionState::kLive || ss.user == detail::kNone) continue;
      const std::string name(ss.name.view());
      im.queueSessionUp(name, im.reg.userSlots[ss.user].name.view());
      ++n;
      if (!bus->wantsMemberships()) continue;
      for (std::uint32_t i = 0; i < ss.rooms.size(); ++i) {
        im.queue([bus, name, r = std::string(im.reg.roomSlots[ss.rooms[i].slot].name.view())]() {
          bus->joined(name, r);
        });
        ++n;
      }
    }
    n += im.typing.impl_->replayToBus();
  } catch (...) {
    im.reg.events.countDropped();
  }
  im.reg.flush();
  return n;
}

std::size_t Keeper::localRoomSize(std::string_view room) const {
  return registry().roomSize(room);
}
std::vector<std::string> Keeper::localRoomMembers(std::string_view room) const {
  return registry().membersOf(room);
}

bool Keeper::relayUserGone(std::string_view user) {
  Impl& im = *impl_;
  if (im.shut || im.reg.findUser(user) != detail::kNone) return false;
  im.typing.impl_->persist(PersistOp::kTypingStoppedAll, user, {});
  im.reg.flush();
  return true;
}

std::size_t Keeper::advance() { return advance(impl_->timers.clock().now()); }
std::size_t Keeper::advance(SteadyTime now, std::size_t maxFire) {
  if (impl_->busy()) return 0;  // from inside a registry visitor: not now
  // Timer handlers only queue their callbacks; they run after the batch.
  ++impl_->reg.events.deferred_;
  const std::size_t n = impl_->timers.advance(now, maxFire);
  --impl_->reg.events.deferred_;
  // An auth timeout may have taken the last session; inside advance() the
  // timer pages could not go (a batch was running): hand them back now.
  if (impl_->reg.sessionIndex.empty() && impl_->timers.size() == 0)
    impl_->timers.shrinkToFit();
  impl_->reg.flush();
  return n;
}
std::optional<SteadyTime> Keeper::nextDeadline() const noexcept {
  return impl_->timers.nextDeadline();
}

MemoryStats Keeper::getMemoryStats() const noexcept { return impl_->stats(); }

std::size_t Keeper::checkTransport(std::size_t openConnections) {
  if (impl_->shut) return 0;
  const std::size_t n = impl_->checkTransport(openConnections);
  impl_->reg.flush();
  return n;
}
std::size_t Keeper::checkThresholds() {
  const std::size_t n = impl_->maybeWarn();
  impl_->reg.flush();
  return n;
}

const SessionRegistry& Keeper::registry() const noexcept { return impl_->registry; }
const TypingTimerManager& Keeper::typing() const noexcept { return impl_->typing; }
const TimerService& Keeper::timers() const noexcept { return impl_->timers; }

namespace {
// A host kind's name inside quotes, in Prometheus text and in JSON: the
// escapes both formats share (backslash, quote, newline); other control
// characters become '?'.
std::string escapeQuoted(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (const char c : in) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += '?';
    } else {
      out += c;
    }
  }
  return out;
}
struct Metric {
  const char* name;
  const char* type;
  const char* help;
  double value;
};
std::vector<Metric> metricsOf(const MemoryStats& s) {
  auto d = [](auto v) { return static_cast<double>(v); };
  return {
      {"connected_clients", "gauge", "Sessions connected now.", d(s.connectedClients)},
      {"authenticated_sessions", "gauge", "Sessions bound to a user.", d(s.authenticated)},
      {"user_sockets", "gauge", "Users with at least one session.", d(s.userSockets)},
      {"connection_timers", "gauge", "Authentication deadlines armed.", d(s.connectionTimers)},
      {"typing_timers", "gauge", "Typing indicators (one auto-clear timer each).",
       d(s.typingTimers)},
      {"tracked_rooms", "gauge", "Room memberships (session, room).", d(s.trackedRooms)},
      {"sessions_with_rooms", "gauge", "Sessions in at least one room.",
       d(s.sessionsWithRooms)},
      {"rooms", "gauge", "Non-empty rooms.", d(s.rooms)},
      {"total_entries", "gauge", "Map entries held, all kinds.", d(s.totalEntries)},
      {"timers_pending", "gauge", "Timers on the timer service.", d(s.timersPending)},
      {"persistence_pending", "gauge", "Persistence calls waiting to be delivered.",
       d(s.pendingPersistence)},
      {"persistence_delivered_total", "counter", "Persistence calls delivered.",
       d(s.persistDelivered)},
      {"persistence_failures_total", "counter", "Persistence attempts that failed.",
       d(s.persistFailures)},
      {"persistence_dropped_total", "counter", "Persistence calls dropped (queue full).",
       d(s.persistDropped)},
      {"callback_errors_total", "counter", "Host callbacks that threw.",
       d(s.callbackErrors)},
      {"auth_timeouts_total", "counter", "Sessions closed at the auth deadline.",
       d(s.authTimeouts)},
      {"forced_cleanups_total", "counter", "Sessions cleaned up by forceCleanup.",
       d(s.forcedCleanups)},
      {"events_dropped_total", "counter",
       "Callback messages lost to an allocation failure (the state change was made).",
       d(s.eventsDropped)},
      {"rate_limit_keys", "gauge", "Client addresses and users the rate limits track.",
       d(s.rateLimitKeys)},
      {"rate_limited_connects_total", "counter",
       "Connects refused: connections per second per address.", d(s.rateLimitedConnects)},
      {"rate_limited_concurrent_total", "counter",
       "Connects refused: sessions open at once per address.", d(s.rateLimitedConcurrent)},
      {"rate_limited_joins_total", "counter", "Joins and leaves refused per session.",
       d(s.rateLimitedJoins)},
      {"rate_limited_typing_total", "counter", "Typing starts refused per session.",
       d(s.rateLimitedTyping)},
      {"rate_limited_host_total", "counter", "allow() calls refused, every host kind.",
       d(s.rateLimitedHost)},
      {"rate_limited_keys_full_total", "counter",
       "Calls refused: a new address or user with maxKeys tracked, none idle.",
       d(s.rateLimitedKeysFull)},
      {"bytes", "gauge", "Heap bytes held by roomkeeper.", d(s.bytes)},
  };
}
}  // namespace

std::string prometheusText(const MemoryStats& stats) {
  std::string out;
  for (const Metric& m : metricsOf(stats)) {
    out += fmt::format("# HELP roomkeeper_{} {}\n# TYPE roomkeeper_{} {}\nroomkeeper_{} {}\n",
                       m.name, m.help, m.name, m.type, m.name, m.value);
  }
  return out;
}

std::string statsJson(const MemoryStats& s) {
  return fmt::format(
      "{{\"connectedClients\":{},\"authenticated\":{},\"userSockets\":{},"
      "\"connectionTimers\":{},\"typingTimers\":{},\"trackedRooms\":{},"
      "\"sessionsWithRooms\":{},\"rooms\":{},\"totalEntries\":{},\"timersPending\":{},"
      "\"pendingPersistence\":{},\"persistDelivered\":{},\"persistFailures\":{},"
      "\"persistDropped\":{},\"callbackErrors\":{},\"authTimeouts\":{},"
      "\"forcedCleanups\":{},\"eventsDropped\":{},\"rateLimitKeys\":{},"
      "\"rateLimitedConnects\":{},\"rateLimitedConcurrent\":{},\"rateLimitedJoins\":{},"
      "\"rateLimitedTyping\":{},\"rateLimitedHost\":{},\"rateLimitedKeysFull\":{},"
      "\"bytes\":{}}}",
      s.connectedClients, s.authenticated, s.userSockets, s.connectionTimers,
      s.typingTimers, s.trackedRooms, s.sessionsWithRooms, s.rooms, s.totalEntries,
      s.timersPending, s.pendingPersistence, s.persistDelivered, s.persistFailures,
      s.persistDropped, s.callbackErrors, s.authTimeouts, s.forcedCleanups, s.eventsDropped,
      s.rateLimitKeys, s.rateLimitedConnects, s.rateLimitedConcurrent, s.rateLimitedJoins,
      s.rateLimitedTyping, s.rateLimitedHost, s.rateLimitedKeysFull, s.bytes);
}

MemoryStats& operator+=(MemoryStats& a, const MemoryStats& b) noexcept {
  a.connectedClients += b.connectedClients;
  a.authenticated += b.authenticated;
  a.userSockets += b.userSockets;
  a.connectionTimers += b.connectionTimers;
  a.typingTimers += b.typingTimers;
  a.trackedRooms += b.trackedRooms;
  a.sessionsWithRooms += b.sessionsWithRooms;
  a.rooms += b.rooms;
  a.totalEntries += b.totalEntries;
  a.timersPending += b.timersPending;
  a.pendingPersistence += b.pendingPersistence;
  a.persistDelivered += b.persistDelivered;
  a.persistFailures += b.persistFailures;
  a.persistDropped += b.persistDropped;
  a.callbackErrors += b.callbackErrors;
  a.authTimeouts += b.authTimeouts;
  a.forcedCleanups += b.forcedCleanups;
  a.eventsDropped += b.eventsDropped;
  a.rateLimitKeys += b.rateLimitKeys;
  a.rateLimitedConnects += b.rateLimitedConnects;
  a.rateLimitedConcurrent += b.rateLimitedConcurrent;
  a.rateLimitedJoins += b.rateLimitedJoins;
  a.rateLimitedTyping += b.rateLimitedTyping;
  a.rateLimitedHost += b.rateLimitedHost;
  a.rateLimitedKeysFull += b.rateLimitedKeysFull;
  a.bytes += b.bytes;
  return a;
}

std::string Keeper::prometheusText() const {
  std::string out = roomkeeper::prometheusText(getMemoryStats());
  // The host kinds by name, one labelled counter.
  const auto& kinds = impl_->opt.rateLimits.kinds;
  if (!kinds.empty()) {
    out += "# HELP roomkeeper_rate_limited_kind_total allow() calls refused, by host kind.\n"
           "# TYPE roomkeeper_rate_limited_kind_total counter\n";
    for (RateKindId k = 0; k < kinds.size(); ++k)
      out += fmt::format("roomkeeper_rate_limited_kind_total{{kind=\"{}\"}} {}\n",
                         escapeQuoted(kinds[k].name), impl_->limiter.hostRefusals(k));
  }
  return out;
}

std::string Keeper::statsJson() const {
  std::string out = roomkeeper::statsJson(getMemoryStats());
  const auto& kinds = impl_->opt.rateLimits.kinds;
  if (!kinds.empty()) {
    out.pop_back();  // the closing brace
    out += ",\"rateLimitedKinds\":{";
    for (RateKindId k = 0; k < kinds.size(); ++k)
      out += fmt::format("{}\"{}\":{}", k ? "," : "", escapeQuoted(kinds[k].name),
                         impl_->limiter.hostRefusals(k));
    out += "}}";
  }
  return out;
}

std::uint64_t Keeper::rateLimited(RateKindId kind) const noexcept {
  return impl_->limiter.hostRefusals(kind);
}

template <typename Id>
Result Keeper::allowImpl(Id session, RateKindId kind) {
  Impl& im = *impl_;
  if (im.shut) return Result::kShutDown;
  Result why = Result::kOk;
  const std::uint32_t s = im.slotOf(session, &why);
  if (s == detail::kNone) return why;
  detail::RefusalWarning w;
  const Result r = im.limiter.allow(s, kind, &w);
  if (r == Result::kRateLimited) {
    im.warnRefusal(s, w);
    im.reg.flush();
  }
  return r;
}
Result Keeper::allow(std::string_view session, RateKindId kind) {
  return allowImpl(session, kind);
}
Result Keeper::allow(SessionHandle session, RateKindId kind) { return allowImpl(session, kind); }

void Keeper::Impl::warnRefusal(std::uint32_t slot, const detail::RefusalWarning& w) noexcept {
  if (!w.due || !cb.log || !warnDue(lastWarnRate)) return;
  try {
    std::string what;
    switch (w.why) {
      case detail::Refusal::kConnects: what = "connections per second"; break;
      case detail::Refusal::kConcurrent: what = "sessions open at once"; break;
      case detail::Refusal::kJoins: what = "joins and leaves"; break;
      case detail::Refusal::kTyping: what = "typing starts"; break;
      case detail::Refusal::kKeysFull: what = "new keys (maxKeys reached)"; break;
      case detail::Refusal::kHost: what = opt.rateLimits.kinds[w.kind].name; break;
    }
    std::string who;
    if (!w.key.empty()) who = fmt::format("'{}'", w.key);
    else if (slot != detail::kNone) who = fmt::format("session {}", reg.sessionSlots[slot].name.view());
    else who = "calls";
    queueLog(LogLevel::kWarning,
             fmt::format("roomkeeper: rate limit: {} refused {} times in a row ({}) - a "
                         "client flooding?",
                         who, w.run, what));
  } catch (...) {
    reg.events.countDropped();
  }
}

}  // namespace roomkeeper
