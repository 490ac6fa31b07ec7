#!/usr/bin/env bash
# The main job: the dispatch demo. Builds dispatch_server (a Boost.Beast
# WebSocket gateway on roomkeeper, typing indicators persisted in SQLite) and
# dispatch_load, starts the server on an ephemeral loopback port with a
# fresh database, plays a dispatch day with 500 clients (clean closes,
# abrupt TCP drops, never-logged-in sockets), prints the server's stats
# before / at the peak / after and the latencies it measured, then lets 20
# clients log in and type and stops the server with SIGTERM while they are
# connected: each must hear serverShutdown. Exits non-zero unless everything
# was back to zero, every stayer was told, and the server exited 0.
#   usage: scripts/demo.sh [build-dir] [clients]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
clients="${2:-500}"
bash "$root/scripts/setup.sh" demo
. "$root/scripts/lib/dispatch_server.sh"
. "$root/scripts/lib/build.sh"

temp_dir_and_server_trap

# The configuration scripts/test.sh uses, so the two share build/; only the
# demo's two programs (and the library) are built here.
echo "== configure $build (as scripts/test.sh does), build dispatch_server and dispatch_load"
if ! configure_build "$root" "$build" >"$tmp/cmake.log" 2>&1; then
  cat "$tmp/cmake.log"; echo "demo: cmake failed"; exit 1
fi
cmake --build "$build" -j2 --target dispatch_server dispatch_load
bin="$build/examples"

echo
echo "== dispatch_server: ephemeral port, auth deadline 2 s, typing auto-clear 5 s, db $tmp/dispatch.db"
: >"$tmp/server.log"  # exists before the loop below reads it
"$bin/dispatch_server" --port 0 --threads 2 --db "$tmp/dispatch.db" \
  --auth-timeout-ms 2000 --typing-timeout-ms 5000 >"$tmp/server.log" 2>&1 &
pid=$!
if ! wait_for_port "$tmp/server.log" "$pid"; then
  echo "demo: the server did not start:"; cat "$tmp/server.log"; exit 1
fi
echo "   listening on 127.0.0.1:$port  (try: curl http://127.0.0.1:$port/stats)"
echo
echo "== dispatch_load: $clients clients, then 20 that stay through the server's SIGTERM"
status=0
"$bin/dispatch_load" --port "$port" --clients "$clients" --stay 20 --server-pid "$pid" ||
  status=$?

echo
echo "== the server's log"
# dispatch_load sends the SIGTERM itself once its stayers are in. If it
# failed before that, the server is still up after 10 s: stop it here.
if ! wait_exit "$pid"; then
  kill -TERM "$pid"
  wait_exit "$pid" || echo "demo: the server did not exit within 10 s of SIGTERM"
fi
pid=""
sed 's/^/   server: /' "$tmp/server.log"
rows="$(sqlite3 "$tmp/dispatch.db" 'SELECT COUNT(*) FROM typing_indicators' 2>/dev/null || echo '?')"
echo "   server exit status: $server_status; typing rows in the database file: $rows"
if [ "$status" -eq 0 ] && [ "$server_status" -eq 0 ] && [ "$rows" = "0" ]; then
  echo
  echo "demo: PASS"
  exit 0
fi
echo
echo "demo: FAIL (load generator $status, server $server_status, rows $rows)"
exit 1
