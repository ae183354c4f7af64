//! `chainlog-bench`: durable-append workloads measured against floors taken in the same run.

use anyhow::Context;
use chainlog_bench::floor::disk_floor_async;
use chainlog_bench::loopback::loopback_rtt;
use chainlog_bench::server::find_server_bin;
use chainlog_bench::suite::{run_suite, SuiteConfig, LOG_NAME};
use chainlog_bench::workload::{connect, run_append, AppendLoad, ClientKnobs};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// See the workspace Cargo.toml: batch buffers come back hot from its thread-local free lists.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chainlog-bench",
    version,
    about = "chainlog durable-append benchmarks, reported against floors measured in the same run"
)]
struct Cli {
    /// Load-generator runtime: 0 = one current-thread tokio runtime (default: the cheapest
    /// load generator, so the server is what is measured); N = a multi-thread runtime with N
    /// workers (measures the client library as a multi-threaded application would run it).
    #[arg(long, global = true, default_value_t = 0)]
    client_threads: usize,
    /// CPUs this process runs on (`1`, `0,2-3`), set before anything starts: the load
    /// generator, the floors and the service floors. `suite` starts its servers with the same
    /// `--cpus`, so everything it measures shares one placement. Default: the OS's.
    #[arg(long, global = true)]
    cpus: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The disk's durable-write floor (io_uring writes + one fdatasync on a pre-zeroed file) for
    /// the batch bytes of one record, with as many batches per fdatasync as appends in flight;
    /// and the loopback round-trip floor.
    Floor {
        /// Directory on the file system to measure (the server's data directory's).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        /// Batches per fdatasync; default: each of 1, 16, 128.
        #[arg(long)]
        batch: Option<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Loopback TCP ping-pong round trip (tokio, one connection).
    Loopback {
        #[arg(long, default_value_t = 64)]
        frame_bytes: usize,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// The service floor: a minimal blocking durable-append service over loopback TCP (read,
    /// group-commit write + fdatasync, acknowledge), closed loop; per split of the appends in
    /// flight into requests.
    Service {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        #[arg(long, default_value_t = 128)]
        inflight: usize,
        /// Requests the appends in flight are split into (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        requests: Vec<usize>,
        /// Services in a chain (1 = a single node).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Where the durable writes go: around one pre-zeroed file, or into new space as a
        /// growing log's do (pre-zeroed meanwhile by the server's spare preparer, or unwritten).
        #[arg(long, value_enum, default_value = "in-place")]
        space: chainlog_bench::service::Space,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Append load against a running server through the real client.
    Append {
        /// Node client addresses, head first (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7400")]
        addr: Vec<String>,
        /// Closed loop: appends outstanding. Open loop (--rate): most outstanding.
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_s: f64,
        #[arg(long, default_value = LOG_NAME)]
        log: String,
        /// Open loop at this many appends/s; latency counted from each intended send time.
        #[arg(long)]
        rate: Option<f64>,
        #[command(flatten)]
        client: ClientKnobs,
        /// Print the result as JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// The full report: rounds interleaving floor, single node and chain at each level.
    Suite {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds measured per run (after warm-up).
        #[arg(long, default_value_t = 5.0)]
        duration_s: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_s: f64,
        /// Seconds per floor measurement (each layout, each level, each round).
        #[arg(long, default_value_t = 2.0)]
        floor_s: f64,
        #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
        levels: Vec<usize>,
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        /// Server --io-mode: auto | direct | buffered.
        #[arg(long, default_value = "auto")]
        io_mode: String,
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// log-server binary; default: next to this one.
        #[arg(long)]
        server_bin: Option<PathBuf>,
        /// Where temp data dirs go (and the floor is measured); default: the system temp dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        #[command(flatten)]
        client: ClientKnobs,
    },
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{what} {s}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(list) = &cli.cpus {
        let cpus =
            chainlog_hw::cpu::parse_cpu_list(list).map_err(|e| anyhow::anyhow!("--cpus: {e}"))?;
        chainlog_hw::cpu::pin_current_thread(&cpus)
            .map_err(|e| anyhow::anyhow!("--cpus {list}: {e}"))?;
    }
    let rt = match cli.client_threads {
        0 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client_threads = cli.client_threads;
    let cpus = cli.cpus.clone();
    match cli.cmd {
        Cmd::Floor {
            dir,
            record_bytes,
            batch,
            seconds,
        } => {
            std::fs::create_dir_all(&dir)?;
            let budget = secs(seconds, "seconds")?;
            let levels = batch.map_or_else(|| vec![1, 16, 128], |b| vec![b]);
            println!("| batches per fdatasync | layout | writes × bytes | records/s | MB/s | p50 µs | p99 µs | max µs | CPU µs/record | rounds | O_DIRECT |");
            println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            for l in levels {
                let f = disk_floor_async(dir.clone(), record_bytes, l, budget).await?;
                for r in &f.runs {
                    println!(
                        "| {} | {:?}{} | {} × {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |",
                        l,
                        r.layout,
                        if r.layout == f.layout { " (floor)" } else { "" },
                        r.writes_per_sync,
                        r.write_bytes,
                        r.records_per_s,
                        r.records_per_s * record_bytes as f64 / 1e6,
                        r.p50_us,
                        r.p99_us,
                        r.max_us,
                        r.cpu_us_per_record.unwrap_or(f64::NAN),
                        r.rounds,
                        r.direct
                    );
                }
            }
            let lb = loopback_rtt(64, budget).await?;
            println!(
                "\nloopback 64 B ping-pong: p50 {:.1} µs, p99 {:.1} µs ({} round trips)",
                lb.rtt.p50_us, lb.rtt.p99_us, lb.round_trips
            );
        }
        Cmd::Service {
            dir,
            record_bytes,
            inflight,
            requests,
            nodes,
            space,
            seconds,
        } => {
            std::fs::create_dir_all(&dir)?;
            let d = secs(seconds, "seconds")?;
            for r in requests {
                let dir = dir.clone();
                let f = tokio::task::spawn_blocking(move || {
                    chainlog_bench::service::service_floor(
                        &dir,
                        record_bytes,
                        inflight,
                        r,
                        nodes,
                        space,
                        d,
                    )
                })
                .await??;
                println!(
                    "{nodes} node(s), {space:?}, {inflight} in flight as {r} requests: {:.0} records/s, {:.1} requests/sync, \
                     p50 {} µs p99 {} µs",
                    f.records_per_s, f.requests_per_sync, f.latency.p50_us, f.latency.p99_us
                );
            }
        }
        Cmd::Loopback {
            frame_bytes,
            seconds,
        } => {
            let lb = loopback_rtt(frame_bytes, secs(seconds, "seconds")?).await?;
            println!("{}", serde_json::to_string_pretty(&lb)?);
        }
        Cmd::Append {
            addr,
            inflight,
            record_bytes,
            duration_s,
            warmup_s,
            log,
            rate,
            client: knobs,
            json,
        } => {
            let client = connect(&addr, knobs).await?;
            // Creating an existing log fails harmlessly; a real problem shows on the appends.
            let _ = client.create_log(&log).await;
            let load = AppendLoad {
                log,
                inflight,
                record_bytes,
                warmup: secs(warmup_s, "warmup-s")?,
                duration: secs(duration_s, "duration-s")?,
                rate_per_s: rate,
            };
            let r = run_append(&client, &load).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} loop, {} in flight{}: {:.0} records/s, {:.1} MB/s; latency µs p50 {:.0} p99 {:.0} p99.9 {:.0} p99.99 {:.0} max {:.0} ({} samples){}",
                    r.mode,
                    r.inflight,
                    r.rate_per_s.map(|x| format!(" at {x}/s")).unwrap_or_default(),
                    r.records_per_s,
                    r.mb_per_s,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.p999_us,
                    r.latency.p9999_us,
                    r.latency.max_us,
                    r.latency.count,
                    r.first_error.as_ref().map(|e| format!("; {} errors, first: {e}", r.errors)).unwrap_or_default()
                );
                if let Some(l) = r.send_lag {
                    println!(
                        "send lag behind schedule (included above) µs: p50 {:.0} p99 {:.0} max {:.0}",
                        l.p50_us, l.p99_us, l.max_us
                    );
                }
            }
            anyhow::ensure!(r.errors == 0, "{} appends failed", r.errors);
        }
        Cmd::Suite {
            rounds,
            duration_s,
            warmup_s,
            floor_s,
            levels,
            record_bytes,
            io_mode,
            nodes,
            server_bin,
            data_dir,
            out,
            client,
        } => {
            anyhow::ensure!(
                matches!(io_mode.as_str(), "auto" | "direct" | "buffered"),
                "--io-mode must be auto, direct or buffered"
            );
            anyhow::ensure!((1..=16).contains(&nodes), "--nodes must be 1..=16");
            let cfg = SuiteConfig {
                rounds,
                levels,
                record_bytes,
                duration: secs(duration_s, "duration-s")?,
                warmup: secs(warmup_s, "warmup-s")?,
                floor_budget: secs(floor_s, "floor-s")?,
                loopback_duration: Duration::from_millis(500),
                loopback_frame_bytes: 64,
                io_mode,
                chain_nodes: nodes,
                server_bin: find_server_bin(server_bin.as_deref())?,
                data_dir: data_dir.unwrap_or_else(std::env::temp_dir),
                out,
                client,
                client_threads,
                cpus,
            };
            let report = run_suite(&cfg).await?;
            println!("{}", report.markdown());
            eprintln!("wrote {}/report.{{md,json}}", cfg.out.display());
        }
    }
    Ok(())
}
