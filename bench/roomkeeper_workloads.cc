// SPDX-License-Identifier: MIT
// File: bench/roomkeeper_workloads.cc
//
// STUBS, TO BE REPLACED: the roomkeeper side of the workloads is not written
// yet. These empty bodies only let roomkeeper-bench link; they print nothing.
#include "roomkeeper_workloads.h"

#include <cstddef>

#include "bench_util.h"

void runRoomsRoomkeeper(const BenchConfig& /*cfg*/) {
  // TODO(stub): W1 rooms on roomkeeper::SessionRegistry.
}

void runTimersRoomkeeper(const BenchConfig& /*cfg*/) {
  // TODO(stub): W2 timers on roomkeeper::TimerService.
}

void runDispatchRoomkeeper(const BenchConfig& /*cfg*/,
                           std::size_t /*sessions*/, int /*threads*/) {
  // TODO(stub): W3 dispatch on roomkeeper::Keeper.
}
