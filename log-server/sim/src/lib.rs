//! chainlog-sim: deterministic simulation of chains of real replica cores under network, disk
//! and crash faults, with invariant checkers after every step and a liveness phase.
//!
//! One seed fixes everything (fault schedule, timings, workload), so a failing seed replays
//! exactly; `Cluster::trace_hash` fingerprints a run to prove it.
#![forbid(unsafe_code)]

pub mod checker;
pub mod cluster;
pub mod disk;
pub mod rng;

pub use cluster::{run_seed, Cluster, Failure, Report, SimOptions, TrimMode};

/// Totals of a batch of seeds.
#[derive(Clone, Debug, Default)]
pub struct BatchSummary {
    pub seeds: u64,
    pub steps: u64,
    pub acked_appends: u64,
    pub crashes: u64,
    pub bit_flips: u64,
    pub partitions: u64,
    /// Trims acknowledged (`TrimOk`).
    pub trims: u64,
    /// Disk-full windows injected.
    pub disk_fulls: u64,
    pub failures: Vec<Failure>,
}

/// Runs seeds `from..to`, collecting failures rather than stopping at the first.
pub fn run_seeds(from: u64, to: u64, opts: &SimOptions) -> BatchSummary {
    let mut s = BatchSummary::default();
    for seed in from..to {
        s.seeds += 1;
        match run_seed(seed, opts) {
            Ok(r) => {
                s.steps += r.steps;
                s.acked_appends += r.acked_appends as u64;
                s.crashes += r.crashes;
                s.bit_flips += r.bit_flips;
                s.partitions += r.partitions;
                s.trims += r.trims;
                s.disk_fulls += r.disk_fulls;
            }
            Err(f) => {
                s.steps += f.step;
                s.failures.push(f);
            }
        }
    }
    s
}
