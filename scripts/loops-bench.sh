#!/usr/bin/env bash
# dispatch_load against dispatch_server with 1 event loop and with 2
# (docs/benchmarks.md "Event loops"): for each, a cold and a warm run of
# --clients N (default 2000) on one server, closed loop (--arrival-rate 0:
# the most the server takes); prints the warm run's latency
# table, login rate, messages a second and the server's CPU and RSS.
#   usage: scripts/loops-bench.sh [clients]   (after scripts/demo.sh built build/)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/build/examples"
clients="${1:-2000}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for loops in 1 2; do
  : >"$tmp/server.log"
  "$bin/dispatch_server" --port 0 --threads "$loops" --db "$tmp/d$loops.db" \
    --auth-timeout-ms 2000 >"$tmp/server.log" 2>&1 &
  pid=$!
  port=""
  for _ in $(seq 100); do
    port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$tmp/server.log")
    [ -n "$port" ] && break
    sleep 0.05
  done
  [ -n "$port" ] || { cat "$tmp/server.log"; exit 1; }
  "$bin/dispatch_load" --port "$port" --clients "$clients" --server-pid "$pid" \
    --arrival-rate 0 >"$tmp/cold" 2>&1
  "$bin/dispatch_load" --port "$port" --clients "$clients" --server-pid "$pid" \
    --arrival-rate 0 >"$tmp/warm" 2>&1
  kill -TERM "$pid"
  wait "$pid" || true
  echo "== dispatch_server --threads $loops (warm run; cold run's PASS/FAIL: $(grep -c '^PASS' "$tmp/cold"))"
  grep -E "^latency|^login round trip|^typing fan-out|^login phase|^messages in|^server \(pid|^PASS|^FAIL" "$tmp/warm"
done
