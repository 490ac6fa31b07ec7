#!/usr/bin/env bash
# Every test: installs what is missing, configures with warnings as errors,
# builds with -j2 and runs the whole ctest suite. The configuration is the
# one scripts/demo.sh uses (scripts/lib/build.sh), so after the demo only
# what it did not build is compiled.
#   usage: scripts/test.sh [build-dir]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
bash "$root/scripts/setup.sh" test
. "$root/scripts/lib/build.sh"
configure_build "$root" "$build"
cmake --build "$build" -j2
# Every public header compiles on its own.
cmake --build "$build" -j2 --target all_verify_interface_header_sets
ctest --test-dir "$build" --output-on-failure -j2
