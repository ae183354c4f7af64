//! Per-stage latency histograms (HDR) kept by the runtime and reported in `status`.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Highest latency tracked exactly; larger values are clamped (and counted in `max`).
const LATENCY_US_MAX: u64 = 60_000_000;

/// Histograms of the node's hot path. Only the core loop writes them.
pub struct Metrics {
    append_us: Histogram<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            append_us: new_histogram(),
        }
    }
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
}
