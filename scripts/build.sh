#!/usr/bin/env bash
# Builds the release binaries, istio-iptables and istio-capture-cni as static executables:
# glibc, libnftnl and libmnl inside, no shared library, no loader. Like Istio's own (Go)
# binaries, istio-iptables then runs in any init-container image (and starts about 0.4 ms
# sooner, BENCHMARKS.md), and the plugin on any x86-64 or arm64 node, whatever its glibc or
# libraries. The plugin must be static (its installer refuses a dynamic build), so without a
# static libmnl (scripts/static-libs.sh) this fails when building it; istio-iptables is then
# linked dynamically like the others.
#
# Only those two crates are built differently: `cargo rustc` passes crt-static to each alone
# and reuses the dependencies the workspace build made (crt-static for the whole workspace
# would need an explicit --target, which moves every binary out of target/release). A plain
# `cargo build` of either links it dynamically again; this script puts the static one back.
#
# Usage: scripts/build.sh [-q] [PACKAGE...]   (default: the whole workspace)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo=(--release --locked)
if [ "${1:-}" = "-q" ]; then
  cargo+=(--quiet)
  shift
fi
static_libs=$(scripts/static-libs.sh --find) || static_libs=""

# The packages whose binary (of the same name) is linked statically below.
static_packages=(istio-iptables istio-capture-cni)
build=()
static=()
if [ $# -eq 0 ]; then
  build=(--workspace)
  for package in "${static_packages[@]}"; do
    build+=(--exclude "$package")
    static+=("$package")
  done
else
  for package in "$@"; do
    if [[ " ${static_packages[*]} " == *" $package "* ]]; then
      static+=("$package")
    else
      build+=(-p "$package")
    fi
  done
fi
if [ -z "$static_libs" ] && [ ${#static[@]} -gt 0 ]; then
  if [[ " ${static[*]} " == *" istio-capture-cni "* ]]; then
    echo "build: istio-capture-cni must be linked statically, and there is no static libmnl: run scripts/static-libs.sh" >&2
    exit 1
  fi
  echo "build: istio-iptables is linked dynamically (no static libmnl)" >&2
  build+=(-p istio-iptables)
  static=()
fi

if [ ${#build[@]} -gt 0 ]; then
  cargo build "${cargo[@]}" "${build[@]}"
fi
for package in "${static[@]}"; do
  cargo rustc "${cargo[@]}" -p "$package" --bin "$package" -- -C target-feature=+crt-static -L "native=$static_libs"
done
