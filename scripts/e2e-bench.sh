#!/usr/bin/env bash
# The end-to-end latency runs of docs/benchmarks.md "End to end":
# dispatch_server (SQLite file, otherwise its defaults) with 1 event loop,
# then with 2 (its default), and dispatch_load --clients N (default 2000) on
# this machine's loopback. Each round starts a fresh server and plays: a
# cold run (arrivals at 1000 a second, dispatch_load's default), then on the
# warm server a run at 1000 a second, one at 500 a second and one
# closed-loop run (--arrival-rate 0: 64 clients start in the same instant,
# each next one the moment one is ready). Prints each run's latency lines,
# login rate and CPU (the server's per login, the load generator's own).
# The auth deadline is 2 s (not 30) so a run takes ~8 s; the login phase
# ends long before it.
#   usage: scripts/e2e-bench.sh [rounds] [clients]   (after scripts/demo.sh built build/)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/build/examples"
. "$root/scripts/lib/dispatch_server.sh"
rounds="${1:-3}"
clients="${2:-2000}"
temp_dir_and_server_trap
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(git -C "$root" describe --always --dirty 2>/dev/null || echo '?')," \
  "$(nproc) cores, $clients clients"
failed=0
for loops in 1 2; do
for round in $(seq "$rounds"); do
  rm -f "$tmp"/d.db*
  : >"$tmp/server.log"
  "$bin/dispatch_server" --port 0 --threads "$loops" --db "$tmp/d.db" --auth-timeout-ms 2000 \
    >"$tmp/server.log" 2>&1 &
  pid=$!
  wait_for_port "$tmp/server.log" "$pid" || { cat "$tmp/server.log"; exit 1; }
  for run in cold:1000 warm:1000 warm:500 warm:0; do
    rate="${run#*:}"
    out="$tmp/run"
    status=PASS
    "$bin/dispatch_load" --port "$port" --clients "$clients" --server-pid "$pid" \
      --arrival-rate "$rate" >"$out" 2>&1 || { status=FAIL; failed=$((failed + 1)); }
    label="--threads $loops, round $round, $([ "${run%%:*}" = cold ] && echo 'cold,' || echo 'warm,') $([ "$rate" = 0 ] && echo 'closed loop' || echo "$rate a second")"
    printf '%-48s %s\n' "$label:" "$status"
    grep -E "^login round trip|^typing fan-out|^login phase|^dispatch_load itself|^server \(pid|^FAIL" \
      "$out" | sed 's/^/    /' || true
  done
  kill -TERM "$pid"
  wait "$pid" || true
  pid=""
done
done
[ "$failed" = 0 ] || { echo "e2e-bench: $failed runs failed (their output above)"; exit 1; }
