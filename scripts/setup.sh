#!/usr/bin/env bash
# Installs, with apt-get, what a fresh Debian 12 machine lacks for one job,
# and says what it installs and why. Idempotent: one line when all is there.
#   usage: scripts/setup.sh [demo|test|ci]     (no argument: ci, everything)
#
#   demo  what scripts/demo.sh needs. That includes Catch2 and Python,
#         which the demo itself does not use: demo.sh configures build/
#         exactly as test.sh does (tests and benchmark on) so that the
#         README's two commands share one build, and CMake needs them
#         to configure it.
#   test  what scripts/test.sh needs: the same list, since it builds the
#         same tree, plus what the operations tests run (Prometheus,
#         Chromium, Node).
#   ci    test plus the fuzzing toolchain (clang and libFuzzer's runtime)
#         for scripts/fuzz.sh; scripts/checks.sh and fuzz.sh call setup.sh
#         with no argument, which is this.
set -euo pipefail
profile="${1:-ci}"
case "$profile" in
  demo | test | ci) ;;
  *) echo "usage: scripts/setup.sh [demo|test|ci]" >&2; exit 2 ;;
esac

# package|why
wanted=(
  "cmake|configures the build (CMake 3.25)"
  "ninja-build|runs the build"
  "g++|compiles the library, tests and examples (GCC 12, C++17)"
  "libabsl-dev|the library's hash maps (Abseil)"
  "libfmt-dev|the library's log and stats formatting (fmt)"
  "libboost-dev|the dispatch demo's WebSocket server and clients (Beast, Asio); the benchmark's Asio peer"
  "libsqlite3-dev|the dispatch demo stores typing indicators in SQLite"
  "nlohmann-json3-dev|the dispatch demo's JSON messages"
  "sqlite3|the demo and its end-to-end test count the rows left in the database file"
  "catch2|the unit tests (configured in the shared build, also by demo.sh)"
  "python3|the benchmark smoke test's output check (configured in the shared build)"
  "libhiredis-dev|roomkeeper::cluster formats and parses Redis commands with hiredis (0.14)"
  "redis-server|the cluster tests and demo start their own redis-server on a loopback port"
)
if [ "$profile" != demo ]; then
  # The operations tests (ctest -L ops); CMake registers them only where
  # these are found, so the demo's build does not need them.
  wanted+=(
    "prometheus|promtool tests the alert rules; the scrape test starts its own prometheus"
    "chromium|the dashboard test opens dispatch_server's page in headless Chromium"
    "nodejs|the dashboard test drives Chromium from a Node script (DevTools protocol)"
  )
fi
if [ "$profile" = ci ]; then
  wanted+=(
    "clang|scripts/fuzz.sh builds the fuzzer with clang"
    "libclang-rt-14-dev|libFuzzer's runtime for clang 14 (scripts/fuzz.sh)"
  )
fi

missing=() reasons=()
for entry in "${wanted[@]}"; do
  pkg="${entry%%|*}"
  dpkg -s "$pkg" >/dev/null 2>&1 && continue
  missing+=("$pkg")
  reasons+=("${entry#*|}")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup ($profile): all ${#wanted[@]} packages are installed"
  exit 0
fi

echo "setup ($profile): installing ${#missing[@]} of ${#wanted[@]} packages with apt-get:"
for i in "${!missing[@]}"; do
  printf '  %-20s %s\n' "${missing[$i]}" "${reasons[$i]}"
done
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
start=$(date +%s)
echo "setup: apt-get update (the package lists)"
$SUDO apt-get update -qq
echo "setup: apt-get install (with their dependencies; a few minutes on a fresh machine)"
# One line a package as dpkg sets it up, so that progress shows. The
# operations packages without Recommends: prometheus would bring
# prometheus-node-exporter, another service.
plain=() bare=()
for pkg in "${missing[@]}"; do
  case "$pkg" in prometheus | chromium | nodejs) bare+=("$pkg") ;; *) plain+=("$pkg") ;; esac
done
for set in plain bare; do
  declare -n list="$set"
  [ ${#list[@]} -eq 0 ] && continue
  extra=()
  [ "$set" = bare ] && extra=(--no-install-recommends)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${extra[@]}" "${list[@]}" |
    sed -un 's/^Setting up \([^ ]*\) .*/  set up \1/p'
done
# The tests start their own prometheus on a free loopback port; the
# package's system service (started where systemd runs) is not wanted.
if [ -d /run/systemd/system ] && systemctl is-enabled prometheus >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "setup ($profile): done in $(( $(date +%s) - start )) s"
