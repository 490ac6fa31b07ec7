// SPDX-License-Identifier: MIT
#include "roomkeeper/sync_keeper.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "keeper_impl.h"

namespace roomkeeper {

namespace {
// The SyncKeeper whose driver loop runs on this thread, if any. Read by
// stopDriver/startDriver/shutdown before they take any lock, so a callback
// on the driver thread neither joins itself nor waits for a stopDriver()
// that is joining it.
thread_local const void* tDriverOf = nullptr;
// The SyncKeeper whose callbacks this thread is delivering, if any (the
// innermost, when deliveries nest).
thread_local const void* tDeliveringFor = nullptr;
}  // namespace

struct SyncKeeper::Impl {
  Impl(KeeperCallbacks c, KeeperOptions o)
      : ordered(o.bus != nullptr), keeper(std::move(c), std::move(o)) {
    keeper.impl_->typing.impl_->mu = &mu;
    keeper.impl_->reg.mu = &mu;
  }

  // Runs `op` under the lock with callback delivery deferred, then delivers
  // what it produced with the lock released.
  // Keeps callback delivery deferred for one locked section, even if the
  // operation throws (an allocation failure in a hash index).
  struct DeferGuard {
    detail::EventQueue& q;
    explicit DeferGuard(detail::EventQueue& queue) : q(queue) { ++q.deferred_; }
    ~DeferGuard() { --q.deferred_; }
  };
  template <typename Op>
  auto run(Op&& op) {
    std::vector<detail::Event> events;
    SessionRegistry::Impl& reg = keeper.impl_->reg;
    using R = decltype(op());
    if constexpr (std::is_void_v<R>) {
      {
        std::lock_guard<std::recursive_mutex> g(mu);
        {
          DeferGuard defer(reg.events);
          op();
        }
        events = reg.events.take();
        wakeDriverIfEarlier();
        if (ordered) enqueue(std::move(events));
      }
      deliverAll(events);
    } else {
      R result;
      {
        std::lock_guard<std::recursive_mutex> g(mu);
        {
          DeferGuard defer(reg.events);
          result = op();
        }
        events = reg.events.take();
        wakeDriverIfEarlier();
        if (ordered) enqueue(std::move(events));
      }
      deliverAll(events);
      return result;
    }
  }
  // With a bus, the events of every call reach the bus (and the host) in
  // the order the calls changed the state, whichever threads made them:
  // each call's batch joins one FIFO under the lock, and one thread at a
  // time delivers the FIFO (a call whose batch another thread is already
  // delivering returns at once). Without a bus, each caller delivers its
  // own batch (no cross-thread order is needed).
  void enqueue(std::vector<detail::Event>&& events) {
    if (events.empty()) return;
    std::lock_guard<std::mutex> g(fifoMu);
    fifo.push_back(std::move(events));
  }
  void deliverAll(std::vector<detail::Event>& events) {
    if (!ordered) {
      deliver(events);
      wakeAfterDelivery(events);
      return;
    }
    {
      std::lock_guard<std::mutex> g(fifoMu);
      if (delivering || fifo.empty()) return;
      delivering = true;
    }
    for (;;) {
      std::vector<detail::Event> batch;
      {
        std::lock_guard<std::mutex> g(fifoMu);
        if (fifo.empty()) {
          delivering = false;
          return;
        }
        batch = std::move(fifo.front());
        fifo.pop_front();
      }
      deliver(batch);
      wakeAfterDelivery(batch);
    }
  }
  void deliver(std::vector<detail::Event>& events) {
    if (events.empty()) return;
    struct Mark {
      const void* prev;
      explicit Mark(const void* self) : prev(tDeliveringFor) { tDeliveringFor = self; }
      ~Mark() { tDeliveringFor = prev; }
    } mark(this);
    for (detail::Event& ev : events) {
      if (ev.kind == static_cast<std::uint8_t>(EventKind::kCustom)) {
        try {
          if (ev.fn) ev.fn();
        } catch (...) {
          reportError("host");
        }
      } else {
        // Registry events only read the callbacks (immutable) and count
        // errors under the lock.
        deliverRegistryEvent(ev);
      }
    }
  }
  void deliverRegistryEvent(detail::Event& ev) {
    const RegistryCallbacks& cb = keeper.impl_->reg.cb;
    auto guarded = [&](auto&& f, std::string_view where) {
      try {
        f();
      } catch (...) {
        reportError(where);
      }
    };
    switch (static_cast<EventKind>(ev.kind)) {
      case EventKind::kMembershipEnded:
        if (cb.leave) guarded([&] { cb.leave(ev.a, ev.b); }, "leave");
        if (cb.roomLeft) guarded([&] { cb.roomLeft(ev.b, ev.a); }, "observer");
        break;
      case EventKind::kRoomCreated:
        if (cb.roomCreated) guarded([&] { cb.roomCreated(ev.b); }, "observer");
        break;
      case EventKind::kRoomJoined:
        if (cb.roomJoined) guarded([&] { cb.roomJoined(ev.b, ev.a); }, "observer");
        break;
      case EventKind::kRoomDeleted:
        if (cb.roomDeleted) guarded([&] { cb.roomDeleted(ev.b); }, "observer");
        break;
      case EventKind::kUserOnline:
        if (cb.userOnline) guarded([&] { cb.userOnline(ev.a); }, "observer");
        break;
      case EventKind::kUserOffline:
        if (cb.userOffline) guarded([&] { cb.userOffline(ev.a); }, "observer");
        break;
      case EventKind::kCustom:
        break;
    }
  }
  // A host callback that threw: counted under the lock, logged outside it
  // (the log is a host callback too). Call inside a catch block.
  void reportError(std::string_view where) noexcept {
    SessionRegistry::Impl& reg = keeper.impl_->reg;
    {
      std::lock_guard<std::recursive_mutex> g(mu);
      ++reg.callbackErrors;
    }
    if (!reg.cb.log) return;
    try {
      std::string msg = "roomkeeper: ";
      msg.append(where.data(), where.size());
      try {
        throw;
      } catch (const std::exception& e) {
        msg += " callback threw: ";
        msg += e.what();
      } catch (...) {
        msg += " callback threw a non-exception";
      }
      reg.cb.log(LogLevel::kError, msg);
    } catch (...) {
      std::lock_guard<std::recursive_mutex> g(mu);
      ++reg.callbackErrors;
    }
  }
  // Delivered work may arm a timer outside the lock (the persistence retry
  // is armed by the drain that runs as a callback): let the driver know.
  void wakeAfterDelivery(const std::vector<detail::Event>& events) {
    if (events.empty() || !driverActive.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::recursive_mutex> g(mu);
    wakeDriverIfEarlier();
  }
  // Called with the lock held.
  void wakeDriverIfEarlier() {
    if (!driverActive.load(std::memory_order_relaxed)) return;
    const std::optional<SteadyTime> nd = keeper.nextDeadline();
    if (nd && *nd < driverWake) {
      std::lock_guard<std::mutex> g(cvMu);
      wakeRequested = true;
      cv.notify_one();
    }
  }
  void driverLoop() {
    tDriverOf = this;
    const Clock& clock = keeper.timers().clock();
    for (;;) {
      std::optional<SteadyTime> nd;
      {
        std::lock_guard<std::recursive_mutex> g(mu);
        nd = keeper.nextDeadline();
        driverWake = nd ? *nd : SteadyTime::max();
      }
      {
        std::unique_lock<std::mutex> lk(cvMu);
        if (stopRequested) return;
        if (!wakeRequested) {
          // Sleep on the host's clock: compute the remaining time on it. A
          // far deadline ("never", Millis::max()) is slept in bounded steps:
          // wait_for adds the duration to now() and would overflow.
          const SteadyTime now = clock.now();
          if (nd && *nd != SteadyTime::max()) {
            if (*nd > now) {
              const auto wait = std::min<std::chrono::nanoseconds>(
                  *nd - now, kMaxDriverSleep);
              cv.wait_for(lk, wait, [&] { return stopRequested || wakeRequested; });
            }
          } else {
            cv.wait_for(lk, kMaxDriverSleep,
                        [&] { return stopRequested || wakeRequested; });
          }
        }
        wakeRequested = false;
        if (stopRequested) return;
      }
      try {
        run([&] { return keeper.advance(); });
      } catch (...) {
        // Out of memory while advancing: the driver must not take the
        // process down. Log (outside the lock), back off, try again.
        logDriverFailure();
        std::unique_lock<std::mutex> lk(cvMu);
        cv.wait_for(lk, std::chrono::milliseconds(10), [&] { return stopRequested; });
      }
    }
  }
  void logDriverFailure() noexcept {
    SessionRegistry::Impl& reg = keeper.impl_->reg;
    {
      std::lock_guard<std::recursive_mutex> g(mu);
      ++reg.callbackErrors;
    }
    if (!reg.cb.log) return;
    try {
      reg.cb.log(LogLevel::kError, "roomkeeper: driver: advance() failed (out of memory?); "
                                   "retrying in 10 ms");
    } catch (...) {
    }
  }
  static constexpr std::chrono::hours kMaxDriverSleep{1};

  const bool ordered;  // KeeperOptions::bus set: deliverAll keeps one order
  std::mutex fifoMu;   // after mu, never before
  std::deque<std::vector<detail::Event>> fifo;
  bool delivering = false;  // a thread is delivering the FIFO (under fifoMu)
  mutable std::recursive_mutex mu;
  Keeper keeper;
  // Driver.
  std::thread driver;
  std::atomic<bool> driverActive{false};
  std::mutex cvMu;
  std::condition_variable cv;
  bool stopRequested = false;
  bool wakeRequested = false;
  SteadyTime driverWake = SteadyTime::max();  // guarded by mu
  std::mutex driverControl;
};

SyncKeeper::SyncKeeper(KeeperCallbacks callbacks, KeeperOptions options)
    : impl_(std::make_unique<Impl>(std::move(callbacks), std::move(options))) {}
SyncKeeper::~SyncKeeper() {
  if (tDriverOf == impl_.get() || tDeliveringFor == impl_.get()) {
    std::fputs(
        "roomkeeper: a SyncKeeper was destroyed from inside one of its own callbacks "
        "(or on its driver thread); destroy it after the call returns. Aborting.\n",
        stderr);
    std::abort();
  }
  stopDriver();
}

Result SyncKeeper::connect(std::string_view s) {
  return impl_->run([&] { return impl_->keeper.connect(s); });
}
Result SyncKeeper::authenticate(std::string_view s, std::string_view u) {
  return impl_->run([&] { return impl_->keeper.authenticate(s, u); });
}
Result SyncKeeper::connectAuthenticated(std::string_view s, std::string_view u) {
  return impl_->run([&] { return impl_->keeper.connectAuthenticated(s, u); });
}
Result SyncKeeper::trackRoom(std::string_view s, std::string_view r) {
  return impl_->run([&] { return impl_->keeper.trackRoom(s, r); });
}
Result SyncKeeper::untrackRoom(std::string_view s, std::string_view r) {
  return impl_->run([&] { return impl_->keeper.untrackRoom(s, r); });
}
void SyncKeeper::prefetchRooms(const std::string_view* rooms, std::size_t n) {
  // A hint, under the lock: the rooms may change before their turn.
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  impl_->keeper.impl_->reg.prefetchRooms(rooms, n);
}
std::size_t SyncKeeper::clearRoomTracking(std::string_view s) {
  return impl_->run([&] { return impl_->keeper.clearRoomTracking(s); });
}
Result SyncKeeper::startTyping(std::string_view s, std::string_view t) {
  return impl_->run([&] { return impl_->keeper.startTyping(s, t); });
}
Result SyncKeeper::stopTyping(std::string_view s, std::string_view t) {
  return impl_->run([&] { return impl_->keeper.stopTyping(s, t); });
}
Result SyncKeeper::disconnect(std::string_view s) {
  return impl_->run([&] { return impl_->keeper.disconnect(s); });
}
Result SyncKeeper::forceCleanup(std::string_view s) {
  return impl_->run([&] { return impl_->keeper.forceCleanup(s); });
}
ShutdownReport SyncKeeper::shutdown() {
  if (tDriverOf != impl_.get()) stopDriver();
  Keeper::Impl& k = *impl_->keeper.impl_;
  ShutdownReport rep = impl_->run([&] {
    if (k.shut) return ShutdownReport{Result::kShutDown};
    ShutdownReport r = k.shutdown();
    if (r.result == Result::kOk) r.timersCancelled += k.timers.cancelAll();
    return r;
  });
  if (rep.result != Result::kOk) return rep;
  // The last persistence attempt runs outside the lock (it calls the host);
  // it first waits for a call in flight on another thread.
  rep.persistUndelivered = k.typing.impl_->finalFlush();
  k.typing.impl_->discardPersistence();  // reported; every count is 0
  impl_->run([&] {
    k.timers.cancelAll();
    k.timers.shrinkToFit();  // bytes back to where they started
    k.typing.impl_->releaseLists();
  });
  return rep;
}
Result SyncKeeper::connect(std::string_view s, SessionHandle* h) {
  return impl_->run([&] { return impl_->keeper.connect(s, h); });
}
Result SyncKeeper::connectAuthenticated(std::string_view s, std::string_view u,
                                        SessionHandle* h) {
  return impl_->run([&] { return impl_->keeper.connectAuthenticated(s, u, h); });
}
Result SyncKeeper::connect(std::string_view s, ClientAddress from, SessionHandle* h) {
  return impl_->run([&] { return impl_->keeper.connect(s, from, h); });
}
Result SyncKeeper::connectAuthenticated(std::string_view s, std::string_view u,
                                        ClientAddress from, SessionHandle* h) {
  return impl_->run([&] { return impl_->keeper.connectAuthenticated(s, u, from, h); });
}
Result SyncKeeper::allow(std::string_view s, RateKindId kind) {
  return impl_->run([&] { return impl_->keeper.allow(s, kind); });
}
Result SyncKeeper::allow(SessionHandle s, RateKindId kind) {
  return impl_->run([&] { return impl_->keeper.allow(s, kind); });
}
Result SyncKeeper::trackRoom(SessionHandle s, std::string_view r) {
  return impl_->run([&] { return impl_->keeper.trackRoom(s, r); });
}
Result SyncKeeper::untrackRoom(SessionHandle s, std::string_view r) {
  return impl_->run([&] { return impl_->keeper.untrackRoom(s, r); });
}
Result SyncKeeper::startTyping(SessionHandle s, std::string_view t) {
  return impl_->run([&] { return impl_->keeper.startTyping(s, t); });
}
Result SyncKeeper::stopTyping(SessionHandle s, std::string_view t) {
  return impl_->run([&] { return impl_->keeper.stopTyping(s, t); });
}
Result SyncKeeper::disconnect(SessionHandle s) {
  return impl_->run([&] { return impl_->keeper.disconnect(s); });
}
Result SyncKeeper::forceCleanup(SessionHandle s) {
  return impl_->run([&] { return impl_->keeper.forceCleanup(s); });
}
bool SyncKeeper::isShutDown() const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.isShutDown();
}
std::size_t SyncKeeper::relayBroadcast(const BroadcastTargets& t, std::string_view e,
                                       std::string_view p) {
  return impl_->run([&] { return impl_->keeper.relayBroadcast(t, e, p); });
}
void SyncKeeper::relayPresence(std::string_view u, bool online) {
  impl_->run([&] { impl_->keeper.relayPresence(u, online); });
}
std::size_t SyncKeeper::relayTyping(std::string_view u, std::string_view t, bool started) {
  return impl_->run([&] { return impl_->keeper.relayTyping(u, t, started); });
}
bool SyncKeeper::relayUserGone(std::string_view u) {
  return impl_->run([&] { return impl_->keeper.relayUserGone(u); });
}
std::size_t SyncKeeper::replayToBus() {
  return impl_->run([&] { return impl_->keeper.replayToBus(); });
}

std::size_t SyncKeeper::broadcast(const BroadcastTargets& t, std::string_view e,
                                  std::string_view p) {
  return impl_->run([&] { return impl_->keeper.broadcast(t, e, p); });
}
std::size_t SyncKeeper::advance() {
  return impl_->run([&] { return impl_->keeper.advance(); });
}
std::size_t SyncKeeper::clearRoomTracking(SessionHandle s) {
  return impl_->run([&] { return impl_->keeper.clearRoomTracking(s); });
}
SessionHandle SyncKeeper::handleOf(std::string_view s) const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.handleOf(s);
}
std::size_t SyncKeeper::advance(SteadyTime now, std::size_t maxFire) {
  return impl_->run([&] { return impl_->keeper.advance(now, maxFire); });
}
std::size_t SyncKeeper::checkThresholds() {
  return impl_->run([&] { return impl_->keeper.checkThresholds(); });
}
std::size_t SyncKeeper::checkTransport(std::size_t open) {
  return impl_->run([&] { return impl_->keeper.checkTransport(open); });
}
std::vector<std::string> SyncKeeper::roomsOf(std::string_view s) const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.registry().roomsOf(s);
}
std::vector<std::string> SyncKeeper::membersOf(std::string_view r) const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.registry().membersOf(r);
}
std::optional<SteadyTime> SyncKeeper::nextDeadline() const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.nextDeadline();
}
bool SyncKeeper::isConnected(std::string_view s) const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.registry().isConnected(s);
}
bool SyncKeeper::isMember(std::string_view s, std::string_view r) const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.registry().isMember(s, r);
}
std::size_t SyncKeeper::roomSize(std::string_view r) const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.registry().roomSize(r);
}
MemoryStats SyncKeeper::getMemoryStats() const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.getMemoryStats();
}
std::string SyncKeeper::prometheusText() const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.prometheusText();
}
std::string SyncKeeper::statsJson() const {
  std::lock_guard<std::recursive_mutex> g(impl_->mu);
  return impl_->keeper.statsJson();
}

bool SyncKeeper::startDriver() {
  if (tDriverOf == impl_.get()) return false;  // running: we are on it
  std::lock_guard<std::mutex> ctl(impl_->driverControl);
  if (impl_->driver.joinable() || isShutDown()) return false;
  {
    std::lock_guard<std::mutex> g(impl_->cvMu);
    impl_->stopRequested = false;
    impl_->wakeRequested = false;
  }
  impl_->driverActive.store(true);
  impl_->driver = std::thread([this] { impl_->driverLoop(); });
  return true;
}
bool SyncKeeper::stopDriver() {
  // On the driver thread: refuse before locking (a stopDriver() on another
  // thread may hold driverControl while it joins us).
  if (tDriverOf == impl_.get()) return false;
  std::lock_guard<std::mutex> ctl(impl_->driverControl);
  if (!impl_->driver.joinable()) return false;
  {
    std::lock_guard<std::mutex> g(impl_->cvMu);
    impl_->stopRequested = true;
    impl_->cv.notify_one();
  }
  impl_->driver.join();
  impl_->driverActive.store(false);
  return true;
}
bool SyncKeeper::driverRunning() const { return impl_->driverActive.load(); }

}  // namespace roomkeeper
