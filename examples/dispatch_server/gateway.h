// SPDX-License-Identifier: MIT
// The dispatch example's WebSocket gateway: Boost.Beast in front, one
// event loop per thread with a roomkeeper::SyncKeeper each for rooms, typing
// and the auth deadline (the loops joined by roomkeeper::cluster), SQLite
// (TypingStore) behind roomkeeper's persistence hook. The wire protocol is
// in docs/protocol.md.
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_GATEWAY_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_GATEWAY_H_

#include <cstddef>
#include <string>

namespace dispatch {

struct ServerOptions {
  std::string host = "127.0.0.1";
  unsigned short port = 8080;               // 0 = ephemeral
  int threads = 2;                          // event loops, a thread and a Keeper each
  std::string db = "dispatch.db";           // ":memory:" for a private database
  long authTimeoutMs = 30000;               // unauthenticated sockets closed (4001)
  long typingTimeoutMs = 5000;              // typing auto-clear
  std::size_t maxMessageBytes = 64 * 1024;  // bigger frames: close 1009
  double rateLimit = 50;                    // messages per second (burst 2x): close 1008
  double joinRate = 100;                    // joins+leaves per second (burst 2x): rate_limited
  double typingRate = 20;                   // typing starts per second (burst 2x): rate_limited
  std::size_t maxPerIp = 4096;              // sockets open per address, per loop: close 1008
  double connectsPerIp = 0;                 // new sockets per second per address (burst 2x)
  std::size_t maxOutbox = 4096;             // queued outgoing messages: close 1008
  long shutdownGraceMs = 3000;              // wait for closes on SIGINT/SIGTERM
  long statsIntervalMs = 0;                 // periodic stats log line; 0 = off
  bool verbose = false;                     // info-level roomkeeper log lines
  std::string redis;                        // "HOST:PORT": one node of a cluster (empty: alone)
};

/// Opens the database, binds, prints "listening on <host>:<port>", serves
/// until SIGINT/SIGTERM, then sends serverShutdown to every client, closes
/// them and returns 0 (1 on a start-up error, 2 if something was left,
/// including a connection still open when the shutdown grace ran out).
int runServer(const ServerOptions& options);

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_GATEWAY_H_
