#!/usr/bin/env bash
# The extra configurations CI runs after the main test command:
#   asan    the whole test suite under AddressSanitizer + UBSan (LeakSanitizer on)
#   tsan    the concurrency tests under ThreadSanitizer
#   cxx20   a C++20, shared-library build running every unit test
# usage: scripts/checks.sh [asan|tsan|cxx20 ...]   (default: all three)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
common=(-G Ninja -DROOMKEEPER_WERROR=ON -DROOMKEEPER_BUILD_TESTS=ON
        -DROOMKEEPER_SKIP_PACKAGE_TESTS=ON -DROOMKEEPER_INSTALL=OFF)
run_asan() {
  local b="$root/build-asan"
  cmake -S "$root" -B "$b" "${common[@]}" -DCMAKE_BUILD_TYPE=Debug \
    -DROOMKEEPER_BUILD_EXAMPLES=ON \
    -DCMAKE_CXX_FLAGS="-O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  cmake --build "$b" -j2
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$b" --output-on-failure -j2
}
run_tsan() {
  local b="$root/build-tsan"
  # Asio's fenced blocks use std::atomic_thread_fence, which TSan does not
  # model (GCC: -Wtsan); its scheduler's mutex orders the handlers anyway.
  cmake -S "$root" -B "$b" "${common[@]}" -DCMAKE_BUILD_TYPE=Debug \
    -DROOMKEEPER_BUILD_EXAMPLES=OFF -DCMAKE_CXX_FLAGS="-O1 -g -fsanitize=thread -DBOOST_ASIO_DISABLE_FENCED_BLOCK"
  cmake --build "$b" -j2 --target concurrency_test
  # The multi-loop tests (one Keeper per loop thread), where the cluster
  # target is built (it needs hiredis and Boost; setup.sh installs both).
  if grep -q 'multi_loop_test' "$b/build.ninja" 2>/dev/null ||
     grep -q 'multi_loop_test' "$b/Makefile" 2>/dev/null; then
    cmake --build "$b" -j2 --target multi_loop_test cluster_loop_suite_test
  fi
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    ctest --test-dir "$b" --output-on-failure -L concurrency
}
run_cxx20() {
  local b="$root/build-cxx20"
  # The library and its tests (the examples are built as C++17 elsewhere).
  cmake -S "$root" -B "$b" "${common[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DROOMKEEPER_BUILD_EXAMPLES=OFF -DCMAKE_CXX_STANDARD=20 -DBUILD_SHARED_LIBS=ON
  cmake --build "$b" -j2
  ctest --test-dir "$b" --output-on-failure -j2
}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(asan tsan cxx20)
for t in "${targets[@]}"; do
  echo "== checks: $t"
  "run_$t"
done
