#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test roomkeeper.
# Idempotent: does nothing when everything is there.
set -euo pipefail
pkgs=(cmake ninja-build g++ clang libabsl-dev libfmt-dev catch2 libboost-dev
      libsqlite3-dev sqlite3 nlohmann-json3-dev libclang-rt-14-dev python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
