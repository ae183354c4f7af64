//! `chainlog` CLI: append lines, read, tail/follow, create logs, trim, and show cluster status.

use anyhow::{bail, Context, Result};
use chainlog_client::{
    Client, ClientConfig, ClusterId, ErrorCode, Offset, ReadOptions, DEFAULT_ADDR,
};
use clap::{Parser, Subcommand};
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Appends awaiting acknowledgement before `append` stops reading input (memory bound; the
/// client's byte budget bounds it too).
const APPENDS_IN_FLIGHT_MAX: usize = 64 * 1024;
/// Records asked for per read request.
const READ_RECORDS_PER_REQUEST: u64 = 1000;

#[derive(Parser, Debug)]
#[command(
    name = "chainlog",
    version,
    about = "Command-line client for a chainlog cluster"
)]
struct Cli {
    /// Node client address(es), comma-separated or repeated. Appends go to the first (and
    /// follow redirects to the head); reads are spread over all.
    #[arg(long, global = true, value_delimiter = ',', default_value = DEFAULT_ADDR)]
    addr: Vec<String>,
    /// Cluster id to require; 0 accepts the cluster the first node reports.
    #[arg(long, global = true, default_value_t = 0)]
    cluster_id: u64,
    /// Read from this node only (an index into --addr) instead of round-robin.
    #[arg(long, global = true)]
    read_from: Option<usize>,
    /// Per-request timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Append each line of FILE (or stdin) as one record; exits 0 once all are durable.
    Append {
        #[arg(long, default_value = "default")]
        log: String,
        /// Input file; stdin if absent or `-`.
        file: Option<PathBuf>,
        /// Wait up to this many microseconds to fill a batch.
        #[arg(long, default_value_t = 0)]
        linger_us: u64,
    },
    /// Print records from an offset, one payload per line, in offset order.
    Read {
        #[arg(long, default_value = "default")]
        log: String,
        #[arg(long)]
        from: u64,
        /// Most records to print; default: up to the committed end.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print the last records, and with -f follow new ones.
    Tail {
        #[arg(long, default_value = "default")]
        log: String,
        /// How many of the last records to print.
        #[arg(short = 'n', default_value_t = 10)]
        n: u64,
        /// Keep printing records as they are committed.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Show every node's status document (nodes, chain, logs, offsets, durability).
    Status {
        /// Print the documents as the servers sent them (an array for several nodes).
        #[arg(long)]
        json: bool,
    },
    /// Create a log.
    CreateLog { name: String },
    /// Trim a log below an offset (retention): no replica serves those records again, and
    /// storage deletes the whole segments below it.
    Trim {
        #[arg(long, default_value = "default")]
        log: String,
        #[arg(long)]
        before: u64,
    },
}

fn config(cli: &Cli) -> ClientConfig {
    ClientConfig {
        addrs: cli
            .addr
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
        cluster_id: ClusterId(cli.cluster_id),
        read_from: cli.read_from,
        request_timeout_ms: cli.timeout_ms,
        ..ClientConfig::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(e) => {
            // A closed pipe (`chainlog read ... | head`) is the reader's choice, not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                0
            } else {
                eprintln!("chainlog: error: {e:#}");
                1
            }
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<()> {
    let mut cfg = config(&cli);
    match cli.cmd {
        Cmd::Append {
            log,
            file,
            linger_us,
        } => {
            cfg.linger_us = linger_us;
            let client = Client::connect(cfg).await?;
            append(&client, &log, file).await
        }
        Cmd::Read { log, from, count } => {
            let client = Client::connect(cfg).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            read(&client, &log, Offset(from), count, &mut out).await?;
            out.flush()?;
            Ok(())
        }
        Cmd::Tail { log, n, follow } => {
            let client = Client::connect(cfg).await?;
            tail(&client, &log, n, follow).await
        }
        Cmd::Status { json } => status(cfg, json).await,
        Cmd::CreateLog { name } => {
            let client = Client::connect(cfg).await?;
            let id = client.create_log(&name).await?;
            println!("created log '{name}' (id {:#018x})", id.0);
            Ok(())
        }
        Cmd::Trim { log, before } => {
            let client = Client::connect(cfg).await?;
            let start = client.trim(&log, Offset(before)).await?;
            println!("log '{log}' now starts at offset {start}");
            Ok(())
        }
    }
}

async fn append(client: &Client, log: &str, file: Option<PathBuf>) -> Result<()> {
    let input: Box<dyn AsyncRead + Unpin + Send> = match &file {
        Some(p) if p.as_os_str() != "-" => Box::new(
            tokio::fs::File::open(p)
                .await
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        _ => Box::new(tokio::io::stdin()),
    };
    let mut input = BufReader::with_capacity(1 << 16, input);
    let producer = client.producer(log)?;
    let mut tickets = VecDeque::new();
    let mut acked = Acked::default();
    loop {
        let mut line = Vec::new();
        if input.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        // Queue in input order; the producer batches and keeps the order on the wire.
        tickets.push_back(producer.send(line).await?);
        while tickets.len() >= APPENDS_IN_FLIGHT_MAX {
            if let Some(t) = tickets.pop_front() {
                acked.settle(t.await, log)?;
            }
        }
    }
    while let Some(t) = tickets.pop_front() {
        acked.settle(t.await, log)?;
    }
    match (acked.first, acked.last) {
        (Some(f), Some(l)) => println!(
            "appended {} records to '{log}' at offsets {f}..={l}",
            acked.count
        ),
        _ => println!("appended 0 records to '{log}'"),
    }
    Ok(())
}

#[derive(Default)]
struct Acked {
    count: u64,
    first: Option<Offset>,
    last: Option<Offset>,
}

impl Acked {
    fn settle(&mut self, r: chainlog_client::Result<(Offset, u32)>, log: &str) -> Result<()> {
        match r {
            Ok((o, n)) => {
                self.count += u64::from(n);
                let end = o.plus(u64::from(n).saturating_sub(1));
                self.first = Some(self.first.map_or(o, |f| f.min(o)));
                self.last = Some(self.last.map_or(end, |l| l.max(end)));
                Ok(())
            }
            Err(e) => bail!(
                "append to '{log}' failed after {} records were acknowledged: {e}",
                self.count
            ),
        }
    }
}

/// Prints records from `from` until `count` are printed or the committed end is reached.
/// Returns the offset after the last record printed (or `from`).
async fn read(
    client: &Client,
    log: &str,
    from: Offset,
    count: Option<u64>,
    out: &mut impl Write,
) -> Result<Offset> {
    let mut next = from;
    let mut left = count.unwrap_or(u64::MAX);
    // The highest committed end any reply showed: replicas learn commits a hop apart, and a
    // reply from one that lags must not end the read before what another already showed.
    let mut end = Offset::ZERO;
    while left > 0 {
        let opts = ReadOptions {
            max_records: left.min(READ_RECORDS_PER_REQUEST) as u32,
            ..ReadOptions::default()
        };
        let res = match client.read_with(log, next, &opts).await {
            Ok(r) => r,
            // At or past the end of what is committed: nothing (more) to print.
            Err(e) if e.code() == Some(ErrorCode::OffsetOutOfRange) => break,
            Err(e) => return Err(e.into()),
        };
        if res.records.is_empty() {
            break;
        }
        for r in &res.records {
            out.write_all(&r.payload)?;
            out.write_all(b"\n")?;
            next = r.offset.plus(1);
            left -= 1;
        }
        end = end.max(res.committed_end);
        if next >= end {
            break;
        }
    }
    Ok(next)
}

async fn tail(client: &Client, log: &str, n: u64, follow: bool) -> Result<()> {
    let end = client.committed_end(log).await?;
    let mut from = Offset(end.0.saturating_sub(n));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let next = if n > 0 {
        match read(client, log, from, Some(end.0 - from.0), &mut out).await {
            // Fewer than n records are left after a trim: print from the log's start.
            Err(e) if trimmed_start(&e).is_some_and(|s| s > from && s <= end) => {
                from = trimmed_start(&e).unwrap_or(end);
                read(client, log, from, Some(end.0 - from.0), &mut out).await?
            }
            r => r?,
        }
    } else {
        end
    };
    out.flush()?;
    if !follow {
        return Ok(());
    }
    // From where printing got to, not from `end`: the read may have stopped short of it (its
    // replica knew a smaller committed end), and the records between would never be printed.
    let mut sub = client.subscribe(log, next).await?;
    while let Some(r) = sub.next().await {
        let r = r?;
        out.write_all(&r.payload)?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(())
}

/// Where a log starts, from the `OffsetTrimmed` ("log starts at S") a read below it gets.
fn trimmed_start(e: &anyhow::Error) -> Option<Offset> {
    let e = e.downcast_ref::<chainlog_client::Error>()?;
    let chainlog_client::Error::Server {
        code: ErrorCode::OffsetTrimmed,
        message,
    } = e
    else {
        return None;
    };
    message.split_whitespace().last()?.parse().ok().map(Offset)
}

async fn status(cfg: ClientConfig, json: bool) -> Result<()> {
    let client = Client::new(cfg)?;
    let addrs = client.nodes();
    let mut failed = 0usize;
    let mut docs = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        match client.status_raw_of(i).await {
            Ok(raw) => docs.push((addr.clone(), Ok(raw))),
            Err(e) => {
                failed += 1;
                docs.push((addr.clone(), Err(e)));
            }
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        let ok: Vec<&[u8]> = docs
            .iter()
            .filter_map(|(_, d)| d.as_ref().ok().map(|b| &b[..]))
            .collect();
        if addrs.len() == 1 {
            if let Some(d) = ok.first() {
                out.write_all(d)?;
                out.write_all(b"\n")?;
            }
        } else {
            out.write_all(b"[")?;
            for (i, d) in ok.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                out.write_all(d)?;
            }
            out.write_all(b"]\n")?;
        }
        for (addr, d) in &docs {
            if let Err(e) = d {
                eprintln!("chainlog: {addr}: {e}");
            }
        }
    } else {
        for (addr, d) in &docs {
            writeln!(out, "node {addr}")?;
            match d {
                Ok(raw) => match serde_json::from_slice::<serde_json::Value>(raw) {
                    Ok(v) => {
                        let mut s = String::new();
                        render(&v, 1, &mut s);
                        out.write_all(s.as_bytes())?;
                    }
                    Err(e) => writeln!(out, "  (status is not JSON: {e})")?,
                },
                Err(e) => writeln!(out, "  unreachable: {e}")?,
            }
        }
    }
    out.flush()?;
    if failed > 0 {
        bail!("{failed} of {} nodes did not answer", addrs.len());
    }
    Ok(())
}

fn scalar(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value::*;
    match v {
        Null => Some("-".into()),
        Bool(b) => Some(b.to_string()),
        Number(n) => Some(n.to_string()),
        String(s) => Some(s.clone()),
        Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => Some(format!(
            "[{}]",
            a.iter().filter_map(scalar).collect::<Vec<_>>().join(", ")
        )),
        Array(a) if a.is_empty() => Some("[]".into()),
        Object(o) if o.is_empty() => Some("{}".into()),
        _ => None,
    }
}

/// Indented `key: value` rendering of any JSON document (no schema assumed).
fn render(v: &serde_json::Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match scalar(v) {
                    Some(s) => out.push_str(&format!("{pad}{k}: {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        render(v, depth + 1, out);
                    }
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                match scalar(item) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}[{i}]\n"));
                        render(item, depth + 1, out);
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other).unwrap_or_default())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addr_list_parses_commas_and_repeats() {
        let cli = Cli::parse_from([
            "chainlog", "--addr", "a:1,b:2", "--addr", "c:3", "read", "--from", "5",
        ]);
        assert_eq!(config(&cli).addrs, vec!["a:1", "b:2", "c:3"]);
        let cli = Cli::parse_from(["chainlog", "tail", "-n", "3", "-f"]);
        assert_eq!(config(&cli).addrs, vec![DEFAULT_ADDR]);
        assert!(matches!(
            cli.cmd,
            Cmd::Tail {
                n: 3,
                follow: true,
                ..
            }
        ));
    }

    #[test]
    fn renders_any_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"node":1,"role":"head","chain":[1,2,3],
                "logs":[{"name":"default","committed_end":42,"durable_end":43}],
                "extra":{"x":null}}"#,
        )
        .unwrap();
        let mut s = String::new();
        render(&v, 0, &mut s);
        assert!(s.contains("node: 1\n"));
        assert!(s.contains("chain: [1, 2, 3]\n"));
        assert!(s.contains("logs:\n  [0]\n"));
        assert!(s.contains("\n    name: default\n"));
        assert!(s.contains("\n    committed_end: 42\n"));
        assert!(s.contains("extra:\n  x: -\n"));
    }
}
