//! Per-stage latency histograms (HDR) kept by the runtime and reported in `status`.

use chainlog_core::types::{LogId, Offset};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Highest latency tracked exactly; larger values are clamped (and counted in `max`).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Writes remembered per log while waiting for their fsync (bounded by the replication window;
/// past this the oldest are forgotten and not measured).
const WRITES_TRACKED_MAX: usize = 1 << 16;

/// Histograms of the node's hot path. Only the core loop writes them.
pub struct Metrics {
    /// Head: client request received → acknowledged (durable on every replica).
    append_us: Histogram<u64>,
    /// Every node: batches handed to storage → covered by a completed fdatasync.
    local_durable_us: Histogram<u64>,
    /// Per log, ends of writes issued and not yet durable, with when they were issued.
    writes: BTreeMap<LogId, VecDeque<(Offset, Instant)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            append_us: new_histogram(),
            local_durable_us: new_histogram(),
            writes: BTreeMap::new(),
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
        let us = (d.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        self.append_us.saturating_record(us);
    }

    pub fn append_summary(&self) -> LatencySummary {
        summarize(&self.append_us)
    }

    /// Storage was asked to write `log` up to `end`.
    pub fn write_issued(&mut self, log: LogId, end: Offset, at: Instant) {
        let q = self.writes.entry(log).or_default();
        if q.len() >= WRITES_TRACKED_MAX {
            q.pop_front();
        }
        q.push_back((end, at));
    }

    /// `log` is durable below `end`: every write ending there or before has finished.
    pub fn durable(&mut self, log: LogId, end: Offset, at: Instant) {
        let Some(q) = self.writes.get_mut(&log) else {
            return;
        };
        while let Some(&(e, t)) = q.front() {
            if e > end {
                break;
            }
            q.pop_front();
            let us = (at.saturating_duration_since(t).as_micros() as u64).clamp(1, LATENCY_US_MAX);
            self.local_durable_us.saturating_record(us);
        }
    }

    /// A failed write resets the log: its pending writes will never become durable as issued.
    pub fn write_failed(&mut self, log: LogId) {
        self.writes.remove(&log);
    }

    pub fn summaries(&self) -> StageSummaries {
        StageSummaries {
            append: summarize(&self.append_us),
            local_durable: summarize(&self.local_durable_us),
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
}
