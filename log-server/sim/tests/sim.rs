//! The simulator as a test suite: a bounded batch of random seeds, replay determinism, the
//! checkers catching a deliberately wrong rule, and scenarios named after the failure.
#![allow(clippy::unwrap_used)]

use chainlog_sim::{run_seed, run_seeds, Cluster, SimOptions, TrimMode};
use std::time::Instant;

/// Seeds in the CI batch; `CHAINLOG_SIM_SEEDS` overrides.
fn batch_seeds() -> u64 {
    std::env::var("CHAINLOG_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

#[test]
fn a_batch_of_seeds_passes_every_checker() {
    let n = batch_seeds();
    let opts = SimOptions::default();
    let started = Instant::now();
    let s = run_seeds(0, n, &opts);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "chainlog-sim: {} seeds run, {} steps, {:.0} steps/s, acked {}, crashes {}, bit flips {}, \
         partitions {}, trims {}, disk fulls {}",
        s.seeds,
        s.steps,
        s.steps as f64 / secs.max(1e-9),
        s.acked_appends,
        s.crashes,
        s.bit_flips,
        s.partitions,
        s.trims,
        s.disk_fulls
    );
    for f in &s.failures {
        println!("{f}");
    }
    assert!(s.failures.is_empty(), "{} seeds failed", s.failures.len());
    assert!(s.acked_appends > n, "the workload must actually append");
    assert!(
        s.crashes > 0 && s.partitions > 0,
        "faults must actually happen"
    );
    assert!(s.trims > n, "the workload must actually trim");
    assert!(s.disk_fulls > 0, "disks must actually fill");
}

#[test]
fn a_seed_replays_identically() {
    let opts = SimOptions::default();
    for seed in [3, 17, 12345] {
        let a = run_seed(seed, &opts).unwrap();
        let b = run_seed(seed, &opts).unwrap();
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!((a.steps, a.sim_time_us), (b.steps, b.sim_time_us));
    }
    let a = run_seed(3, &opts).unwrap();
    let c = run_seed(4, &opts).unwrap();
    assert_ne!(
        a.trace_hash, c.trace_hash,
        "different seeds, different runs"
    );
}

#[test]
fn acking_before_the_successor_is_caught() {
    let opts = SimOptions {
        steps: 1500,
        nodes: Some(3),
        bug_ack_before_successor: true,
        ..SimOptions::default()
    };
    let caught = (0..20).find_map(|seed| run_seed(seed, &opts).err());
    let f = caught.expect("the checkers must catch the wrong ack rule within 20 seeds");
    println!("caught: {f}");
    assert!(f.message.contains("not durable"), "{}", f.message);
    assert!(f.repro().contains("--bug-ack-before-successor"));
    // And the failure replays.
    let again = run_seed(f.seed, &opts).unwrap_err();
    assert_eq!((again.step, again.message), (f.step, f.message));
}

fn quiet_cluster(seed: u64, nodes: usize) -> Cluster {
    Cluster::new(
        seed,
        SimOptions {
            nodes: Some(nodes),
            faults: false,
            ..SimOptions::default()
        },
    )
}

#[test]
fn head_crash_mid_stream() {
    let mut cluster = quiet_cluster(11, 3);
    cluster.run_for(30_000).unwrap();
    let before = cluster
        .checker
        .acked_end(chainlog_core::LogId::from_name("default"));
    assert!(before.0 > 0);
    cluster.node(1).crash();
    cluster.run_for(20_000).unwrap();
    cluster.node(1).restart();
    cluster.run_for(20_000).unwrap();
    cluster.run_liveness().unwrap();
    let after = cluster
        .checker
        .acked_end(chainlog_core::LogId::from_name("default"));
    assert!(after > before, "the chain accepts appends again");
}

/// Each position of a three-node chain in turn: its disk fills mid-stream, the log fails
/// there and the chain stops committing; once space returns it takes appends again in place
/// (no node restarts), and everything acknowledged survives.
#[test]
fn a_full_disk_stalls_the_chain_until_space_returns_without_a_restart() {
    let log = chainlog_core::LogId::from_name("default");
    for node in 1..=3u32 {
        let mut cluster = quiet_cluster(21, 3);
        cluster.run_for(20_000).unwrap();
        cluster.node(node).disk_full_for(30_000);
        cluster.run_for(15_000).unwrap();
        let st = cluster.node(node).log_status().unwrap();
        assert_eq!(
            st.failed,
            Some(chainlog_core::ErrorCode::StorageFull),
            "node {node}"
        );
        let stalled = cluster.checker.acked_end(log);
        cluster.run_for(10_000).unwrap();
        assert_eq!(
            cluster.checker.acked_end(log),
            stalled,
            "node {node}: nothing commits while a replica cannot write"
        );
        // Space returns 30 ms after it filled; the writer's check reopens the log.
        cluster.run_for(30_000).unwrap();
        assert_eq!(cluster.node(node).log_status().unwrap().failed, None);
        assert!(
            cluster.checker.acked_end(log) > stalled,
            "node {node}: appends commit again"
        );
        cluster.run_liveness().unwrap();
        let r = cluster.report();
        assert_eq!((r.crashes, r.disk_fulls), (0, 1), "node {node}");
    }
}

#[test]
fn middle_crash_stalls_then_resumes() {
    let mut cluster = quiet_cluster(12, 3);
    cluster.run_for(20_000).unwrap();
    cluster.node(2).crash();
    cluster.run_for(10_000).unwrap();
    let log = chainlog_core::LogId::from_name("default");
    let stalled = cluster.checker.acked_end(log);
    cluster.run_for(30_000).unwrap();
    assert_eq!(
        cluster.checker.acked_end(log),
        stalled,
        "nothing commits while a replica is down"
    );
    cluster.node(2).restart();
    cluster.run_liveness().unwrap();
    assert!(cluster.checker.acked_end(log) > stalled);
}

#[test]
fn tail_disk_bit_flip_is_repaired_from_its_predecessor() {
    let mut cluster = quiet_cluster(13, 3);
    cluster.run_for(40_000).unwrap();
    cluster.node(3).crash_with_bit_flip();
    assert!(cluster.node(3).is_damaged());
    cluster.node(3).restart();
    cluster.run_liveness().unwrap();
    assert!(
        !cluster.node(3).is_damaged(),
        "the tail holds every committed entry again"
    );
}

#[test]
fn head_disk_bit_flip_is_repaired_from_its_successor() {
    let mut cluster = quiet_cluster(14, 2);
    cluster.run_for(40_000).unwrap();
    cluster.node(1).crash_with_bit_flip();
    cluster.node(1).restart();
    let cut = cluster.node(1).disk_end();
    let kept = cluster.node(2).disk_synced_end();
    assert!(
        cut < kept,
        "the flip cut committed data from the head ({cut} vs {kept})"
    );
    cluster.run_liveness().unwrap();
    assert!(cluster.node(1).disk_end() >= kept);
}

#[test]
fn predecessor_restarts_shorter_than_its_successor() {
    // The head's syncs are slow, its successor's fast: the successor makes durable what the
    // head has only written; a head crash then loses that suffix on the head alone.
    let found = (0..50).find_map(|seed| {
        let mut cluster = quiet_cluster(seed, 2);
        cluster.node(1).sync_delay_us(20_000, 30_000);
        cluster.node(2).sync_delay_us(50, 100);
        cluster.run_for(25_000).unwrap();
        cluster.node(1).crash();
        cluster.node(1).restart();
        let head = cluster.node(1).disk_end();
        let succ = cluster.node(2).disk_end();
        (head < succ).then_some((cluster, succ))
    });
    let (mut cluster, succ_end) = found.expect("some seed loses a suffix on the head only");
    cluster.node(1).sync_delay_us(50, 500);
    cluster.run_liveness().unwrap();
    // Nothing was truncated anywhere: the head adopted its successor's suffix.
    assert!(cluster.node(2).disk_end() >= succ_end);
    assert!(cluster.node(1).disk_end() >= succ_end);
}

/// A three-node chain that trims aggressively; the tail's disk rots while it is down, so it
/// restarts without committed offsets its predecessor has trimmed since. Returns the cluster
/// just after the restart (and the tail's end then) for the first seed where that happened.
fn tail_restarts_behind_its_predecessors_start(bug: bool) -> (Cluster, chainlog_core::Offset) {
    let found = (0..50).find_map(|seed| {
        let mut cluster = Cluster::new(
            seed,
            SimOptions {
                nodes: Some(3),
                faults: false,
                trims: Some(TrimMode::Aggressive),
                bug_no_restart_at_pred_start: bug,
                ..SimOptions::default()
            },
        );
        cluster.run_for(60_000).unwrap();
        cluster.node(3).crash_with_bit_flip();
        cluster.run_for(20_000).unwrap();
        cluster.node(3).restart();
        let end = cluster.node(3).disk_end();
        (end < cluster.node(2).disk_start()).then_some((cluster, end))
    });
    found.expect("some seed trims past what the damaged tail kept")
}

#[test]
fn a_successor_behind_its_predecessors_start_restarts_its_log_there() {
    let (mut cluster, end) = tail_restarts_behind_its_predecessors_start(false);
    cluster.run_liveness().unwrap();
    assert!(
        cluster.node(3).disk_start() > end,
        "the tail's log restarted past what it held"
    );
    assert!(
        !cluster.node(3).is_damaged(),
        "and holds every committed entry it must"
    );
}

#[test]
fn switching_off_the_restart_rule_is_caught() {
    let (mut cluster, _) = tail_restarts_behind_its_predecessors_start(true);
    let f = cluster.run_liveness().unwrap_err();
    println!("caught: {f}");
    assert!(f.message.contains("liveness"), "{}", f.message);
    assert!(f.repro().contains("--bug-no-restart-at-pred-start"));
}
