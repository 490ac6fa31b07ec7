// SPDX-License-Identifier: MIT
// File: roomkeeper/cluster/node.h  (target roomkeeper::cluster)
//
// cluster::Node: one Keeper's place in a cluster of Keepers -- the Bus that
// Keeper reports to (roomkeeper/bus.h), plus cluster-wide queries. There
// are two backends behind this one interface:
//   * RedisNode (redis_node.h): Keepers in several server processes, on one
//     Redis, over the host's Boost.Asio io_context;
//   * InProcessHub (in_process.h): Keepers on several event loops of one
//     process (and the tests' reference for the Redis one).
// The same behavioural test suite runs against both (tests/cluster/).
//
//   auto node = hub.join();                 // or RedisNode(io, config)
//   roomkeeper::KeeperOptions o;
//   o.bus = node.get();
//   roomkeeper::Keeper keeper(callbacks, o);
//   node->bind(keeper, [&](auto fn) { asio::post(io, std::move(fn)); });
//   ... keeper.broadcast({{"job:42"}}, "jobUpdated", json);  // every node
//
// What is cluster-wide (see docs/cluster.md for the guarantees):
//   * broadcast(): the members of the named rooms on every node, once each,
//     with the local rules (union of rooms, except rooms, not the sender);
//   * presence: userOnline on every node when a user's first session in the
//     cluster connects, userOffline when the last one goes;
//   * typing: one indicator per user and thread; typingStarted/Stopped to
//     the thread's members on every node; the wildcard kTypingStoppedAll
//     persisted once, by the node of the user's last session;
//   * roomSize/roomMembers/isOnline: eventually consistent answers.
// Session ids must be unique across the cluster (as socket ids are).
//
// Lifetimes: create the node, then the Keeper (with KeeperOptions::bus),
// then bind(). Destroy (or shut down) the Keeper before the node, and the
// node before the loop its post function feeds (its io_context): the
// Keeper's shutdown reports every session down, so the node leaves nothing
// behind. Thread safety: a node's Bus events come from its Keeper's thread;
// queries and stats() may be called from any thread; answers and commands
// run through the post function on the Keeper's thread.
#ifndef ROOMKEEPER_CLUSTER_NODE_H_
#define ROOMKEEPER_CLUSTER_NODE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "roomkeeper/bus.h"
#include "roomkeeper/keeper.h"

namespace roomkeeper::cluster {

/// Runs a function on the bound Keeper's own thread, in call order (Asio:
/// post onto its io_context). Called from any thread, possibly while the
/// Keeper (a SyncKeeper) holds its lock: it must be thread-safe and must
/// queue the function, never run it inline (asio::post, not dispatch).
using Post = std::function<void(std::function<void()>)>;

/// Cluster counters and gauges (also in prometheusText()/statsJson()).
struct ClusterStats {
  bool connected = false;          // Redis reachable (in-process: always true)
  std::int64_t leaseAgeMs = -1;    // since the last renewed lease; -1 = none
  std::size_t nodes = 0;           // live nodes known
  std::uint64_t published = 0;     // messages and changes sent to the cluster
  std::uint64_t received = 0;      // messages from other nodes applied here
  std::uint64_t dropped = 0;       // changes that could not be sent (Redis down)
  std::uint64_t nodesReaped = 0;   // dead nodes this node cleaned up
  std::uint64_t resyncs = 0;       // full resynchronisations (reconnects)
  std::uint64_t fenced = 0;        // times this node found its lease lost
};

class Node : public Bus {
 public:
  ~Node() override = default;
  /// Binds the Keeper (or SyncKeeper) that reports to this node (its
  /// KeeperOptions::bus is this node); commands for it and query answers
  /// run through `post`. Call once, before the Keeper's first call.
  /// Returns false if already bound (or `post` is empty).
  virtual bool bind(BusTarget& keeper, Post post) = 0;
  /// Cluster-wide queries, answered once through the post function.
  virtual void roomSize(std::string room, std::function<void(std::size_t)> done) = 0;
  virtual void roomMembers(std::string room,
                           std::function<void(std::vector<std::string>)> done) = 0;
  virtual void isOnline(std::string user, std::function<void(bool)> done) = 0;
  /// This node's id (fresh at every start).
  virtual std::string id() const = 0;
  virtual ClusterStats stats() const = 0;
  /// Prometheus text for the cluster gauges and counters (roomkeeper_cluster_*).
  std::string prometheusText() const;
  /// The same as one JSON object.
  std::string statsJson() const;
};

}  // namespace roomkeeper::cluster

#endif  // ROOMKEEPER_CLUSTER_NODE_H_
