#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# A real Prometheus scraping dispatch_server (run by ctest: ops.prometheus_scrape).
#   prometheus_scrape.sh SERVER LOAD
# Starts dispatch_server (ephemeral port, short auth deadline) and Debian's
# prometheus on a free loopback port, with a temporary config and data
# directory, scraping /metrics every second and evaluating
# contrib/prometheus/roomkeeper-rules.yml every second. Then runs
# dispatch_load with 700 clients (70 never log in: 70 auth timeouts within
# a second or so) and asks Prometheus's HTTP API:
#   * roomkeeper_connected_clients went above 0 during the run and is 0 after;
#   * the alert RoomkeeperAuthTimeoutBurst fires (over 50 in a minute, for 10 s);
#   * no alert about a leak fires.
# Stops both afterwards (never a system service).
set -euo pipefail
server="$1" load="$2"
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/lib/dispatch_server.sh"
command -v prometheus >/dev/null || { echo "prometheus_scrape: no prometheus (scripts/setup.sh)"; exit 1; }
start_ops_server prometheus_scrape "$server"
sport="$port"
pport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

cat >"$tmp/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/contrib/prometheus/roomkeeper-rules.yml
scrape_configs:
  - job_name: dispatch
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$sport"]
YML
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$pport" >"$tmp/prometheus.log" 2>&1 &
ppid_=$!
pids="$pids $ppid_"

# query EXPR: the first sample's value of an instant query, or "none".
query() {
  python3 - "$pport" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
port, expr = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
try:
    body = json.load(urllib.request.urlopen(url, timeout=5))
except Exception:
    print("none"); sys.exit(0)
res = body.get("data", {}).get("result", [])
print(res[0]["value"][1] if res else "none")
PY
}
# firing NAME: prints the alert's state ("firing", "pending") or "none".
alert_state() {
  python3 - "$pport" "$1" <<'PY'
import json, sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
try:
    body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5))
except Exception:
    print("none"); sys.exit(0)
states = [a["state"] for a in body["data"]["alerts"] if a["labels"].get("alertname") == name]
print("firing" if "firing" in states else (states[0] if states else "none"))
PY
}

# Prometheus up and scraping the server.
up=none
for _ in $(seq 100); do
  up="$(query 'up{job="dispatch"}')"
  [ "$up" = 1 ] && break
  kill -0 "$ppid_" 2>/dev/null || { echo "prometheus_scrape: prometheus exited"; cat "$tmp/prometheus.log"; exit 1; }
  sleep 0.2
done
[ "$up" = 1 ] || { echo "prometheus_scrape: target never up"; tail -20 "$tmp/prometheus.log"; exit 1; }
echo "prometheus_scrape: prometheus on 127.0.0.1:$pport scrapes dispatch_server on :$sport"

"$load" --port "$sport" --clients 700 >"$tmp/load.log" 2>&1 || { cat "$tmp/load.log"; echo "prometheus_scrape: FAIL: dispatch_load"; exit 1; }
tail -3 "$tmp/load.log"

status=0
# After the run: a scrape that sees 0 connected, then the peak over the run.
now=none
for _ in $(seq 50); do
  now="$(query 'roomkeeper_connected_clients{job="dispatch"}')"
  [ "$now" = 0 ] && break
  sleep 0.2
done
peak="$(query 'max_over_time(roomkeeper_connected_clients{job="dispatch"}[5m])')"
timeouts="$(query 'max_over_time(roomkeeper_auth_timeouts_total{job="dispatch"}[5m])')"
echo "prometheus_scrape: connected clients peak $peak, now $now; auth timeouts $timeouts"
if [ "$now" != 0 ]; then echo "prometheus_scrape: FAIL: connected clients not back to 0 ($now)"; status=1; fi
if [ "$peak" = none ] || [ "${peak%.*}" -lt 1 ]; then echo "prometheus_scrape: FAIL: no peak seen"; status=1; fi

# The auth-timeout burst: pending at once, firing after its 10 s.
state=none
for _ in $(seq 60); do
  state="$(alert_state RoomkeeperAuthTimeoutBurst)"
  [ "$state" = firing ] && break
  sleep 0.5
done
echo "prometheus_scrape: RoomkeeperAuthTimeoutBurst: $state"
[ "$state" = firing ] || { echo "prometheus_scrape: FAIL: the auth-timeout alert did not fire"; status=1; }
for a in RoomkeeperEntriesWithoutConnections RoomkeeperRoomEntriesOutliveConnections \
         RoomkeeperCallbackErrors RoomkeeperEventsDropped RoomkeeperPersistenceDropped; do
  s="$(alert_state "$a")"
  if [ "$s" != none ]; then echo "prometheus_scrape: FAIL: $a is $s"; status=1; fi
done

# Both stopped and reaped before the trap removes their directories.
kill -TERM "$ppid_" 2>/dev/null || true
kill -TERM "$spid" 2>/dev/null || true
wait "$ppid_" 2>/dev/null || true
wait_exit "$spid" 200 0.05 || true
pids=""
[ "$status" -eq 0 ] && echo "prometheus_scrape: PASS"
exit "$status"
