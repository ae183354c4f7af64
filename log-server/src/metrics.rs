//! Per-stage latency histograms (HDR) kept by the runtime and reported in `status`.

use chainlog_core::types::{LogId, Offset};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Highest latency tracked exactly; larger values are clamped (and counted in `max`).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Ranges remembered per log and stage while waiting for what ends them (bounded by the
/// replication window; past this the oldest are forgotten and not measured).
const RANGES_TRACKED_MAX: usize = 1 << 16;

/// Histograms of the node's hot path. Only the core loop writes them.
pub struct Metrics {
    /// Head: client request received → acknowledged (durable on every replica).
    append_us: Histogram<u64>,
    /// Every node: batches handed to storage → covered by a completed fdatasync.
    local_durable: OffsetStage,
    /// Every node but the tail: batches forwarded → the successor's acknowledgement covers them
    /// (the rest of the chain's round trip, its disks included).
    successor_ack: OffsetStage,
    /// Every node but the head: batches received from the predecessor → acknowledged to it
    /// (this replica's turnaround: its own disk and everything downstream).
    replica_ack: OffsetStage,
    /// Not on the tail: a frame carrying batches read off the socket → the batch handed to the
    /// successor's link (decode and checks, the core, the hand-off: this node's share of a hop).
    received_to_forward_us: Histogram<u64>,
    /// Every node: the same frame read → its batch handed to storage.
    received_to_write_us: Histogram<u64>,
}

/// A stage measured by log offsets: it starts for a range ending at some offset, and ends for
/// every started range once a later event covers that offset (an fsync, an acknowledgement).
struct OffsetStage {
    hist: Histogram<u64>,
    /// Per log, ends of ranges started and not yet covered, with when they started.
    pending: BTreeMap<LogId, VecDeque<(Offset, Instant)>>,
}

impl OffsetStage {
    fn new() -> OffsetStage {
        OffsetStage {
            hist: new_histogram(),
            pending: BTreeMap::new(),
        }
    }

    fn start(&mut self, log: LogId, end: Offset, at: Instant) {
        let q = self.pending.entry(log).or_default();
        if q.len() >= RANGES_TRACKED_MAX {
            q.pop_front();
        }
        q.push_back((end, at));
    }

    fn reach(&mut self, log: LogId, end: Offset, at: Instant) {
        let Some(q) = self.pending.get_mut(&log) else {
            return;
        };
        while let Some(&(e, t)) = q.front() {
            if e > end {
                break;
            }
            q.pop_front();
            let us = (at.saturating_duration_since(t).as_micros() as u64).clamp(1, LATENCY_US_MAX);
            self.hist.saturating_record(us);
        }
    }

    fn forget(&mut self, log: LogId) {
        self.pending.remove(&log);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            append_us: new_histogram(),
            local_durable: OffsetStage::new(),
            successor_ack: OffsetStage::new(),
            replica_ack: OffsetStage::new(),
            received_to_forward_us: new_histogram(),
            received_to_write_us: new_histogram(),
        }
    }
}

/// The per-stage summaries `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StageSummaries {
    /// Head only: request in → `AppendOk` out.
    pub append: LatencySummary,
    /// Storage stage on this node: write issued → fdatasync done (group commit included).
    pub local_durable: LatencySummary,
    /// Not on the tail: batches forwarded → covered by the successor's acknowledgement.
    pub successor_ack: LatencySummary,
    /// Not on the head: batches received from the predecessor → acknowledged upstream.
    pub replica_ack: LatencySummary,
    /// Not on the tail: a frame with batches read → its batch handed to the successor's link.
    pub received_to_forward: LatencySummary,
    /// A frame with batches read → its batch handed to storage.
    pub received_to_write: LatencySummary,
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant digits over 1 µs .. 60 s: ~200 KiB, allocated once.
    match Histogram::new_with_bounds(1, LATENCY_US_MAX, 3) {
        Ok(h) => h,
        Err(e) => panic!("histogram bounds are constants: {e}"),
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).clamp(1, LATENCY_US_MAX));
}

pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
    LatencySummary {
        count: h.len(),
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

impl Metrics {
    /// Client request received → acknowledged durable on every replica (at the head).
    pub fn record_append(&mut self, d: Duration) {
        record(&mut self.append_us, d);
    }

    /// A received batch was handed to the successor's link `d` after its frame was read.
    pub fn received_to_forward(&mut self, d: Duration) {
        record(&mut self.received_to_forward_us, d);
    }

    /// A received batch was handed to storage `d` after its frame was read.
    pub fn received_to_write(&mut self, d: Duration) {
        record(&mut self.received_to_write_us, d);
    }

    pub fn append_summary(&self) -> LatencySummary {
        summarize(&self.append_us)
    }

    /// Storage was asked to write `log` up to `end`.
    pub fn write_issued(&mut self, log: LogId, end: Offset, at: Instant) {
        self.local_durable.start(log, end, at);
    }

    /// `log` is durable below `end`: every write ending there or before has finished.
    pub fn durable(&mut self, log: LogId, end: Offset, at: Instant) {
        self.local_durable.reach(log, end, at);
    }

    /// A failed write resets the log: its pending writes will never become durable as issued.
    pub fn write_failed(&mut self, log: LogId) {
        self.local_durable.forget(log);
    }

    /// Batches of `log` up to `end` were handed to the successor's link.
    pub fn forwarded(&mut self, log: LogId, end: Offset, at: Instant) {
        self.successor_ack.start(log, end, at);
    }

    /// The successor acknowledged `log` below `end`.
    pub fn successor_acked(&mut self, log: LogId, end: Offset, at: Instant) {
        self.successor_ack.reach(log, end, at);
    }

    /// Batches of `log` up to `end` arrived from the predecessor.
    pub fn received(&mut self, log: LogId, end: Offset, at: Instant) {
        self.replica_ack.start(log, end, at);
    }

    /// This node acknowledged `log` below `end` to its predecessor.
    pub fn acked_upstream(&mut self, log: LogId, end: Offset, at: Instant) {
        self.replica_ack.reach(log, end, at);
    }

    /// A link went down: what was in flight on it is resent on the next session (as new
    /// ranges), so the old ones are not waited for.
    pub fn link_reset(&mut self) {
        self.successor_ack.pending.clear();
        self.replica_ack.pending.clear();
    }

    pub fn summaries(&self) -> StageSummaries {
        StageSummaries {
            append: summarize(&self.append_us),
            local_durable: summarize(&self.local_durable.hist),
            successor_ack: summarize(&self.successor_ack.hist),
            replica_ack: summarize(&self.replica_ack.hist),
            received_to_forward: summarize(&self.received_to_forward_us),
            received_to_write: summarize(&self.received_to_write_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_durable_matches_writes_to_syncs() {
        let mut m = Metrics::default();
        let t0 = Instant::now();
        let log = LogId(1);
        m.write_issued(log, Offset(2), t0);
        m.write_issued(log, Offset(5), t0 + Duration::from_micros(100));
        m.write_issued(log, Offset(9), t0 + Duration::from_micros(200));
        // One fsync covers the first two writes (group commit), a later one the third.
        m.durable(log, Offset(5), t0 + Duration::from_micros(300));
        assert_eq!(m.summaries().local_durable.count, 2);
        m.durable(log, Offset(9), t0 + Duration::from_micros(1200));
        let s = m.summaries().local_durable;
        assert_eq!(s.count, 3);
        assert!((995..=1005).contains(&s.max), "max {}", s.max);
        assert!(s.p50 >= 195 && s.p50 <= 305, "p50 {}", s.p50);
        // Durable events for other logs or with nothing pending change nothing.
        m.durable(LogId(2), Offset(100), t0);
        assert_eq!(m.summaries().local_durable.count, 3);
    }

    #[test]
    fn replication_stages_end_at_acknowledgements() {
        let mut m = Metrics::default();
        let t0 = Instant::now();
        let us = |n| t0 + Duration::from_micros(n);
        let log = LogId(1);
        m.received(log, Offset(4), t0);
        m.forwarded(log, Offset(4), us(10));
        m.received(log, Offset(8), us(50));
        m.forwarded(log, Offset(8), us(60));
        // The successor acknowledges the first range only; a stale ack changes nothing.
        m.successor_acked(log, Offset(4), us(410));
        m.successor_acked(log, Offset(3), us(420));
        let s = m.summaries();
        assert_eq!((s.successor_ack.count, s.replica_ack.count), (1, 0));
        assert!((399..=401).contains(&s.successor_ack.max));
        m.acked_upstream(log, Offset(8), us(650));
        let s = m.summaries();
        assert_eq!(s.replica_ack.count, 2);
        assert!(
            (649..=651).contains(&s.replica_ack.max),
            "{:?}",
            s.replica_ack
        );
        // After a link reset the old ranges are not waited for.
        m.forwarded(log, Offset(12), us(700));
        m.link_reset();
        m.successor_acked(log, Offset(12), us(900));
        assert_eq!(m.summaries().successor_ack.count, 1);
    }
}
