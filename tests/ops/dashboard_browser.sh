#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The live dashboard in a real browser (run by ctest: ops.dashboard_browser).
#   dashboard_browser.sh SERVER LOAD [SCREENSHOT]
# Starts dispatch_server, opens its dashboard (GET /) in Debian's headless
# Chromium (tests/ops/dashboard_browser.mjs, over the DevTools protocol),
# runs dispatch_load with 700 clients, and checks through the DOM that the
# figures were live and non-zero at the peak (clients, rooms, memberships,
# typing timers, bytes) and read 0 afterwards. Saves a screenshot at the
# peak (default: dashboard.png in the current directory).
# RK_DASHBOARD_CLIENTS: the load's size (700); docs/img/dashboard.png was
# taken with 3000.
set -euo pipefail
server="$1" load="$2" shot="${3:-$PWD/dashboard.png}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/lib/dispatch_server.sh"
chromium="$(command -v chromium || true)"
[ -n "$chromium" ] || { echo "dashboard_browser: no chromium (scripts/setup.sh)"; exit 1; }
start_ops_server dashboard_browser "$server"
rm -f "$shot"  # a screenshot from an earlier run must not pass for this one's

node "$root/tests/ops/dashboard_browser.mjs" "$chromium" "http://127.0.0.1:$port/" "$shot" \
  "$tmp/done" "$tmp/profile" 240 >"$tmp/browser.json" 2>"$tmp/browser.err" &
dpid=$!
pids="$pids $dpid"
# The page is up and polling before the load starts.
sleep 3
"$load" --port "$port" --clients "${RK_DASHBOARD_CLIENTS:-700}" >"$tmp/load.log" 2>&1 || { cat "$tmp/load.log"; echo "dashboard_browser: FAIL: dispatch_load"; exit 1; }
touch "$tmp/done"
status=0
wait "$dpid" || status=$?
pids="$spid"  # the driver has been reaped
cat "$tmp/browser.err" >&2 || true
[ "$status" -eq 0 ] || { echo "dashboard_browser: FAIL: the browser driver exited $status"; exit 1; }
cat "$tmp/browser.json"
python3 - "$tmp/browser.json" "$shot" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
peak, last = r["peak"], r["last"]
bad = []
for k in ("connectedClients", "rooms", "trackedRooms", "typingTimers", "bytes"):
    if not peak[k] > 0:
        bad.append(f"{k} never above 0 on the page")
for k in ("connectedClients", "rooms", "trackedRooms", "typingTimers", "pendingPersistence"):
    if last[k] != 0:
        bad.append(f"{k} reads {last[k]} after the load")
if not last["samples"] > r["firstSamples"] + 3:
    bad.append(f"the page polled only {last['samples']} times")
if not os.path.getsize(sys.argv[2]) > 10000:
    bad.append("no screenshot")
if bad:
    print("dashboard_browser: FAIL: " + "; ".join(bad)); sys.exit(1)
print(f"dashboard_browser: peak {peak['connectedClients']} clients, {peak['rooms']} rooms, "
      f"{peak['trackedRooms']} memberships, {peak['typingTimers']} typing timers; 0 after; "
      f"{last['samples']} polls; screenshot {sys.argv[2]}")
print("dashboard_browser: PASS")
PY
kill -TERM "$spid" 2>/dev/null || true
if wait_exit "$spid" 200 0.05; then pids=""; fi
