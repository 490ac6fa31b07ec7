#!/usr/bin/env bash
# The dispatch demo as a cluster: one redis-server (free loopback port,
# temporary directory, no persistence) and 3 dispatch_servers on it
# (--redis), each with its own SQLite file.
#   1. dispatch_load plays a day with its clients spread over the three
#      (client i on server i % 3: a user's two devices on two servers, and
#      a typing indicator's audience on all three); everything must come
#      back to zero on every server, and typing crosses servers (each
#      server's cluster counters show what it received from the others).
#   2. A second day, and server 3 is killed with -9 in the middle of it:
#      the kill-to-clean time (until Redis holds nothing of that server
#      and its lease is gone) is printed; the survivors come back to zero.
#   3. The survivors stop with SIGTERM; Redis key counts before / at the
#      peak / after are printed, and after must be 0.
#   usage: scripts/cluster-demo.sh [build-dir] [clients]
#   (ctest runs it as example.cluster_demo with RK_PREBUILT=1: the build
#   and the set-up are its caller's)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
clients="${2:-600}"
[ -n "${RK_PREBUILT:-}" ] || bash "$root/scripts/setup.sh" demo
. "$root/scripts/lib/dispatch_server.sh"
. "$root/scripts/lib/build.sh"

tmp="$(mktemp -d)"
pids=() redis_pid="" sampler=""
cleanup() {
  for p in "${pids[@]}" $sampler $redis_pid; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "cluster-demo: FAIL: $*"; exit 1; }

if [ -z "${RK_PREBUILT:-}" ]; then
  echo "== configure $build (as scripts/test.sh does), build dispatch_server and dispatch_load"
  configure_build "$root" "$build" >"$tmp/cmake.log" 2>&1 || { cat "$tmp/cmake.log"; fail cmake; }
  cmake --build "$build" -j2 --target dispatch_server dispatch_load
fi
bin="$build/examples"

rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cli() { redis-cli -p "$rport" "$@"; }
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
  --logfile "$tmp/redis.log" &
redis_pid=$!
for _ in $(seq 100); do cli PING >/dev/null 2>&1 && break; sleep 0.05; done
before=$(cli DBSIZE)
echo
echo "== redis-server on 127.0.0.1:$rport; keys: $before"

ports=()
for i in 1 2 3; do
  : >"$tmp/server.$i.log"
  "$bin/dispatch_server" --port 0 --threads 2 --db "$tmp/dispatch.$i.db" \
    --auth-timeout-ms 2000 --typing-timeout-ms 5000 --redis "127.0.0.1:$rport" \
    >"$tmp/server.$i.log" 2>&1 &
  pids+=($!)
  wait_for_port "$tmp/server.$i.log" "${pids[-1]}" || { cat "$tmp/server.$i.log"; fail "server $i"; }
  ports+=("$port")
done
list=$(IFS=,; echo "${ports[*]}")
echo "== 3 dispatch_servers on ports $list, one cluster"

# The highest key count while the days run.
( peak=0; while :; do n=$(cli DBSIZE 2>/dev/null || echo 0)
    [ "$n" -gt "$peak" ] && { peak=$n; echo "$peak" >"$tmp/peak"; }; sleep 0.1; done ) &
sampler=$!

cluster_field() {  # cluster_field PORT FIELD: from GET /stats's "cluster" object
  http_get "$1" /stats | python3 -c "import json,sys; print(json.load(sys.stdin)['cluster']['$2'])"
}

echo
echo "== day 1: dispatch_load, $clients clients spread over the three servers"
"$bin/dispatch_load" --ports "$list" --clients "$clients" || fail "day 1"
for i in 0 1 2; do
  echo "   server $((i + 1)): published $(cluster_field "${ports[$i]}" published)," \
       "received from the others $(cluster_field "${ports[$i]}" received)"
done
[ "$(cluster_field "${ports[1]}" received)" -gt 0 ] || fail "nothing crossed servers"

echo
echo "== day 2: the same day, and server 3 is killed with -9 in the middle of it"
dead=$(cluster_field "${ports[2]}" node)
"$bin/dispatch_load" --ports "$list" --clients "$clients" >"$tmp/day2.log" 2>&1 &
load=$!
sleep 1.5
kill -9 "${pids[2]}"
t0=$(( $(date +%s%N) / 1000000 ))
clean=""
for _ in $(seq 400); do
  if [ -z "$(cli ZSCORE rk:nodes "$dead")" ] && [ "$(cli KEYS "rk:node:$dead:*" | wc -w)" -eq 0 ]; then
    clean=$(( $(date +%s%N) / 1000000 - t0 )); break
  fi
  sleep 0.05
done
[ -n "$clean" ] || fail "server 3's state is still in Redis"
echo "   kill -9 of server 3: its sessions gone from Redis in $clean ms (lease 5 s)"
wait "$load" || true   # its clients on server 3 were cut off: expected to fail
grep -E "^(dispatch_load: (PASS|FAIL)|  clients failed)" "$tmp/day2.log" | head -3 | sed 's/^/   (day 2, expected with a server killed) /' || true
for i in 0 1; do
  for _ in $(seq 200); do
    s=$(http_get "${ports[$i]}" /stats)
    c=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d['connectedClients']+d['trackedRooms']+d['typingTimers'])" "$s")
    [ "$c" -eq 0 ] && break
    sleep 0.1
  done
  [ "$c" -eq 0 ] || fail "server $((i + 1)) not back to zero: $s"
done
echo "   servers 1 and 2: back to zero (connectedClients, trackedRooms, typingTimers)"

echo
echo "== the survivors stop (SIGTERM)"
kill -TERM "${pids[0]}" "${pids[1]}"
wait_exit "${pids[0]}" || fail "server 1 did not exit"
wait_exit "${pids[1]}" || fail "server 2 did not exit"
kill "$sampler" 2>/dev/null || true; sampler=""
after=$(cli DBSIZE)
echo "   Redis keys: before $before / at the peak $(cat "$tmp/peak" 2>/dev/null || echo 0) / after $after"
[ "$after" -eq 0 ] || fail "$after keys left in Redis"
echo "cluster-demo: PASS"
