// SPDX-License-Identifier: MIT
// dispatch_server: the server roomkeeper came from, done right. A dispatch
// app's WebSocket gateway (Boost.Beast) whose rooms, typing indicators and
// auth deadlines are roomkeeper's, with typing persisted in SQLite.
//
//   dispatch_server --port 0 --db /tmp/d.db --auth-timeout-ms 2000
//   dispatch_server --print-token u1:dispatcher:c1   # a demo login token (24 h)
//   dispatch_server --print-token u1:dispatcher:c1 --token-ttl 600
//
// Protocol: docs/protocol.md. Load generator: dispatch_load.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "demo_token.h"
#include "gateway.h"

namespace {

constexpr const char* kUsage =
    "usage: dispatch_server [flags]\n"
    "  --host ADDR               listen address (default 127.0.0.1)\n"
    "  --port N                  port; 0 = ephemeral (default 8080)\n"
    "  --threads N               event loops, each on its own thread with its own\n"
    "                            Keeper; rooms, presence and typing span them\n"
    "                            (default 2)\n"
    "  --db PATH                 SQLite file, created on first run; :memory: ok\n"
    "                            (default ./dispatch.db)\n"
    "  --auth-timeout-ms N       close sockets that do not authenticate (30000)\n"
    "  --typing-timeout-ms N     typing auto-clear (5000)\n"
    "  --max-message-bytes N     larger frames are closed with 1009 (65536)\n"
    "  --rate-limit N            messages per second per socket, burst 2N; 0 = off (50)\n"
    "  --join-rate N             joins and leaves per second per socket, burst 2N;\n"
    "                            0 = off (100)\n"
    "  --typing-rate N           typing starts per second per socket, burst 2N;\n"
    "                            0 = off (20)\n"
    "  --max-per-ip N            sockets open at once per client address, in each\n"
    "                            event loop; 0 = off (4096)\n"
    "  --connects-per-ip N       new sockets per second per client address, burst\n"
    "                            2N, in each event loop; 0 = off (0)\n"
    "  --max-outbox N            queued messages per socket before a client that\n"
    "                            does not read is closed with 1008 (4096)\n"
    "  --stats-interval-ms N     log a stats line every N ms; 0 = off (0)\n"
    "  --shutdown-grace-ms N     at SIGINT/SIGTERM, wait up to N ms for the\n"
    "                            connections to close (3000); exit 2 if any is left\n"
    "  --verbose                 log roomkeeper's info lines too\n"
    "  --redis HOST:PORT         one server of a cluster on that Redis: rooms,\n"
    "                            presence and typing span every server on it\n"
    "  --print-token USER:ROLE:CREW   print a demo token and exit\n"
    "  --token-ttl SECONDS       with --print-token: the token expires after\n"
    "                            SECONDS (86400)\n";

bool parseLong(const char* s, long lo, long hi, long* out) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

/// --print-token USER:ROLE:CREW [--token-ttl SECONDS].
int printDemoToken(const std::string& spec, long ttlSeconds) {
  dispatch::Identity id;
  const auto a = spec.find(':');
  const auto b = a == std::string::npos ? a : spec.find(':', a + 1);
  id.userId = spec.substr(0, a);
  if (a != std::string::npos)
    id.role = spec.substr(a + 1, b == std::string::npos ? b : b - a - 1);
  if (b != std::string::npos) id.crewId = spec.substr(b + 1);
  const std::int64_t now = dispatch::unixNow();
  const std::string token = dispatch::makeDemoToken(id, now + ttlSeconds);
  dispatch::Identity check;
  if (dispatch::verifyDemoToken(token, now, &check) != dispatch::TokenCheck::kOk) {
    std::fprintf(stderr,
                 "dispatch_server: want USER:ROLE:CREW, role admin|dispatcher|crew, "
                 "ids [A-Za-z0-9_.-]{1,64}, crew needs a crew id\n");
    return 1;
  }
  std::printf("%s\n", token.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  dispatch::ServerOptions opt;
  std::string printToken;
  long tokenTtl = dispatch::kDemoTokenTtlSeconds;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    const bool isSwitch = flag == "--verbose" || flag == "--help" || flag == "-h";
    if (const auto eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag.resize(eq);
    } else if (!isSwitch) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "dispatch_server: %s needs a value\n%s", flag.c_str(),
                     kUsage);
        return 1;
      }
      value = argv[++i];
    }
    long n = 0;
    auto number = [&](long lo, long hi) {
      if (parseLong(value.c_str(), lo, hi, &n)) return true;
      std::fprintf(stderr, "dispatch_server: bad value for %s: %s\n", flag.c_str(),
                   value.c_str());
      return false;
    };
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (flag == "--verbose") {
      opt.verbose = true;
    } else if (flag == "--host") {
      opt.host = value;
    } else if (flag == "--port") {
      if (!number(0, 65535)) return 1;
      opt.port = static_cast<unsigned short>(n);
    } else if (flag == "--threads") {
      if (!number(1, 64)) return 1;
      opt.threads = static_cast<int>(n);
    } else if (flag == "--db") {
      opt.db = value;
    } else if (flag == "--redis") {
      const auto colon = value.rfind(':');
      long p = 0;
      if (colon == std::string::npos || colon == 0 ||
          !parseLong(value.c_str() + colon + 1, 1, 65535, &p)) {
        std::fprintf(stderr, "dispatch_server: bad --redis %s (want HOST:PORT)\n",
                     value.c_str());
        return 1;
      }
      opt.redis = value;
    } else if (flag == "--auth-timeout-ms") {
      if (!number(0, 86400000)) return 1;
      opt.authTimeoutMs = n;
    } else if (flag == "--typing-timeout-ms") {
      if (!number(1, 86400000)) return 1;
      opt.typingTimeoutMs = n;
    } else if (flag == "--max-message-bytes") {
      if (!number(256, 64L << 20)) return 1;
      opt.maxMessageBytes = static_cast<std::size_t>(n);
    } else if (flag == "--rate-limit") {
      if (!number(0, 1000000)) return 1;
      opt.rateLimit = static_cast<double>(n);
    } else if (flag == "--join-rate") {
      if (!number(0, 1000000)) return 1;
      opt.joinRate = static_cast<double>(n);
    } else if (flag == "--typing-rate") {
      if (!number(0, 1000000)) return 1;
      opt.typingRate = static_cast<double>(n);
    } else if (flag == "--max-per-ip") {
      if (!number(0, 10000000)) return 1;
      opt.maxPerIp = static_cast<std::size_t>(n);
    } else if (flag == "--connects-per-ip") {
      if (!number(0, 1000000)) return 1;
      opt.connectsPerIp = static_cast<double>(n);
    } else if (flag == "--shutdown-grace-ms") {
      if (!number(0, 600000)) return 1;
      opt.shutdownGraceMs = n;
    } else if (flag == "--max-outbox") {
      if (!number(1, 1 << 20)) return 1;
      opt.maxOutbox = static_cast<std::size_t>(n);
    } else if (flag == "--stats-interval-ms") {
      if (!number(0, 86400000)) return 1;
      opt.statsIntervalMs = n;
    } else if (flag == "--print-token") {
      printToken = value;
    } else if (flag == "--token-ttl") {
      if (!number(1, 10L * 365 * 86400)) return 1;
      tokenTtl = n;
    } else {
      std::fprintf(stderr, "dispatch_server: unknown flag %s\n%s", flag.c_str(), kUsage);
      return 1;
    }
  }
  if (!printToken.empty()) return printDemoToken(printToken, tokenTtl);
  return dispatch::runServer(opt);
}
