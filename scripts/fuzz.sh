#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time: SECONDS_PER_TARGET (first argument,
# default 20, what scripts/test.sh uses; give e.g. 600 for a longer hunt). Any crash fails.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH" RUSTC_BOOTSTRAP=1
seconds=${1:-20}
# No sanitizer: the code under test is safe Rust; debug assertions (-a) catch overflows.
flags=(-s none -a)
cargo fuzz build "${flags[@]}"
for target in $(cargo fuzz list); do
  echo "== fuzz $target (${seconds}s)"
  mkdir -p "corpus/$target"
  # The corpus persists between runs so later runs start where earlier ones stopped.
  log=$(mktemp)
  if ! cargo fuzz run "${flags[@]}" "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4096 >"$log" 2>&1; then
    # -a: a target's own output (the CNI plugin's log lines) may carry the fuzzer's bytes.
    grep -aA40 panicked "$log" || tail -40 "$log"
    echo "fuzz target $target failed: the input is in fuzz/artifacts/$target"
    exit 1
  fi
  grep -aE '^Done' "$log"
  rm -f "$log"
done
