#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests in real network namespaces, and the
# conformance runner against Istio's own rulesets. Run as root, after scripts/provision.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
shared=${SHARED_DIR:-../shared}
# A namespace test that cannot run here fails instead of being reported as ignored (tests/build.rs).
export CI="${CI:-true}"

# Gates: the tree formatted (rustfmt.toml) and clippy clean, warnings as errors.
cargo fmt --all --check
(cd fuzz && cargo fmt --check)
cargo clippy --workspace --all-targets --release --locked -- -D warnings

# Integration tests drive the release binaries, so build them first (one profile for all;
# istio-iptables linked statically, as it ships).
scripts/build.sh
cargo test --release --workspace --locked -- --test-threads=2
# Supply chain: licenses, bans, sources (advisories need GitHub: see deny.toml).
cargo deny check licenses bans sources
# Each fuzz target for a bounded time (FUZZ_SECONDS, default 20 each).
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"

if [ ! -x "$shared/conformance/run" ]; then
  echo "conformance runner not found at $shared/conformance (set SHARED_DIR); skipped"
  exit 0
fi
status=0
for backend in iptables nftables; do
  echo "== conformance ($backend)"
  "$shared/conformance/run" --backend "$backend" target/release/istio-iptables || status=1
done
exit $status
