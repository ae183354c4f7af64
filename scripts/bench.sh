#!/usr/bin/env bash
# The benchmark report for issues #2 and #3: builds release and runs `chainlog-bench suite`
# (floors, single node and 3-node chain at 1/16/128 in flight, interleaved rounds, ratios to the
# floors of the same run). Arguments pass through, e.g. `scripts/bench.sh --rounds 5 --out r/`.
# Results: bench-results/report.{md,json} (and a timestamped copy of each).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p chainlog-server -p chainlog-bench --bins
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/chainlog-bench" suite --server-bin "$target/release/log-server" "$@"
