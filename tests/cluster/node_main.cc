// SPDX-License-Identifier: MIT
// cluster_node: one server process of a test cluster -- a Keeper on a
// RedisNode, loaded with its share of a synthetic day, for the process-level
// cluster tests (cluster_process_test.sh): kill -9, SIGSTOP/SIGCONT.
//
//   cluster_node --port P --index i --nodes N --sessions S [--lease MS]
//                [--events FILE]
//   cluster_node --port P --audit        (prints "orphans K keys N", exit 0/1)
//
// Session s (0 <= s < S) lives on node s % N. Sessions below S/2 come in
// pairs (2k, 2k+1) for user "pair-k" -- two devices, always on two nodes;
// the rest are single-device users "solo-s". Rooms: user:<u>, crew:<s%100>,
// job:<s%500>, thread:<s%1000>. Prints "ready <node id> <sessions>" once
// everything it published has been applied by Redis, then one line per
// userOnline / userOffline / typing event to --events. SIGTERM: a clean
// stop (Keeper shutdown, node stop), exit 0.
#include <roomkeeper/cluster/redis_node.h>

// Before Asio: Boost 1.74's asio/awaitable.hpp uses std::exchange without
// including <utility> (a C++20 build fails without this).
#include <utility>
#include <boost/asio.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

namespace {

struct Args {
  std::uint16_t port = 6379;
  int index = 0, nodes = 1, sessions = 0;
  long lease = 5000;
  std::string events;
  bool audit = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "missing value for " << k << "\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--port") a.port = static_cast<std::uint16_t>(std::stoi(next()));
    else if (k == "--index") a.index = std::stoi(next());
    else if (k == "--nodes") a.nodes = std::stoi(next());
    else if (k == "--sessions") a.sessions = std::stoi(next());
    else if (k == "--lease") a.lease = std::stol(next());
    else if (k == "--events") a.events = next();
    else if (k == "--audit") a.audit = true;
    else {
      std::cerr << "unknown argument " << k << "\n";
      std::exit(2);
    }
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  boost::asio::io_context io;
  roomkeeper::cluster::RedisConfig rc;
  rc.port = a.port;
  rc.lease = std::chrono::milliseconds(a.lease);
  rc.log = [](roomkeeper::LogLevel l, std::string_view m) {
    if (l >= roomkeeper::LogLevel::kWarning) std::cerr << m << "\n";
  };
  roomkeeper::cluster::RedisNode node(io, rc);
  std::FILE* ev = a.events.empty() ? nullptr : std::fopen(a.events.c_str(), "a");
  auto line = [ev](std::string_view kind, std::string_view what) {
    if (!ev) return;
    std::fprintf(ev, "%.*s %.*s\n", static_cast<int>(kind.size()), kind.data(),
                 static_cast<int>(what.size()), what.data());
    std::fflush(ev);
  };
  roomkeeper::KeeperCallbacks cb;
  cb.userOnline = [&](std::string_view u) { line("online", u); };
  cb.userOffline = [&](std::string_view u) { line("offline", u); };
  cb.emit = [&](std::string_view, std::string_view event, std::string_view payload) {
    if (event == "typingStarted" || event == "typingStopped") line(event, payload);
  };
  cb.persist = [](const roomkeeper::PersistCall&) { return true; };
  roomkeeper::KeeperOptions o;
  o.bus = &node;
  o.authTimeout = roomkeeper::Millis{0};
  o.limits.maxSessionsPerUser = 8;
  roomkeeper::Keeper keeper(std::move(cb), o);
  node.bind(keeper, [&io](std::function<void()> fn) { boost::asio::post(io, std::move(fn)); });
  node.start();

  if (a.audit) {
    int rc2 = 2;
    boost::asio::steady_timer t(io, std::chrono::milliseconds(300));
    t.async_wait([&](auto) {
      node.audit([&](roomkeeper::cluster::AuditReport r) {
        std::cout << "orphans " << r.orphans.size() << " keys " << r.keys << std::endl;
        for (std::size_t i = 0; i < r.orphans.size() && i < 10; ++i)
          std::cout << "  " << r.orphans[i] << "\n";
        rc2 = r.ok && r.orphans.empty() ? 0 : 1;
        node.stop([&] { io.stop(); });
      });
    });
    io.run();
    return rc2;
  }

  boost::asio::signal_set sig(io, SIGTERM, SIGINT);
  sig.async_wait([&](auto, int) {
    keeper.shutdown();
    node.stop([&] { io.stop(); });
  });
  // Load once registered; "ready" after the last change has been applied
  // (replies on one connection come in order: a query sent last answers last).
  boost::asio::steady_timer poll(io);
  std::function<void()> load = [&]() {
    if (!node.stats().connected) {
      poll.expires_after(std::chrono::milliseconds(20));
      poll.async_wait([&](auto) { load(); });
      return;
    }
    // In chunks, each after the last one has been applied, as sessions
    // arrive at a real server (and never more than a chunk in flight).
    auto next = std::make_shared<int>(a.index);
    auto mine = std::make_shared<int>(0);
    auto chunk = std::make_shared<std::function<void()>>();
    *chunk = [&, next, mine, chunk]() {
      for (int k = 0; k < 500 && *next < a.sessions; ++k, *next += a.nodes) {
        const int s = *next;
        const std::string sid = "s" + std::to_string(s);
        const std::string user =
            s < a.sessions / 2 ? "pair-" + std::to_string(s / 2) : "solo-" + std::to_string(s);
        bool ok = keeper.connectAuthenticated(sid, user) == roomkeeper::Result::kOk;
        for (const std::string& room :
             {"user:" + user, "crew:" + std::to_string(s % 100),
              "job:" + std::to_string(s % 500), "thread:" + std::to_string(s % 1000)})
          ok = ok && keeper.trackRoom(sid, room) == roomkeeper::Result::kOk;
        if (!ok) {
          std::cerr << "cluster_node: could not connect " << sid << "\n";
          std::exit(1);
        }
        ++*mine;
      }
      node.isOnline("nobody", [&, next, mine, chunk](bool) {
        if (*next < a.sessions) return (*chunk)();
        std::cout << "ready " << node.id() << " " << *mine << std::endl;
        *chunk = nullptr;  // ends the closure's cycle through its own capture
      });
    };
    (*chunk)();
  };
  load();
  io.run();
  if (ev) std::fclose(ev);
  return 0;
}
