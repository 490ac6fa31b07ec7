// SPDX-License-Identifier: MIT
// File: bench/peer_asio.cc
//
// W2 on Boost.Asio: T boost::asio::steady_timer objects on one io_context.
//   arm     = expires_after(5 s) + async_wait
//   restart = expires_after(5 s) + async_wait, K rounds over every timer in
//             index order, then K rounds in WORKLOAD.md's random order
//   cancel  = cancel()
// The loop is not run while measuring (time does not advance). Every
// expires_after on a timer with a pending wait, and every cancel, completes
// that wait with operation_aborted: the handler is queued on the io_context
// and stays allocated until the loop runs it. So after the cancel phase the
// benchmark runs io_context::poll() outside the timed regions (after the
// index-order rounds and after the cancel phase) to run and free those
// T * (2K + 1) handlers, and reports how many it drained.
//
// The fire phase of W2 needs a clock the benchmark can advance; a
// steady_timer waits for the real steady clock, so that phase is skipped for
// this peer ("fire":"skipped").
#include "peer_asio.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/system/error_code.hpp>
#include <boost/version.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "bench_util.h"

namespace {

std::string asioSystemName() {
  return "boost.asio steady_timer (boost " +
         std::to_string(BOOST_VERSION / 100000) + "." +
         std::to_string(BOOST_VERSION / 100 % 1000) + "." +
         std::to_string(BOOST_VERSION % 100) + ")";
}

}  // namespace

void runTimersAsio(const BenchConfig& cfg) {
  const std::size_t count = cfg.timers;
  const std::size_t restarts = cfg.restarts;
  constexpr std::chrono::milliseconds kTimeout{kTypingTimeoutMs};

  JsonLine line;
  {
    boost::asio::io_context io;
    std::uint64_t aborted = 0;
    auto onTimer = [&aborted](const boost::system::error_code& ec) {
      if (ec == boost::asio::error::operation_aborted) ++aborted;
    };

    const std::size_t before = bytesInUse();
    // The timer objects are created before the clock starts: a server keeps
    // one per session (as a member) and arms it when typing starts.
    std::vector<boost::asio::steady_timer> timers;
    timers.reserve(count);
    for (std::size_t i = 0; i < count; ++i) timers.emplace_back(io);

    // arm
    Stopwatch sw;
    for (boost::asio::steady_timer& t : timers) {
      t.expires_after(kTimeout);
      t.async_wait(onTimer);
    }
    const std::uint64_t armNs = sw.elapsedNs();
    const std::size_t armed = bytesInUse();

    // restart: K rounds
    sw.restart();
    for (std::size_t k = 0; k < restarts; ++k) {
      for (boost::asio::steady_timer& t : timers) {
        t.expires_after(kTimeout);
        t.async_wait(onTimer);
      }
    }
    const std::uint64_t restartNs = sw.elapsedNs();

    // Not timed: run the aborted handlers of the index-order rounds first,
    // so the random-order rounds start from the same queue as those did.
    std::uint64_t drained = io.poll();

    // restart in random order: round k restarts timer (i * 7919 + k * 104729) % count
    const std::size_t step = 7919 % count;
    sw.restart();
    for (std::size_t k = 0; k < restarts; ++k) {
      std::size_t idx = (k * 104729) % count;
      for (std::size_t i = 0; i < count; ++i) {
        timers[idx].expires_after(kTimeout);
        timers[idx].async_wait(onTimer);
        idx += step;
        if (idx >= count) idx -= count;
      }
    }
    const std::uint64_t restartRandomNs = sw.elapsedNs();

    // cancel
    std::uint64_t cancelled = 0;
    sw.restart();
    for (boost::asio::steady_timer& t : timers) cancelled += t.cancel();
    const std::uint64_t cancelNs = sw.elapsedNs();
    benchSink(cancelled);

    // Not timed: run the aborted handlers so their memory is freed.
    drained += io.poll();
    benchSink(aborted);

    line.addString("workload", "timers")
        .addString("system", asioSystemName())
        .addCount("timers", count)
        .addCount("restarts", restarts)
        .addNumber("arm_ns_per_op", perOp(armNs, count))
        .addNumber("restart_ns_per_op", perOp(restartNs, count * restarts))
        .addNumber("restart_random_ns_per_op", perOp(restartRandomNs, count * restarts))
        .addNumber("cancel_ns_per_op", perOp(cancelNs, count))
        .addNumber("bytes_per_timer", bytesPer(before, armed, count))
        .addString("fire", "skipped")
        .addCount("drained_handlers", drained);
  }
  line.print();
}
