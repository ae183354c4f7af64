//! `log-server`: run one node of a chain, or a whole local chain for development.

use anyhow::Context;
use chainlog_server::config::{load_or_create_cluster_id, ChainNode, IoModeSetting, NodeConfig};
use chainlog_server::node;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
        #[arg(long, default_value = "chainlog-data")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// auto | direct | buffered
        #[arg(long)]
        io_mode: Option<String>,
        /// Write + fdatasync groups per log in flight (1..=16; default from the config, 4).
        #[arg(long)]
        flushes_in_flight: Option<usize>,
    },
    /// Run a local chain of N nodes in this process (client ports PORT, PORT+1, ...), one data
    /// directory each under DIR. Ctrl-C stops every node cleanly.
    Dev {
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
    },
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // One thread runs every socket and the replica; the storage thread owns io_uring. On the
    // small machines we target, a work-stealing pool mostly added cross-thread wake-ups (futex,
    // epoll) to every append.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run {
                config,
                dir,
                listen,
                io_mode,
                flushes_in_flight,
            } => {
                let mut cfg = match config {
                    Some(path) => {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        NodeConfig::from_toml(&text)?
                    }
                    None => NodeConfig::single(dir, listen),
                };
                if let Some(m) = parse_io_mode(&io_mode)? {
                    cfg.storage.io_mode = m;
                }
                if let Some(n) = flushes_in_flight {
                    cfg.storage.flushes_in_flight_max = n;
                }
                let h = node::start(cfg).await?;
                println!(
                    "node {} listening on {} (cluster {:016x})",
                    h.node, h.listen, h.cluster_id.0
                );
                wait_for_signal().await;
                eprintln!("shutting down");
                h.shutdown().await;
                Ok(())
            }
            Cmd::Dev {
                nodes,
                dir,
                port,
                host,
                io_mode,
                flushes_in_flight,
            } => {
                anyhow::ensure!((1..=16).contains(&nodes), "--nodes must be 1..=16");
                let cluster = load_or_create_cluster_id(&dir)
                    .with_context(|| format!("cluster id in {}", dir.display()))?;
                let chain: Vec<ChainNode> = (0..nodes)
                    .map(|i| ChainNode {
                        id: i + 1,
                        addr: format!("{host}:{}", u32::from(port) + i),
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
                    if let Some(m) = io {
                        cfg.storage.io_mode = m;
                    }
                    if let Some(n) = flushes_in_flight {
                        cfg.storage.flushes_in_flight_max = n;
                    }
                    handles.push(node::start(cfg).await?);
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
                wait_for_signal().await;
                eprintln!("shutting down");
                for h in handles {
                    h.shutdown().await;
                }
                Ok(())
            }
        }
    })
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
