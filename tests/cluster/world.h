// SPDX-License-Identifier: MIT
// File: tests/cluster/world.h -- what the cluster behavioural suite needs
// of a backend: N nodes, each a real Keeper bound to a cluster::Node, with
// what each Keeper's host saw recorded. A backend supplies makeNode(),
// pump() (run what is due on every node's loop) and settle().
#ifndef ROOMKEEPER_TESTS_CLUSTER_WORLD_H_
#define ROOMKEEPER_TESTS_CLUSTER_WORLD_H_

#include <roomkeeper/cluster/node.h>
#include <roomkeeper/roomkeeper.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace rkt {

struct Emit {
  std::string session, event, payload;
};

/// One server: its Keeper, its node, and its host's record.
struct Server {
  std::unique_ptr<roomkeeper::cluster::Node> node;
  std::unique_ptr<roomkeeper::Keeper> keeper;
  std::vector<Emit> emits;
  std::vector<std::string> online, offline;  // users, in order
  std::vector<roomkeeper::PersistCall> persisted;
  std::vector<std::string> left;  // "session room"
  bool stopped = false;            // the node was stopped (backends that stop)

  std::size_t count(std::string_view session, std::string_view event) const {
    return static_cast<std::size_t>(std::count_if(emits.begin(), emits.end(), [&](const Emit& e) {
      return e.session == session && e.event == event;
    }));
  }
  std::size_t countEvent(std::string_view event) const {
    return static_cast<std::size_t>(std::count_if(
        emits.begin(), emits.end(), [&](const Emit& e) { return e.event == event; }));
  }
  std::size_t wildcards(std::string_view user) const {
    return static_cast<std::size_t>(
        std::count_if(persisted.begin(), persisted.end(), [&](const roomkeeper::PersistCall& c) {
          return c.op == roomkeeper::PersistOp::kTypingStoppedAll && c.user == user;
        }));
  }
};

/// Makes the Keeper for a node with callbacks that record into `s`.
inline void makeKeeper(Server& s, const roomkeeper::Clock* clock) {
  roomkeeper::KeeperCallbacks cb;
  cb.emit = [&s](std::string_view session, std::string_view event, std::string_view payload) {
    s.emits.push_back({std::string(session), std::string(event), std::string(payload)});
  };
  cb.userOnline = [&s](std::string_view u) { s.online.emplace_back(u); };
  cb.userOffline = [&s](std::string_view u) { s.offline.emplace_back(u); };
  cb.persist = [&s](const roomkeeper::PersistCall& c) {
    s.persisted.push_back(c);
    return true;
  };
  cb.leave = [&s](std::string_view session, std::string_view room) {
    s.left.push_back(std::string(session) + " " + std::string(room));
  };
  roomkeeper::KeeperOptions o;
  o.bus = s.node.get();
  o.clock = clock;
  o.authTimeout = roomkeeper::Millis{0};
  s.keeper = std::make_unique<roomkeeper::Keeper>(std::move(cb), o);
}

}  // namespace rkt

#endif  // ROOMKEEPER_TESTS_CLUSTER_WORLD_H_
