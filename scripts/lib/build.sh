# SPDX-License-Identifier: MIT
# The one CMake configuration of build/ that scripts/test.sh and
# scripts/demo.sh share, so that running both (the README's two commands)
# configures and compiles the tree once. Source it.

# configure_build ROOT BUILD: configures BUILD from the checkout at ROOT
# (-Werror, tests, examples and the benchmark on). Passes CMake's output through.
configure_build() {
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DROOMKEEPER_WERROR=ON -DROOMKEEPER_BUILD_TESTS=ON -DROOMKEEPER_BUILD_EXAMPLES=ON \
    -DROOMKEEPER_BUILD_BENCH=ON
}
