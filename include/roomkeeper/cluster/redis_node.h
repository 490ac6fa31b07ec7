// SPDX-License-Identifier: MIT
// File: roomkeeper/cluster/redis_node.h  (target roomkeeper::cluster)
//
// RedisNode: the cluster::Node of one server process on a shared Redis
// (one primary; Redis Cluster is not supported: the scripts span keys).
// Redis holds the shared view; every change is one Lua script that checks
// this node's lease (fencing), changes the state and publishes its diff in
// the same step -- one round trip, pipelined. docs/cluster.md has the key
// schema, the scripts and the failure table.
//
//   boost::asio::io_context io;
//   roomkeeper::cluster::RedisConfig rc;
//   rc.port = 6379;
//   roomkeeper::cluster::RedisNode node(io, rc);
//   roomkeeper::KeeperOptions o;
//   o.bus = &node;
//   roomkeeper::Keeper keeper(callbacks, o);
//   node.bind(keeper, [&](auto fn) { boost::asio::post(io, std::move(fn)); });
//   node.start();
//   ... io.run(); at the end: keeper.shutdown(); node.stop([]{});
//
// Three connections of its own: commands, the subscription, and the lease
// heartbeat (so bulk work never starves the lease). Nothing blocks the
// io_context; nothing about Redis makes a Keeper call fail or wait: while
// Redis is unreachable, local operation goes on and what cannot be sent
// is counted (ClusterStats::dropped) and dropped, never queued without
// bound. Back in touch, the node registers under a fresh id, replays its
// local state (Keeper::replayToBus) and removes what its old id held: the
// other nodes hear only the differences.
//
// Leases: a fresh node id at each start; a lease (default 5 s) renewed
// every 80-100 % of lease/5 (spread at random, so that nodes started
// together do not beat together), judged by Redis TIME. A node whose lease has
// expired is fenced: its scripts are refused, and it re-registers. Any
// node that has held its own lease for a full lease period removes the
// sessions, memberships, presence and typing of a dead node (an NX lock
// per dead node; batches that can be resumed by anyone), and the
// survivors hear userOffline and typingStopped for what went.
//
// Threading: thread-safe. The node's own work runs on a strand of the
// io_context (so a thread pool may run it); Bus events may come from any
// thread (a SyncKeeper's callers, its driver) and are handed to the strand
// in order; commands for the Keeper go through bind()'s post (a plain
// Keeper: post onto its thread; a SyncKeeper: any). Destroy the node after
// stop() has completed or after the io_context has stopped. Ids containing
// the byte 0x1F are not shared (counted as dropped).
#ifndef ROOMKEEPER_CLUSTER_REDIS_NODE_H_
#define ROOMKEEPER_CLUSTER_REDIS_NODE_H_

// Before Asio: Boost 1.74's asio/awaitable.hpp uses std::exchange without
// including <utility> (a C++20 build fails without this).
#include <utility>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "roomkeeper/cluster/node.h"

namespace roomkeeper::cluster {

struct RedisConfig {
  std::string host = "127.0.0.1";              // an IP address (no name lookup)
  std::uint16_t port = 6379;
  std::string keyPrefix = "rk";               // every key and channel starts "<prefix>:"
  std::chrono::milliseconds lease{5000};       // a node silent this long is dead
  std::chrono::milliseconds requestTimeout{2000};
  std::chrono::milliseconds reconnectMin{100}; // backoff doubles up to Max
  std::chrono::milliseconds reconnectMax{2000};
  std::size_t reapBatch = 500;                 // entries per reap script
  std::size_t maxPending = 500000;             // commands in flight per connection
  LogFn log;
};

/// What RedisNode::audit() found: keys that no registered node accounts
/// for, or that would never expire. Empty when the namespace is clean.
struct AuditReport {
  bool ok = false;                   // the audit ran (Redis reachable)
  std::size_t keys = 0;              // keys in the namespace
  std::vector<std::string> orphans;  // the keys
};

class RedisNode final : public Node {
 public:
  RedisNode(boost::asio::io_context& io, RedisConfig config);
  /// Closes the connections; a node that was not stopped is left to the
  /// other nodes' reaper (as after a crash).
  ~RedisNode() override;
  RedisNode(const RedisNode&) = delete;
  RedisNode& operator=(const RedisNode&) = delete;

  bool bind(BusTarget& keeper, Post post) override;
  /// Connects and registers (asynchronously; reconnects by itself).
  void start();
  /// A clean stop, after the Keeper's shutdown: removes whatever this node
  /// still holds in Redis, deregisters, closes; then `done`.
  void stop(std::function<void()> done);

  /// Lists what in the namespace no registered node accounts for (a script
  /// over KEYS: an operations call, not for the hot path).
  void audit(std::function<void(AuditReport)> done);
  /// Redis keys of the namespace (operations and tests).
  void keyCount(std::function<void(std::size_t)> done);

  // Bus
  void sessionUp(std::string_view session, std::string_view user) override;
  void sessionDown(std::string_view session, std::string_view user) override;
  void joined(std::string_view session, std::string_view room) override;
  void left(std::string_view session, std::string_view room) override;
  void typing(std::string_view user, std::string_view thread, bool started) override;
  void broadcast(const BroadcastTargets& targets, std::string_view event,
                 std::string_view payload) override;
  bool typingElsewhere(std::string_view user, std::string_view thread) const noexcept override;

  // Node
  void roomSize(std::string room, std::function<void(std::size_t)> done) override;
  void roomMembers(std::string room, std::function<void(std::vector<std::string>)> done) override;
  void isOnline(std::string user, std::function<void(bool)> done) override;
  std::string id() const override;
  ClusterStats stats() const override;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace roomkeeper::cluster

#endif  // ROOMKEEPER_CLUSTER_REDIS_NODE_H_
