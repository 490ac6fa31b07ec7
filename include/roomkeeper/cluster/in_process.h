// SPDX-License-Identifier: MIT
// File: roomkeeper/cluster/in_process.h  (target roomkeeper::cluster)
//
// InProcessHub: the cluster backend for several Keepers in one process --
// one Keeper per event loop, each session owned by one loop -- with rooms,
// presence and typing spanning the loops, exactly as RedisNode spans
// processes. join() gives the cluster::Node for one Keeper.
//
//   hub: InProcessHub            loop i: io_context + thread
//   node_i = hub.join()          Keeper k_i(callbacks, {.bus = node_i.get()})
//   node_i->bind(k_i, [&io_i](auto fn) { asio::post(io_i, std::move(fn)); });
//   each session lives on one loop; every call about it is made there.
//
// No lock is shared by every change (the hot path):
//   * memberships are not copied (Bus::wantsMemberships() is false): a
//     broadcast is handed to every other loop, whose Keeper delivers it to
//     its own members; roomSize/roomMembers ask every loop's Keeper
//     (BusTarget::localRoomSize/localRoomMembers) and answer when all have;
//   * a user's first and last session anywhere and a user's typing in a
//     thread are decided in one of 64 shards by key, each with its mutex;
//   * what a change means for another loop goes into that loop's inbox in
//     the order it was decided, and the loop is woken through its post
//     function once per batch, after every lock is released; the wake runs
//     the whole inbox on the loop's thread, in order per sender;
//   * presence and typing edges wake their target loops at the end of the
//     deciding loop's turn (the node posts itself one flush per batch), so
//     an idle loop is woken once for many edges; a broadcast wakes them at
//     once (and with it whatever was queued ahead of it). So a loop's last
//     edges (its Keeper's shutdown()) reach the other loops when it runs
//     its queue once more, or at the latest when its node is destroyed.
// No mutex is ever held while a Keeper or a host callback runs.
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
