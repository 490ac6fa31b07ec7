#!/usr/bin/env bash
# The main job: builds what is needed and runs the demo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j2 --target roomkeeper_basic
"$build/examples/roomkeeper_basic"
