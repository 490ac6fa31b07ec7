// SPDX-License-Identifier: MIT
// File: bench/peer_handwritten.cc
//
// The hand-written C++ baseline for W1 (rooms) and W3 (dispatch). It is the
// code a C++ programmer writes by hand for the original server's
// bookkeeping: string-keyed std::unordered_map / std::unordered_set, a
// std::multimap timer queue, and the seed gateway's handlers ported one to
// one from shared/bench/peers/seed_gateway.js. It is meant to be idiomatic,
// neither deliberately slow nor tuned.
#include "peer_handwritten.h"

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "bench_util.h"

namespace {

using StringSet = std::unordered_set<std::string>;

// ---------------------------------------------------------------------------
// The membership index, as socket.io's in-memory Adapter keeps it:
// rooms_ maps a room to its sockets, sids_ maps a socket to its rooms. A room
// is erased when its last member leaves; a socket's entry goes on leaveAll.
class RoomIndex {
 public:
  // Adapter.addAll(id, [room])
  void join(const std::string& id, const std::string& room) {
    sids_[id].insert(room);
    rooms_[room].insert(id);
  }

  // Adapter.del(id, room)
  void leave(const std::string& id, const std::string& room) {
    auto sid = sids_.find(id);
    if (sid != sids_.end()) sid->second.erase(room);
    removeFromRoom(room, id);
  }

  // Adapter.delAll(id)
  void leaveAll(const std::string& id) {
    auto sid = sids_.find(id);
    if (sid == sids_.end()) return;
    for (const std::string& room : sid->second) removeFromRoom(room, id);
    sids_.erase(sid);
  }

  // Calls visit(socketId) for every member of room; returns the count.
  template <typename Visit>
  std::size_t forEachMember(const std::string& room, Visit&& visit) const {
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return 0;
    for (const std::string& id : it->second) visit(id);
    return it->second.size();
  }

  std::size_t roomCount() const { return rooms_.size(); }
  std::size_t sessionCount() const { return sids_.size(); }

  std::size_t membershipCount() const {
    std::size_t n = 0;
    for (const auto& entry : sids_) n += entry.second.size();
    return n;
  }

 private:
  void removeFromRoom(const std::string& room, const std::string& id) {
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return;
    it->second.erase(id);
    if (it->second.empty()) rooms_.erase(it);
  }

  std::unordered_map<std::string, StringSet> rooms_;  // room -> sockets
  std::unordered_map<std::string, StringSet> sids_;   // socket -> rooms
};

// ---------------------------------------------------------------------------
// Timers. A hand-written server that does not pull in an event-loop library
// keeps its one-shot timers in an ordered container keyed by deadline; the
// usual choice is std::multimap<deadline, callback>, whose iterator is the
// timer's handle: setTimeout = insert (O(log n), one node allocation, plus
// whatever the std::function captures), clearTimeout = erase(handle)
// (O(log n)), restart = erase + insert. A min-heap would be cheaper to insert
// into but cannot cancel by handle without extra bookkeeping, which is why
// hand-written code rarely uses one here.
//
// Time is a logical millisecond counter that this benchmark never advances
// (W3: time does not advance), so no timer fires during the run; the queue
// still holds every armed timer and its callback, as the real one would.
// (There is no firing routine for the same reason; one would erase the entry
// before calling its callback, so that a callback's own clearTimeout of the
// handle, as in the seed's typing timeout, would have to be skipped.)
class TimerQueue {
 public:
  using Callback = std::function<void()>;
  using Queue = std::multimap<std::uint64_t, Callback>;
  using Handle = Queue::iterator;

  Handle setTimeout(Callback callback, std::uint64_t delayMs) {
    return queue_.emplace(nowMs_ + delayMs, std::move(callback));
  }

  void clearTimeout(Handle handle) { queue_.erase(handle); }

  std::size_t size() const { return queue_.size(); }

 private:
  std::uint64_t nowMs_ = 0;
  Queue queue_;
};

// ---------------------------------------------------------------------------
// The seed gateway (seed_gateway.js), step by step.

struct Client {
  std::string id;
  std::string userId;
  std::string role;
  std::uint64_t crewId = 0;
};

struct TypingPayload {
  std::uint64_t threadId = 0;
};

struct GatewayStats {
  // The seed's getMemoryStats() ...
  std::size_t connectedClients = 0;
  std::size_t userSockets = 0;
  std::size_t crewRooms = 0;
  std::size_t connectionTimers = 0;
  std::size_t typingTimers = 0;
  std::size_t socketRooms = 0;
  std::size_t trackedRooms = 0;
  // ... and what lives outside the gateway's maps: the timer queue and the
  // membership index (the socket.io Adapter's rooms and sids).
  std::size_t queuedTimers = 0;
  std::size_t adapterRooms = 0;
  std::size_t adapterSessions = 0;

  JsonLine toJson() const {
    JsonLine j;
    j.addCount("connectedClients", connectedClients)
        .addCount("userSockets", userSockets)
        .addCount("crewRooms", crewRooms)
        .addCount("connectionTimers", connectionTimers)
        .addCount("typingTimers", typingTimers)
        .addCount("socketRooms", socketRooms)
        .addCount("trackedRooms", trackedRooms)
        .addCount("queuedTimers", queuedTimers)
        .addCount("adapterRooms", adapterRooms)
        .addCount("adapterSessions", adapterSessions);
    return j;
  }
};

class Gateway {
 public:
  Gateway(RoomIndex& adapter, TimerQueue& timers)
      : adapter_(adapter), timers_(timers) {}

  void trackRoom(const std::string& id, const std::string& room) {
    socketRooms_[id].insert(room);
  }

  void clearRoomTracking(const std::string& id) { socketRooms_.erase(id); }

  void join(const Client& client, const std::string& room) {
    adapter_.join(client.id, room);
    trackRoom(client.id, room);
  }

  void handleConnection(const Client& client) {
    connectionTimers_[client.id] =
        timers_.setTimeout([] {}, kConnectionTimeoutMs);
    connectedClients_[client.id] = &client;
    userSockets_[client.userId].insert(client.id);
    join(client, "role:" + client.role);
    join(client, "user:" + client.userId);
    join(client, "crew:" + std::to_string(client.crewId));
    crewRooms_[client.crewId].insert(client.id);
  }

  void subscribeToJob(const Client& client, std::uint64_t jobId) {
    join(client, "job:" + std::to_string(jobId));
  }

  void unsubscribeFromJob(const Client& client, std::uint64_t jobId) {
    const std::string room = "job:" + std::to_string(jobId);
    adapter_.leave(client.id, room);
    auto rooms = socketRooms_.find(client.id);
    if (rooms != socketRooms_.end()) rooms->second.erase(room);
  }

  void threadSubscribe(const Client& client, std::uint64_t threadId) {
    join(client, "thread:" + std::to_string(threadId));
  }

  void handleTypingStart(const Client& client, const TypingPayload& payload) {
    std::string key = client.id + ":" + std::to_string(payload.threadId);
    auto existing = typingTimers_.find(key);
    if (existing != typingTimers_.end()) timers_.clearTimeout(existing->second);
    TimerQueue::Handle timer = timers_.setTimeout(
        [this, &client, payload, key] {
          handleTypingStop(client, payload);
          typingTimers_.erase(key);
        },
        kTypingTimeoutMs);
    typingTimers_[std::move(key)] = timer;
  }

  void handleTypingStop(const Client& client, const TypingPayload& payload) {
    const std::string key = client.id + ":" + std::to_string(payload.threadId);
    auto timer = typingTimers_.find(key);
    if (timer != typingTimers_.end()) {
      timers_.clearTimeout(timer->second);
      typingTimers_.erase(timer);
    }
    ++typingStopsEmitted_;
  }

  // typingTimers is keyed "socketId:threadId": the seed can only find a
  // socket's timers by scanning the whole map for the prefix.
  void clearTypingTimers(const std::string& id) {
    const std::string prefix = id + ":";
    for (auto it = typingTimers_.begin(); it != typingTimers_.end();) {
      if (it->first.compare(0, prefix.size(), prefix) == 0) {
        timers_.clearTimeout(it->second);
        it = typingTimers_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void handleDisconnect(const Client& client) {
    auto t = connectionTimers_.find(client.id);
    if (t != connectionTimers_.end()) {
      timers_.clearTimeout(t->second);
      connectionTimers_.erase(t);
    }
    clearTypingTimers(client.id);
    auto rooms = socketRooms_.find(client.id);
    if (rooms != socketRooms_.end()) {
      for (const std::string& room : rooms->second) {
        adapter_.leave(client.id, room);
      }
    }
    clearRoomTracking(client.id);
    adapter_.leaveAll(client.id);
    connectedClients_.erase(client.id);
    auto u = userSockets_.find(client.userId);
    if (u != userSockets_.end()) {
      u->second.erase(client.id);
      if (u->second.empty()) userSockets_.erase(u);
    }
    auto c = crewRooms_.find(client.crewId);
    if (c != crewRooms_.end()) {
      c->second.erase(client.id);
      if (c->second.empty()) crewRooms_.erase(c);
    }
  }

  GatewayStats getMemoryStats() const {
    GatewayStats s;
    s.connectedClients = connectedClients_.size();
    s.userSockets = userSockets_.size();
    s.crewRooms = crewRooms_.size();
    s.connectionTimers = connectionTimers_.size();
    s.typingTimers = typingTimers_.size();
    s.socketRooms = socketRooms_.size();
    for (const auto& entry : socketRooms_) s.trackedRooms += entry.second.size();
    s.queuedTimers = timers_.size();
    s.adapterRooms = adapter_.roomCount();
    s.adapterSessions = adapter_.sessionCount();
    return s;
  }

  std::uint64_t typingStopsEmitted() const { return typingStopsEmitted_; }

 private:
  RoomIndex& adapter_;
  TimerQueue& timers_;
  std::unordered_map<std::string, const Client*> connectedClients_;
  std::unordered_map<std::string, StringSet> userSockets_;
  std::unordered_map<std::uint64_t, StringSet> crewRooms_;
  std::unordered_map<std::string, TimerQueue::Handle> connectionTimers_;
  std::unordered_map<std::string, TimerQueue::Handle> typingTimers_;
  std::unordered_map<std::string, StringSet> socketRooms_;
  std::uint64_t typingStopsEmitted_ = 0;
};

}  // namespace

// ---------------------------------------------------------------------------
// W1 rooms

void runRoomsHandwritten(const BenchConfig& cfg) {
  const std::size_t sessions = cfg.sessions;

  // Ids and room names are made before the clock starts, as in the
  // socket.io peer: the host hands the index strings it already has.
  std::vector<std::string> ids;
  std::vector<std::array<std::string, kRoomsPerSession>> rooms;
  ids.reserve(sessions);
  rooms.reserve(sessions);
  for (std::size_t s = 0; s < sessions; ++s) {
    ids.push_back(sessionIdOf(s));
    rooms.push_back(roomsOf(s));
  }
  std::vector<std::string> crews;
  crews.reserve(kCrews);
  for (std::uint64_t c = 0; c < kCrews; ++c) crews.push_back(crewRoomOf(c));

  std::size_t roomsLeft = 0;
  std::size_t sessionsLeft = 0;
  JsonLine line;
  {
    RoomIndex index;
    const std::size_t before = bytesInUse();

    // 1. join
    Stopwatch sw;
    std::size_t joins = 0;
    for (std::size_t s = 0; s < sessions; ++s) {
      for (const std::string& room : rooms[s]) {
        index.join(ids[s], room);
        ++joins;
      }
    }
    const std::uint64_t joinNs = sw.elapsedNs();
    const std::size_t afterJoin = bytesInUse();
    const std::size_t memberships = index.membershipCount();

    // 2. fanout: visit every member of crew:0 ... crew:999
    std::uint64_t visited = 0;
    std::uint64_t touched = 0;
    sw.restart();
    for (const std::string& crew : crews) {
      visited += index.forEachMember(
          crew, [&touched](const std::string& id) { touched += id.size(); });
    }
    const std::uint64_t fanoutNs = sw.elapsedNs();
    benchSink(touched);

    // 3. leave: every session leaves its room #3
    sw.restart();
    for (std::size_t s = 0; s < sessions; ++s) index.leave(ids[s], rooms[s][3]);
    const std::uint64_t leaveNs = sw.elapsedNs();

    // 4. disconnect
    sw.restart();
    for (std::size_t s = 0; s < sessions; ++s) index.leaveAll(ids[s]);
    const std::uint64_t disconnectNs = sw.elapsedNs();

    roomsLeft = index.roomCount();
    sessionsLeft = index.sessionCount();

    line.addString("workload", "rooms")
        .addString("system",
                   "hand-written C++ (std::unordered_map<std::string, "
                   "std::unordered_set<std::string>>)")
        .addCount("sessions", sessions)
        .addString("session_ids", "string")
        .addNumber("join_ns_per_op", perOp(joinNs, joins))
        .addNumber("fanout_ns_per_member", perOp(fanoutNs, visited))
        .addNumber("leave_ns_per_op", perOp(leaveNs, sessions))
        .addNumber("disconnect_ns_per_session", perOp(disconnectNs, sessions))
        .addNumber("bytes_per_membership",
                   bytesPer(before, afterJoin, memberships))
        .addCount("rooms_left", roomsLeft)
        .addCount("sessions_left", sessionsLeft);
  }
  line.print();
}

// ---------------------------------------------------------------------------
// W3 dispatch

void runDispatchHandwritten(const BenchConfig& cfg, std::size_t sessions) {
  const std::size_t restarts = cfg.restarts;

  // The socket objects exist before the run, as in the seed peer.
  std::vector<Client> clients;
  clients.reserve(sessions);
  for (std::size_t s = 0; s < sessions; ++s) {
    Client c;
    c.id = sessionIdOf(s);
    c.userId = dispatchUserOf(s, sessions);
    c.role = dispatchRoleOf(s);
    c.crewId = crewOf(s);
    clients.push_back(std::move(c));
  }

  JsonLine line;
  {
    RoomIndex adapter;
    TimerQueue timers;
    Gateway g(adapter, timers);
    const std::size_t before = bytesInUse();

    // 1. connect
    Stopwatch sw;
    for (std::size_t s = 0; s < sessions; ++s) {
      const Client& c = clients[s];
      g.handleConnection(c);
      for (std::uint64_t job : jobsOf(s)) g.subscribeToJob(c, job);
      g.threadSubscribe(c, threadOf(s));
    }
    const std::uint64_t connectNs = sw.elapsedNs();

    // 2. typing: K + 1 rounds
    sw.restart();
    for (std::size_t k = 0; k <= restarts; ++k) {
      for (std::size_t s = 0; s < sessions; ++s) {
        g.handleTypingStart(clients[s], TypingPayload{threadOf(s)});
      }
    }
    const std::uint64_t typingNs = sw.elapsedNs();
    const std::size_t afterTyping = bytesInUse();
    const GatewayStats peak = g.getMemoryStats();

    // 3. stop and unsubscribe
    sw.restart();
    for (std::size_t s = 0; s < sessions; s += 2) {
      g.handleTypingStop(clients[s], TypingPayload{threadOf(s)});
    }
    for (std::size_t s = 0; s < sessions; ++s) {
      g.unsubscribeFromJob(clients[s], jobsOf(s)[0]);
    }
    const std::uint64_t stopNs = sw.elapsedNs();

    // 4. disconnect storm
    sw.restart();
    for (std::size_t s = 0; s < sessions; ++s) g.handleDisconnect(clients[s]);
    const std::uint64_t disconnectNs = sw.elapsedNs();
    const GatewayStats left = g.getMemoryStats();
    benchSink(g.typingStopsEmitted());

    line.addString("workload", "dispatch")
        .addString("system",
                   "hand-written C++ seed gateway port (std::unordered_map/"
                   "unordered_set, std::multimap timers)")
        .addCount("sessions", sessions)
        .addString("session_ids", "string")
        .addCount("restarts", restarts)
        .addNumber("connect_ns_per_session", perOp(connectNs, sessions))
        .addNumber("typing_restart_ns_per_op",
                   perOp(typingNs, sessions * (restarts + 1)))
        .addNumber("stop_and_unsubscribe_ns_per_session",
                   perOp(stopNs, sessions))
        .addNumber("disconnect_ns_per_session", perOp(disconnectNs, sessions))
        .addNumber("bytes_per_session", bytesPer(before, afterTyping, sessions))
        .addObject("peak", peak.toJson())
        .addObject("left", left.toJson());
  }
  line.print();
}
