// SPDX-License-Identifier: MIT
// File: bench/roomkeeper_workloads.cc -- roomkeeper's side of W1, W2, W3.
#include "roomkeeper_workloads.h"

#include <roomkeeper/roomkeeper.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

using namespace roomkeeper;
using std::chrono::milliseconds;

namespace {

const std::string kSystem = std::string("roomkeeper ") + ROOMKEEPER_VERSION_STRING;

JsonLine statsObject(const MemoryStats& s) {
  JsonLine o;
  o.addCount("connectedClients", s.connectedClients);
  o.addCount("userSockets", s.userSockets);
  o.addCount("connectionTimers", s.connectionTimers);
  o.addCount("typingTimers", s.typingTimers);
  o.addCount("trackedRooms", s.trackedRooms);
  o.addCount("sessionsWithRooms", s.sessionsWithRooms);
  o.addCount("rooms", s.rooms);
  o.addCount("timersPending", s.timersPending);
  o.addCount("pendingPersistence", s.pendingPersistence);
  o.addCount("totalEntries", s.totalEntries);
  o.addCount("bytes", s.bytes);
  return o;
}

}  // namespace

void runRoomsRoomkeeper(const BenchConfig& cfg, bool handles, bool batched) {
  const std::size_t S = cfg.sessions;
  std::vector<std::string> ids;
  std::vector<std::array<std::string, kRoomsPerSession>> rooms;
  ids.reserve(S);
  rooms.reserve(S);
  for (std::size_t s = 0; s < S; ++s) {
    ids.push_back(sessionIdOf(s));
    rooms.push_back(roomsOf(s));
  }
  std::vector<std::string> crews;
  for (std::uint64_t c = 0; c < kCrews; ++c) crews.push_back(crewRoomOf(c));

  auto reg = std::make_unique<SessionRegistry>();
  // The host's array of handles is its own memory, as the ids are: made
  // before the count starts (it was inside it until 2026-12-07: +1.1 bytes
  // per membership on the handle lines).
  std::vector<SessionHandle> h(handles ? S : 0);
  const std::size_t before = bytesInUse();
  // Join: each session connects (the registry has no implicit session) and
  // joins its 7 rooms; the connect is inside the timed phase and the bytes.
  Stopwatch sw;
  std::uint64_t joins = 0;
  for (std::size_t s = 0; s < S; ++s) {
    if (batched) {
      // The session's 7 rooms in one trackRooms call (the connect-time join).
      if (handles) {
        (void)reg->connect(ids[s], {}, &h[s]);
        joins += reg->trackRooms(h[s], rooms[s]);
      } else {
        (void)reg->connect(ids[s]);
        joins += reg->trackRooms(ids[s], rooms[s]);
      }
    } else if (handles) {
      (void)reg->connect(ids[s], {}, &h[s]);
      for (const std::string& r : rooms[s]) joins += reg->trackRoom(h[s], r) == Result::kOk;
    } else {
      (void)reg->connect(ids[s]);
      for (const std::string& r : rooms[s]) joins += reg->trackRoom(ids[s], r) == Result::kOk;
    }
  }
  const std::uint64_t joinNs = sw.elapsedNs();
  const std::size_t after = bytesInUse();
  const RegistryStats peak = reg->getMemoryStats();

  sw.restart();
  std::uint64_t visited = 0;
  for (const std::string& c : crews)
    visited += reg->forEachMember(c, [&](std::string_view m) { benchSink(m.size()); });
  const std::uint64_t fanoutNs = sw.elapsedNs();

  sw.restart();
  for (std::size_t s = 0; s < S; ++s) {
    if (handles) (void)reg->untrackRoom(h[s], rooms[s][3]);
    else (void)reg->untrackRoom(ids[s], rooms[s][3]);
  }
  const std::uint64_t leaveNs = sw.elapsedNs();

  sw.restart();
  for (std::size_t s = 0; s < S; ++s) {
    if (handles) (void)reg->disconnect(h[s]);
    else (void)reg->disconnect(ids[s]);
  }
  const std::uint64_t discNs = sw.elapsedNs();
  const RegistryStats left = reg->getMemoryStats();

  JsonLine j;
  j.addString("workload", "rooms");
  j.addString("system", kSystem + (batched ? " SessionRegistry, trackRooms (7 per call)"
                                            : " SessionRegistry"));
  j.addCount("sessions", S);
  j.addString("session_ids", handles ? "handle" : "string");
  j.addCount("joins", joins);
  j.addNumber("join_ns_per_op", perOp(joinNs, S * kRoomsPerSession));
  j.addNumber("fanout_ns_per_member", perOp(fanoutNs, visited));
  j.addNumber("leave_ns_per_op", perOp(leaveNs, S));
  j.addNumber("disconnect_ns_per_session", perOp(discNs, S));
  j.addNumber("bytes_per_membership", bytesPer(before, after, peak.memberships));
  j.addNumber("registry_bytes_per_membership",
              static_cast<double>(peak.bytes) / static_cast<double>(peak.memberships));
  j.addCount("rooms_left", left.rooms);
  j.addCount("sessions_left", left.sessions);
  j.addCount("memberships_left", left.memberships);
  j.addCount("bytes_left", left.bytes);
  j.print();
}

void runTimersRoomkeeper(const BenchConfig& cfg) {
  const std::size_t T = cfg.timers;
  const std::size_t K = cfg.restarts;
  ManualClock clock(SteadyTime{} + std::chrono::hours(1));
  auto timers = std::make_unique<TimerService>(&clock);
  std::uint64_t firedCount = 0;
  const TimerHandlerId noop =
      timers->addHandler([&](TimerHandle, std::uint32_t) { ++firedCount; });
  std::vector<TimerHandle> handles(T);

  const std::size_t before = bytesInUse();
  Stopwatch sw;
  for (std::size_t i = 0; i < T; ++i)
    handles[i] = timers->arm(milliseconds(5000), noop, static_cast<std::uint32_t>(i));
  const std::uint64_t armNs = sw.elapsedNs();
  const std::size_t after = bytesInUse();
  sw.restart();
  for (std::size_t k = 0; k < K; ++k)
    for (std::size_t i = 0; i < T; ++i) benchSink(timers->restart(handles[i], milliseconds(5000)));
  const std::uint64_t restartNs = sw.elapsedNs();
  // Random order (WORKLOAD.md): round k restarts timer (i * 7919 + k * 104729) % T,
  // walked incrementally (the same sequence without a division per step).
  const std::size_t step = 7919 % T;
  sw.restart();
  for (std::size_t k = 0; k < K; ++k) {
    std::size_t idx = (k * 104729) % T;
    for (std::size_t i = 0; i < T; ++i) {
      benchSink(timers->restart(handles[idx], milliseconds(5000)));
      idx += step;
      if (idx >= T) idx -= T;
    }
  }
  const std::uint64_t restartRandomNs = sw.elapsedNs();
  sw.restart();
  for (std::size_t i = 0; i < T; ++i) benchSink(timers->cancel(handles[i]));
  const std::uint64_t cancelNs = sw.elapsedNs();
  const std::size_t leftAfterCancel = timers->size();

  // Fire phase: deadlines spread evenly over 5 s, advanced in 1 ms steps.
  const SteadyTime start = clock.now();
  std::uint64_t early = 0, late = 0;
  std::vector<std::int64_t> deadlineMs(T);
  const TimerHandlerId check = timers->addHandler([&](TimerHandle, std::uint32_t i) {
    ++firedCount;
    const std::int64_t nowMs =
        std::chrono::duration_cast<milliseconds>(clock.now() - start).count();
    if (nowMs < deadlineMs[i]) ++early;
    if (nowMs > deadlineMs[i] + 1) ++late;
  });
  firedCount = 0;
  for (std::size_t i = 0; i < T; ++i) {
    deadlineMs[i] = static_cast<std::int64_t>((i * 5000) / T) + 1;
    handles[i] = timers->arm(milliseconds(deadlineMs[i]), check, static_cast<std::uint32_t>(i));
  }
  sw.restart();
  for (int ms = 1; ms <= 5001; ++ms) {
    clock.set(start + milliseconds(ms));
    timers->advance(clock.now());
  }
  const std::uint64_t fireNs = sw.elapsedNs();

  JsonLine j;
  j.addString("workload", "timers");
  j.addString("system", kSystem + " TimerService");
  j.addString("clock", "manual");
  j.addCount("timers", T);
  j.addCount("restarts", K);
  j.addNumber("arm_ns_per_op", perOp(armNs, T));
  j.addNumber("restart_ns_per_op", perOp(restartNs, T * K));
  j.addNumber("restart_random_ns_per_op", perOp(restartRandomNs, T * K));
  j.addNumber("cancel_ns_per_op", perOp(cancelNs, T));
  j.addNumber("bytes_per_timer", bytesPer(before, after, T));
  j.addNumber("fire_ns_per_timer", perOp(fireNs, T));
  j.addCount("fired", firedCount);
  j.addCount("early", early);
  j.addCount("late", late);
  j.addCount("timers_left", timers->size() + leftAfterCancel);
  j.print();
}

namespace {

struct DispatchIds {
  std::vector<std::string> session, user, role, userRoom, crew, thread, threadRoom;
  std::vector<std::array<std::string, 3>> jobs;
};

DispatchIds makeIds(std::size_t S) {
  DispatchIds d;
  for (std::size_t s = 0; s < S; ++s) {
    d.session.push_back(sessionIdOf(s));
    d.user.push_back(dispatchUserOf(s, S));
    d.role.push_back(std::string("role:") + dispatchRoleOf(s));
    d.userRoom.push_back("user:" + d.user.back());
    d.crew.push_back(crewRoomOf(crewOf(s)));
    const auto j = jobsOf(s);
    d.jobs.push_back({"job:" + std::to_string(j[0]), "job:" + std::to_string(j[1]),
                      "job:" + std::to_string(j[2])});
    d.thread.push_back(std::to_string(threadOf(s)));
    d.threadRoom.push_back("thread:" + d.thread.back());
  }
  return d;
}

// The phases, written once for Keeper and SyncKeeper, by id or by handle.
template <typename K, typename Id>
void joinAll(K& k, const DispatchIds& d, std::size_t s, Id id) {
  (void)k.trackRoom(id, d.role[s]);
  (void)k.trackRoom(id, d.userRoom[s]);
  (void)k.trackRoom(id, d.crew[s]);
  for (const std::string& j : d.jobs[s]) (void)k.trackRoom(id, j);
  (void)k.trackRoom(id, d.threadRoom[s]);
}

}  // namespace

void runDispatchRoomkeeper(const BenchConfig& cfg, std::size_t S, int threads,
                           bool handles) {
  const std::size_t K = cfg.restarts;
  const DispatchIds d = makeIds(S);
  ManualClock clock(SteadyTime{} + std::chrono::hours(1));
  std::atomic<std::uint64_t> emitted{0}, persisted{0}, left{0};
  KeeperCallbacks cb;
  cb.leave = [&](std::string_view, std::string_view) { left.fetch_add(1, std::memory_order_relaxed); };
  cb.emit = [&](std::string_view, std::string_view, std::string_view) {
    emitted.fetch_add(1, std::memory_order_relaxed);
  };
  cb.persist = [&](const PersistCall&) {
    persisted.fetch_add(1, std::memory_order_relaxed);
    return true;
  };
  KeeperOptions opt;
  opt.clock = &clock;
  opt.warnConnections = SIZE_MAX;  // the bench has no log sink anyway
  std::uint64_t phaseNs[4] = {};
  std::size_t before = 0, afterTyping = 0;
  MemoryStats peak, after;

  auto phases = [&](auto& k, int nThreads) {
    // Each phase runs on nThreads threads over interleaved session ranges.
    auto parallel = [&](auto&& body) {
      if (nThreads <= 1) {
        for (std::size_t s = 0; s < S; ++s) body(s);
        return;
      }
      std::vector<std::thread> pool;
      for (int t = 0; t < nThreads; ++t)
        pool.emplace_back([&, t] {
          for (std::size_t s = static_cast<std::size_t>(t); s < S; s += static_cast<std::size_t>(nThreads))
            body(s);
        });
      for (auto& th : pool) th.join();
    };
    std::vector<SessionHandle> h(handles ? S : 0);
    before = bytesInUse();
    Stopwatch sw;
    parallel([&](std::size_t s) {
      // connect arms the 30 s auth deadline; authenticate cancels it.
      if (handles) {
        (void)k.connect(d.session[s], &h[s]);
        (void)k.authenticate(d.session[s], d.user[s]);
        joinAll(k, d, s, h[s]);
      } else {
        (void)k.connect(d.session[s]);
        (void)k.authenticate(d.session[s], d.user[s]);
        joinAll(k, d, s, std::string_view(d.session[s]));
      }
    });
    phaseNs[0] = sw.elapsedNs();
    sw.restart();
    for (std::size_t round = 0; round <= K; ++round)
      parallel([&](std::size_t s) {
        if (handles) (void)k.startTyping(h[s], d.thread[s]);
        else (void)k.startTyping(d.session[s], d.thread[s]);
      });
    phaseNs[1] = sw.elapsedNs();
    afterTyping = bytesInUse();
    peak = k.getMemoryStats();
    sw.restart();
    parallel([&](std::size_t s) {
      if (handles) {
        if (s % 2 == 0) (void)k.stopTyping(h[s], d.thread[s]);
        (void)k.untrackRoom(h[s], d.jobs[s][0]);
      } else {
        if (s % 2 == 0) (void)k.stopTyping(d.session[s], d.thread[s]);
        (void)k.untrackRoom(d.session[s], d.jobs[s][0]);
      }
    });
    phaseNs[2] = sw.elapsedNs();
    sw.restart();
    parallel([&](std::size_t s) {
      if (handles) (void)k.disconnect(h[s]);
      else (void)k.disconnect(d.session[s]);
    });
    phaseNs[3] = sw.elapsedNs();
    after = k.getMemoryStats();
  };

  std::string system = kSystem;
  if (threads <= 0) {
    auto k = std::make_unique<Keeper>(cb, opt);
    phases(*k, 1);
    system += " Keeper";
  } else {
    auto k = std::make_unique<SyncKeeper>(cb, opt);
    phases(*k, threads);
    system += " SyncKeeper, " + std::to_string(threads) + " thread" + (threads > 1 ? "s" : "");
  }

  JsonLine j;
  j.addString("workload", "dispatch");
  j.addString("system", system);
  j.addCount("sessions", S);
  j.addString("session_ids", handles ? "handle" : "string");
  j.addCount("threads", static_cast<std::uint64_t>(threads <= 0 ? 1 : threads));
  j.addCount("restarts", K);
  j.addNumber("connect_ns_per_session", perOp(phaseNs[0], S));
  j.addNumber("typing_restart_ns_per_op", perOp(phaseNs[1], S * (K + 1)));
  j.addNumber("stop_and_unsubscribe_ns_per_session", perOp(phaseNs[2], S));
  j.addNumber("disconnect_ns_per_session", perOp(phaseNs[3], S));
  j.addNumber("bytes_per_session", bytesPer(before, afterTyping, S));
  j.addNumber("keeper_bytes_per_session",
              static_cast<double>(peak.bytes) / static_cast<double>(S));
  j.addCount("emitted", emitted.load());
  j.addCount("persisted", persisted.load());
  j.addCount("host_leaves", left.load());
  j.addObject("peak", statsObject(peak));
  j.addObject("left", statsObject(after));
  j.print();
}

#if ROOMKEEPER_BENCH_CLUSTER
// ---------------------------------------------------------------------------
// W3t dispatch_threads: the W3 day on N threads at once.
//   * "multi-loop": one Keeper per thread, joined by an InProcessHub; a
//     thread's own sessions only; what another loop must deliver is handed
//     over through that loop's queue (its "post"), drained between calls;
//   * the peer: one SyncKeeper shared by the N threads;
//   * a diagnostic: the multi-loop Keepers with no hub (the ceiling).
// Every phase ends with a barrier that opens when
// all threads have arrived and no queue holds anything, so each phase's
// effects are delivered before the next starts, in both modes alike.

#include <roomkeeper/cluster/in_process.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <type_traits>

namespace {

// A thread's event loop, as small as one can be: a locked queue.
struct BenchLoop {
  std::mutex mu;
  std::vector<std::function<void()>> q, running;
  std::atomic<bool> queued{false};  // q is not empty (set and cleared under mu)
  std::atomic<std::int64_t>* pending = nullptr;  // queued or running, all loops

  void post(std::function<void()> fn) {
    pending->fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> g(mu);
    q.push_back(std::move(fn));
    queued.store(true, std::memory_order_release);
  }
  bool drain() {
    // An idle loop polls without the lock, so that it does not contend for
    // it with the threads that post to it.
    if (!queued.load(std::memory_order_acquire)) return false;
    {
      std::lock_guard<std::mutex> g(mu);
      if (q.empty()) return false;
      running.swap(q);
      queued.store(false, std::memory_order_relaxed);
    }
    for (auto& fn : running) {
      fn();
      pending->fetch_sub(1, std::memory_order_acq_rel);
    }
    running.clear();
    return true;
  }
};

struct BarrierSlot {
  std::atomic<std::size_t> arrived{0}, passed{0};
};

// Waits, draining `loop`, until all n threads have arrived and nothing is
// queued anywhere; then until all have seen that.
void barrier(BarrierSlot& b, std::size_t n, const std::atomic<std::int64_t>& pending,
             BenchLoop* loop) {
  auto drainOrYield = [&] {
    if (loop == nullptr || !loop->drain()) std::this_thread::yield();
  };
  b.arrived.fetch_add(1);
  while (b.arrived.load() != n || pending.load() != 0) drainOrYield();
  b.passed.fetch_add(1);
  while (b.passed.load() != n) drainOrYield();
}

struct DayResult {
  std::uint64_t dayNs = 0;
  std::array<std::uint64_t, 4> phaseEnds{};  // ns from the start, thread 0's view
  MemoryStats left;
  std::size_t hubEntries = 0;
  std::uint64_t emitted = 0, crossLoop = 0;
};

// The day for thread t of n, on keeper k (a Keeper of its own, or the shared
// SyncKeeper), its queue `loop` (null for the peer).
template <typename K>
void dayOnThread(K& k, const DispatchIds& d, std::size_t S, std::size_t K_, std::size_t t,
                 std::size_t n, std::vector<BarrierSlot>& slots,
                 const std::atomic<std::int64_t>& pending, BenchLoop* loop,
                 std::array<std::uint64_t, 4>* phaseEnds) {
  std::size_t slot = 0;
  Stopwatch sw;
  auto each = [&](auto&& body, std::size_t rounds = 1) {
    std::size_t i = 0;
    for (std::size_t r = 0; r < rounds; ++r)
      for (std::size_t s = t; s < S; s += n) {
        body(s);
        if (loop != nullptr && (++i & 63) == 0) loop->drain();
      }
    barrier(slots[slot], n, pending, loop);
    if (t == 0) (*phaseEnds)[slot] = sw.elapsedNs();
    ++slot;
  };
  each([&](std::size_t s) {
    (void)k.connect(d.session[s]);
    (void)k.authenticate(d.session[s], d.user[s]);
    joinAll(k, d, s, std::string_view(d.session[s]));
  });
  // The K + 1 typing rounds (each over all of the thread's sessions, as in
  // W3) are one phase: no barrier between rounds.
  each([&](std::size_t s) { (void)k.startTyping(d.session[s], d.thread[s]); }, K_ + 1);
  each([&](std::size_t s) {
    if (s % 2 == 0) (void)k.stopTyping(d.session[s], d.thread[s]);
    (void)k.untrackRoom(d.session[s], d.jobs[s][0]);
  });
  each([&](std::size_t s) { (void)k.disconnect(d.session[s]); });
}

// Starts n threads on body(t), times from their common start to the last one's end.
std::uint64_t timeThreads(std::size_t n, const std::function<void(std::size_t)>& body) {
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < n; ++t)
    pool.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      body(t);
    });
  Stopwatch sw;
  go.store(true);
  for (auto& th : pool) th.join();
  return sw.elapsedNs();
}

// withBus false: the same Keepers and calls with no hub at all, so nothing
// crosses loops (not the W3t day: a user's rooms are per loop). It shows
// what N threads of this day can gain on this machine when they share
// nothing: the ceiling the multi-loop line is to be read against.
DayResult multiLoopDay(const DispatchIds& d, std::size_t S, std::size_t K_, std::size_t n,
                       bool withBus) {
  struct PerLoop {
    BenchLoop loop;
    ManualClock clock{SteadyTime{} + std::chrono::hours(1)};
    std::uint64_t emitted = 0;  // on its own thread only
    std::unique_ptr<cluster::Node> node;
    std::unique_ptr<Keeper> keeper;
  };
  std::atomic<std::int64_t> pending{0};
  cluster::InProcessHub hub;
  std::vector<std::unique_ptr<PerLoop>> loops;
  for (std::size_t t = 0; t < n; ++t) {
    auto l = std::make_unique<PerLoop>();
    PerLoop* p = l.get();
    p->loop.pending = &pending;
    p->node = hub.join();
    KeeperCallbacks cb;
    cb.emit = [p](std::string_view, std::string_view, std::string_view) { ++p->emitted; };
    cb.persist = [](const PersistCall&) { return true; };
    KeeperOptions opt;
    opt.clock = &p->clock;
    opt.bus = withBus ? p->node.get() : nullptr;
    p->keeper = std::make_unique<Keeper>(std::move(cb), opt);
    if (withBus)
      p->node->bind(*p->keeper, [p](std::function<void()> fn) { p->loop.post(std::move(fn)); });
    loops.push_back(std::move(l));
  }
  std::vector<BarrierSlot> slots(4);
  DayResult r;
  r.dayNs = timeThreads(n, [&](std::size_t t) {
    dayOnThread(*loops[t]->keeper, d, S, K_, t, n, slots, pending, &loops[t]->loop,
                &r.phaseEnds);
  });
  for (auto& l : loops) {
    r.left += l->keeper->getMemoryStats();
    r.emitted += l->emitted;
    r.crossLoop += l->node->stats().received;
  }
  r.hubEntries = hub.entries();
  for (auto& l : loops) {
    l->keeper.reset();
    l->node.reset();
  }
  return r;
}

DayResult syncKeeperDay(const DispatchIds& d, std::size_t S, std::size_t K_, std::size_t n) {
  ManualClock clock(SteadyTime{} + std::chrono::hours(1));
  std::atomic<std::uint64_t> emitted{0};
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view, std::string_view, std::string_view) {
    emitted.fetch_add(1, std::memory_order_relaxed);
  };
  cb.persist = [](const PersistCall&) { return true; };
  KeeperOptions opt;
  opt.clock = &clock;
  SyncKeeper k(std::move(cb), opt);
  std::atomic<std::int64_t> none{0};
  std::vector<BarrierSlot> slots(4);
  DayResult r;
  r.dayNs = timeThreads(n, [&](std::size_t t) {
    dayOnThread(k, d, S, K_, t, n, slots, none, nullptr, &r.phaseEnds);
  });
  r.left = k.getMemoryStats();
  r.emitted = emitted.load();
  return r;
}

// Runs one day twice in a child process of its own and returns the second
// (the first warms the heap: its pages are mapped, its threads' malloc
// arenas made). Each mode and N starts from a heap of its own, not from
// whatever the runs before it left behind: run in this process, a
// multi-loop day measured after a shared-SyncKeeper day was up to twice as
// slow as the same day after another multi-loop day.
DayResult inChild(const std::function<DayResult()>& day) {
  static_assert(std::is_trivially_copyable_v<DayResult>, "sent through a pipe");
  int fds[2];
  if (::pipe(fds) != 0) return day();
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return day();
  }
  if (pid == 0) {
    ::close(fds[0]);
    (void)day();
    const DayResult r = day();
    const char* p = reinterpret_cast<const char*>(&r);
    for (std::size_t done = 0; done < sizeof r;) {
      const ssize_t n = ::write(fds[1], p + done, sizeof r - done);
      if (n <= 0) ::_exit(1);
      done += static_cast<std::size_t>(n);
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  DayResult r;
  char* p = reinterpret_cast<char*>(&r);
  std::size_t got = 0;
  while (got < sizeof r) {
    const ssize_t n = ::read(fds[0], p + got, sizeof r - got);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (got != sizeof r || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "dispatch_threads: a run's child process failed\n");
    std::exit(1);
  }
  return r;
}

}  // namespace

void runDispatchThreadsRoomkeeper(const BenchConfig& cfg, std::size_t S,
                                  const std::vector<std::size_t>& threads) {
  const DispatchIds d = makeIds(S);
  // This machine is shared and noisy: every (mode, N) runs kRuns times,
  // interleaved (1 loop, 2 loops, 1 shared, 2 shared, 1 no bus, 2 no bus,
  // 1 loop, ...), and the median is reported, with the fastest and slowest
  // run. Modes: 0 multi-loop, 1 the peer (shared SyncKeeper), 2 the
  // no-bus ceiling (see multiLoopDay).
  constexpr int kRuns = 5;
  constexpr int kModes = 3;
  struct Series {
    std::vector<double> days;
    DayResult last;
  };
  std::vector<std::vector<Series>> series(kModes, std::vector<Series>(threads.size()));
  for (int run = 0; run < kRuns; ++run)
    for (int mode = 0; mode < kModes; ++mode)
      for (std::size_t i = 0; i < threads.size(); ++i) {
        const DayResult r = inChild([&] {
          return mode == 1 ? syncKeeperDay(d, S, cfg.restarts, threads[i])
                           : multiLoopDay(d, S, cfg.restarts, threads[i], mode == 0);
        });
        series[mode][i].days.push_back(static_cast<double>(r.dayNs) / static_cast<double>(S));
        series[mode][i].last = r;
      }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const char* systems[kModes] = {
      " multi-loop (Keeper per loop, InProcessHub)", " SyncKeeper shared",
      " Keeper per loop, no bus (ceiling: nothing crosses loops)"};
  for (int mode = 0; mode < kModes; ++mode) {
    const double day1 = median(series[mode][0].days);
    for (std::size_t i = 0; i < threads.size(); ++i) {
      const Series& se = series[mode][i];
      const DayResult& r = se.last;
      const double day = median(se.days);
      JsonLine j;
      j.addString("workload", "dispatch_threads");
      j.addString("system", kSystem + systems[mode]);
      j.addCount("sessions", S);
      j.addCount("threads", threads[i]);
      j.addCount("restarts", cfg.restarts);
      j.addCount("runs", kRuns);
      j.addNumber("day_ns_per_session", day);
      j.addNumber("day_ns_per_session_min", *std::min_element(se.days.begin(), se.days.end()));
      j.addNumber("day_ns_per_session_max", *std::max_element(se.days.begin(), se.days.end()));
      j.addNumber("scaling", day1 / day);
      // Per phase (ns per session), from the last of the runs.
      JsonLine ph;
      const char* names[4] = {"connect", "typing", "stop_and_unsubscribe", "disconnect"};
      for (int p = 0; p < 4; ++p)
        ph.addNumber(names[p], static_cast<double>(r.phaseEnds[p] - (p ? r.phaseEnds[p - 1] : 0)) /
                                   static_cast<double>(S));
      j.addObject("phase_ns_per_session", ph);
      j.addCount("emitted", r.emitted);
      if (mode == 0) {
        j.addCount("cross_loop_commands", r.crossLoop);
        j.addCount("hub_entries_left", r.hubEntries);
      }
      j.addObject("left", statsObject(r.left));
      j.print();
    }
  }
}
#endif  // ROOMKEEPER_BENCH_CLUSTER
