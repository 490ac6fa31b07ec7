// SPDX-License-Identifier: MIT
// File: bench/ratelimit_workload.cc -- W5 ratelimit: Keeper::allow at
// 100,000 active keys of each scope (session, user, address).
//
// 100,000 authenticated sessions, each with its own user and its own client
// address, and three host kinds (one per scope, 10 a second, bursts of 20).
// A round checks every session once per kind in index order (as W2's
// restart: the prefetcher helps), then once more in a shuffled order (as
// messages arrive: every lookup a cache miss), then moves the clock 200 ms:
// two tokens back per round, so every check is allowed and none is free. Run on
// the ManualClock (the check itself) and on the steady clock (what a host
// that passes no clock pays, one clock read per check included).
#include "ratelimit_workload.h"

#include <roomkeeper/keeper.h>
#include <roomkeeper/version.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"

using namespace roomkeeper;

namespace {

void runOne(std::size_t keys, std::size_t rounds, bool manual) {
  ManualClock manualClock(SteadyTime{} + std::chrono::hours(1));
  KeeperOptions opt;
  opt.clock = manual ? static_cast<const Clock*>(&manualClock) : nullptr;
  opt.authTimeout = Millis{0};
  opt.rateLimits.maxKeys = keys * 2;
  opt.rateLimits.kinds = {{"message", RateScope::kSession, {10, 20}},
                          {"upload", RateScope::kUser, {10, 20}},
                          {"report", RateScope::kAddress, {10, 20}}};
  Keeper keeper(KeeperCallbacks{}, opt);
  std::vector<SessionHandle> handles(keys);
  for (std::size_t i = 0; i < keys; ++i) {
    const std::string id = sessionIdOf(i);
    const Result r = keeper.connectAuthenticated(
        id, "user-" + std::to_string(i), ClientAddress{"10." + std::to_string(i)}, &handles[i]);
    if (r != Result::kOk) std::abort();
  }
  std::mt19937_64 rng(42);
  std::vector<SessionHandle> order = handles;
  double ns[2][3] = {{0, 0, 0}, {0, 0, 0}};  // [index, random][kind]
  std::uint64_t allowed = 0, refused = 0;
  for (std::size_t round = 0; round < rounds; ++round) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int random = 0; random < 2; ++random) {
      const std::vector<SessionHandle>& seq = random ? order : handles;
      for (RateKindId kind = 0; kind < 3; ++kind) {
        Stopwatch sw;
        std::uint64_t okCount = 0;
        for (const SessionHandle h : seq) okCount += keeper.allow(h, kind) == Result::kOk;
        ns[random][kind] += static_cast<double>(sw.elapsedNs());
        allowed += okCount;
        refused += seq.size() - okCount;
      }
    }
    manualClock.advanceBy(std::chrono::milliseconds(200));
    if (!manual) {
      // The steady clock moves by itself; wait out the rest of 200 ms so
      // that two tokens are back for every key, as on the manual clock.
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
      while (std::chrono::steady_clock::now() < until) {
      }
    }
  }
  const MemoryStats st = keeper.getMemoryStats();
  const double checks = static_cast<double>(keys * rounds);
  JsonLine line;
  line.addString("workload", "ratelimit")
      .addString("system", "roomkeeper " ROOMKEEPER_VERSION_STRING " Keeper::allow")
      .addString("clock", manual ? "manual" : "steady")
      .addCount("keys", keys)
      .addCount("rounds", rounds)
      .addNumber("check_ns_per_op", ns[0][0] / checks)
      .addNumber("check_user_ns_per_op", ns[0][1] / checks)
      .addNumber("check_address_ns_per_op", ns[0][2] / checks)
      .addNumber("check_random_ns_per_op", ns[1][0] / checks)
      .addNumber("check_user_random_ns_per_op", ns[1][1] / checks)
      .addNumber("check_address_random_ns_per_op", ns[1][2] / checks)
      .addCount("allowed", allowed)
      .addCount("refused", refused)
      .addCount("rate_limit_keys", st.rateLimitKeys)
      .addNumber("bytes_per_session",
                 static_cast<double>(st.bytes) / static_cast<double>(keys));
  line.print();
  benchSink(allowed);
}

}  // namespace

void runRateLimitRoomkeeper(const BenchConfig& cfg) {
  const std::size_t keys = cfg.quick ? 2000 : 100000;
  const std::size_t rounds = cfg.quick ? 3 : 10;
  runOne(keys, rounds, true);
  runOne(keys, rounds, false);
}
