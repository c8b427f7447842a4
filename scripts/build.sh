#!/usr/bin/env bash
# Builds the release binaries (the whole workspace, or the cargo arguments given), then links
# istio-iptables statically: glibc, libnftnl and libmnl inside, no shared library, no loader.
# Like Istio's own (Go) binary, it then runs in any init-container image, and it starts in
# about 0.4 ms less (BENCHMARKS.md). Where no static libmnl is at hand
# (scripts/static-libs.sh), istio-iptables stays dynamically linked.
#
# Only the final link differs: `cargo rustc` passes crt-static to the istio-iptables crate
# alone, so the dependencies built above are reused (a workspace-wide crt-static would need
# an explicit --target, which moves every binary out of target/release). A later plain
# `cargo build` relinks istio-iptables dynamically; run this script again to get the static one.
#
# Usage: scripts/build.sh [CARGO BUILD ARGUMENTS...]   (default: --workspace)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked "${@:---workspace}"
if libs=$(scripts/static-libs.sh --find); then
  cargo rustc --release --locked -p istio-iptables --bin istio-iptables -- \
    -C target-feature=+crt-static -L "native=$libs"
else
  echo "build: istio-iptables is dynamically linked (no static libmnl)" >&2
fi
