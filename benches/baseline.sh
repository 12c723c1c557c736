#!/usr/bin/env bash
# The load benchmark against a baseline: builds the bridge at REV (default af08e95, the code
# before the performance work) in a git worktree with a target directory of its own, then runs
# `cargo bench --bench load` with BENCH_BASELINE_BIN pointing at it, so that the two builds run
# in turn on the same broker and load. The benchmark's environment variables apply (e.g.
# BENCH_LEVELS=64 benches/baseline.sh).
#
#   benches/baseline.sh [REV]
set -euo pipefail
rev=${1:-af08e95}
root=$(git rev-parse --show-toplevel)
dir=${BENCH_BASELINE_DIR:-$root/../tamio-bridge-baseline-$rev}
if [ ! -d "$dir" ]; then
  git -C "$root" worktree add --detach "$dir" "$rev"
fi
CARGO_TARGET_DIR="$dir/target" cargo build --release --locked --bin tamio-kafka-bridge \
  --manifest-path "$dir/Cargo.toml"
cd "$root"
BENCH_BASELINE_BIN="$dir/target/release/tamio-kafka-bridge" cargo bench --bench load
