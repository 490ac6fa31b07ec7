// SPDX-License-Identifier: MIT
// File: bench/roomkeeper_workloads.h
//
// The roomkeeper side of the three benchmark workloads (WORKLOAD.md). Each
// function runs one workload on roomkeeper and prints ONE JSON line to stdout
// (use JsonLine from bench_util.h), with the same keys as its peers:
//
//   rooms:    workload, system, sessions, session_ids, join_ns_per_op,
//             fanout_ns_per_member, leave_ns_per_op, disconnect_ns_per_session,
//             bytes_per_membership, rooms_left, sessions_left
//   timers:   workload, system, timers, restarts, arm_ns_per_op,
//             restart_ns_per_op, cancel_ns_per_op, bytes_per_timer,
//             fire_ns_per_timer, fired
//   dispatch: workload, system, sessions, session_ids, restarts,
//             connect_ns_per_session, typing_restart_ns_per_op,
//             stop_and_unsubscribe_ns_per_session, disconnect_ns_per_session,
//             bytes_per_session, peak{...}, left{...} (+ threads)
#ifndef ROOMKEEPER_BENCH_ROOMKEEPER_WORKLOADS_H_
#define ROOMKEEPER_BENCH_ROOMKEEPER_WORKLOADS_H_

#include <cstddef>
#include <vector>

#include "bench_util.h"

// W1 rooms: cfg.sessions sessions.
// batched: each session joins its rooms with one trackRooms call (a line
// of its own; WORKLOAD.md's join is one call per room).
void runRoomsRoomkeeper(const BenchConfig& cfg, bool handles = false, bool batched = false);

// W2 timers: cfg.timers timers, cfg.restarts restart rounds, plus the fire
// phase.
void runTimersRoomkeeper(const BenchConfig& cfg);

// W3 dispatch: `sessions` sessions, cfg.restarts restart rounds, on
// `threads` threads (1 = single-threaded keeper).
// threads == 0: the single-threaded Keeper; >= 1: SyncKeeper on that many
// threads. handles: address sessions by the SessionHandle from connect
// (WORKLOAD.md allows it; the output says "session_ids":"handle").
void runDispatchRoomkeeper(const BenchConfig& cfg, std::size_t sessions,
                           int threads, bool handles = false);

#if ROOMKEEPER_BENCH_CLUSTER
// W3t dispatch_threads: the W3 day on each thread count of `threads` (the
// first must be 1: scaling = day(1) / day(N)), once as one Keeper per
// thread joined by an InProcessHub, once through one shared SyncKeeper.
//   keys: workload, system, sessions, threads, restarts, day_ns_per_session,
//         scaling, emitted, (cross_loop_commands, hub_entries_left), left{...}
void runDispatchThreadsRoomkeeper(const BenchConfig& cfg, std::size_t sessions,
                                  const std::vector<std::size_t>& threads);
#endif

#endif  // ROOMKEEPER_BENCH_ROOMKEEPER_WORKLOADS_H_
