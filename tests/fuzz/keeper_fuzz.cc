// SPDX-License-Identifier: MIT
// libFuzzer target: decodes the input into a stream of operations on a
// Keeper -- connect, authenticate, join, leave, clear, typing start/stop,
// advance time, disconnect, force-cleanup, shutdown -- with host callbacks
// that (depending on the input) call back in or throw, and checks the
// invariants after every operation:
//   * the two-way index is consistent (rooms of each session vs members of
//     each room), no room is empty, every count equals a recount;
//   * without re-entrant callbacks, sessions/users/memberships equal a plain
//     std::map model exactly;
//   * a refused call changes nothing (stats identical, bytes included),
//     also one refused by a rate limit (mode & 8 turns tight limits on:
//     per address, per session, a host kind per user, a tiny maxKeys);
//   * after shutdown every count is 0.
// Build: cmake -DROOMKEEPER_BUILD_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++
#include <roomkeeper/roomkeeper.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using namespace roomkeeper;

namespace {

#define FUZZ_CHECK(cond)                                                      \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond, __FILE__, \
                   __LINE__);                                                 \
      std::abort();                                                           \
    }                                                                         \
  } while (0)

struct Input {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  bool empty() const { return n == 0; }
};

const char* const kSessions[] = {"s0", "s1", "s2", "s3", "s4", "s5", "", "sx-long"};
const char* const kUsers[] = {"u0", "u1", "u2", ""};
const char* const kRooms[] = {"r0", "r1", "r2", "thread:t0", "thread:t1", "job:1", "", "r7"};
const char* const kThreads[] = {"t0", "t1", "t2", ""};

struct Model {
  std::map<std::string, std::string> sessions;  // session -> user ("" = not authenticated)
  std::map<std::string, std::set<std::string>> rooms;  // session -> rooms
};

bool sameStats(const MemoryStats& a, const MemoryStats& b) {
  return a.connectedClients == b.connectedClients && a.userSockets == b.userSockets &&
         a.connectionTimers == b.connectionTimers && a.typingTimers == b.typingTimers &&
         a.trackedRooms == b.trackedRooms && a.rooms == b.rooms &&
         a.sessionsWithRooms == b.sessionsWithRooms && a.bytes == b.bytes;
}

void checkIndex(const Keeper& k) {
  const SessionRegistry& reg = k.registry();
  const MemoryStats st = k.getMemoryStats();
  std::map<std::string, std::set<std::string>> byRoom;
  std::set<std::string> users;
  std::size_t sessions = 0, memberships = 0, withRooms = 0, authed = 0;
  std::vector<std::string> ids;
  reg.forEachSession([&](std::string_view s) { ids.emplace_back(s); });
  for (const std::string& s : ids) {
    ++sessions;
    const std::string user(reg.userOf(s));
    if (!user.empty()) {
      users.insert(user);
      ++authed;
    }
    const std::vector<std::string> rooms = reg.roomsOf(s);
    FUZZ_CHECK(rooms.size() == reg.roomCount(s));
    memberships += rooms.size();
    if (!rooms.empty()) ++withRooms;
    for (const std::string& r : rooms) {
      FUZZ_CHECK(reg.isMember(s, r));
      byRoom[r].insert(s);
    }
  }
  for (const auto& [room, members] : byRoom) {
    FUZZ_CHECK(reg.roomSize(room) == members.size());
    const std::vector<std::string> m = reg.membersOf(room);
    FUZZ_CHECK(std::set<std::string>(m.begin(), m.end()) == members);
  }
  FUZZ_CHECK(st.connectedClients == sessions);
  FUZZ_CHECK(st.authenticated == authed);
  FUZZ_CHECK(st.userSockets == users.size());
  FUZZ_CHECK(st.trackedRooms == memberships);
  FUZZ_CHECK(st.sessionsWithRooms == withRooms);
  FUZZ_CHECK(st.rooms == byRoom.size());  // no empty room survives
  FUZZ_CHECK(st.typingTimers == k.typing().stats().indicators);
  FUZZ_CHECK(st.connectionTimers <= st.connectedClients - authed);
}

void checkModel(const Keeper& k, const Model& m) {
  const SessionRegistry& reg = k.registry();
  FUZZ_CHECK(k.getMemoryStats().connectedClients == m.sessions.size());
  for (const auto& [s, user] : m.sessions) {
    FUZZ_CHECK(reg.isConnected(s));
    FUZZ_CHECK(reg.userOf(s) == user);
    const auto it = m.rooms.find(s);
    const std::size_t want = it == m.rooms.end() ? 0 : it->second.size();
    FUZZ_CHECK(reg.roomCount(s) == want);
    if (it != m.rooms.end())
      for (const std::string& r : it->second) FUZZ_CHECK(reg.isMember(s, r));
  }
}

// An advance may close sessions that missed their auth deadline -- only
// those: an authenticated session never disappears on its own.
void pruneTimedOut(const Keeper& k, Model& m) {
  for (auto it = m.sessions.begin(); it != m.sessions.end();) {
    if (!k.registry().isConnected(it->first)) {
      FUZZ_CHECK(it->second.empty());
      m.rooms.erase(it->first);
      it = m.sessions.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input in{data, size};
  const std::uint8_t mode = in.byte();
  const bool reentrant = mode & 1;    // callbacks call back in
  const bool throwing = mode & 2;     // callbacks throw
  const bool failingDb = mode & 4;    // persistence fails now and then
  const bool limited = mode & 8;      // tight rate limits

  ManualClock clock(SteadyTime{} + std::chrono::hours(1));
  Keeper* self = nullptr;
  std::uint32_t tick = 0;  // drives "sometimes" from the input
  std::uint8_t chaos = in.byte();
  auto sometimes = [&](unsigned mask) { return ((chaos + ++tick) & mask) == 0; };
  std::size_t persistAttempts = 0;

  KeeperCallbacks cb;
  cb.leave = [&](std::string_view s, std::string_view room) {
    if (throwing && sometimes(3)) throw std::runtime_error("leave failed");
    if (reentrant && self && sometimes(3)) {
      (void)self->trackRoom(s, room);         // rejoin while leaving: refused or ok
      (void)self->untrackRoom("s1", "r1");    // leave someone else's room
    }
  };
  cb.emit = [&](std::string_view s, std::string_view, std::string_view) {
    if (throwing && sometimes(3)) throw 42;  // not even a std::exception
    if (reentrant && self && sometimes(7)) (void)self->disconnect(s);
  };
  cb.closeSession = [&](std::string_view s, std::string_view) {
    if (reentrant && self && sometimes(1)) (void)self->forceCleanup(s);
  };
  cb.persist = [&](const PersistCall&) {
    ++persistAttempts;
    if (throwing && sometimes(7)) throw std::runtime_error("db down");
    return !(failingDb && sometimes(1));
  };
  cb.disconnecting = [&](std::string_view s, const std::vector<std::string>&) {
    if (reentrant && self && sometimes(3)) (void)self->trackRoom(s, "r0");
    if (reentrant && self && sometimes(15)) (void)self->shutdown();
  };
  cb.userOffline = [&](std::string_view) {
    if (throwing && sometimes(3)) throw std::logic_error("observer");
  };
  cb.log = [&](LogLevel, std::string_view) {
    if (throwing && sometimes(7)) throw std::runtime_error("log");
  };
  KeeperOptions opt;
  opt.clock = &clock;
  opt.authTimeout = Millis(300);
  opt.typing.timeout = Millis(50);
  opt.typing.maxPendingPersist = 8;
  opt.typing.retryInitial = Millis(10);
  opt.limits.maxRoomsPerSession = 4;
  opt.limits.maxSessionsPerUser = 2;
  opt.limits.maxIdLength = 7;
  opt.warnTypingTimers = 2;
  opt.warnConnections = 3;
  if (limited) {
    opt.rateLimits.connectsPerAddress = {20, 2};
    opt.rateLimits.maxSessionsPerAddress = 2;
    opt.rateLimits.joinsPerSession = {50, 3};
    opt.rateLimits.typingPerSession = {50, 2};
    opt.rateLimits.kinds = {{"message", RateScope::kUser, {100, 2}},
                            {"report", RateScope::kAddress, {10, 1}}};
    opt.rateLimits.maxKeys = 3;
    opt.rateLimits.warnAfterRefusals = 2;
  }
  const char* const kAddresses[] = {"a0", "a1", "a2", "a3", ""};
  Keeper keeper(cb, opt);
  self = &keeper;
  Model model;
  const bool exact = !reentrant && !throwing;

  while (!in.empty()) {
    const std::uint8_t op = in.byte();
    const std::uint8_t arg = in.byte();
    const std::string s = kSessions[arg & 7];
    const std::string room = kRooms[(arg >> 3) & 7];
    const std::string user = kUsers[(arg >> 3) & 3];
    const std::string thread = kThreads[(arg >> 5) & 3];
    const MemoryStats before = keeper.getMemoryStats();
    Result r = Result::kOk;
    bool refusable = true;
    switch (op % 12) {
      case 0:
        r = limited ? keeper.connect(s, ClientAddress{kAddresses[(arg >> 3) % 5]})
                    : keeper.connect(s);
        if (exact && r == Result::kOk) model.sessions[s] = "";
        break;
      case 1:
        r = keeper.authenticate(s, user);
        if (exact && r == Result::kOk) model.sessions[s] = user;
        break;
      case 2:
        r = keeper.trackRoom(s, room);
        if (exact && r == Result::kOk) model.rooms[s].insert(room);
        break;
      case 3:
        r = keeper.untrackRoom(s, room);
        if (exact && r == Result::kOk) {
          model.rooms[s].erase(room);
          if (model.rooms[s].empty()) model.rooms.erase(s);
        }
        break;
      case 4:
        if (limited && (arg & 64)) {
          // A host kind (2 is not one). Refused, it changes nothing.
          const RateKindId kind = (arg >> 3) % 3;
          r = keeper.allow(s, kind);
          FUZZ_CHECK(r == Result::kOk || r == Result::kRateLimited ||
                     r == Result::kNotConnected || r == Result::kNotAuthenticated ||
                     r == Result::kUnknownKind || r == Result::kShutDown);
          if (r != Result::kNotConnected && r != Result::kShutDown)
            FUZZ_CHECK((kind == 2) == (r == Result::kUnknownKind));
          break;
        }
        (void)keeper.clearRoomTracking(s);
        if (exact) model.rooms.erase(s);
        refusable = false;
        break;
      case 5:
        r = keeper.startTyping(s, thread);
        refusable = false;  // a restart moves a timer; counts stay
        break;
      case 6:
        r = keeper.stopTyping(s, thread);
        refusable = false;
        break;
      case 7:
      case 8: {
        clock.advanceBy(std::chrono::milliseconds(arg * 3));
        const std::size_t maxFire = (op & 16) ? 1 : static_cast<std::size_t>(-1);
        (void)keeper.advance(clock.now(), maxFire);
        refusable = false;
        if (exact) pruneTimedOut(keeper, model);
        break;
      }
      case 9:
        r = keeper.disconnect(s);
        if (exact && r == Result::kOk) {
          model.sessions.erase(s);
          model.rooms.erase(s);
        }
        break;
      case 10:
        r = keeper.forceCleanup(s);
        if (exact && r == Result::kOk) {
          model.sessions.erase(s);
          model.rooms.erase(s);
        }
        break;
      case 11:
        if ((arg & 31) == 0) {
          (void)keeper.shutdown();
          model = Model{};
          refusable = false;
        } else {
          clock.set(clock.now() - std::chrono::milliseconds(arg));  // time goes back
          (void)keeper.advance(clock.now());  // may fire a backlog left by maxFire
          if (exact) pruneTimedOut(keeper, model);
          refusable = false;
        }
        break;
    }
    if (refusable && !ok(r) && !reentrant) FUZZ_CHECK(sameStats(before, keeper.getMemoryStats()));
    if (keeper.isShutDown()) {
      FUZZ_CHECK(keeper.connect("s0") == Result::kShutDown);
      model = Model{};
    }
    checkIndex(keeper);
    if (exact && !keeper.isShutDown()) checkModel(keeper, model);
  }
  const ShutdownReport rep = keeper.shutdown();
  (void)rep;
  const MemoryStats st = keeper.getMemoryStats();
  FUZZ_CHECK(st.connectedClients == 0 && st.userSockets == 0 && st.connectionTimers == 0 &&
             st.typingTimers == 0 && st.trackedRooms == 0 && st.rooms == 0 &&
             st.sessionsWithRooms == 0 && st.timersPending == 0 && st.totalEntries == 0 &&
             st.rateLimitKeys == 0);
  FUZZ_CHECK(st.pendingPersistence <= opt.typing.maxPendingPersist);
  (void)persistAttempts;
  return 0;
}
