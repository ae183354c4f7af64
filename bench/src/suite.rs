//! The whole report in one run: rounds that interleave the floors (disk, service), a single node and a
//! local chain (real `log-server` processes on temp dirs) at each in-flight level, so slow
//! periods of this shared disk hit floor and server alike; then medians and ratios.

use crate::cpu::{host_ticks, steal_share, CpuSample, CpuUse};
use crate::floor::{disk_floor_async, DiskFloor};
use crate::loopback::loopback_rtt;
use crate::report::{
    summarize, summarize_growing_service, summarize_retained, Meta, RoundResult, SuiteReport,
};
use crate::server::{ServerProc, START_TIMEOUT};
use crate::service::{service_floor, Space};
use crate::storage_stats::{StorageCounters, Turnaround};
use crate::workload::{connect, run_append, AppendLoad, AppendResult, ClientKnobs};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Log every run appends to.
pub const LOG_NAME: &str = "bench";
/// How long `create_log` keeps retrying while a fresh chain links up.
const CREATE_LOG_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes per log each node keeps in the steady-state chain run (two default segments), so
/// that run reaches the state of a log under retention within seconds.
pub const RETAINED_RETENTION_BYTES: u64 = 128 << 20;
/// Segments the head must have recycled before the steady-state run is measured: from then on
/// every roll takes a recycled segment instead of a freshly zeroed one.
pub const FILL_RECYCLED_MIN: u64 = 2;
/// Longest the steady-state run's fill may take; it is then measured anyway (and its counters
/// show how much zeroing it still did).
const FILL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for every node's spare segments before a run (zeroing 64 MiB takes well under
/// a second here; past this the run starts anyway, and says so).
const SPARES_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SuiteConfig {
    pub rounds: usize,
    pub levels: Vec<usize>,
    pub record_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Time per floor measurement (each level, each round).
    pub floor_budget: Duration,
    pub loopback_duration: Duration,
    pub loopback_frame_bytes: usize,
    pub io_mode: String,
    pub chain_nodes: u16,
    pub server_bin: PathBuf,
    /// Parent of the temp data dirs (the floor is measured there too: same file system).
    pub data_dir: PathBuf,
    pub out: PathBuf,
    pub client: ClientKnobs,
    /// The load generator's runtime: 0 = current-thread, N = multi-thread with N workers.
    pub client_threads: usize,
    /// CPU list every measured process runs on: this one (floors, services, load generator;
    /// pinned by `main` before anything starts) and the servers (`--cpus`). None: the OS's.
    pub cpus: Option<String>,
}

/// `git rev-parse --short HEAD` of the source tree (with `-dirty` if it has local changes).
pub fn git_rev() -> String {
    let src = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(src)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => match run(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(st) if !st.is_empty() => format!("{rev}-dirty"),
            _ => rev,
        },
        None => "unknown".into(),
    }
}

fn host_meta(m: &mut Meta) {
    // The machine's CPUs, not this process's share of them (which `--cpus` narrows).
    m.host_nproc = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    m.host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    m.host_cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
}

/// One closed-loop run on a fresh server: the load's result, the head's storage counters and
/// the CPU both processes used over it, and the head's status document afterwards.
struct ServerRun {
    result: AppendResult,
    storage: Option<StorageCounters>,
    cpu: Option<CpuUse>,
    status: Option<serde_json::Value>,
    /// Every node's own turnaround (None if some node did not answer `status`).
    turnaround: Option<Turnaround>,
}

async fn storage_counters(client: &chainlog_client::Client) -> Option<StorageCounters> {
    StorageCounters::from_status(&client.status().await.ok()?)
}

/// Every node's status document, in chain order (`None` for a node that did not answer).
async fn statuses(
    client: &chainlog_client::Client,
    nodes: usize,
) -> Vec<Option<serde_json::Value>> {
    let mut docs = Vec::with_capacity(nodes);
    for i in 0..nodes {
        docs.push(client.status_of(i).await.ok());
    }
    docs
}

/// Spare segments every node of the chain still has to zero (`None` if some node does not
/// report it).
async fn spares_pending(client: &chainlog_client::Client, nodes: usize) -> Option<u64> {
    let mut sum = 0;
    for doc in statuses(client, nodes).await {
        sum += crate::storage_stats::spares_pending(&doc?)?;
    }
    Some(sum)
}

/// Waits until no node is zeroing a spare segment: a fresh node zeroes its first spares at
/// start and again after the log's first segment takes one. That is start-up work; measured,
/// it lands on whichever level runs first (a growing log's rolls during a run still zero, and
/// the report counts them).
async fn wait_for_spares(
    client: &chainlog_client::Client,
    nodes: usize,
    what: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match spares_pending(client, nodes).await {
            None | Some(0) => return Ok(()),
            Some(n) if start.elapsed() >= SPARES_TIMEOUT => {
                eprintln!(
                    "  {what}: {n} spare segment(s) still being zeroed after {} s; running anyway",
                    SPARES_TIMEOUT.as_secs()
                );
                return Ok(());
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Appends closed loop, a second at a time, until the head has recycled `FILL_RECYCLED_MIN`
/// segments (or `FILL_TIMEOUT`).
async fn fill_until_recycling(
    client: &chainlog_client::Client,
    cfg: &SuiteConfig,
    inflight: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        let recycled = storage_counters(client)
            .await
            .map_or(0, |c| c.segments_recycled);
        if recycled >= FILL_RECYCLED_MIN {
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!("  fill: the head recycled {recycled} segments in {FILL_TIMEOUT:?}; measuring anyway");
            return Ok(());
        }
        let load = AppendLoad {
            log: LOG_NAME.into(),
            inflight,
            record_bytes: cfg.record_bytes,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            rate_per_s: None,
        };
        run_append(client, &load).await?;
    }
}

/// Waits for `server`, creates the log, (with `fill`) fills it until retention recycles
/// segments, runs `inflight` appends closed loop.
async fn run_on(
    mut server: ServerProc,
    cfg: &SuiteConfig,
    what: &str,
    inflight: usize,
    fill: bool,
) -> anyhow::Result<ServerRun> {
    server.wait_listening(START_TIMEOUT).await?;
    let client = connect(&server.addrs, cfg.client).await?;
    let deadline = Instant::now() + CREATE_LOG_TIMEOUT;
    loop {
        match client.create_log(LOG_NAME).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                server.check_alive()?;
                eprintln!("  {what}: create_log not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{what}: creating log:\n{}", server.log_tail()))
            }
        }
    }
    if fill {
        fill_until_recycling(&client, cfg, inflight).await?;
    }
    wait_for_spares(&client, server.addrs.len(), what).await?;
    let before = storage_counters(&client).await;
    let cpu_before = CpuSample::now(server.pid());
    let load = AppendLoad {
        log: LOG_NAME.into(),
        inflight,
        record_bytes: cfg.record_bytes,
        warmup: cfg.warmup,
        duration: cfg.duration,
        rate_per_s: None,
    };
    let r = run_append(&client, &load).await?;
    let cpu = CpuUse::between(cpu_before, CpuSample::now(server.pid()));
    server.check_alive()?;
    // One status document per node: the head's (first) for the counters, all for the
    // turnaround.
    let docs = statuses(&client, server.addrs.len()).await;
    let status = docs.first().cloned().flatten();
    let turnaround = docs
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .map(|docs| Turnaround::from_statuses(&docs));
    let storage = match (
        before,
        status.as_ref().and_then(StorageCounters::from_status),
    ) {
        (Some(b), Some(a)) => Some(a.since(&b)),
        _ => None,
    };
    eprintln!(
        "  {what:<6} @{inflight:<4} {:>9.0} rec/s {:>7.1} MB/s  p50 {:>8.0} p99 {:>8.0} p99.9 {:>8.0} µs{}",
        r.records_per_s,
        r.mb_per_s,
        r.latency.p50_us,
        r.latency.p99_us,
        r.latency.p999_us,
        if r.errors > 0 { format!("  ({} errors)", r.errors) } else { String::new() }
    );
    if let (Some(d), Some(c)) = (storage, cpu) {
        let per = 1e6 / r.records_total.max(1) as f64;
        eprintln!(
            "         head: {:.1} records/batch, {:.1} batches/fsync, {} spares zeroed, {} segments recycled; cpu µs/record: server {:.0}, client {:.0}; host steal {}",
            r.records_total as f64 / d.batches.max(1) as f64,
            d.batches_per_fsync(),
            d.spares_zeroed,
            d.segments_recycled,
            c.server_s * per,
            c.client_s * per,
            crate::report::percent(c.host_steal_share)
        );
    }
    Ok(ServerRun {
        result: r,
        storage,
        cpu,
        status,
        turnaround,
    })
}

/// [`run_on`] a fresh server whose data lives in `dir`, then deletes it: the data of a finished
/// run only costs disk space from here on.
async fn run_fresh(
    server: ServerProc,
    dir: &Path,
    cfg: &SuiteConfig,
    what: &str,
    inflight: usize,
    fill: bool,
) -> anyhow::Result<ServerRun> {
    let r = run_on(server, cfg, what, inflight, fill).await;
    let _ = std::fs::remove_dir_all(dir);
    r
}

/// The three measurements a round interleaves at each level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Floor,
    Single,
    Chain,
}

/// Order of the steps in round `round`: rotated each round, so no measurement always runs
/// first (after the previous level's heaviest load) or last.
fn step_order(round: usize) -> [Step; 3] {
    let mut o = [Step::Floor, Step::Single, Step::Chain];
    o.rotate_left(round % 3);
    o
}

/// One round: at each level, the floor, a fresh single node and a fresh chain back to back (in
/// a per-round order), so the floor and the runs it is compared with are seconds apart.
async fn one_round(round: usize, cfg: &SuiteConfig) -> anyhow::Result<RoundResult> {
    eprintln!("round {}/{}", round + 1, cfg.rounds);
    let tmp = tempfile::Builder::new()
        .prefix("chainlog-bench-")
        .tempdir_in(&cfg.data_dir)
        .with_context(|| format!("temp dir in {}", cfg.data_dir.display()))?;
    let loopback = loopback_rtt(cfg.loopback_frame_bytes, cfg.loopback_duration).await?;
    eprintln!(
        "  loopback {} B ping-pong p50 {:.1} µs",
        loopback.frame_bytes, loopback.rtt.p50_us
    );
    let mut floors: Vec<DiskFloor> = Vec::new();
    let mut service = Vec::new();
    let mut service_chain = Vec::new();
    let mut service_chain_growing = Vec::new();
    let mut single = Vec::new();
    let mut chain = Vec::new();
    let mut chain_retained = None;
    let top = cfg.levels.iter().copied().max().unwrap_or(0);
    for &inflight in &cfg.levels {
        for step in step_order(round) {
            match step {
                Step::Floor => {
                    let host_before = host_ticks();
                    let mut f = disk_floor_async(
                        tmp.path().join("floor"),
                        cfg.record_bytes,
                        inflight,
                        cfg.floor_budget,
                    )
                    .await?;
                    f.host_steal_share = steal_share(host_before, host_ticks());
                    for r in &f.runs {
                        eprintln!(
                            "  floor  @{inflight:<4} {:>9.0} rec/s {:>7.1} MB/s  p50 {:>8.0} p99 {:>8.0} µs per sync ({} rounds, {:?}{})",
                            r.records_per_s,
                            r.records_per_s * cfg.record_bytes as f64 / 1e6,
                            r.p50_us,
                            r.p99_us,
                            r.rounds,
                            r.layout,
                            if r.layout == f.layout { ", floor" } else { "" }
                        );
                    }
                    floors.push(f);
                    // A single service and a chain of them; at the top level also that chain
                    // with its files growing as a growing log's do (the growing chain's own
                    // floor).
                    let n = usize::from(cfg.chain_nodes);
                    let mut runs = vec![(1, Space::InPlace), (n, Space::InPlace)];
                    if inflight == top {
                        runs.extend([(n, Space::Prezeroed), (n, Space::Unwritten)]);
                    }
                    for (nodes, space) in runs {
                        let dir = tmp.path().join("floor");
                        let (record_bytes, budget) = (cfg.record_bytes, cfg.floor_budget);
                        let sf = tokio::task::spawn_blocking(move || {
                            service_floor(&dir, record_bytes, inflight, 1, nodes, space, budget)
                        })
                        .await
                        .context("service floor thread panicked")??;
                        eprintln!(
                            "  service×{nodes} {space:?} @{inflight:<4} {:>9.0} rec/s {:>7.1} MB/s  p50 {:>8.0} p99 {:>8.0} µs ({:.1} requests/sync)",
                            sf.records_per_s,
                            sf.records_per_s * cfg.record_bytes as f64 / 1e6,
                            sf.latency.p50_us,
                            sf.latency.p99_us,
                            sf.requests_per_sync
                        );
                        if space.growing() {
                            service_chain_growing.push(sf);
                        } else if nodes == 1 {
                            service.push(sf);
                        } else {
                            service_chain.push(sf);
                        }
                    }
                }
                Step::Single => {
                    let dir = tmp.path().join(format!("single-{inflight}"));
                    let s = ServerProc::single(
                        &cfg.server_bin,
                        &dir,
                        &cfg.io_mode,
                        cfg.cpus.as_deref(),
                    )?;
                    single.push(run_fresh(s, &dir, cfg, "single", inflight, false).await?);
                }
                Step::Chain => {
                    let chain_in = |name: &str, extra: &[String]| {
                        let dir = tmp.path().join(format!("{name}-{inflight}"));
                        let s = ServerProc::chain(
                            &cfg.server_bin,
                            &dir,
                            cfg.chain_nodes,
                            &cfg.io_mode,
                            cfg.cpus.as_deref(),
                            extra,
                        );
                        s.map(|s| (s, dir))
                    };
                    let (s, dir) = chain_in("chain", &[])?;
                    chain.push(run_fresh(s, &dir, cfg, "chain", inflight, false).await?);
                    if inflight == top {
                        // The same chain in the state a log under retention runs in: filled
                        // past its retention, so rolls take recycled segments, not zeroed ones.
                        let extra = [
                            "--retention-bytes".to_string(),
                            RETAINED_RETENTION_BYTES.to_string(),
                        ];
                        let (s, dir) = chain_in("chain-retained", &extra)?;
                        let r = run_fresh(s, &dir, cfg, "chain-ret", inflight, true).await?;
                        chain_retained = Some(r);
                    }
                }
            }
        }
    }
    let (single, single_storage, single_cpu, single_status, _) = unzip_runs(single);
    let (chain, chain_storage, chain_cpu, chain_status, chain_turnaround) = unzip_runs(chain);
    let (chain_retained, chain_retained_storage, chain_retained_cpu) = match chain_retained {
        Some(r) => (Some(r.result), r.storage, r.cpu),
        None => (None, None, None),
    };
    Ok(RoundResult {
        round,
        floors,
        service,
        service_chain,
        loopback,
        single,
        chain,
        single_storage,
        chain_storage,
        single_cpu,
        chain_cpu,
        single_status,
        chain_status,
        chain_turnaround,
        chain_retained,
        chain_retained_storage,
        chain_retained_cpu,
        service_chain_growing,
    })
}

type Unzipped = (
    Vec<AppendResult>,
    Vec<Option<StorageCounters>>,
    Vec<Option<CpuUse>>,
    Vec<Option<serde_json::Value>>,
    Vec<Option<Turnaround>>,
);

fn unzip_runs(runs: Vec<ServerRun>) -> Unzipped {
    let mut out: Unzipped = Default::default();
    for r in runs {
        out.0.push(r.result);
        out.1.push(r.storage);
        out.2.push(r.cpu);
        out.3.push(r.status);
        out.4.push(r.turnaround);
    }
    out
}

/// Runs the suite, writes `report.json` and `report.md` (and a timestamped copy of each) to
/// `cfg.out`, and returns the report.
pub async fn run_suite(cfg: &SuiteConfig) -> anyhow::Result<SuiteReport> {
    anyhow::ensure!(cfg.rounds >= 1, "need at least one round");
    anyhow::ensure!(!cfg.levels.is_empty(), "need at least one in-flight level");
    std::fs::create_dir_all(&cfg.data_dir)?;
    let mut meta = Meta {
        git_rev: git_rev(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        io_mode: cfg.io_mode.clone(),
        record_bytes: cfg.record_bytes,
        levels: cfg.levels.clone(),
        rounds: cfg.rounds,
        duration_s: cfg.duration.as_secs_f64(),
        warmup_s: cfg.warmup.as_secs_f64(),
        chain_nodes: usize::from(cfg.chain_nodes),
        server_bin: cfg.server_bin.display().to_string(),
        data_dir: cfg.data_dir.display().to_string(),
        client_linger_us: cfg.client.config(&[]).linger_us,
        client_batches_in_flight_max: cfg.client.config(&[]).batches_in_flight_max,
        client_threads: cfg.client_threads,
        cpus: cfg.cpus.clone(),
        ..Meta::default()
    };
    host_meta(&mut meta);
    let mut rounds = Vec::with_capacity(cfg.rounds);
    for i in 0..cfg.rounds {
        rounds.push(one_round(i, cfg).await?);
    }
    meta.floor_direct = rounds.iter().flat_map(|r| &r.floors).all(|f| f.direct);
    let (levels, latency_target) = summarize(&cfg.levels, usize::from(cfg.chain_nodes), &rounds);
    let retained = summarize_retained(&cfg.levels, usize::from(cfg.chain_nodes), &rounds);
    let growing_service =
        summarize_growing_service(&cfg.levels, usize::from(cfg.chain_nodes), &rounds);
    let report = SuiteReport {
        meta,
        levels,
        latency_target,
        retained,
        growing_service,
        rounds,
    };
    write_report(&report, &cfg.out)?;
    Ok(report)
}

fn write_report(report: &SuiteReport, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    let md = report.markdown();
    let stamp = format!("{}-{}", report.meta.started_unix_s, report.meta.git_rev);
    for (name, body) in [
        (format!("report-{stamp}.json"), &json),
        (format!("report-{stamp}.md"), &md),
        ("report.json".to_string(), &json),
        ("report.md".to_string(), &md),
    ] {
        std::fs::write(out.join(&name), body).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_leads_once_every_three_rounds() {
        let firsts: Vec<Step> = (0..3).map(|r| step_order(r)[0]).collect();
        assert_eq!(firsts, vec![Step::Floor, Step::Single, Step::Chain]);
        assert_eq!(step_order(4), step_order(1));
        for r in 0..3 {
            let o = step_order(r);
            assert!([Step::Floor, Step::Single, Step::Chain]
                .iter()
                .all(|s| o.contains(s)));
        }
    }

    #[test]
    fn git_rev_is_never_empty() {
        assert!(!git_rev().is_empty());
    }
}
