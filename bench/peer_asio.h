// SPDX-License-Identifier: MIT
// File: bench/peer_asio.h
//
// The Boost.Asio peer for W2 (timers): boost::asio::steady_timer objects on
// one io_context, armed, restarted and cancelled without running the loop.
#ifndef ROOMKEEPER_BENCH_PEER_ASIO_H_
#define ROOMKEEPER_BENCH_PEER_ASIO_H_

#include "bench_util.h"

// W2 timers on boost::asio::steady_timer. Prints one JSON line.
void runTimersAsio(const BenchConfig& cfg);

#endif  // ROOMKEEPER_BENCH_PEER_ASIO_H_
