#!/usr/bin/env bash
# Every test: installs what is missing, configures with warnings as errors,
# builds with -j2 and runs the whole ctest suite.
#   usage: scripts/test.sh [build-dir]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DROOMKEEPER_WERROR=ON -DROOMKEEPER_BUILD_TESTS=ON -DROOMKEEPER_BUILD_EXAMPLES=ON \
  -DROOMKEEPER_BUILD_BENCH=ON
cmake --build "$build" -j2
# Every public header compiles on its own.
cmake --build "$build" -j2 --target all_verify_interface_header_sets
ctest --test-dir "$build" --output-on-failure -j2
