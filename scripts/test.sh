#!/usr/bin/env bash
# The README's test command: the whole suite — unit, property, storage crash/recovery,
# real-process crash and chain tests, and a bounded batch of simulator seeds.
# Release mode: the simulator and the crash tests run several times faster, which pays for the
# longer build well inside CI's budget.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=1
# The simulator's seed batch size for the test run (the test prints seeds run and steps/s).
export CHAINLOG_SIM_SEEDS="${CHAINLOG_SIM_SEEDS:-400}"
cargo build --release --workspace --all-features --bins
cargo test --release --workspace --all-features -- --test-threads=2 "$@"
