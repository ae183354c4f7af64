//! `chainlog-sim --seed S [--steps N]` or `--seeds A..B`: runs seeds, prints seeds run, steps
//! per second and a one-line repro for every failure; exits non-zero if any seed failed.

use chainlog_sim::{run_seed, run_seeds, SimOptions, TrimMode};
use clap::Parser;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "chainlog-sim",
    about = "Deterministic simulation of chainlog chains"
)]
struct Args {
    /// Run one seed and print its report (trace hash included).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run a range of seeds, `A..B` (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    /// Events in the safety phase of each seed.
    #[arg(long, default_value_t = SimOptions::default().steps)]
    steps: u64,
    /// Fix the chain length (1..=8) instead of drawing it from the seed.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
    nodes: Option<u8>,
    /// No random faults in the safety phase.
    #[arg(long)]
    no_faults: bool,
    /// Switch on the deliberately wrong ack rule (the checkers must catch it).
    #[arg(long)]
    bug_ack_before_successor: bool,
    /// Switch off the rule that a successor behind its predecessor's start restarts its log
    /// there (the liveness check must catch it).
    #[arg(long)]
    bug_no_restart_at_pred_start: bool,
    /// How the workload trims (never, sometimes, aggressive) instead of drawing it from the
    /// seed.
    #[arg(long, value_parser = parse_trims)]
    trims: Option<TrimMode>,
}

fn parse_trims(s: &str) -> Result<TrimMode, String> {
    match s {
        "never" => Ok(TrimMode::Never),
        "sometimes" => Ok(TrimMode::Sometimes),
        "aggressive" => Ok(TrimMode::Aggressive),
        _ => Err(format!("{s:?}: want never, sometimes or aggressive")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = SimOptions {
        steps: args.steps,
        nodes: args.nodes.map(usize::from),
        faults: !args.no_faults,
        bug_ack_before_successor: args.bug_ack_before_successor,
        bug_no_restart_at_pred_start: args.bug_no_restart_at_pred_start,
        trims: args.trims,
        ..SimOptions::default()
    };
    let started = Instant::now();
    if let Some(seed) = args.seed {
        return match run_seed(seed, &opts) {
            Ok(r) => {
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "seed {} ok: nodes {} steps {} sim_time_us {} acked {} crashes {} bit_flips {} \
                     partitions {} trims {} disk_fulls {} trace {:016x} ({:.0} steps/s)",
                    r.seed,
                    r.nodes,
                    r.steps,
                    r.sim_time_us,
                    r.acked_appends,
                    r.crashes,
                    r.bit_flips,
                    r.partitions,
                    r.trims,
                    r.disk_fulls,
                    r.trace_hash,
                    r.steps as f64 / secs.max(1e-9)
                );
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("{f}");
                ExitCode::FAILURE
            }
        };
    }
    let (from, to) = match args.seeds.as_deref().map(parse_range) {
        Some(Some(r)) => r,
        Some(None) => {
            eprintln!("--seeds wants A..B");
            return ExitCode::from(2);
        }
        None => (0, 100),
    };
    let s = run_seeds(from, to, &opts);
    let secs = started.elapsed().as_secs_f64();
    for f in &s.failures {
        println!("{f}");
    }
    println!(
        "seeds {}..{}: {} run, {} failed, {} steps, {:.0} steps/s, {:.0} seeds/min, acked {} \
         crashes {} bit_flips {} partitions {} trims {} disk_fulls {}",
        from,
        to,
        s.seeds,
        s.failures.len(),
        s.steps,
        s.steps as f64 / secs.max(1e-9),
        s.seeds as f64 * 60.0 / secs.max(1e-9),
        s.acked_appends,
        s.crashes,
        s.bit_flips,
        s.partitions,
        s.trims,
        s.disk_fulls
    );
    if s.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once("..")?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a < b).then_some((a, b))
}
