// SPDX-License-Identifier: MIT
// File: bench/peer_handwritten.h
//
// The hand-written C++ baseline: what a C++ server author writes without
// roomkeeper, a straightforward port of the original server's bookkeeping
// (shared/bench/peers/seed_gateway.js) onto the standard containers.
#ifndef ROOMKEEPER_BENCH_PEER_HANDWRITTEN_H_
#define ROOMKEEPER_BENCH_PEER_HANDWRITTEN_H_

#include <cstddef>

#include "bench_util.h"

// W1 rooms on std::unordered_map<std::string, std::unordered_set<std::string>>
// (socket -> rooms and room -> sockets). Prints one JSON line.
void runRoomsHandwritten(const BenchConfig& cfg);

// W3 dispatch: the whole seed gateway ported step by step, with a
// std::multimap timer queue. Prints one JSON line.
void runDispatchHandwritten(const BenchConfig& cfg, std::size_t sessions);

#endif  // ROOMKEEPER_BENCH_PEER_HANDWRITTEN_H_
