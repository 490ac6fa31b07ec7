// SPDX-License-Identifier: MIT
// Several event loops in one process: one Keeper per loop, each loop a real
// thread running its own Boost.Asio io_context, all joined by one
// InProcessHub. Every loop works at the same time (built for TSan too: the
// CI runs this program under ThreadSanitizer). What is checked is what a
// host on N cores relies on: presence once per user across loops, a
// broadcast once per member on every loop and in order per sender, one
// typing indicator reaching every loop, its 5 s auto-clear, the wildcard
// persisted once, and nothing left anywhere afterwards.
#include <roomkeeper/cluster/in_process.h>
#include <roomkeeper/roomkeeper.h>

#include <utility>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using roomkeeper::BroadcastTargets;
using roomkeeper::Result;
using std::chrono::milliseconds;

namespace {

// One loop: a thread, its io_context, its Keeper and node, and what its
// host saw (touched on the loop's thread only).
struct Loop {
  asio::io_context io;
  std::unique_ptr<roomkeeper::cluster::Node> node;
  std::unique_ptr<roomkeeper::Keeper> keeper;
  roomkeeper::ManualClock clock;
  std::map<std::string, std::vector<std::string>> got;  // session -> "event payload"
  std::map<std::string, int> online, offline, wildcards;  // user -> times
  std::thread thread;
};

class Loops {
 public:
  explicit Loops(std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      auto l = std::make_unique<Loop>();
      Loop* p = l.get();
      p->node = hub_.join();
      roomkeeper::KeeperCallbacks cb;
      cb.emit = [p](std::string_view s, std::string_view e, std::string_view payload) {
        p->got[std::string(s)].push_back(std::string(e) + " " + std::string(payload));
      };
      cb.userOnline = [p](std::string_view u) { ++p->online[std::string(u)]; };
      cb.userOffline = [p](std::string_view u) { ++p->offline[std::string(u)]; };
      cb.persist = [p](const roomkeeper::PersistCall& c) {
        if (c.op == roomkeeper::PersistOp::kTypingStoppedAll) ++p->wildcards[c.user];
        return true;
      };
      roomkeeper::KeeperOptions o;
      o.bus = p->node.get();
      o.clock = &p->clock;
      p->keeper = std::make_unique<roomkeeper::Keeper>(std::move(cb), o);
      // The host's post function, counted so that the test knows when
      // every loop is idle with nothing queued.
      REQUIRE(p->node->bind(*p->keeper, [this, p](std::function<void()> fn) {
        pending_.fetch_add(1);
        asio::post(p->io, [this, fn = std::move(fn)]() {
          fn();
          pending_.fetch_sub(1);
        });
      }));
      loops_.push_back(std::move(l));
    }
    for (auto& l : loops_) {
      guards_.emplace_back(asio::make_work_guard(l->io));
      l->thread = std::thread([io = &l->io]() { io->run(); });
    }
  }
  ~Loops() {
    onEach([](Loop& l) {
      if (l.keeper) l.keeper->shutdown();
    });
    settle();
    guards_.clear();
    for (auto& l : loops_) l->thread.join();
    for (auto& l : loops_) {
      l->keeper.reset();
      l->node.reset();
    }
  }
  std::size_t size() const { return loops_.size(); }
  Loop& at(std::size_t i) { return *loops_.at(i); }

  /// Runs fn(loop) on every loop's own thread at once; returns when all
  /// have finished (not when what they caused has been delivered).
  void onEach(const std::function<void(Loop&)>& fn) {
    std::vector<std::future<void>> done;
    for (auto& l : loops_) {
      auto task = std::make_shared<std::packaged_task<void()>>([&fn, p = l.get()]() { fn(*p); });
      done.push_back(task->get_future());
      pending_.fetch_add(1);
      asio::post(l->io, [this, task]() {
        (*task)();
        pending_.fetch_sub(1);
      });
    }
    for (auto& f : done) f.get();
  }
  /// Waits until no loop has anything queued or running.
  bool settle() {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (pending_.load() != 0) {
      if (std::chrono::steady_clock::now() > end) return false;
      std::this_thread::sleep_for(milliseconds(1));
    }
    return true;
  }
  roomkeeper::cluster::InProcessHub& hub() { return hub_; }

 private:
  roomkeeper::cluster::InProcessHub hub_;
  std::vector<std::unique_ptr<Loop>> loops_;
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards_;
  std::atomic<std::int64_t> pending_{0};
};

// Session s lives on loop s % n. User s / 2: its two devices, sessions 2u
// and 2u + 1, sit on two loops whenever n > 1.
std::string sessionOf(std::size_t s) { return "s" + std::to_string(s); }
std::string userOf(std::size_t s) { return "u" + std::to_string(s / 2); }
std::string threadOf(std::size_t s) { return std::to_string((s / 2) % 10); }
std::string crewOf(std::size_t s) { return "crew:" + std::to_string(s % 7); }

}  // namespace

TEST_CASE("multi-loop: a day on 1, 2 and 4 loops at once, every rule held, nothing left",
          "[cluster][multiloop]") {
  const std::size_t n = GENERATE(1, 2, 4);
  const std::size_t S = 240;
  CAPTURE(n);
  Loops loops(n);
  auto mine = [&](Loop& l) {
    std::vector<std::size_t> v;
    for (std::size_t i = 0; i < loops.size(); ++i)
      if (&loops.at(i) == &l)
        for (std::size_t s = i; s < S; s += loops.size()) v.push_back(s);
    return v;
  };

  // Connect: every loop its own sessions, all loops at once.
  std::atomic<int> bad{0};
  loops.onEach([&](Loop& l) {
    for (std::size_t s : mine(l)) {
      const std::string sid = sessionOf(s);
      if (l.keeper->connectAuthenticated(sid, userOf(s)) != Result::kOk) ++bad;
      for (const std::string& r : {crewOf(s), "thread:" + threadOf(s), std::string("all")})
        if (l.keeper->trackRoom(sid, r) != Result::kOk) ++bad;
    }
  });
  REQUIRE(loops.settle());
  CHECK(bad == 0);
  // Presence: every user online exactly once on every loop.
  for (std::size_t i = 0; i < n; ++i) {
    CHECK(loops.at(i).online.size() == S / 2);
    for (auto& [u, times] : loops.at(i).online) CHECK(times == 1);
    CHECK(loops.at(i).offline.empty());
  }

  // Broadcasts: every loop sends 30 to "all" from its first session, in
  // sequence, at the same time as the others.
  loops.onEach([&](Loop& l) {
    const std::string sender = sessionOf(mine(l).front());
    for (int k = 0; k < 30; ++k) {
      BroadcastTargets t;
      t.rooms = {"all"};
      t.sender = sender;
      (void)l.keeper->broadcast(t, "seq", sender + ":" + std::to_string(k));
    }
  });
  REQUIRE(loops.settle());
  // Each session heard each other sender's 30, in order, once each.
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t s : mine(loops.at(i))) {
      std::map<std::string, int> next;  // sender -> next k expected
      int heard = 0;
      for (const std::string& e : loops.at(i).got[sessionOf(s)]) {
        if (e.rfind("seq ", 0) != 0) continue;
        const std::string body = e.substr(4);
        const std::string from = body.substr(0, body.find(':'));
        const int k = std::stoi(body.substr(body.find(':') + 1));
        CHECK(from != sessionOf(s));
        CHECK(k == next[from]);
        next[from] = k + 1;
        ++heard;
      }
      const bool sends = s < n;  // the first session of each loop
      CHECK(heard == static_cast<int>(30 * (n - (sends ? 1 : 0))));
    }
  }

  // Typing: the even device of every user starts typing in its thread.
  loops.onEach([&](Loop& l) {
    for (std::size_t s : mine(l))
      if (s % 2 == 0 && l.keeper->startTyping(sessionOf(s), threadOf(s)) != Result::kOk) ++bad;
  });
  REQUIRE(loops.settle());
  CHECK(bad == 0);
  // Every member of a thread hears each other user typing there once,
  // whichever loop it is on; never its own user.
  auto countOf = [&](std::size_t s, const std::string& event) {
    std::map<std::string, int> by;  // typer -> times
    Loop& l = loops.at(s % n);
    for (const std::string& e : l.got[sessionOf(s)])
      if (e.rfind(event + " ", 0) == 0) {
        const auto at = e.find("\"userId\":\"");
        by[e.substr(at + 10, e.find('"', at + 10) - at - 10)]++;
      }
    return by;
  };
  const std::size_t usersPerThread = (S / 2) / 10;
  for (std::size_t s = 0; s < S; ++s) {
    auto by = countOf(s, "typingStarted");
    CHECK(by.size() == usersPerThread - 1);
    for (auto& [u, times] : by) {
      CHECK(u != userOf(s));
      CHECK(times == 1);
    }
  }
  // The 5 s auto-clear, on every loop's own clock.
  loops.onEach([&](Loop& l) {
    l.clock.advanceBy(milliseconds(5001));
    l.keeper->advance();
  });
  REQUIRE(loops.settle());
  for (std::size_t s = 0; s < S; ++s) {
    auto by = countOf(s, "typingStopped");
    CHECK(by.size() == usersPerThread - 1);
    for (auto& [u, times] : by) CHECK(times == 1);
  }

  // Disconnect everyone, all loops at once.
  loops.onEach([&](Loop& l) {
    for (std::size_t s : mine(l))
      if (l.keeper->disconnect(sessionOf(s)) != Result::kOk) ++bad;
  });
  REQUIRE(loops.settle());
  CHECK(bad == 0);
  std::map<std::string, int> wildcards;
  for (std::size_t i = 0; i < n; ++i) {
    CHECK(loops.at(i).offline.size() == S / 2);
    for (auto& [u, times] : loops.at(i).offline) CHECK(times == 1);
    for (auto& [u, times] : loops.at(i).wildcards) wildcards[u] += times;
    const auto st = loops.at(i).keeper->getMemoryStats();
    CHECK(st.connectedClients == 0);
    CHECK(st.trackedRooms == 0);
    CHECK(st.typingTimers == 0);
    CHECK(st.totalEntries == 0);
  }
  // Once per user, by whichever loop held the user's last session.
  CHECK(wildcards.size() == S / 2);
  for (auto& [u, times] : wildcards) CHECK(times == 1);
  CHECK(loops.hub().entries() == 0);
}

TEST_CASE("multi-loop: a loop's node destroyed with sessions in it is reaped for the others",
          "[cluster][multiloop]") {
  Loops loops(2);
  std::atomic<int> bad{0};  // (Catch's assertions are for the test's thread)
  loops.onEach([&](Loop& l) {
    const std::string who = &l == &loops.at(0) ? "gone" : "watcher";
    if (l.keeper->connectAuthenticated(who + "@s", who) != Result::kOk) ++bad;
    if (l.keeper->trackRoom(who + "@s", "thread:1") != Result::kOk) ++bad;
  });
  REQUIRE(loops.settle());
  loops.onEach([&](Loop& l) {
    if (&l == &loops.at(0) && l.keeper->startTyping("gone@s", "1") != Result::kOk) ++bad;
  });
  REQUIRE(loops.settle());
  CHECK(bad == 0);
  // Loop 0's Keeper and node go without a word, on loop 0's thread.
  loops.onEach([&](Loop& l) {
    if (&l != &loops.at(0)) return;
    l.keeper.reset();
    l.node.reset();
  });
  REQUIRE(loops.settle());
  Loop& w = loops.at(1);
  CHECK(w.offline["gone"] == 1);
  CHECK(w.wildcards["gone"] == 1);  // the only node left persists it
  int stopped = 0;
  for (auto& e : w.got["watcher@s"]) stopped += e.rfind("typingStopped", 0) == 0;
  CHECK(stopped == 1);
  loops.onEach([&](Loop& l) {
    if (l.keeper) (void)l.keeper->disconnect("watcher@s");
  });
  REQUIRE(loops.settle());
  CHECK(loops.hub().entries() == 0);
}
