// SPDX-License-Identifier: MIT
// File: bench/cluster_workload.h -- W4 `cluster` (WORKLOAD.md): node
// processes on one redis-server, all started by the benchmark.
#ifndef ROOMKEEPER_BENCH_CLUSTER_WORKLOAD_H_
#define ROOMKEEPER_BENCH_CLUSTER_WORKLOAD_H_

#include <cstddef>

/// The parent: starts redis-server and 3 node processes (`self` again),
/// runs the phases, prints one JSON line.
void runClusterWorkload(const char* self, std::size_t sessions);
/// A node process: roomkeeper-bench --cluster-node INDEX NODES SESSIONS PORT.
int runClusterNode(int argc, char** argv);

#endif  // ROOMKEEPER_BENCH_CLUSTER_WORKLOAD_H_
