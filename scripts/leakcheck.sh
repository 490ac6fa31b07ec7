#!/usr/bin/env bash
# Leak check of the dispatch demo under valgrind memcheck (not part of the
# default tests; see docs/robustness.md, "Leak check of the demo").
# Builds dispatch_server and dispatch_load, starts the server under
#   valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=3
# on an ephemeral loopback port with a fresh SQLite file, runs dispatch_load
# against it (also under valgrind, same options) with CLIENTS clients: clean
# closes, abrupt TCP drops, lingerers, never-logged-in sockets closed at the
# auth deadline. Then SIGTERM to the server, and both valgrind reports are
# checked: "definitely lost: 0 bytes" (or "no leaks are possible"), no
# memcheck error, exit status 0 (3 would be valgrind's). Prints both LEAK
# SUMMARYs; the full reports stay in OUT/valgrind-{server,load}.log.
#   usage: scripts/leakcheck.sh [out-dir] [clients]
#   defaults:                   build-leakcheck  200
#   environment: BUILD_DIR (default build), JOBS (build parallelism, 2)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/build-leakcheck}"
clients="${2:-200}"
build="${BUILD_DIR:-$root/build}"
jobs="${JOBS:-2}"

# What this script needs beyond scripts/setup.sh: valgrind.
bash "$root/scripts/setup.sh"
. "$root/scripts/lib/dispatch_server.sh"
if ! dpkg -s valgrind >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
fi

# RelWithDebInfo: the optimised code that ships, with line numbers in stacks.
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DROOMKEEPER_BUILD_EXAMPLES=ON >/dev/null
cmake --build "$build" -j"$jobs" --target dispatch_server dispatch_load
bin="$build/examples"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/valgrind-*.log "$out"/server.log "$out"/load.log "$out"/dispatch.db*
# shellcheck disable=SC2054  # the commas are inside one valgrind option
vg=(valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite,possible
    --errors-for-leak-kinds=definite --error-exitcode=3 --num-callers=30)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo
echo "== dispatch_server under valgrind: auth deadline 5 s, typing auto-clear 2 s"
: >"$out/server.log"
"${vg[@]}" --log-file="$out/valgrind-server.log" \
  "$bin/dispatch_server" --port 0 --threads 2 --db "$out/dispatch.db" \
  --auth-timeout-ms 5000 --typing-timeout-ms 2000 >"$out/server.log" 2>&1 &
pid=$!
# Up to 60 s: valgrind starts slowly.
if ! wait_for_port "$out/server.log" "$pid" 1200; then
  echo "leakcheck: the server did not start:"; cat "$out/server.log" "$out/valgrind-server.log"
  exit 1
fi
echo "   listening on 127.0.0.1:$port"

echo
echo "== dispatch_load under valgrind: $clients clients, concurrency 16"
load_status=0
"${vg[@]}" --log-file="$out/valgrind-load.log" \
  "$bin/dispatch_load" --port "$port" --clients "$clients" --concurrency 16 --arrival-rate 0 \
  >"$out/load.log" 2>&1 || load_status=$?
sed -n '/^server \/stats/,$p' "$out/load.log" | sed 's/^/   /'

echo
echo "== SIGTERM to the server"
kill -TERM "$pid"
wait_exit "$pid" 1200 0.1 || echo "leakcheck: the server did not exit within 120 s of SIGTERM"
pid=""
grep -v '^\[warning\] roomkeeper: high connection count' "$out/server.log" | sed 's/^/   server: /'

# check NAME LOG STATUS: prints the LEAK SUMMARY and returns non-zero unless
# nothing is definitely lost, memcheck saw no error, and the status is 0.
check() {
  local name="$1" log="$2" st="$3" ok=0
  echo
  echo "== $name: valgrind ($log)"
  sed -n '/HEAP SUMMARY/,/total heap usage/p' "$log" | sed 's/^==[0-9]*== /   /'
  if grep -q 'All heap blocks were freed -- no leaks are possible' "$log"; then
    # valgrind prints no LEAK SUMMARY then: nothing at all is left.
    grep 'All heap blocks were freed' "$log" | sed 's/^==[0-9]*== /   /'
  elif grep -q 'definitely lost: 0 bytes in 0 blocks' "$log"; then
    sed -n '/LEAK SUMMARY/,/suppressed:/p' "$log" | sed 's/^==[0-9]*== /   /'
  else
    sed -n '/LEAK SUMMARY/,/suppressed:/p' "$log" | sed 's/^==[0-9]*== /   /'
    echo "leakcheck: FAIL: $name: memory definitely lost; the stacks:"
    sed -n '/definitely lost in loss record/,/^==[0-9]*== $/p' "$log" | sed 's/^==[0-9]*== /   /'
    ok=1
  fi
  grep 'ERROR SUMMARY' "$log" | sed 's/^==[0-9]*== /   /'
  if ! grep -q 'ERROR SUMMARY: 0 errors' "$log"; then
    echo "leakcheck: FAIL: $name: memcheck reported errors (see $log)"; ok=1
  fi
  if [ "$st" -ne 0 ]; then echo "leakcheck: FAIL: $name exited with status $st"; ok=1; fi
  return "$ok"
}
status=0
check dispatch_server "$out/valgrind-server.log" "$server_status" || status=1
check dispatch_load "$out/valgrind-load.log" "$load_status" || status=1
if [ "$load_status" -ne 0 ]; then
  echo "   (dispatch_load status $load_status: 1 = the server was not back to zero or"
  echo "    a client failed, 3 = valgrind; its output is in $out/load.log)"
fi
grep -q "shutdown complete" "$out/server.log" ||
  { echo "leakcheck: FAIL: no clean shutdown line from the server"; status=1; }

if [ "$status" -eq 0 ]; then echo; echo "leakcheck: PASS (0 bytes definitely lost)"; else echo; echo "leakcheck: FAIL"; fi
exit "$status"
