//! `log-server`: run one node of a chain, or a whole local chain for development.

use anyhow::Context;
use chainlog_server::config::{load_or_create_cluster_id, ChainNode, IoModeSetting, NodeConfig};
use chainlog_server::node;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// See the workspace Cargo.toml: batch buffers come back hot from its thread-local free lists.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "log-server",
    version,
    about = "chainlog: a chain-replicated, durable append-only log"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node. Either `--config FILE` (a node of a static chain) or `--dir`/`--listen`
    /// (a single-node chain).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory of a single-node chain (default ./chainlog-data); with `--config`,
        /// the config's `dir` says where.
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// Listen address of a single-node chain (default 127.0.0.1:7400); with `--config`,
        /// the config's `listen` says where.
        #[arg(long, conflicts_with = "config")]
        listen: Option<String>,
        /// auto | direct | buffered
        #[arg(long)]
        io_mode: Option<String>,
        /// Write + fdatasync groups per log in flight (1..=16; default from the config, 4).
        #[arg(long)]
        flushes_in_flight: Option<usize>,
        /// CPUs the node's threads run on (`1`, `0,2-3`); overrides the config's `cpus`.
        #[arg(long)]
        cpus: Option<String>,
    },
    /// Run a local chain of N nodes in this process, each on a thread of its own (client ports
    /// PORT, PORT+1, ...), one data directory each under DIR. Ctrl-C stops every node cleanly.
    Dev(DevArgs),
}

#[derive(clap::Args)]
struct DevArgs {
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    #[arg(long, default_value = "chainlog-dev-data")]
    dir: PathBuf,
    #[arg(long, default_value_t = 7400)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// auto | direct | buffered
    #[arg(long)]
    io_mode: Option<String>,
    /// Write + fdatasync groups per log in flight (1..=16; default from the config, 4).
    #[arg(long)]
    flushes_in_flight: Option<usize>,
    /// Bytes per segment file (default from the config, 64 MiB).
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Keep about this many bytes per log, deleting (recycling) the oldest segments beyond it
    /// (default from the config: keep everything).
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// CPUs every node's threads run on (`1`, `0,2-3`); default: wherever the OS puts them.
    /// On a small VM one CPU for the whole chain (the one that takes the disk's interrupts)
    /// skips a cross-CPU wake-up on every hop.
    #[arg(long)]
    cpus: Option<String>,
}

fn parse_io_mode(s: &Option<String>) -> anyhow::Result<Option<IoModeSetting>> {
    Ok(match s.as_deref() {
        None => None,
        Some("auto") => Some(IoModeSetting::Auto),
        Some("direct") => Some(IoModeSetting::Direct),
        Some("buffered") => Some(IoModeSetting::Buffered),
        Some(o) => anyhow::bail!("--io-mode {o:?}: expected auto, direct or buffered"),
    })
}

/// The storage flags both subcommands take, over the node's configuration.
fn apply_storage_flags(
    cfg: &mut NodeConfig,
    io_mode: Option<IoModeSetting>,
    flushes_in_flight: Option<usize>,
) {
    if let Some(m) = io_mode {
        cfg.storage.io_mode = m;
    }
    if let Some(n) = flushes_in_flight {
        cfg.storage.flushes_in_flight_max = n;
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run {
            config,
            dir,
            listen,
            io_mode,
            flushes_in_flight,
            cpus,
        } => {
            let mut cfg = match config {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    NodeConfig::from_toml(&text)?
                }
                None => NodeConfig::single(
                    dir.unwrap_or_else(|| PathBuf::from("chainlog-data")),
                    listen.unwrap_or_else(|| "127.0.0.1:7400".into()),
                ),
            };
            apply_storage_flags(&mut cfg, parse_io_mode(&io_mode)?, flushes_in_flight);
            if cpus.is_some() {
                cfg.cpus = cpus;
            }
            run_node(cfg)
        }
        Cmd::Dev(args) => run_dev(args),
    }
}

/// `log-server run`: one node on this thread's current-thread runtime. One thread runs every
/// socket, the replica and the storage writer; on the small machines we target, a
/// work-stealing pool mostly added cross-thread wake-ups (futex, epoll) to every append.
fn run_node(cfg: NodeConfig) -> anyhow::Result<()> {
    current_thread_runtime()?.block_on(async move {
        let h = node::start(cfg).await?;
        println!(
            "node {} listening on {} (cluster {:016x})",
            h.node, h.listen, h.cluster_id.0
        );
        wait_for_signal().await;
        eprintln!("shutting down (Ctrl-C again to exit at once)");
        tokio::select! {
            () = h.shutdown() => {}
            () = wait_for_signal() => exit_at_once(),
        }
        Ok(())
    })
}

/// A second Ctrl-C (or SIGTERM) during shutdown: exit without waiting for the drain. Nothing
/// acknowledged is lost (an ack means durable on every replica); what was in flight is in
/// doubt for its clients, as after a crash.
fn exit_at_once() -> ! {
    eprintln!("second signal: exiting without finishing the shutdown");
    std::process::exit(130)
}

/// `log-server dev`: every node on a thread of its own with its own current-thread runtime, as
/// separate machines would run them (one runtime for all of them serialised every hop's work on
/// one core, and a 2-core machine has two).
fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let DevArgs {
        nodes,
        dir,
        port,
        host,
        io_mode,
        flushes_in_flight,
        segment_bytes,
        retention_bytes,
        cpus,
    } = args;
    if let Some(c) = &cpus {
        chainlog_hw::cpu::parse_cpu_list(c).map_err(|e| anyhow::anyhow!("--cpus: {e}"))?;
    }
    anyhow::ensure!((1..=16).contains(&nodes), "--nodes must be 1..=16");
    anyhow::ensure!(
        port != 0 && u32::from(port) + nodes - 1 <= u32::from(u16::MAX),
        "--port {port}: the chain takes ports {port}..{} (each must be 1..=65535)",
        u32::from(port) + nodes - 1
    );
    let cluster = load_or_create_cluster_id(&dir)
        .with_context(|| format!("cluster id in {}", dir.display()))?;
    let chain: Vec<ChainNode> = (0..nodes)
        .map(|i| ChainNode {
            id: i + 1,
            addr: host_port(&host, port + i as u16),
        })
        .collect();
    let io = parse_io_mode(&io_mode)?;
    let mut handles = Vec::new();
    // Start the tail first so each predecessor finds its successor listening.
    for n in chain.iter().rev() {
        let mut cfg = NodeConfig {
            cluster_id: cluster.0,
            node_id: n.id,
            listen: n.addr.clone(),
            dir: dir.join(format!("node-{}", n.id)),
            ..NodeConfig::default()
        };
        cfg.chain.nodes = chain.clone();
        apply_storage_flags(&mut cfg, io, flushes_in_flight);
        if let Some(b) = segment_bytes {
            cfg.storage.segment_bytes = b;
        }
        if let Some(b) = retention_bytes {
            cfg.storage.retention_bytes = Some(b);
        }
        cfg.cpus = cpus.clone();
        match NodeThread::spawn(cfg) {
            Ok(h) => handles.push(h),
            Err(e) => {
                for h in handles {
                    h.shutdown();
                }
                return Err(e);
            }
        }
    }
    handles.reverse();
    println!(
        "chainlog dev chain of {nodes} (cluster {:016x}):",
        cluster.0
    );
    for (i, h) in handles.iter().enumerate() {
        let role = if nodes == 1 {
            "head+tail"
        } else if i == 0 {
            "head"
        } else if i + 1 == handles.len() {
            "tail"
        } else {
            "middle"
        };
        println!(
            "  node {} {:<9} {}  data {}",
            h.node,
            role,
            h.listen,
            dir.join(format!("node-{}", h.node)).display()
        );
    }
    println!("try: chainlog append <<< 'hello'   then: chainlog read --from 0");
    let rt = current_thread_runtime()?;
    rt.block_on(wait_for_signal());
    eprintln!("shutting down (Ctrl-C again to exit at once)");
    rt.block_on(async move {
        let all = tokio::task::spawn_blocking(move || {
            for h in handles {
                h.shutdown();
            }
        });
        tokio::select! {
            _ = all => {}
            () = wait_for_signal() => exit_at_once(),
        }
    });
    Ok(())
}

/// `host:port`, with an IPv6 literal in brackets.
fn host_port(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// One node of the dev chain, running on its own thread until `shutdown`.
struct NodeThread {
    node: chainlog_core::NodeId,
    listen: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl NodeThread {
    /// Starts the node and returns once it listens (or failed to start).
    fn spawn(cfg: NodeConfig) -> anyhow::Result<NodeThread> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("node-{}", cfg.node_id))
            .spawn(move || {
                let rt = match current_thread_runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match node::start(cfg).await {
                        Ok(h) => {
                            let _ = ready_tx.send(Ok((h.node, h.listen)));
                            // A dropped sender (the main thread is gone) stops the node too.
                            let _ = stop_rx.await;
                            h.shutdown().await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .context("spawning a node thread")?;
        let (node, listen) = ready_rx
            .recv()
            .context("the node thread exited before starting")??;
        Ok(NodeThread {
            node,
            listen,
            stop,
            thread,
        })
    }

    /// Stops the node and waits until everything it wrote is durable.
    fn shutdown(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            eprintln!("node {} panicked while stopping", self.node);
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn dev_addresses_bracket_ipv6() {
        assert_eq!(host_port("127.0.0.1", 7400), "127.0.0.1:7400");
        assert_eq!(host_port("::1", 7400), "[::1]:7400");
        assert_eq!(host_port("localhost", 7401), "localhost:7401");
        assert!(host_port("::1", 7400)
            .parse::<std::net::SocketAddr>()
            .is_ok());
    }
}
