// SPDX-License-Identifier: MIT
// File: bench/main.cc
//
// roomkeeper-bench: runs the workloads of shared/bench/WORKLOAD.md on
// roomkeeper and on its in-process peers, one JSON line per (workload,
// system), roomkeeper first.
//
//   roomkeeper-bench [--workload rooms|timers|dispatch|all] [--sessions N]
//                    [--dispatch-sessions N] [--timers N] [--restarts K]
//                    [--quick]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "peer_asio.h"
#include "peer_handwritten.h"
#include "ratelimit_workload.h"
#include "roomkeeper_workloads.h"
#if ROOMKEEPER_BENCH_CLUSTER
#include "cluster_workload.h"
#endif

namespace {

constexpr std::size_t kQuickSessions = 2000;
constexpr std::size_t kQuickTimers = 20000;
constexpr std::size_t kQuickDispatchSessions = 2000;

// The W3 scaling run (not with --quick): roomkeeper alone at these sizes and
// thread counts, to show that per-session costs do not grow with S.

void printUsage(std::FILE* out) {
  std::fprintf(
      out,
      "usage: roomkeeper-bench [--workload rooms|timers|dispatch|dispatch_threads|\n"
      "                         ratelimit|all|cluster]\n"
      "                        [--sessions N] [--dispatch-sessions N]\n"
      "                        [--timers N] [--restarts K] [--quick]\n"
      "\n"
      "  --workload W          which workload to run (default: all)\n"
      "  --sessions N          W1 rooms sessions (default 200000); W4 cluster\n"
      "                        sessions (default 3000; cluster starts its own\n"
      "                        redis-server and 3 node processes, and runs only\n"
      "                        when named)\n"
      "  --dispatch-sessions N W3 and W3t dispatch sessions (default 20000)\n"
      "  --timers N            W2 timers (default 1000000)\n"
      "  --restarts K          W2/W3 restart rounds (default 10)\n"
      "  --quick               small sizes: sessions 2000, timers 20000,\n"
      "                        dispatch 2000; no W3 scaling run\n"
      "\n"
      "Prints one JSON line per (workload, system).\n");
}

bool parseSize(const char* text, std::size_t* out) {
  if (text == nullptr || *text == '\0') return false;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text, &end, 10);
  if (*end != '\0' || value == 0 || text[0] == '-') return false;
  *out = static_cast<std::size_t>(value);
  return true;
}

void runRooms(const BenchConfig& cfg) {
  runRoomsRoomkeeper(cfg);
  runRoomsRoomkeeper(cfg, /*handles=*/true);
  runRoomsRoomkeeper(cfg, /*handles=*/false, /*batched=*/true);
  runRoomsRoomkeeper(cfg, /*handles=*/true, /*batched=*/true);
  runRoomsHandwritten(cfg);
}

void runTimers(const BenchConfig& cfg) {
  runTimersRoomkeeper(cfg);
  runTimersAsio(cfg);
}

void runDispatch(const BenchConfig& cfg) {
  // threads == 0: the single-threaded Keeper; >= 1: SyncKeeper on N threads.
  runDispatchRoomkeeper(cfg, cfg.dispatchSessions, 0);
  runDispatchRoomkeeper(cfg, cfg.dispatchSessions, 0, /*handles=*/true);
  runDispatchHandwritten(cfg, cfg.dispatchSessions);
  if (cfg.quick) {
    runDispatchRoomkeeper(cfg, cfg.dispatchSessions, 2);  // smoke the locked path
    return;
  }
  // Scaling: per-session disconnect cost at 10x the sessions.
  runDispatchRoomkeeper(cfg, cfg.dispatchSessions * 10, 0);
  runDispatchRoomkeeper(cfg, cfg.dispatchSessions * 10, 0, /*handles=*/true);
  // The thread-safe way: throughput with 1 and 2 threads.
  runDispatchRoomkeeper(cfg, cfg.dispatchSessions, 1);
  runDispatchRoomkeeper(cfg, cfg.dispatchSessions, 2);
}

}  // namespace

int main(int argc, char** argv) {
#if ROOMKEEPER_BENCH_CLUSTER
  // A node process of W4, started by the parent below.
  if (argc > 1 && std::string(argv[1]) == "--cluster-node") return runClusterNode(argc, argv);
#endif
  std::string workload = "all";
  bool quick = false;
  // Explicit sizes win over --quick, whatever the order of the flags.
  std::vector<std::pair<std::string, std::size_t>> sizes;

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--help" || arg == "-h") {
      printUsage(stdout);
      return 0;
    } else if (arg == "--quick") {
      quick = true;
    } else if (arg == "--workload") {
      if (value == nullptr) {
        std::fprintf(stderr, "roomkeeper-bench: --workload needs a value\n");
        return 2;
      }
      workload = value;
      ++i;
    } else if (arg == "--sessions" || arg == "--dispatch-sessions" ||
               arg == "--timers" || arg == "--restarts") {
      std::size_t n = 0;
      if (!parseSize(value, &n)) {
        std::fprintf(stderr, "roomkeeper-bench: %s needs a positive number\n",
                     arg.c_str());
        return 2;
      }
      sizes.emplace_back(arg, n);
      ++i;
    } else {
      std::fprintf(stderr, "roomkeeper-bench: unknown argument '%s'\n",
                   arg.c_str());
      printUsage(stderr);
      return 2;
    }
  }

  const bool runAll = workload == "all";
  if (!runAll && workload != "rooms" && workload != "timers" &&
      workload != "dispatch" && workload != "dispatch_threads" && workload != "cluster" &&
      workload != "ratelimit") {
    std::fprintf(stderr, "roomkeeper-bench: unknown workload '%s'\n",
                 workload.c_str());
    printUsage(stderr);
    return 2;
  }

  BenchConfig cfg;
  cfg.quick = quick;
  if (quick) {
    cfg.sessions = kQuickSessions;
    cfg.timers = kQuickTimers;
    cfg.dispatchSessions = kQuickDispatchSessions;
  }
  for (const auto& size : sizes) {
    if (size.first == "--sessions") cfg.sessions = size.second;
    if (size.first == "--dispatch-sessions") cfg.dispatchSessions = size.second;
    if (size.first == "--timers") cfg.timers = size.second;
    if (size.first == "--restarts") cfg.restarts = size.second;
  }

  if (runAll || workload == "rooms") runRooms(cfg);
  if (runAll || workload == "timers") runTimers(cfg);
  if (runAll || workload == "dispatch") runDispatch(cfg);
  if (runAll || workload == "ratelimit") runRateLimitRoomkeeper(cfg);
  if (runAll || workload == "dispatch_threads") {
#if ROOMKEEPER_BENCH_CLUSTER
    // W3t: 1 and 2 threads (and 4 where the machine has the cores).
    std::vector<std::size_t> threads{1, 2};
    if (std::thread::hardware_concurrency() >= 4) threads.push_back(4);
    runDispatchThreadsRoomkeeper(cfg, cfg.dispatchSessions, threads);
#else
    if (!runAll) {
      std::fprintf(stderr, "roomkeeper-bench: built without roomkeeper::cluster\n");
      return 2;
    }
#endif
  }
  // W4 starts its own redis-server and node processes: asked for by name
  // only (not part of "all").
  if (workload == "cluster") {
#if ROOMKEEPER_BENCH_CLUSTER
    std::size_t sessions = 3000;
    for (const auto& size : sizes)
      if (size.first == "--sessions") sessions = size.second;
    runClusterWorkload(argv[0], sessions);
#else
    std::fprintf(stderr, "roomkeeper-bench: built without roomkeeper::cluster\n");
    return 2;
#endif
  }
  return 0;
}
