#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# End-to-end tests of the dispatch demo, on loopback only (run by ctest).
#   dispatch_e2e.sh load     SERVER LOAD PROTOCOL [clients]
#   dispatch_e2e.sh protocol SERVER LOAD PROTOCOL
#   dispatch_e2e.sh shutdown SERVER LOAD PROTOCOL
# Starts dispatch_server on an ephemeral port with short timeouts and a
# fresh SQLite file, then either runs dispatch_load (default 60 clients) and
# checks the server is back to zero, or runs dispatch_protocol_test (bad
# input, relays, the auth deadline, ending with SIGTERM). Either way the
# server must exit 0 after SIGTERM and leave no row in typing_indicators.
# The shutdown mode is the other way round: a client that never answers the
# server's close keeps its connection past the shutdown grace, and the
# server must say so and exit 2.
set -euo pipefail
mode="$1" server="$2" load="$3" protocol="$4" clients="${5:-60}"
. "$(dirname "$0")/../scripts/lib/dispatch_server.sh"
expect_status=0
extra=()
if [ "$mode" = shutdown ]; then expect_status=2; extra=(--shutdown-grace-ms 300); fi
temp_dir_and_server_trap

: >"$tmp/server.log"  # exists before the loop below reads it
"$server" --port 0 --threads 2 --db "$tmp/dispatch.db" \
  --auth-timeout-ms 800 --typing-timeout-ms 400 --max-outbox 1024 --max-per-ip 100 "${extra[@]}" \
  >"$tmp/server.log" 2>&1 &
pid=$!
if ! wait_for_port "$tmp/server.log" "$pid"; then
  echo "dispatch_e2e: the server did not start"; cat "$tmp/server.log"; exit 1
fi
echo "dispatch_e2e: server pid $pid on port $port"

status=0
case "$mode" in
  load)
    # 5 clients stay connected and typing; dispatch_load sends the SIGTERM
    # and checks each hears serverShutdown and gets 1001.
    "$load" --port "$port" --clients "$clients" --stay 5 --server-pid "$pid" || status=$?
    ;;
  protocol)
    # --print-token: exp (the 4th field) is now + --token-ttl, 24 h without it.
    for ttl in 60 ""; do
      tok="$("$server" --print-token u1:dispatcher:c1 ${ttl:+--token-ttl "$ttl"})"
      want=$(( $(date +%s) + ${ttl:-86400} )) exp="$(echo "$tok" | cut -d: -f4)"
      if [ "$(echo "$tok" | cut -d: -f1-3)" != u1:dispatcher:c1 ] ||
         [ "$exp" -lt $(( want - 5 )) ] || [ "$exp" -gt "$want" ]; then
        echo "dispatch_e2e: FAIL: --print-token ${ttl:+--token-ttl $ttl }gave $tok (want exp ~$want)"
        status=1
      fi
    done
    # The protocol test sends SIGTERM itself, as its last case (a second
    # one could land after the server has restored the default handler).
    "$protocol" --port "$port" --server-pid "$pid" || status=$?
    [ "$status" -eq 0 ] || kill -TERM "$pid" 2>/dev/null || true
    ;;
  shutdown)
    # A WebSocket handshake by hand, then silence: the client reads nothing
    # more and never answers the close frame.
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n' >&3
    read -r -t 5 answer <&3 || answer="(nothing)"
    case "$answer" in
      "HTTP/1.1 101"*) ;;
      *) echo "dispatch_e2e: FAIL: handshake answered: $answer"; status=1 ;;
    esac
    # The session is in the server's map once the 101 has gone out.
    for _ in $(seq 100); do
      http_get "$port" /stats | grep -q '"serverSessions":1' && break
      sleep 0.02
    done
    kill -TERM "$pid" 2>/dev/null || true
    ;;
  *) echo "dispatch_e2e: unknown mode $mode"; exit 2 ;;
esac

# The server must exit by itself, promptly, with status 0. (If the client
# failed before it sent SIGTERM, the server is still up: stop it.)
if ! wait_exit "$pid"; then
  echo "dispatch_e2e: FAIL: the server did not exit within 10 s of SIGTERM"; status=1
  kill -TERM "$pid" 2>/dev/null || true
  wait_exit "$pid" || true
fi
pid=""
echo "---- server log"
cat "$tmp/server.log"
echo "----"
if [ "$server_status" -ne "$expect_status" ]; then
  echo "dispatch_e2e: FAIL: the server exited with status $server_status, not $expect_status"
  status=1
fi
grep -q "shutdown complete" "$tmp/server.log" ||
  { echo "dispatch_e2e: FAIL: no shutdown line"; status=1; }
if [ "$mode" = load ]; then
  grep -q "told 5 sessions" "$tmp/server.log" ||
    { echo "dispatch_e2e: FAIL: the server did not tell the 5 clients left at SIGTERM"; status=1; }
fi
if [ "$mode" = shutdown ]; then
  grep -q "serverSessions=1 " "$tmp/server.log" ||
    { echo "dispatch_e2e: FAIL: the shutdown line does not count the silent client"; status=1; }
  grep -q "exit status 2: something was left" "$tmp/server.log" ||
    { echo "dispatch_e2e: FAIL: the server did not say why it exits 2"; status=1; }
fi
if command -v sqlite3 >/dev/null; then
  rows="$(sqlite3 "$tmp/dispatch.db" 'SELECT COUNT(*) FROM typing_indicators')"
  echo "dispatch_e2e: typing rows in $tmp/dispatch.db after exit: $rows"
  [ "$rows" = "0" ] || { echo "dispatch_e2e: FAIL: typing rows left"; status=1; }
fi
if [ "$status" -eq 0 ]; then echo "dispatch_e2e: $mode: PASS"; else echo "dispatch_e2e: $mode: FAIL"; fi
exit "$status"
