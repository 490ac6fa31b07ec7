// SPDX-License-Identifier: MIT
// Driving roomkeeper's timers from a Boost.Asio steady_timer: the host's own
// io_context fires typing auto-clears and auth deadlines; roomkeeper starts
// no thread. The pattern: after anything that may arm a timer, re-aim one
// steady_timer at keeper.nextDeadline(); when it expires, keeper.advance().
#include <roomkeeper/roomkeeper.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstdio>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

class AsioTimerDriver {
 public:
  AsioTimerDriver(asio::io_context& io, roomkeeper::Keeper& keeper)
      : timer_(io), keeper_(keeper) {}

  // Call after any keeper call that may have armed an earlier timer.
  void reschedule() {
    const auto next = keeper_.nextDeadline();
    if (!next) {
      timer_.cancel();
      armed_ = false;
      return;
    }
    if (armed_ && *next >= aimedAt_) return;  // already aimed early enough
    aimedAt_ = *next;
    armed_ = true;
    timer_.expires_at(*next);  // SteadyTime is steady_clock::time_point
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      armed_ = false;
      keeper_.advance();
      reschedule();
    });
  }

 private:
  asio::steady_timer timer_;
  roomkeeper::Keeper& keeper_;
  roomkeeper::SteadyTime aimedAt_{};
  bool armed_ = false;
};

int main() {
  asio::io_context io;
  int stopped = 0, closed = 0;
  roomkeeper::KeeperCallbacks cb;
  cb.emit = [&](std::string_view s, std::string_view ev, std::string_view) {
    std::printf("  -> %.*s: %.*s\n", int(s.size()), s.data(), int(ev.size()), ev.data());
    if (ev == "typingStopped") ++stopped;
  };
  cb.closeSession = [&](std::string_view s, std::string_view why) {
    std::printf("  close %.*s (%.*s)\n", int(s.size()), s.data(), int(why.size()), why.data());
    ++closed;
  };
  roomkeeper::KeeperOptions opt;
  opt.typing.timeout = 50ms;  // short, so the example finishes quickly
  opt.authTimeout = 120ms;
  roomkeeper::Keeper keeper(cb, opt);
  AsioTimerDriver driver(io, keeper);

  asio::post(io, [&] {
    (void)keeper.connectAuthenticated("sock-1", "alice");
    (void)keeper.connectAuthenticated("sock-2", "bob");
    (void)keeper.connect("sock-3");  // never authenticates
    (void)keeper.trackRoom("sock-1", "thread:9");
    (void)keeper.trackRoom("sock-2", "thread:9");
    (void)keeper.startTyping("sock-1", "9");
    driver.reschedule();
  });
  io.run();  // returns when no timer is left: everything fired or was cleared

  const roomkeeper::MemoryStats st = keeper.getMemoryStats();
  std::printf("typingStopped=%d closed=%d typingTimers=%zu connectionTimers=%zu sessions=%zu\n",
              stopped, closed, st.typingTimers, st.connectionTimers, st.connectedClients);
  (void)keeper.disconnect("sock-1");
  (void)keeper.disconnect("sock-2");
  if (stopped == 1 && closed == 1 && keeper.getMemoryStats().connectedClients == 0 &&
      keeper.getMemoryStats().timersPending == 0) {
    std::printf("all timers fired through asio and everything was cleaned\n");
    return 0;
  }
  return 1;
}
