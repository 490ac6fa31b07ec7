#!/usr/bin/env bash
# Process-level cluster test (ctest cluster.process), against a real
# redis-server on a free loopback port (temporary directory, no
# persistence), with 3 cluster_node processes and 60,000 sessions:
#   1. kill -9 of a node holding 20,000 sessions: kill-to-clean time
#      (until its lease entry is gone and both survivors have seen
#      userOffline for each user whose only session was on it), <= 10 s;
#      the audit finds no orphan.
#   2. SIGSTOP of a node past its lease, then SIGCONT: it is fenced,
#      re-registers under a new id and replays; every session is in the
#      shared view exactly once; the audit is clean.
#   3. SIGTERM to the survivors: clean stops; Redis is left with 0 keys.
#   4. 3 nodes again, then kill -9 of every one at once: every key expires
#      by itself, within two leases of the kill (one lease for the lease,
#      one for a reaper that never comes).
#   usage: process_test.sh path/to/cluster_node
set -euo pipefail
node_bin="$1"
[ -x "$node_bin" ] || { echo "usage: process_test.sh path/to/cluster_node" >&2; exit 2; }
S=${CLUSTER_SESSIONS:-60000}
N=3
work=$(mktemp -d /tmp/rk-cluster-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${redis_pid:-}" ] && kill -9 "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/err.*; do [ -s "$f" ] && { echo "--- $f" >&2; grep -v "^    #[1-9][0-9]" "$f" | head -40 >&2; }; done
  exit 1
}
cli() { redis-cli -p "$port" "$@"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ksum() {  # sum of $1 (HLEN, ZCARD) over the keys matching $2
  cli EVAL "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[2])) do n = n + redis.call(ARGV[1], k) end return n" 0 "$1" "$2"
}
sessions() { ksum HLEN 'rk:node:*:s'; }
memberships() { ksum ZCARD 'rk:node:*:m'; }

redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
redis_pid=$!
for _ in $(seq 100); do cli PING >/dev/null 2>&1 && break; sleep 0.05; done
cli PING >/dev/null || fail "redis-server did not start"
before=$(cli DBSIZE)

start_nodes() {  # $1 sessions, $2 file tag: N nodes, until each is ready
  pids=()
  for i in 0 1 2; do
    "$node_bin" --port "$port" --index "$i" --nodes $N --sessions "$1" \
      --events "$work/events$2.$i" >"$work/out$2.$i" 2>"$work/err$2.$i" &
    pids+=($!)
  done
  for _ in $(seq 600); do
    ready=$(cat "$work"/out"$2".* 2>/dev/null | grep -c '^ready' || true)
    [ "$ready" -eq $N ] && return 0
    sleep 0.1
  done
  fail "nodes not ready: $(cat "$work"/err"$2".*)"
}
start_nodes "$S" ""
peak=$(cli DBSIZE)
[ "$(sessions)" -eq "$S" ] || fail "sessions in the shared view: $(sessions) of $S"
echo "cluster: $S sessions on $N nodes; Redis keys before $before, at the peak $peak"

# 1. kill -9 of node 0.
dead=$(awk '/^ready/ {print $2}' "$work/out.0")
solo0=$(python3 -c "print(sum(1 for s in range($S//2, $S) if s % $N == 0))")
kill -9 "${pids[0]}"
t0=$(now_ms)
clean=""
for _ in $(seq 300); do
  off1=$(grep -c '^offline solo-' "$work/events.1" || true)
  off2=$(grep -c '^offline solo-' "$work/events.2" || true)
  if [ -z "$(cli ZSCORE rk:nodes "$dead")" ] && [ "$off1" -ge "$solo0" ] && [ "$off2" -ge "$solo0" ]; then
    clean=$(( $(now_ms) - t0 )); break
  fi
  sleep 0.05
done
[ -n "$clean" ] || fail "node $dead not cleaned up (offline seen: $off1, $off2 of $solo0)"
echo "cluster: kill -9 of a node with $(( S / N )) sessions: clean in $clean ms (limit 10000)"
[ "$clean" -le 10000 ] || fail "kill-to-clean $clean ms > 10000"
[ "$(cli KEYS "rk:node:$dead:*" | wc -w)" -eq 0 ] || fail "index of $dead left"
[ "$(sessions)" -eq $(( S - S / N )) ] || fail "sessions after the reap: $(sessions)"
"$node_bin" --port "$port" --audit >"$work/audit1" || fail "audit: $(cat "$work/audit1")"
echo "cluster: audit after the kill: $(head -1 "$work/audit1")"

# 2. SIGSTOP node 1 past its lease, then SIGCONT.
first1=$(awk '/^ready/ {print $2}' "$work/out.1")
kill -STOP "${pids[1]}"
for _ in $(seq 300); do
  [ -z "$(cli ZSCORE rk:nodes "$first1")" ] && break   # reaped by node 2
  sleep 0.05
done
[ -z "$(cli ZSCORE rk:nodes "$first1")" ] || fail "paused node not reaped"
kill -CONT "${pids[1]}"
want=$(( S - S / N ))
for _ in $(seq 400); do
  [ "$(cli ZCARD rk:nodes)" -eq 2 ] && [ "$(sessions)" -eq "$want" ] &&
    [ "$(memberships)" -eq $(( want * 4 )) ] && break
  sleep 0.05
done
[ "$(sessions)" -eq "$want" ] || fail "after SIGCONT: $(sessions) sessions, want $want"
[ "$(memberships)" -eq $(( want * 4 )) ] || fail "after SIGCONT: $(memberships) memberships"
[ -z "$(cli ZSCORE rk:nodes "$first1")" ] || fail "the paused node kept its old id"
"$node_bin" --port "$port" --audit >"$work/audit2" || fail "audit: $(cat "$work/audit2")"
echo "cluster: SIGSTOP past the lease, SIGCONT: fenced, re-registered, $want sessions once each; audit: $(head -1 "$work/audit2")"

# 3. Clean stops.
kill -TERM "${pids[1]}" "${pids[2]}"
wait "${pids[1]}" "${pids[2]}" || fail "a node did not stop cleanly"
after=$(cli DBSIZE)
echo "cluster: Redis keys before $before / at the peak $peak / after $after"
[ "$after" -eq 0 ] || fail "$after keys left: $(cli KEYS 'rk:*' | head)"

# 4. Every node killed at once.
S4=$(( S / 10 ))
start_nodes "$S4" 4
[ "$(sessions)" -eq "$S4" ] || fail "sessions before the kill: $(sessions) of $S4"
peak4=$(cli DBSIZE)
kill -9 "${pids[@]}"
t0=$(now_ms)
gone=""
for _ in $(seq 400); do
  [ "$(cli DBSIZE)" -eq 0 ] && { gone=$(( $(now_ms) - t0 )); break; }
  sleep 0.05
done
[ -n "$gone" ] || fail "keys left 20 s after every node was killed: $(cli KEYS 'rk:*' | head)"
echo "cluster: kill -9 of every node ($S4 sessions, $peak4 keys): Redis empty by itself in $gone ms (limit 10000 + 1000)"
[ "$gone" -le 11000 ] || fail "keys outlived two leases: $gone ms"
echo "cluster.process: PASS"
