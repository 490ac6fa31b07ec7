#!/usr/bin/env bash
# Runs the whole benchmark (roomkeeper-bench in a Release build and the Node
# peers) in one go and renders the tables of docs/benchmarks.md.
#   usage: scripts/bench.sh [out.jsonl]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/build-bench/results.jsonl}"
bash "$root/scripts/setup.sh"
command -v node >/dev/null || { apt-get install -y -qq nodejs npm >/dev/null; }
cmake -S "$root" -B "$root/build-bench" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DROOMKEEPER_BUILD_BENCH=ON -DROOMKEEPER_BUILD_TESTS=OFF -DROOMKEEPER_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$root/build-bench" -j2 --target roomkeeper-bench
peers="$root/../shared/bench/peers/run.sh"
[ -f "$peers" ] || peers="${ROOMKEEPER_PEERS:-}"
{
  "$root/build-bench/bench/roomkeeper-bench" --workload all
  if [ -n "$peers" ] && [ -f "$peers" ]; then bash "$peers" 200000 1000000 20000; fi
} | tee "$out"
python3 "$root/bench/report.py" "$out"
