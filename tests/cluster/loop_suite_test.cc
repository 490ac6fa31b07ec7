// SPDX-License-Identifier: MIT
// The cluster behavioural suite on the in-process backend with every node's
// loop a real thread: what one Keeper's change means for the others runs
// on their own threads, at the same time. The test's own calls are made
// while the loops are paused (settle() lets them run until nothing is left
// queued anywhere), so that the suite's steps stay in a known order; the
// loops among themselves are concurrent (the CI runs this under TSan).
#include <roomkeeper/cluster/in_process.h>

#include <catch2/catch.hpp>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "cluster/world.h"

namespace rkt {

class LoopWorld {
  using InProcessHub = roomkeeper::cluster::InProcessHub;
  struct Loop {
    std::deque<std::function<void()>> q;
    std::thread thread;
  };

 public:
  explicit LoopWorld(std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      auto s = std::make_unique<Server>();
      s->node = hub_.join();
      makeKeeper(*s, &clock_);
      Loop* l = loops_.emplace_back(std::make_unique<Loop>()).get();
      REQUIRE(s->node->bind(*s->keeper, [this, l](std::function<void()> fn) {
        std::lock_guard<std::mutex> g(mu_);
        l->q.push_back(std::move(fn));
        ++pending_;
        cv_.notify_all();
      }));
      servers_.push_back(std::move(s));
    }
    for (auto& l : loops_) l->thread = std::thread([this, p = l.get()] { run(*p); });
  }
  ~LoopWorld() {
    for (auto& s : servers_)
      if (s->keeper) s->keeper->shutdown();
    settle();
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& l : loops_) l->thread.join();
  }
  Server& s(std::size_t i) { return *servers_.at(i); }
  /// Lets every loop run until nothing is queued or running anywhere.
  void settle() {
    std::unique_lock<std::mutex> g(mu_);
    open_ = true;
    cv_.notify_all();
    cv_.wait(g, [&] { return pending_ == 0; });
    open_ = false;
  }
  bool until(const std::function<bool()>& pred) {
    settle();
    return pred();
  }
  void advance(std::chrono::milliseconds d) {
    clock_.advanceBy(d);  // the loops are paused: nobody reads it now
    for (auto& s : servers_)
      if (s->keeper) s->keeper->advance();
  }
  std::size_t shared() const { return hub_.entries(); }

 private:
  void run(Loop& l) {
    std::unique_lock<std::mutex> g(mu_);
    for (;;) {
      cv_.wait(g, [&] { return stop_ || (open_ && !l.q.empty()); });
      if (stop_) return;
      std::function<void()> fn = std::move(l.q.front());
      l.q.pop_front();
      g.unlock();
      fn();
      g.lock();
      --pending_;
      cv_.notify_all();
    }
  }

  roomkeeper::ManualClock clock_;
  InProcessHub hub_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false, stop_ = false;
  std::size_t pending_ = 0;  // queued or running, every loop
  std::vector<std::unique_ptr<Loop>> loops_;
  std::vector<std::unique_ptr<Server>> servers_;
};

}  // namespace rkt

#define CLUSTER_WORLD rkt::LoopWorld
#include "cluster/suite.h"
