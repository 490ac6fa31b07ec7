#!/usr/bin/env bash
# Builds the libFuzzer target with clang and runs it for N seconds (default
# 60) on a copy of the seed corpus. Run it longer to search harder:
#   bash scripts/fuzz.sh 3600
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-60}"
bash "$root/scripts/setup.sh"
b="$root/build-fuzz"
# Examples left at their default (ON): the fuzzer's instrumented copy of
# the library must not leak into their link (an example is built to prove it).
cmake -S "$root" -B "$b" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
  -DROOMKEEPER_BUILD_FUZZ=ON -DROOMKEEPER_BUILD_TESTS=OFF \
  -DROOMKEEPER_INSTALL=OFF >/dev/null
cmake --build "$b" -j2 --target keeper_fuzz roomkeeper_basic
"$b/examples/roomkeeper_basic" >/dev/null
work="$b/corpus"
mkdir -p "$work"
cp -n "$root"/tests/fuzz/corpus/* "$work"/ 2>/dev/null || true
"$b/tests/fuzz/keeper_fuzz" -max_total_time="$secs" -max_len=512 -timeout=10 -entropic=0 \
  -print_final_stats=1 "$work"
