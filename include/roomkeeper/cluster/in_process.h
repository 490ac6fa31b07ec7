// SPDX-License-Identifier: MIT
// File: roomkeeper/cluster/in_process.h  (target roomkeeper::cluster)
//
// InProcessHub: the cluster backend for several Keepers in one process --
// one Keeper per event loop, each session owned by one loop -- with rooms,
// presence and typing spanning the loops, exactly as RedisNode spans
// processes. join() gives the cluster::Node for one Keeper.
//
// The hub keeps the shared view (which node holds which session, member,
// typing indicator) behind one mutex of its own, taken for the length of
// one map update and never while a Keeper or a host callback runs: what a
// change means for other Keepers is handed to them through their post
// functions, after the mutex is released, in order per sender.
//
// A node that is destroyed while its Keeper still held sessions (the
// in-process picture of a crashed server) is cleaned up as RedisNode's
// reaper cleans up a dead node: the other nodes hear userOffline and
// typingStopped for what went, and one of them persists the wildcard for
// each user left with no session.
//
// Thread safety: thread-safe. The hub must outlive its nodes.
#ifndef ROOMKEEPER_CLUSTER_IN_PROCESS_H_
#define ROOMKEEPER_CLUSTER_IN_PROCESS_H_

#include <memory>

#include "roomkeeper/cluster/node.h"

namespace roomkeeper::cluster {

class InProcessHub {
 public:
  InProcessHub();
  ~InProcessHub();
  InProcessHub(const InProcessHub&) = delete;
  InProcessHub& operator=(const InProcessHub&) = delete;

  /// A new node (id "loop-<n>"), not yet bound to a Keeper.
  std::unique_ptr<Node> join();
  /// Nodes alive, and entries held in the shared view (0 when every node's
  /// Keeper has shut down: nothing left behind).
  std::size_t nodes() const;
  std::size_t entries() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace roomkeeper::cluster

#endif  // ROOMKEEPER_CLUSTER_IN_PROCESS_H_
