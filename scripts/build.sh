#!/usr/bin/env bash
# Builds the release binaries, istio-iptables as a static executable: glibc, libnftnl and
# libmnl inside, no shared library, no loader. Like Istio's own (Go) binary, it then runs in
# any init-container image, and it starts about 0.4 ms sooner (BENCHMARKS.md). Where no static
# libmnl is at hand (scripts/static-libs.sh), it is linked dynamically like the others.
#
# Only istio-iptables' own crate is built differently: `cargo rustc` passes crt-static to it
# alone and reuses the dependencies the workspace build made (crt-static for the whole
# workspace would need an explicit --target, which moves every binary out of target/release).
# A plain `cargo build` of istio-iptables links it dynamically again; this script puts the
# static one back.
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

# What `cargo build` makes: everything asked for, but istio-iptables where it is linked below.
link_static=false
if [ $# -eq 0 ]; then
  selection=(--workspace)
  if [ -n "$static_libs" ]; then
    selection+=(--exclude istio-iptables)
    link_static=true
  fi
else
  selection=()
  for package in "$@"; do
    if [ "$package" = istio-iptables ] && [ -n "$static_libs" ]; then
      link_static=true
    else
      selection+=(-p "$package")
    fi
  done
fi

if [ ${#selection[@]} -gt 0 ]; then
  cargo build "${cargo[@]}" "${selection[@]}"
fi
if $link_static; then
  cargo rustc "${cargo[@]}" -p istio-iptables --bin istio-iptables -- \
    -C target-feature=+crt-static -L "native=$static_libs"
elif [ -z "$static_libs" ]; then
  echo "build: istio-iptables is linked dynamically (no static libmnl)" >&2
fi
