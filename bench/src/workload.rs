//! Append load through the real client: closed loop (N appends outstanding) or open loop (a fixed
//! rate, latency measured from each append's intended send time so a stall is charged to every
//! append it delayed — no coordinated omission). Each task keeps its own histogram; they are
//! merged once at the end.
//!
//! The closed loop is one producer keeping N sends outstanding (`Producer::send` tickets,
//! awaited oldest first, a new send the moment one is answered), as kafka-producer-perf-test
//! drives a Kafka producer: the cheapest load generator through the real client, so the server
//! is what is measured. The open loop needs a worker per outstanding append instead (whichever
//! is free takes the next intended send time).

use crate::hist::{LatencyHist, LatencySummary};
use anyhow::Context;
use bytes::Bytes;
use chainlog_client::{Client, ClientConfig};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most appends one load keeps outstanding (open loop: workers spawned); the server's per-connection limit.
pub const INFLIGHT_MAX: usize = chainlog_core::limits::CONNECTION_REQUESTS_MAX;
/// Failed appends after which a run stops early: past this the figures describe a broken
/// server, not a slow one.
pub const ERRORS_MAX: u64 = 100;

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendLoad {
    pub log: String,
    /// Closed loop: appends outstanding. Open loop: the most outstanding (the task count).
    pub inflight: usize,
    pub record_bytes: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Open loop at this many appends per second; `None` is closed loop.
    pub rate_per_s: Option<f64>,
}

impl AppendLoad {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=INFLIGHT_MAX).contains(&self.inflight),
            "in-flight must be 1..={INFLIGHT_MAX}"
        );
        anyhow::ensure!(
            self.record_bytes <= chainlog_core::limits::RECORD_BYTES_MAX,
            "record bytes over the {} limit",
            chainlog_core::limits::RECORD_BYTES_MAX
        );
        anyhow::ensure!(!self.duration.is_zero(), "duration must be positive");
        if let Some(r) = self.rate_per_s {
            anyhow::ensure!(r.is_finite() && r > 0.0, "rate must be positive");
        }
        Ok(())
    }
}

/// What a run measured (over the window after warm-up).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendResult {
    pub mode: String,
    pub inflight: usize,
    pub record_bytes: usize,
    pub rate_per_s: Option<f64>,
    pub duration_s: f64,
    /// Appends acknowledged inside the measurement window.
    pub records: u64,
    /// Appends acknowledged over the whole run, warm-up and drain included.
    pub records_total: u64,
    pub records_per_s: f64,
    /// Payload megabytes (10^6) per second.
    pub mb_per_s: f64,
    pub latency: LatencySummary,
    /// Open loop: how late appends were sent after their intended time (the tool's own lag,
    /// already included in `latency`).
    pub send_lag: Option<LatencySummary>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Throughput over a window: `(records/s, payload MB/s)`.
pub fn throughput(records: u64, record_bytes: usize, window: Duration) -> (f64, f64) {
    let s = window.as_secs_f64();
    if s <= 0.0 {
        return (0.0, 0.0);
    }
    let rps = records as f64 / s;
    (rps, rps * record_bytes as f64 / 1e6)
}

/// A payload that is not all zeros (so nothing downstream can shortcut it).
pub fn payload(record_bytes: usize) -> Bytes {
    Bytes::from(
        (0..record_bytes)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Client settings the benchmark varies; `None` keeps the library default. Also the
/// command-line flags of every subcommand that runs a client.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, clap::Args)]
pub struct ClientKnobs {
    /// Client linger (µs) before sending a batch; default: the client's.
    #[arg(long)]
    pub linger_us: Option<u64>,
    /// Client batches in flight per log; default: the client's.
    #[arg(long = "batches-in-flight")]
    pub batches_in_flight_max: Option<usize>,
    /// Most bytes in one client batch; default: the client's.
    #[arg(long)]
    pub batch_bytes_max: Option<usize>,
}

impl ClientKnobs {
    /// The client configuration for `addrs` (head first) with these knobs applied.
    pub fn config(&self, addrs: &[String]) -> ClientConfig {
        let mut cfg = ClientConfig::new(addrs.iter().cloned());
        if let Some(l) = self.linger_us {
            cfg.linger_us = l;
        }
        if let Some(b) = self.batches_in_flight_max {
            cfg.batches_in_flight_max = b;
        }
        if let Some(b) = self.batch_bytes_max {
            cfg.batch_bytes_max = b;
        }
        cfg
    }
}

/// Connects a client to `addrs` (head first).
pub async fn connect(addrs: &[String], knobs: ClientKnobs) -> anyhow::Result<Client> {
    let cfg = knobs.config(addrs);
    cfg.validate().context("client configuration")?;
    Client::connect(cfg)
        .await
        .with_context(|| format!("connecting to {addrs:?}"))
}

struct Shared {
    stop: AtomicBool,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn failed(&self, e: &chainlog_client::Error) {
        if self.errors.fetch_add(1, Ordering::Relaxed) + 1 >= ERRORS_MAX {
            self.stop.store(true, Ordering::Relaxed);
        }
        let mut f = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }
}

/// Sends per open-loop pacer channel before the pacer waits for the workers (it then falls
/// behind, but every append is still charged from its intended time).
const PACER_QUEUE_MAX: usize = 4 * INFLIGHT_MAX;

/// Intended send times of an open loop: `start`, `start + interval`, ... before `end`.
pub fn schedule(start: Instant, interval: Duration, end: Instant) -> impl Iterator<Item = Instant> {
    assert!(!interval.is_zero(), "open loop needs a positive interval");
    (0u32..)
        .map(move |i| start + interval.saturating_mul(i))
        .take_while(move |t| *t < end)
}

/// The open loop's clock: a thread that hands each intended send time to the workers when it
/// comes. tokio's timer rounds sleeps up to whole milliseconds, which would be charged to every
/// append as latency; a thread's sleep is good to tens of microseconds. Stops when the
/// schedule ends or every worker is gone.
pub fn spawn_pacer(
    start: Instant,
    interval: Duration,
    end: Instant,
    tx: tokio::sync::mpsc::Sender<Instant>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for t in schedule(start, interval, end) {
            let now = Instant::now();
            if t > now {
                std::thread::sleep(t - now);
            }
            if tx.blocking_send(t).is_err() {
                return;
            }
        }
    })
}

/// The closed loop's clock window.
struct Window {
    inflight: usize,
    measure_from: Instant,
    end: Instant,
}

/// The closed loop: `inflight` sends outstanding, oldest awaited first; each answer starts the
/// next send, timed from that answer (one clock read per append). Appends commit in order, so
/// awaiting the oldest first charges no append for a later one's wait; if the client ever
/// answered out of order, the later answer would be counted late, never early.
async fn closed_loop(
    producer: chainlog_client::Producer,
    body: Bytes,
    w: Window,
    shared: Arc<Shared>,
) -> (LatencyHist, LatencyHist, u64, u64) {
    let mut hist = LatencyHist::new();
    let (mut done_in_window, mut done) = (0u64, 0u64);
    let mut outstanding = std::collections::VecDeque::with_capacity(w.inflight);
    let mut last_end = Instant::now();
    loop {
        while outstanding.len() < w.inflight
            && last_end < w.end
            && !shared.stop.load(Ordering::Relaxed)
        {
            match producer.send(body.clone()).await {
                Ok(ticket) => outstanding.push_back((last_end, ticket)),
                Err(e) => shared.failed(&e),
            }
        }
        let Some((t0, ticket)) = outstanding.pop_front() else {
            break;
        };
        let r = ticket.await;
        let t1 = Instant::now();
        last_end = t1;
        match r {
            Ok(_) => {
                done += 1;
                if t0 >= w.measure_from {
                    hist.record(t1 - t0);
                }
                if t1 >= w.measure_from && t1 <= w.end {
                    done_in_window += 1;
                }
            }
            Err(e) => shared.failed(&e),
        }
    }
    (hist, LatencyHist::new(), done_in_window, done)
}

/// Runs `load` against `client` (the log must exist). Returns once every task has finished its
/// last append.
pub async fn run_append(client: &Client, load: &AppendLoad) -> anyhow::Result<AppendResult> {
    load.validate()?;
    let body = payload(load.record_bytes);
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    // Open loop: the pacer releases intended send times; whichever worker is free takes the
    // next one (one waiter at a time, through the fair mutex). When every worker is busy the
    // times queue up, and the wait is charged to those appends: no coordinated omission.
    let (slots, pacer) = match load.rate_per_s {
        None => (None, None),
        Some(rate) => {
            let (tx, rx) = tokio::sync::mpsc::channel(PACER_QUEUE_MAX);
            let pacer = spawn_pacer(start, Duration::from_secs_f64(1.0 / rate), end, tx);
            (Some(Arc::new(tokio::sync::Mutex::new(rx))), Some(pacer))
        }
    };
    let mut tasks = Vec::with_capacity(load.inflight);
    // One producer handle per task: every clone feeds the log's single batcher, and the hot
    // loop skips the client's per-call producer lookup.
    let producer = client
        .producer(&load.log)
        .with_context(|| format!("producer for {}", load.log))?;
    match &slots {
        None => {
            let window = Window {
                inflight: load.inflight,
                measure_from,
                end,
            };
            // Unconstrained: with tokio's cooperative budget the loop would yield every few dozen
            // sends, and the client's batcher, run in between, would seal batches of that size; a
            // closed loop of separate tasks hands it all of them in one turn instead.
            tasks.push(tokio::spawn(tokio::task::unconstrained(closed_loop(
                producer.clone(),
                body.clone(),
                window,
                shared.clone(),
            ))));
        }
        // The open loop: a worker per outstanding append.
        Some(slots) => {
            for _ in 0..load.inflight {
                let producer = producer.clone();
                let body = body.clone();
                let shared = shared.clone();
                let rx = slots.clone();
                tasks.push(tokio::spawn(async move {
                    let mut hist = LatencyHist::new();
                    let mut lag = LatencyHist::new();
                    let mut done_in_window = 0u64;
                    let mut done = 0u64;
                    while !shared.stop.load(Ordering::Relaxed) {
                        let next = rx.lock().await.recv().await;
                        let Some(t0) = next else { break };
                        if t0 >= measure_from {
                            lag.record(t0.elapsed());
                        }
                        if t0 >= end {
                            break;
                        }
                        let r = producer.append(body.clone()).await;
                        let t1 = Instant::now();
                        match r {
                            Ok(_) => {
                                done += 1;
                                if t0 >= measure_from {
                                    hist.record(t1 - t0);
                                }
                                if t1 >= measure_from && t1 <= end {
                                    done_in_window += 1;
                                }
                            }
                            Err(e) => shared.failed(&e),
                        }
                    }
                    (hist, lag, done_in_window, done)
                }));
            }
        }
    }
    drop(slots);
    let mut hists = Vec::with_capacity(tasks.len());
    let mut lags = Vec::with_capacity(tasks.len());
    let mut records = 0u64;
    let mut records_total = 0u64;
    for t in tasks {
        let (h, l, d, all) = t.await.context("append task panicked")?;
        hists.push(h);
        lags.push(l);
        records += d;
        records_total += all;
    }
    if let Some(p) = pacer {
        // Every receiver is gone, so the pacer's next send fails and it returns.
        tokio::task::spawn_blocking(move || p.join())
            .await
            .context("joining the pacer")?
            .map_err(|_| anyhow::anyhow!("pacer thread panicked"))?;
    }
    let hist = LatencyHist::merged(&hists);
    let (records_per_s, mb_per_s) = throughput(records, load.record_bytes, load.duration);
    let first_error = shared
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let open = load.rate_per_s.is_some();
    Ok(AppendResult {
        mode: if open { "open" } else { "closed" }.to_string(),
        inflight: load.inflight,
        record_bytes: load.record_bytes,
        rate_per_s: load.rate_per_s,
        duration_s: load.duration.as_secs_f64(),
        records,
        records_total,
        records_per_s,
        mb_per_s,
        latency: hist.summary(),
        send_lag: open.then(|| LatencyHist::merged(&lags).summary()),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_math() {
        let (rps, mbs) = throughput(50_000, 1024, Duration::from_secs(5));
        assert_eq!(rps, 10_000.0);
        assert!((mbs - 10.24).abs() < 1e-9);
        assert_eq!(throughput(5, 1, Duration::ZERO), (0.0, 0.0));
    }

    #[test]
    fn load_limits_are_checked() {
        let ok = AppendLoad {
            log: "b".into(),
            inflight: 16,
            record_bytes: 1024,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            rate_per_s: None,
        };
        ok.validate().unwrap();
        for bad in [
            AppendLoad {
                inflight: 0,
                ..ok.clone()
            },
            AppendLoad {
                inflight: INFLIGHT_MAX + 1,
                ..ok.clone()
            },
            AppendLoad {
                duration: Duration::ZERO,
                ..ok.clone()
            },
            AppendLoad {
                rate_per_s: Some(0.0),
                ..ok.clone()
            },
            AppendLoad {
                record_bytes: usize::MAX,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn schedule_is_evenly_spaced_and_bounded() {
        let t = Instant::now();
        let v: Vec<Instant> =
            schedule(t, Duration::from_millis(2), t + Duration::from_millis(9)).collect();
        assert_eq!(v.len(), 5);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x - t, Duration::from_millis(2 * i as u64));
        }
    }

    #[tokio::test]
    async fn pacer_releases_every_slot_in_order_and_stops() {
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let p = spawn_pacer(
            start,
            Duration::from_millis(1),
            start + Duration::from_millis(20),
            tx,
        );
        let mut got = Vec::new();
        while let Some(t) = rx.recv().await {
            // A slot is never released before its time.
            assert!(Instant::now() >= t);
            got.push(t);
        }
        p.join().unwrap();
        assert_eq!(got.len(), 20);
        assert!(got
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::from_millis(1)));
        // With the receiver gone the pacer gives up instead of blocking forever.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        spawn_pacer(
            Instant::now(),
            Duration::from_secs(1),
            Instant::now() + Duration::from_secs(3600),
            tx,
        )
        .join()
        .unwrap();
    }

    /// The closed loop against a real node: every append it counts was acknowledged, each has
    /// a latency sample, it keeps `inflight` outstanding (the node stores them as full
    /// batches: one batch per round of answers), and it ends with nothing outstanding.
    #[tokio::test(flavor = "current_thread")]
    async fn closed_loop_keeps_the_window_full_against_a_real_node() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut cfg =
            chainlog_server::config::NodeConfig::single(dir.path().to_path_buf(), listen.clone());
        // Buffered I/O: the test is about the load generator, on any file system.
        cfg.storage.io_mode = chainlog_server::config::IoModeSetting::Buffered;
        let node = chainlog_server::node::start(cfg).await.unwrap();
        let client = connect(std::slice::from_ref(&listen), ClientKnobs::default())
            .await
            .unwrap();
        client.create_log("w").await.unwrap();
        let load = AppendLoad {
            log: "w".into(),
            inflight: 128,
            record_bytes: 100,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            rate_per_s: None,
        };
        let r = run_append(&client, &load).await.unwrap();
        assert_eq!(
            (r.errors, r.mode.as_str()),
            (0, "closed"),
            "{:?}",
            r.first_error
        );
        assert!(r.records > 0 && r.records <= r.records_total);
        assert!(r.latency.count > 0 && r.latency.count <= r.records_total);
        // Every append it counted was acknowledged, and nothing else was sent: the log holds
        // exactly that many records.
        assert_eq!(client.committed_end("w").await.unwrap().0, r.records_total);
        // Full windows: a round's 128 sends reach the node as one batch (the loop hands the
        // client's batcher all of them in one turn; tokio's budget would split them).
        let status = client.status().await.unwrap();
        let batches = status["storage"]["batches"].as_u64().unwrap();
        assert!(
            r.records_total >= 96 * batches,
            "{} records in {batches} batches",
            r.records_total
        );
        drop(client);
        node.shutdown().await;
    }

    #[test]
    fn payload_is_sized_and_not_zero() {
        let p = payload(1024);
        assert_eq!(p.len(), 1024);
        assert!(p.iter().any(|&b| b != 0));
    }
}
