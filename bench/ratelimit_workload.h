// SPDX-License-Identifier: MIT
// File: bench/ratelimit_workload.h -- W5 ratelimit (Keeper::allow).
//   keys: workload, system, clock, keys, rounds, check_ns_per_op (session
//         scope, index order), check_user_ns_per_op, check_address_ns_per_op,
//         the same three in shuffled order (check_random_ns_per_op, ...), allowed,
//         refused, rate_limit_keys, bytes_per_session (the whole Keeper)
#ifndef ROOMKEEPER_BENCH_RATELIMIT_WORKLOAD_H_
#define ROOMKEEPER_BENCH_RATELIMIT_WORKLOAD_H_

#include "bench_util.h"

// One line on the ManualClock, one on the steady clock.
void runRateLimitRoomkeeper(const BenchConfig& cfg);

#endif  // ROOMKEEPER_BENCH_RATELIMIT_WORKLOAD_H_
