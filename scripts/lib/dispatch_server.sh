# SPDX-License-Identifier: MIT
# Shell helpers shared by the scripts that run examples/dispatch_server in
# the background (demo, e2e test, soak, leak check). Source it; the helpers
# set variables in the caller's shell (a subshell could not `wait`).

# temp_dir_and_server_trap: makes `tmp` (a temporary directory), sets `pid`
# (the server's, once the caller starts it) empty, and traps EXIT to kill
# the server if it is still running and remove `tmp`.
temp_dir_and_server_trap() {
  tmp="$(mktemp -d)"
  pid=""
  trap 'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        rm -rf "$tmp"' EXIT
}

# wait_for_port LOG PID [TRIES]: waits (TRIES x 0.05 s, default 10 s) for the
# server's "listening on HOST:PORT" line in LOG and sets `port`; returns 1,
# with `port` empty, if PID exits or time runs out first.
wait_for_port() {
  local log="$1" server_pid="$2" tries="${3:-200}"
  port=""
  for _ in $(seq "$tries"); do
    port="$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$log")"
    [ -n "$port" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# wait_exit PID [TRIES] [STEP]: waits up to TRIES x STEP seconds (default
# 200 x 0.05) for PID to exit and sets `server_status` to its exit status.
# If it is still running, sets `server_status` to 1 and returns 1 (the
# caller's cleanup kills it).
wait_exit() {
  local server_pid="$1" tries="${2:-200}" step="${3:-0.05}"
  for _ in $(seq "$tries"); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep "$step"
  done
  server_status=0
  if kill -0 "$server_pid" 2>/dev/null; then
    server_status=1
    return 1
  fi
  wait "$server_pid" || server_status=$?
}

# http_get PORT PATH: prints the body of GET http://127.0.0.1:PORT/PATH,
# with bash's /dev/tcp (no curl needed); prints nothing on failure.
http_get() {
  local reply
  reply="$(exec 5<>"/dev/tcp/127.0.0.1/$1" &&
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&5 &&
    timeout 5 cat <&5)" 2>/dev/null || return 0
  printf '%s\n' "${reply#*$'\r\n\r\n'}"
}

# start_ops_server NAME SERVER: for the operations tests. Makes `tmp` (a
# temporary directory), traps EXIT to kill and reap every pid still in
# `pids` (the caller removes the ones it has reaped) and then remove `tmp`,
# starts SERVER there (ephemeral port, 2 loops, a fresh database, a 500 ms
# auth deadline), adds it to `pids` as `spid`, and sets `port`. Exits with
# a message if the server does not start.
start_ops_server() {
  local name="$1" bin="$2"
  tmp="$(mktemp -d)"
  pids=""
  trap 'for p in $pids; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
  : >"$tmp/server.log"
  "$bin" --port 0 --threads 2 --db "$tmp/dispatch.db" --auth-timeout-ms 500 \
    >"$tmp/server.log" 2>&1 &
  spid=$!
  pids="$spid"
  if ! wait_for_port "$tmp/server.log" "$spid"; then
    echo "$name: the server did not start"; cat "$tmp/server.log"; exit 1
  fi
}
