#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# End-to-end tests of the dispatch demo, on loopback only (run by ctest).
#   dispatch_e2e.sh load     SERVER LOAD PROTOCOL [clients]
#   dispatch_e2e.sh protocol SERVER LOAD PROTOCOL
# Starts dispatch_server on an ephemeral port with short timeouts and a
# fresh SQLite file, then either runs dispatch_load (default 60 clients) and
# checks the server is back to zero, or runs dispatch_protocol_test (bad
# input, relays, the auth deadline, ending with SIGTERM). Either way the
# server must exit 0 after SIGTERM and leave no row in typing_indicators.
set -euo pipefail
mode="$1" server="$2" load="$3" protocol="$4" clients="${5:-60}"
. "$(dirname "$0")/../scripts/lib/dispatch_server.sh"
tmp="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

: >"$tmp/server.log"  # exists before the loop below reads it
"$server" --port 0 --threads 2 --db "$tmp/dispatch.db" \
  --auth-timeout-ms 800 --typing-timeout-ms 400 >"$tmp/server.log" 2>&1 &
pid=$!
if ! wait_for_port "$tmp/server.log" "$pid"; then
  echo "dispatch_e2e: the server did not start"; cat "$tmp/server.log"; exit 1
fi
echo "dispatch_e2e: server pid $pid on port $port"

status=0
case "$mode" in
  load)
    "$load" --port "$port" --clients "$clients" || status=$?
    kill -TERM "$pid" 2>/dev/null || true
    ;;
  protocol)
    # The protocol test sends SIGTERM itself, as its last case (a second
    # one could land after the server has restored the default handler).
    "$protocol" --port "$port" --server-pid "$pid" || status=$?
    [ "$status" -eq 0 ] || kill -TERM "$pid" 2>/dev/null || true
    ;;
  *) echo "dispatch_e2e: unknown mode $mode"; exit 2 ;;
esac

# The server must exit by itself, promptly, with status 0.
if ! wait_exit "$pid"; then
  echo "dispatch_e2e: FAIL: the server did not exit within 10 s of SIGTERM"; status=1
fi
pid=""
echo "---- server log"
cat "$tmp/server.log"
echo "----"
if [ "$server_status" -ne 0 ]; then
  echo "dispatch_e2e: FAIL: the server exited with status $server_status"; status=1
fi
grep -q "shutdown complete" "$tmp/server.log" ||
  { echo "dispatch_e2e: FAIL: no clean shutdown line"; status=1; }
if command -v sqlite3 >/dev/null; then
  rows="$(sqlite3 "$tmp/dispatch.db" 'SELECT COUNT(*) FROM typing_indicators')"
  echo "dispatch_e2e: typing rows in $tmp/dispatch.db after exit: $rows"
  [ "$rows" = "0" ] || { echo "dispatch_e2e: FAIL: typing rows left"; status=1; }
fi
if [ "$status" -eq 0 ]; then echo "dispatch_e2e: $mode: PASS"; else echo "dispatch_e2e: $mode: FAIL"; fi
exit "$status"
