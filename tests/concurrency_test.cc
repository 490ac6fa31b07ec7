// SPDX-License-Identifier: MIT
//
// SyncKeeper under threads: workers connect, authenticate, join shared
// rooms, type, stop and disconnect while the driver thread fires real
// auto-clears (a 2 ms typing timeout on the steady clock: the one test file
// that uses real time and may sleep briefly). Callbacks call back into the
// SyncKeeper, on their own thread and from another thread that must not
// block (it would, if a callback ran with the lock held). Every wait has a
// deadline that fails the test instead of hanging it.
//
// Catch2 assertions are made on the test's thread only; workers, callbacks
// and the driver record into atomics.
#include <roomkeeper/sync_keeper.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "test_support.h"

namespace {

using roomkeeper::KeeperCallbacks;
using roomkeeper::KeeperOptions;
using roomkeeper::LogLevel;
using roomkeeper::MemoryStats;
using roomkeeper::Millis;
using roomkeeper::PersistCall;
using roomkeeper::PersistOp;
using roomkeeper::Result;
using roomkeeper::ShutdownReport;
using roomkeeper::SyncKeeper;
using namespace std::chrono_literals;

// Who is running a callback: 0 = a thread the test did not start (the
// driver), 1 = a worker, 2 = the test's own thread.
thread_local int tRole = 0;

// Runs `f` on another thread and fails (without hanging) if it does not
// finish in time: a deadlock ends the process with a message.
template <typename F>
auto withinSeconds(int seconds, const char* what, F&& f) {
  auto fut = std::async(std::launch::async, std::forward<F>(f));
  if (fut.wait_for(std::chrono::seconds(seconds)) != std::future_status::ready) {
    std::fprintf(stderr, "FATAL: %s did not finish within %d s: deadlock\n", what,
                 seconds);
    std::fflush(nullptr);
    std::_Exit(3);
  }
  return fut.get();
}

// Waits up to `limit` for `pred`, polling.
template <typename Pred>
bool eventually(std::chrono::milliseconds limit, Pred&& pred) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

// Calls into the SyncKeeper from a fresh thread and waits for it. If the
// calling callback ran with the SyncKeeper's lock held, the probe blocks and
// the wait times out: counted, and the probe is joined later (it finishes
// once the callback returns and the lock is released).
struct Probe {
  std::atomic<SyncKeeper*> sk{nullptr};
  std::atomic<int> ok{0};
  std::atomic<int> blocked{0};
  std::mutex mu;
  std::vector<std::thread> late;

  void operator()() {
    auto done = std::make_shared<std::promise<void>>();
    std::future<void> fut = done->get_future();
    SyncKeeper* k = sk.load();
    std::thread t([k, done] {
      (void)k->roomSize("thread:0");
      (void)k->isConnected("nobody");
      (void)k->getMemoryStats();
      done->set_value();
    });
    if (fut.wait_for(3s) == std::future_status::ready) {
      t.join();
      ++ok;
    } else {
      ++blocked;
      std::lock_guard<std::mutex> g(mu);
      late.push_back(std::move(t));
    }
  }
  void joinLate() {
    std::lock_guard<std::mutex> g(mu);
    for (std::thread& t : late) t.join();
    late.clear();
  }
};


}  // namespace

TEST_CASE("SyncKeeper stress: workers and the driver, callbacks calling back in",
          "[concurrency]") {
  tRole = 2;
  constexpr int kWorkers = 4;
  constexpr int kIterations = 1500;
  constexpr std::size_t kWindow = 6;  // live sessions per worker

  std::atomic<SyncKeeper*> self{nullptr};
  Probe probe;
  std::atomic<long> emits{0}, stoppedEmits{0}, startedEmits{0}, leaves{0}, persisted{0},
      closes{0}, disconnectings{0}, offline{0}, online{0}, errorLogs{0}, thrown{0},
      reentrant{0}, driverCallbacks{0}, driverStops{0}, broadcastEmits{0}, noteEmits{0}, noteThrown{0};

  auto onDriver = [&] {
    if (tRole == 0) ++driverCallbacks;
  };
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view to, std::string_view ev, std::string_view) {
    onDriver();
    const long n = ++emits;
    if (ev == "typingStopped") {
      ++stoppedEmits;
      if (tRole == 0) ++driverStops;
    }
    if (ev == "typingStarted") ++startedEmits;
    if (ev == "note" && ++noteEmits % 5 == 0) {
      // A throw inside a broadcast's fan-out, whatever n % 97 does.
      ++noteThrown;
      ++thrown;
      throw std::runtime_error("note boom");
    }
    SyncKeeper* k = self.load();
    (void)k->isConnected(to);  // same thread, straight back in
    ++reentrant;
    if (n % 101 == 0) {
      // A join from a callback: allowed, may be refused (the session may be
      // gone or not authenticated), must not deadlock.
      (void)k->trackRoom(to, "from-callback");
      (void)k->untrackRoom(to, "from-callback");
    }
    if (n % 64 == 0) probe();
    if (n % 97 == 0) {
      ++thrown;
      throw std::runtime_error("emit boom");
    }
  };
  cb.leave = [&](std::string_view, std::string_view room) {
    onDriver();
    const long n = ++leaves;
    (void)self.load()->roomSize(room);
    ++reentrant;
    if (n % 50 == 0) probe();
  };
  cb.persist = [&](const PersistCall&) {
    onDriver();
    const long n = ++persisted;
    if (n % 200 == 0) {
      (void)self.load()->getMemoryStats();
      probe();
    }
    return true;
  };
  cb.closeSession = [&](std::string_view s, std::string_view) {
    onDriver();
    ++closes;
    (void)self.load()->isConnected(s);
    probe();
  };
  cb.disconnecting = [&](std::string_view s, const std::vector<std::string>& rooms) {
    onDriver();
    ++disconnectings;
    if (!rooms.empty()) (void)self.load()->isMember(s, rooms.front());
  };
  cb.userOnline = [&](std::string_view) { ++online; };
  cb.userOffline = [&](std::string_view u) {
    onDriver();
    ++offline;
    (void)self.load()->isConnected(u);
  };
  cb.log = [&](LogLevel level, std::string_view) {
    if (level == LogLevel::kError) ++errorLogs;
  };

  KeeperOptions opt;
  opt.typing.requireMembership = false;  // typers need not join here
  opt.typing.timeout = Millis(2);  // real auto-clears, on the driver
  opt.authTimeout = Millis(20);    // unauthenticated sessions time out on the driver
  opt.statsLogInterval = Millis(5);
  SyncKeeper sk(std::move(cb), opt);
  self = &sk;
  probe.sk = &sk;
  REQUIRE(sk.startDriver());
  CHECK(sk.driverRunning());
  CHECK_FALSE(sk.startDriver());

  std::atomic<long> refusedUnexpectedly{0};
  auto worker = [&](int t) {
    tRole = 1;
    std::deque<std::string> live;
    auto expectOk = [&](Result r) {
      if (!roomkeeper::ok(r) && r != Result::kNotConnected) ++refusedUnexpectedly;
    };
    for (int i = 0; i < kIterations; ++i) {
      const std::string id = "t" + std::to_string(t) + "-s" + std::to_string(i);
      const std::string user = "u" + std::to_string(t) + "-" + std::to_string(i % 3);
      if (sk.connect(id) != Result::kOk) ++refusedUnexpectedly;
      if (i % 10 == 9) {
        live.push_back(id);  // never authenticates: the driver closes it
      } else {
        expectOk(sk.authenticate(id, user));
        expectOk(sk.trackRoom(id, "thread:" + std::to_string(i % 4)));  // shared
        expectOk(sk.trackRoom(id, "private:" + std::to_string(t)));
        expectOk(sk.startTyping(id, std::to_string(i % 4)));
        if (i % 3 == 0) expectOk(sk.startTyping(id, std::to_string((i + 1) % 4)));
        live.push_back(id);
      }
      if (live.size() > kWindow) {
        const std::string old = live.front();
        live.pop_front();
        switch (i % 4) {
          case 0:
            expectOk(sk.stopTyping(old, std::to_string((i - kWindow) % 4)));
            expectOk(sk.disconnect(old));
            break;
          case 1:
            expectOk(sk.forceCleanup(old));
            break;
          case 2:
            expectOk(sk.untrackRoom(old, "private:" + std::to_string(t)));
            expectOk(sk.disconnect(old));
            break;
          default:
            (void)sk.clearRoomTracking(old);
            expectOk(sk.disconnect(old));
            break;
        }
      }
      if (i % 7 == 0 && !live.empty()) {
        // A keystroke on an older session: restarts, or starts again after
        // the driver cleared it.
        const Result r = sk.startTyping(live.front(), "0");
        if (!roomkeeper::ok(r) && r != Result::kNotConnected &&
            r != Result::kNotAuthenticated)
          ++refusedUnexpectedly;
      }
      if (i % 5 == 0) {
        // A broadcast to a shared room: one queued fan-out, delivered after
        // the lock is released, whose throwing emits are counted then.
        const std::string room = "thread:" + std::to_string(i % 4);
        roomkeeper::BroadcastTargets to;  // views: `room` outlives the call
        to.rooms = {room};
        const std::size_t n = sk.broadcast(to, "note", "{}");
        broadcastEmits += static_cast<long>(n);
      }
      if (i % 16 == 0) std::this_thread::sleep_for(1ms);  // let timers come due
    }
    return std::vector<std::string>(live.begin(), live.end());
  };

  const auto started = std::chrono::steady_clock::now();
  std::vector<std::string> leftovers = withinSeconds(120, "the workers", [&] {
    std::vector<std::future<std::vector<std::string>>> fs;
    for (int t = 0; t < kWorkers; ++t)
      fs.push_back(std::async(std::launch::async, worker, t));
    std::vector<std::string> all;
    for (auto& f : fs) {
      std::vector<std::string> v = f.get();
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  });
  // Let the driver fire what is left (2 ms typing, 20 ms auth).
  std::this_thread::sleep_for(50ms);
  const bool stopped = withinSeconds(10, "stopDriver", [&] { return sk.stopDriver(); });
  CHECK(stopped);
  CHECK_FALSE(sk.driverRunning());
  CHECK_FALSE(sk.stopDriver());

  withinSeconds(30, "the final disconnects", [&] {
    tRole = 2;
    for (const std::string& id : leftovers) (void)sk.disconnect(id);
    (void)sk.advance();
  });
  const auto elapsed = std::chrono::steady_clock::now() - started;
  INFO("elapsed " << std::chrono::duration_cast<Millis>(elapsed).count() << " ms");
  probe.joinLate();

  const MemoryStats st = sk.getMemoryStats();
  requireEmpty(st);
  CHECK(st.timersPending == 1);  // the stats log timer
  CHECK(refusedUnexpectedly == 0);
  CHECK(probe.blocked == 0);  // no callback ever ran with the lock held
  CHECK(probe.ok > 0);
  CHECK(reentrant > 0);
  CHECK(startedEmits > 0);
  CHECK(broadcastEmits > 0);
  CHECK(noteEmits == broadcastEmits);  // every member a broadcast counted was told
  CHECK(noteThrown > 0);
  CHECK(stoppedEmits > 0);
  CHECK(driverCallbacks > 0);  // auto-clears and auth deadlines really fired
  CHECK(driverStops > 0);      // typingStopped emitted by the driver's auto-clear
  CHECK(st.authTimeouts > 0);
  CHECK(closes == static_cast<long>(st.authTimeouts));
  CHECK(offline == online);
  CHECK(st.callbackErrors == static_cast<std::uint64_t>(thrown.load()));
  CHECK(errorLogs == thrown);
  CHECK(st.persistDelivered == static_cast<std::uint64_t>(persisted.load()));
  CHECK(st.persistFailures == 0);
  CHECK(st.persistDropped == 0);
  CHECK(st.forcedCleanups > 0);

  const ShutdownReport rep = sk.shutdown();
  CHECK(rep.sessionsClosed == 0);
  const MemoryStats end = sk.getMemoryStats();
  requireEmpty(end);
  CHECK(end.timersPending == 0);
}

TEST_CASE("no SyncKeeper callback runs with the lock held", "[concurrency]") {
  tRole = 2;
  Probe probe;
  std::atomic<SyncKeeper*> self{nullptr};
  std::vector<std::string> seen;  // on this thread only (no driver here)
  auto hit = [&](const char* what) {
    seen.emplace_back(what);
    probe();
  };
  bool throwEmit = true, throwPersist = true, throwLeave = true;
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view, std::string_view, std::string_view) {
    hit("emit");
    if (throwEmit) {
      throwEmit = false;
      throw std::runtime_error("emit boom");  // reported through log
    }
  };
  cb.leave = [&](std::string_view, std::string_view) {
    hit("leave");
    if (throwLeave) {
      throwLeave = false;
      throw std::runtime_error("leave boom");
    }
  };
  cb.persist = [&](const PersistCall&) {
    hit("persist");
    if (throwPersist) {
      throwPersist = false;
      throw std::runtime_error("persist boom");
    }
    return true;
  };
  cb.closeSession = [&](std::string_view, std::string_view) { hit("closeSession"); };
  cb.disconnecting = [&](std::string_view, const std::vector<std::string>&) {
    hit("disconnecting");
  };
  cb.userOnline = [&](std::string_view) { hit("userOnline"); };
  cb.userOffline = [&](std::string_view) { hit("userOffline"); };
  cb.roomCreated = [&](std::string_view) { hit("roomCreated"); };
  cb.roomDeleted = [&](std::string_view) { hit("roomDeleted"); };
  cb.log = [&](LogLevel, std::string_view) { hit("log"); };
  KeeperOptions opt;
  opt.typing.requireMembership = false;  // typers need not join here
  opt.warnConnections = 1;  // a warning (log) on the second connect
  opt.authTimeout = Millis(0);
  SyncKeeper sk(std::move(cb), opt);
  self = &sk;
  probe.sk = &sk;

  withinSeconds(60, "the scenario", [&] {
    tRole = 2;
    (void)sk.connectAuthenticated("a1", "alice");
    (void)sk.connectAuthenticated("b1", "bob");
    (void)sk.trackRoom("a1", "thread:1");
    (void)sk.trackRoom("b1", "thread:1");
    (void)sk.trackRoom("a1", "job:1");
    (void)sk.startTyping("a1", "1");  // emit throws -> log; persist throws -> log
    (void)sk.stopTyping("a1", "1");
    (void)sk.untrackRoom("a1", "job:1");  // leave throws -> log
    (void)sk.disconnect("a1");
    (void)sk.connect("anon");
    (void)sk.shutdown();  // serverShutdown, closeSession, last persistence attempt
  });
  probe.joinLate();
  for (const char* what :
       {"emit", "leave", "persist", "closeSession", "disconnecting", "userOnline",
        "userOffline", "roomCreated", "roomDeleted", "log"}) {
    INFO(what);
    CHECK(std::count(seen.begin(), seen.end(), std::string(what)) > 0);
  }
  CHECK(probe.blocked == 0);
  CHECK(probe.ok == static_cast<int>(seen.size()));
  CHECK(sk.getMemoryStats().callbackErrors == 3);
  requireEmpty(sk.getMemoryStats());
}

TEST_CASE("stopDriver from a callback on the driver thread returns false",
          "[concurrency]") {
  tRole = 2;
  std::atomic<SyncKeeper*> self{nullptr};
  std::atomic<int> onDriverCalls{0};
  std::atomic<int> stopResults{-1};  // -1 none, 0 false, 1 true
  std::atomic<int> startResults{-1};
  std::atomic<bool> inCallback{false};
  std::atomic<bool> holdInCallback{false};
  std::atomic<bool> mainStopping{false};
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view, std::string_view ev, std::string_view) {
    if (tRole != 0 || ev != "typingStopped") return;
    if (onDriverCalls++ > 0) return;
    SyncKeeper* k = self.load();
    inCallback = true;
    if (holdInCallback) {
      // Let the test's thread get into stopDriver() (it joins us).
      (void)eventually(2000ms, [&] { return mainStopping.load(); });
      std::this_thread::sleep_for(20ms);
    }
    stopResults = k->stopDriver() ? 1 : 0;
    startResults = k->startDriver() ? 1 : 0;
  };
  KeeperOptions opt;
  opt.typing.requireMembership = false;  // typers need not join here
  opt.typing.timeout = Millis(1);
  SyncKeeper sk(std::move(cb), opt);
  self = &sk;
  REQUIRE(sk.connectAuthenticated("a1", "alice") == Result::kOk);
  REQUIRE(sk.connectAuthenticated("b1", "bob") == Result::kOk);
  REQUIRE(sk.trackRoom("a1", "thread:1") == Result::kOk);
  REQUIRE(sk.trackRoom("b1", "thread:1") == Result::kOk);

  SECTION("alone") {
    REQUIRE(sk.startDriver());
    REQUIRE(sk.startTyping("a1", "1") == Result::kOk);
    CHECK(eventually(5000ms, [&] { return stopResults.load() != -1; }));
    CHECK(stopResults == 0);
    CHECK(startResults == 0);
    CHECK(sk.driverRunning());  // the refused stop left it running
    CHECK(withinSeconds(10, "stopDriver", [&] { return sk.stopDriver(); }));
  }
  SECTION("while the test's thread is stopping the driver") {
    holdInCallback = true;
    REQUIRE(sk.startDriver());
    REQUIRE(sk.startTyping("a1", "1") == Result::kOk);
    CHECK(eventually(5000ms, [&] { return inCallback.load(); }));
    const bool stopped = withinSeconds(10, "stopDriver racing a driver callback", [&] {
      mainStopping = true;
      return sk.stopDriver();
    });
    CHECK(stopped);
    CHECK(stopResults == 0);
  }
  CHECK_FALSE(sk.driverRunning());
  CHECK(onDriverCalls == 1);
  CHECK_FALSE(sk.isConnected("nobody"));
  REQUIRE(sk.disconnect("a1") == Result::kOk);
  REQUIRE(sk.disconnect("b1") == Result::kOk);
  requireEmpty(sk.getMemoryStats());
}

TEST_CASE("shutdown from a callback on the driver thread", "[concurrency]") {
  tRole = 2;
  std::atomic<SyncKeeper*> self{nullptr};
  std::atomic<int> shutdowns{0};
  std::atomic<int> serverShutdownEmits{0};
  KeeperCallbacks cb;
  cb.emit = [&](std::string_view, std::string_view ev, std::string_view) {
    if (ev == "serverShutdown") ++serverShutdownEmits;
    if (tRole == 0 && ev == "typingStopped" && shutdowns++ == 0)
      (void)self.load()->shutdown();
  };
  KeeperOptions opt;
  opt.typing.requireMembership = false;  // typers need not join here
  opt.typing.timeout = Millis(1);
  SyncKeeper sk(std::move(cb), opt);
  self = &sk;
  REQUIRE(sk.connectAuthenticated("a1", "alice") == Result::kOk);
  REQUIRE(sk.connectAuthenticated("b1", "bob") == Result::kOk);
  REQUIRE(sk.trackRoom("a1", "thread:1") == Result::kOk);
  REQUIRE(sk.trackRoom("b1", "thread:1") == Result::kOk);
  REQUIRE(sk.startDriver());
  REQUIRE(sk.startTyping("a1", "1") == Result::kOk);
  CHECK(eventually(5000ms, [&] { return sk.isShutDown(); }));
  CHECK(eventually(5000ms, [&] { return serverShutdownEmits.load() == 2; }));
  CHECK(sk.connect("x") == Result::kShutDown);
  CHECK_FALSE(sk.startDriver());
  requireEmpty(sk.getMemoryStats());
  CHECK(withinSeconds(10, "stopDriver", [&] { return sk.stopDriver(); }));
  CHECK(sk.getMemoryStats().timersPending == 0);
}

TEST_CASE("the driver delivers persistence retries armed outside the lock",
          "[concurrency]") {
  tRole = 2;
  std::atomic<int> attempts{0};
  std::atomic<bool> failedOnce{false};
  std::atomic<int> stoppedDelivered{0};
  KeeperCallbacks cb;
  cb.persist = [&](const PersistCall& c) {
    ++attempts;
    if (c.op != PersistOp::kTypingStopped) return true;
    if (!failedOnce.exchange(true)) return false;  // the first stop fails once
    ++stoppedDelivered;
    return true;
  };
  KeeperOptions opt;
  opt.typing.requireMembership = false;  // typers need not join here
  opt.typing.timeout = Millis(60000);   // the driver's next deadline: a minute away
  opt.typing.retryInitial = Millis(5);  // the retry: 5 ms away
  SyncKeeper sk(std::move(cb), opt);
  REQUIRE(sk.connectAuthenticated("a1", "alice") == Result::kOk);
  REQUIRE(sk.startDriver());
  REQUIRE(sk.startTyping("a1", "1") == Result::kOk);
  REQUIRE(sk.startTyping("a1", "2") == Result::kOk);
  std::this_thread::sleep_for(50ms);  // the driver now sleeps until thread 2's clear
  REQUIRE(sk.stopTyping("a1", "1") == Result::kOk);
  // The retry timer was armed by the failed attempt, which ran after the
  // lock was released; the sleeping driver must still fire it on time.
  CHECK(eventually(3000ms, [&] { return stoppedDelivered.load() == 1; }));
  CHECK(sk.getMemoryStats().pendingPersistence == 0);
  CHECK(sk.getMemoryStats().persistFailures == 1);
  CHECK(withinSeconds(10, "stopDriver", [&] { return sk.stopDriver(); }));
  REQUIRE(sk.disconnect("a1") == Result::kOk);
  requireEmpty(sk.getMemoryStats());
}

TEST_CASE("many threads typing in one thread room agree on one indicator",
          "[concurrency]") {
  tRole = 2;
  std::atomic<int> started{0}, stopped{0};
  KeeperCallbacks cb;
  cb.persist = [&](const PersistCall& c) {
    if (c.op == PersistOp::kTypingStarted) ++started;
    if (c.op == PersistOp::kTypingStopped) ++stopped;
    return true;
  };
  KeeperOptions opt;
  opt.typing.requireMembership = false;  // typers need not join here
  opt.authTimeout = Millis(0);
  SyncKeeper sk(std::move(cb), opt);
  // Eight devices of one user, each on its own thread, hammer one thread.
  constexpr int kDevices = 8;
  for (int d = 0; d < kDevices; ++d)
    REQUIRE(sk.connectAuthenticated("dev" + std::to_string(d), "alice") == Result::kOk);
  std::atomic<int> newIndicators{0};
  withinSeconds(60, "the devices", [&] {
    std::vector<std::thread> ts;
    for (int d = 0; d < kDevices; ++d)
      ts.emplace_back([&, d] {
        const std::string s = "dev" + std::to_string(d);
        for (int i = 0; i < 2000; ++i) {
          if (sk.startTyping(s, "42") == Result::kOk) ++newIndicators;
          if (i % 50 == 49) (void)sk.stopTyping(s, "42");
        }
      });
    for (auto& t : ts) t.join();
  });
  for (int d = 0; d < kDevices; ++d)
    REQUIRE(sk.disconnect("dev" + std::to_string(d)) == Result::kOk);
  CHECK(started == newIndicators);
  CHECK(stopped == started);  // every indicator that started ended exactly once
  requireEmpty(sk.getMemoryStats());
}

TEST_CASE("shutdown waits for a persistence call in flight, then delivers the rest",
          "[concurrency][hardening]") {
  std::mutex m;
  std::vector<std::string> stored;
  std::promise<void> entered;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> first{true};
  KeeperCallbacks cb;
  cb.persist = [&](const PersistCall& c) {
    if (first.exchange(false)) {
      entered.set_value();
      released.wait();  // one slow write
    }
    std::lock_guard<std::mutex> g(m);
    stored.push_back(std::string(roomkeeper::toString(c.op)) + ":" + c.user + ":" + c.thread);
    return true;
  };
  KeeperOptions opt;
  opt.typing.requireMembership = false;
  SyncKeeper sk(std::move(cb), opt);
  REQUIRE(sk.connectAuthenticated("s1", "u1") == Result::kOk);
  // The typing start's persistence call runs on this worker and blocks.
  std::thread worker([&] { (void)sk.startTyping("s1", "7"); });
  entered.get_future().wait();
  std::future<ShutdownReport> rep =
      std::async(std::launch::async, [&] { return sk.shutdown(); });
  // Shutdown cannot finish while the write is in flight.
  CHECK(rep.wait_for(50ms) == std::future_status::timeout);
  release.set_value();
  const ShutdownReport r = rep.get();
  worker.join();
  CHECK(r.persistUndelivered == 0);
  std::lock_guard<std::mutex> g(m);
  CHECK(stored == std::vector<std::string>{"typing_started:u1:7", "typing_stopped:u1:7",
                                           "typing_stopped_all:u1:"});
  CHECK(sk.getMemoryStats().bytes == 0);
}

#include <sys/wait.h>
#include <unistd.h>
TEST_CASE("destroying a SyncKeeper on its driver thread is refused loudly",
          "[concurrency][hardening]") {
#if defined(__SANITIZE_THREAD__)
  return;  // ThreadSanitizer does not follow a fork that starts threads
#endif
  const pid_t pid = fork();
  if (pid == 0) {
    std::freopen("/dev/null", "w", stderr);
    SyncKeeper* sk = nullptr;
    KeeperCallbacks cb;
    cb.closeSession = [&](std::string_view, std::string_view) { delete sk; };
    KeeperOptions opt;
    opt.authTimeout = Millis(1);
    sk = new SyncKeeper(cb, opt);
    (void)sk->connect("s1");
    (void)sk->startDriver();
    std::this_thread::sleep_for(2s);  // the driver times s1 out and aborts
    std::_Exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGABRT);
}

TEST_CASE("SyncKeeper has the handle, query and bounded-advance calls",
          "[concurrency][hardening]") {
  KeeperOptions opt;
  SyncKeeper sk({}, opt);
  roomkeeper::SessionHandle h;
  REQUIRE(sk.connectAuthenticated("s1", "u1", &h) == Result::kOk);
  CHECK(sk.handleOf("s1") == h);
  REQUIRE(sk.trackRoom(h, "a") == Result::kOk);
  REQUIRE(sk.trackRoom(h, "b") == Result::kOk);
  CHECK(sk.roomsOf("s1") == std::vector<std::string>{"a", "b"});
  CHECK(sk.membersOf("a") == std::vector<std::string>{"s1"});
  CHECK(sk.clearRoomTracking(h) == 2);
  CHECK(sk.roomsOf("s1").empty());
  CHECK(sk.advance(std::chrono::steady_clock::now(), 1) == 0);
  CHECK(sk.checkThresholds() == 0);
}

TEST_CASE("SyncKeeper::trackRooms from several threads: each room once per session, "
          "callbacks outside the lock",
          "[concurrency]") {
  // Four threads, each with its own sessions, join overlapping lists of
  // rooms with trackRooms; a roomCreated observer calls back in (it would
  // deadlock if it ran under the lock on another thread's call).
  KeeperCallbacks cb;
  SyncKeeper* self = nullptr;
  std::atomic<int> created{0};
  cb.roomCreated = [&](std::string_view room) {
    ++created;
    (void)self->roomSize(room);
  };
  SyncKeeper sk(cb, KeeperOptions{});
  self = &sk;
  constexpr int kThreads = 4, kSessions = 50;
  std::vector<std::string> rooms;
  for (int r = 0; r < 20; ++r) rooms.push_back("room-" + std::to_string(r));
  std::vector<std::thread> pool;
  std::atomic<std::size_t> joined{0};
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      for (int i = 0; i < kSessions; ++i) {
        const std::string s = "t" + std::to_string(t) + "-" + std::to_string(i);
        roomkeeper::SessionHandle h;
        if (sk.connectAuthenticated(s, s, &h) != Result::kOk) continue;
        // Each thread starts the list at another place; by handle for half.
        std::vector<std::string_view> mine;
        for (int r = 0; r < 20; ++r) mine.push_back(rooms[(r + 5 * t) % 20]);
        std::vector<Result> results;
        joined += (i % 2) ? sk.trackRooms(h, mine, &results) : sk.trackRooms(s, mine, &results);
        joined += sk.trackRooms(s, mine, &results);  // again: all kAlreadyDone
      }
    });
  for (auto& th : pool) th.join();
  CHECK(joined == static_cast<std::size_t>(kThreads * kSessions * 20));
  CHECK(created == 20);
  for (const std::string& r : rooms) CHECK(sk.roomSize(r) == kThreads * kSessions);
  CHECK(sk.getMemoryStats().trackedRooms == static_cast<std::size_t>(kThreads * kSessions * 20));
}

TEST_CASE("rate limits under SyncKeeper: shared buckets hand out exactly their tokens",
          "[concurrency][ratelimit]") {
  // A frozen clock: no token comes back, so across every thread exactly the
  // burst is allowed, whatever the interleaving.
  roomkeeper::ManualClock clock;
  roomkeeper::KeeperOptions opt;
  opt.clock = &clock;
  opt.authTimeout = roomkeeper::Millis{0};
  opt.rateLimits.connectsPerAddress = {1, 40};
  opt.rateLimits.maxSessionsPerAddress = 30;
  opt.rateLimits.kinds = {{"message", roomkeeper::RateScope::kUser, {1, 100}},
                          {"ping", roomkeeper::RateScope::kSession, {1, 10}}};
  roomkeeper::SyncKeeper k({}, opt);
  constexpr int kThreads = 4;
  std::atomic<int> connected{0}, refusedConnects{0}, messages{0}, pings{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        const std::string s = "t" + std::to_string(t) + "-" + std::to_string(i);
        const roomkeeper::Result r =
            k.connectAuthenticated(s, "ann", roomkeeper::ClientAddress{"10.0.0.1"});
        if (r == roomkeeper::Result::kOk) ++connected;
        else if (r == roomkeeper::Result::kRateLimited) ++refusedConnects;
        for (int m = 0; m < 50; ++m) {
          if (k.allow(s, 0) == roomkeeper::Result::kOk) ++messages;
          if (k.allow(s, 1) == roomkeeper::Result::kOk) ++pings;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(connected.load() == 30);  // the cap on open sessions, below the burst
  CHECK(refusedConnects.load() == kThreads * 20 - 30);
  CHECK(messages.load() == 100);      // one user: one bucket
  CHECK(pings.load() == 30 * 10);     // each session its own
  const roomkeeper::MemoryStats st = k.getMemoryStats();
  CHECK(st.rateLimitedConcurrent == static_cast<std::uint64_t>(kThreads * 20 - 30));
  CHECK(st.rateLimitKeys == 2);  // the address and the user
  // Shutdown lets go of every key, also those kept for their buckets.
  REQUIRE(k.shutdown().result == roomkeeper::Result::kOk);
  requireEmpty(k.getMemoryStats());
  CHECK(k.getMemoryStats().timersPending == 0);
}
