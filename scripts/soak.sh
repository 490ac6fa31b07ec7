#!/usr/bin/env bash
# Soak of the dispatch demo (not part of the default tests; see docs/soak.md).
# Builds dispatch_server and dispatch_load, starts the server on an ephemeral
# loopback port with short deadlines (auth 500 ms, typing auto-clear 300 ms)
# and a fresh SQLite file, then runs dispatch_load round after round (each
# round: CLIENTS clients connect, log in or not, and go, clean or abrupt; the
# round must end with the server back to zero) until CYCLES connect/
# disconnect cycles are done. Meanwhile the server's RSS (VmRSS from
# /proc/PID/status) and a few GET /stats counters are sampled every second
# into OUT/soak-rss.csv; the RSS after each round, with the server idle, goes
# to OUT/soak-rounds.csv. At the end: /stats must be all zero, SIGTERM, the
# server must exit 0; the CSV is plotted to OUT/soak-rss.png (gnuplot) and
# the figures are written to OUT/summary.txt.
#   usage: scripts/soak.sh [out-dir] [cycles] [clients-per-round]
#   defaults:              build-soak  100000   1000
#   environment: BUILD_DIR (default build), JOBS (build parallelism, 2),
#                CONCURRENCY (dispatch_load --concurrency, 128)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/build-soak}"
cycles="${2:-100000}"
per_round="${3:-1000}"
build="${BUILD_DIR:-$root/build}"
jobs="${JOBS:-2}"
concurrency="${CONCURRENCY:-128}"
auth_ms=500
typing_ms=300

# What this script needs beyond scripts/setup.sh: gnuplot for the plot,
# curl for GET /stats.
bash "$root/scripts/setup.sh"
. "$root/scripts/lib/dispatch_server.sh"
extra=(gnuplot-nox curl)
missing=()
for p in "${extra[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DROOMKEEPER_BUILD_EXAMPLES=ON >/dev/null
cmake --build "$build" -j"$jobs" --target dispatch_server dispatch_load
bin="$build/examples"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/soak-rss.csv "$out"/soak-rounds.csv "$out"/soak-rss.png \
  "$out"/summary.txt "$out"/final-stats.json "$out"/dispatch.db* "$out"/load-*.log
pid="" sampler=""
cleanup() {
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; fi
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

now_ns() { date +%s%N; }
rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB$/\1/p' "/proc/$1/status" 2>/dev/null; }
# field NAME JSON: the integer value of "NAME" in a flat JSON object.
field() { sed -n "s/.*\"$1\":\([0-9-]*\).*/\1/p" <<<"$2"; }

echo
echo "== dispatch_server: ephemeral port, auth deadline $auth_ms ms, typing auto-clear $typing_ms ms"
: >"$out/server.log"
"$bin/dispatch_server" --port 0 --threads 2 --db "$out/dispatch.db" \
  --auth-timeout-ms "$auth_ms" --typing-timeout-ms "$typing_ms" >"$out/server.log" 2>&1 &
pid=$!
if ! wait_for_port "$out/server.log" "$pid"; then
  echo "soak: the server did not start:"; cat "$out/server.log"; exit 1
fi
url="http://127.0.0.1:$port/stats"
echo "   pid $pid, listening on 127.0.0.1:$port"

# The sampler: one row a second, on a fixed 1 s grid from t0.
t0="$(now_ns)"
echo 0 >"$out/.cycles"
echo "elapsed_s,rss_kib,cycles_done,connectedClients,trackedRooms,typingTimers,bytes,wal_bytes" \
  >"$out/soak-rss.csv"
(
  i=0
  while kill -0 "$pid" 2>/dev/null; do
    r="$(rss_kib "$pid")"
    [ -n "$r" ] || break
    s="$(curl -s --max-time 0.5 "$url" || true)"
    # wal_bytes: SQLite's WAL, which the store's writer thread keeps bounded.
    printf '%d,%s,%s,%s,%s,%s,%s,%s\n' "$i" "$r" "$(cat "$out/.cycles")" \
      "$(field connectedClients "$s")" "$(field trackedRooms "$s")" \
      "$(field typingTimers "$s")" "$(field bytes "$s")" \
      "$(stat -c %s "$out/dispatch.db-wal" 2>/dev/null || echo 0)" >>"$out/soak-rss.csv"
    i=$((i + 1))
    wait_ns=$((t0 + i * 1000000000 - $(now_ns)))
    [ "$wait_ns" -gt 0 ] && sleep "$(printf '%d.%09d' $((wait_ns / 1000000000)) $((wait_ns % 1000000000)))"
  done
) &
sampler=$!

sleep 3  # a few idle samples first: the RSS at start
rounds=$(((cycles + per_round - 1) / per_round))
echo
echo "== $cycles connect/disconnect cycles: $rounds rounds of dispatch_load --clients $per_round --concurrency $concurrency"
echo "round,cycles_done,elapsed_s,rss_kib" >"$out/soak-rounds.csv"
done_cycles=0
for k in $(seq "$rounds"); do
  n=$((cycles - done_cycles < per_round ? cycles - done_cycles : per_round))
  if ! "$bin/dispatch_load" --port "$port" --clients "$n" --concurrency "$concurrency" --arrival-rate 0 \
      >"$out/load-last.log" 2>&1; then
    cp "$out/load-last.log" "$out/load-failed-round-$k.log"
    echo "soak: FAIL: dispatch_load failed in round $k (the server did not come back to zero"
    echo "      or a client failed); its output is in $out/load-failed-round-$k.log:"
    tail -40 "$out/load-last.log"
    exit 1
  fi
  done_cycles=$((done_cycles + n))
  echo "$done_cycles" >"$out/.cycles.tmp" && mv "$out/.cycles.tmp" "$out/.cycles"
  t="$(( ($(now_ns) - t0) / 1000000 ))"
  r="$(rss_kib "$pid")"
  printf '%d,%d,%d.%03d,%s\n' "$k" "$done_cycles" $((t / 1000)) $((t % 1000)) "$r" \
    >>"$out/soak-rounds.csv"
  if [ "$k" -eq 1 ] || [ $((k % 10)) -eq 0 ] || [ "$k" -eq "$rounds" ]; then
    printf '   round %4d/%d  cycles %7d  %6d s  server RSS %6s KiB (idle, back to zero)\n' \
      "$k" "$rounds" "$done_cycles" $((t / 1000)) "$r"
  fi
done
sleep 3  # a few idle samples at the end

final="$(curl -s --max-time 2 "$url" || true)"
echo "$final" >"$out/final-stats.json"
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""
rm -f "$out/.cycles"

echo
echo "== final GET /stats"
echo "   $final"
status=0
for key in connectedClients authenticated userSockets connectionTimers typingTimers \
    trackedRooms rooms typingRows typingRowsQueued serverSessions pendingPersistence timersPending \
    callbackErrors persistFailures persistDropped; do
  v="$(field "$key" "$final")"
  if [ "$v" != "0" ]; then echo "soak: FAIL: final $key = ${v:-?}"; status=1; fi
done

echo
echo "== SIGTERM to the server"
kill -TERM "$pid"
wait_exit "$pid" || echo "soak: the server did not exit within 10 s"
pid=""
grep -v '^\[warning\] roomkeeper: high connection count' "$out/server.log" | sed 's/^/   server: /'
[ "$server_status" -eq 0 ] || { echo "soak: FAIL: server exit status $server_status"; status=1; }
rows="$(sqlite3 "$out/dispatch.db" 'SELECT COUNT(*) FROM typing_indicators' 2>/dev/null || echo '?')"
[ "$rows" = "0" ] || { echo "soak: FAIL: typing rows left in the database: $rows"; status=1; }

# The figures. Warm-up = the first 10% of the cycles. Slopes are least-squares
# fits over the second half of the cycles: of the idle RSS after each round
# (soak-rounds.csv) and of every per-second sample (soak-rss.csv).
awk -F, -v cycles="$cycles" -v per="$per_round" -v conc="$concurrency" '
  function fit(sx, sy, sxx, sxy, n) {
    return (n > 1 && n * sxx - sx * sx != 0) ? (n * sxy - sx * sy) / (n * sxx - sx * sx) : 0
  }
  FNR == 1 { next }
  FILENAME ~ /soak-rounds.csv$/ {
    if (warm == "" && $2 >= cycles / 10) { warm = $4; warmc = $2 }
    if (first_idle == "") first_idle = $4
    last_idle = $4; dur_rounds = $3
    if ($2 > cycles / 2) { n1++; x1 += $2; y1 += $4; xx1 += $2 * $2; xy1 += $2 * $4 }
    next
  }
  {
    if (start == "") start = $2
    if ($2 > max) { max = $2; maxt = $1 }
    if ($8 > walmax) walmax = $8
    end = $2; dur = $1
    if ($3 > cycles / 2) { n2++; x2 += $3; y2 += $2; xx2 += $3 * $3; xy2 += $3 * $2 }
  }
  END {
    printf "cycles:                          %d (%d rounds of %d clients, concurrency %d)\n", cycles, (cycles + per - 1) / per, per, conc
    printf "duration of the rounds:          %.0f s (%.0f cycles/s)\n", dur_rounds, cycles / dur_rounds
    printf "samples:                         %d (one a second)\n", dur + 1
    printf "RSS at start (idle):             %d KiB\n", start
    printf "RSS idle after round 1:          %d KiB\n", first_idle
    printf "RSS idle after warm-up (%d):  %d KiB\n", warmc, warm
    printf "RSS max (during a round):        %d KiB at %d s\n", max, maxt
    printf "RSS idle after the last round:   %d KiB\n", last_idle
    printf "RSS at end (last sample):        %d KiB\n", end
    printf "slope, 2nd half, idle RSS:       %+.1f KiB per 10k cycles (%d rounds)\n", fit(x1, y1, xx1, xy1, n1) * 10000, n1
    printf "slope, 2nd half, all samples:    %+.1f KiB per 10k cycles (%d samples)\n", fit(x2, y2, xx2, xy2, n2) * 10000, n2
    printf "SQLite WAL, largest sample:      %d bytes\n", walmax
  }' "$out/soak-rounds.csv" "$out/soak-rss.csv" >"$out/summary.txt"
{
  echo "final /stats:                    $final"
  echo "server exit status:              $server_status; typing rows in the database: $rows"
} >>"$out/summary.txt"

gnuplot <<EOF
set terminal pngcairo size 1200,650 font "DejaVu Sans,11"
set output "$out/soak-rss.png"
set datafile separator ","
set key autotitle columnhead
set title "dispatch\\\\_server RSS during $cycles WebSocket connect/disconnect cycles ($per_round clients per round)"
set xlabel "elapsed (s)"
set ylabel "server RSS (MiB)"
set y2label "connected clients"
set yrange [0:*]
set y2range [0:*]
set ytics nomirror
set y2tics
set grid ytics
set key below horizontal
plot "$out/soak-rss.csv" using 1:4 axes x1y2 with lines lc rgb "#c8c8c8" title "connectedClients (right axis)", \
     "$out/soak-rss.csv" using 1:(\$2/1024) with lines lw 2 lc rgb "#1f77b4" title "RSS, sampled every second", \
     "$out/soak-rounds.csv" using 3:(\$4/1024) with points pt 7 ps 0.6 lc rgb "#d62728" title "RSS after each round (server idle, all counts 0)"
EOF

echo
echo "== figures ($out/summary.txt)"
sed 's/^/   /' "$out/summary.txt"
echo "   files: $out/soak-rss.csv, $out/soak-rounds.csv, $out/soak-rss.png"
if [ "$status" -eq 0 ]; then echo; echo "soak: PASS"; else echo; echo "soak: FAIL"; fi
exit "$status"
