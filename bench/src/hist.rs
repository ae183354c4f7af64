//! Latency histograms: one HDR histogram per load task, merged once at the end (no shared lock on
//! the hot path, no sorting of samples), summarised as percentiles in microseconds.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Smallest value we record, in nanoseconds (HDR needs a lower bound >= 1).
const LATENCY_NS_MIN: u64 = 1;
/// Largest value tracked exactly; anything slower saturates here (a minute is far past every
/// request timeout the client allows).
const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// Three significant digits: 0.1% resolution at every magnitude.
const SIGFIG: u8 = 3;

/// Samples a histogram holds back before recording them as one block.
const PENDING_MAX: usize = 1024;

/// A latency histogram in nanoseconds. Samples are recorded a block at a time: a closed loop
/// of 128 tasks has 128 histograms of ~220 KiB each, and recording into them one sample at a
/// time in turn missed the cache on nearly every sample (7% of the load generator's CPU,
/// inside its turnaround between a reply and the next batch).
#[derive(Clone, Debug)]
pub struct LatencyHist {
    h: Histogram<u64>,
    pending: Vec<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    pub fn new() -> LatencyHist {
        // The bounds are constants that satisfy HDR's preconditions (low >= 1, high >= 2*low,
        // sigfig <= 5), so construction cannot fail.
        let h = Histogram::new_with_bounds(LATENCY_NS_MIN, LATENCY_NS_MAX, SIGFIG)
            .unwrap_or_else(|e| panic!("histogram bounds are constants: {e}"));
        LatencyHist {
            h,
            pending: Vec::new(),
        }
    }

    /// Records one latency; values past the tracked range are clamped, never dropped, so a stall
    /// still shows up as the maximum.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if self.pending.capacity() == 0 {
            self.pending.reserve_exact(PENDING_MAX);
        }
        self.pending.push(ns.clamp(LATENCY_NS_MIN, LATENCY_NS_MAX));
        if self.pending.len() >= PENDING_MAX {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for ns in self.pending.drain(..) {
            self.h.saturating_record(ns);
        }
    }

    pub fn record_us(&mut self, us: u64) {
        self.record(Duration::from_micros(us));
    }

    pub fn count(&self) -> u64 {
        self.h.len() + self.pending.len() as u64
    }

    /// Adds `other`'s counts to this one (same bounds, so it cannot fail).
    pub fn merge(&mut self, other: &LatencyHist) {
        self.flush();
        self.h
            .add(&other.h)
            .unwrap_or_else(|e| panic!("histograms share constant bounds: {e}"));
        for &ns in &other.pending {
            self.h.saturating_record(ns);
        }
    }

    /// Merges per-task histograms into one.
    pub fn merged<'a>(parts: impl IntoIterator<Item = &'a LatencyHist>) -> LatencyHist {
        let mut all = LatencyHist::new();
        for p in parts {
            all.merge(p);
        }
        all
    }

    fn quantile_us(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> LatencySummary {
        if self.count() == 0 {
            return LatencySummary::default();
        }
        if !self.pending.is_empty() {
            let mut all = self.clone();
            all.flush();
            return all.summary();
        }
        LatencySummary {
            count: self.count(),
            mean_us: self.h.mean() / 1000.0,
            p50_us: self.quantile_us(0.5),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            p9999_us: self.quantile_us(0.9999),
            max_us: self.h.max() as f64 / 1000.0,
        }
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0.1% relative error plus one bucket, the resolution SIGFIG = 3 promises.
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b * 0.002 + 0.002
    }

    #[test]
    fn merge_equals_one_histogram_of_all_samples() {
        // Three "tasks" with disjoint latency ranges, as a slow replica would produce.
        let mut parts = vec![LatencyHist::new(), LatencyHist::new(), LatencyHist::new()];
        let mut all = LatencyHist::new();
        for i in 1..=3000u64 {
            let us = if i % 3 == 0 { 10_000 + i } else { i };
            parts[(i % 3) as usize].record_us(us);
            all.record_us(us);
        }
        let m = LatencyHist::merged(&parts);
        assert_eq!(m.count(), 3000);
        assert_eq!(m.summary(), all.summary());
        // A third of the samples sit above 10 ms, so p50 is from the fast tasks and p99 from the
        // slow one: a merge that averaged per-task percentiles would get both wrong.
        let s = m.summary();
        assert!(s.p50_us < 3000.0, "p50 {}", s.p50_us);
        assert!(s.p99_us > 10_000.0, "p99 {}", s.p99_us);
        assert!(close(s.max_us, 13_000.0), "max {}", s.max_us);
    }

    #[test]
    fn percentiles_of_a_uniform_range() {
        let mut h = LatencyHist::new();
        for us in 1..=10_000u64 {
            h.record_us(us);
        }
        let s = h.summary();
        assert!(close(s.p50_us, 5000.0), "p50 {}", s.p50_us);
        assert!(close(s.p99_us, 9900.0), "p99 {}", s.p99_us);
        assert!(close(s.p999_us, 9990.0), "p99.9 {}", s.p999_us);
        assert!(close(s.mean_us, 5000.5), "mean {}", s.mean_us);
    }

    #[test]
    fn stalls_saturate_instead_of_vanishing() {
        let mut h = LatencyHist::new();
        h.record(Duration::from_secs(3600));
        h.record(Duration::ZERO);
        assert_eq!(h.count(), 2);
        assert!(h.summary().max_us >= 59_000_000.0);
    }

    /// Samples held back (fewer than a block, or a block and some) count everywhere: in the
    /// count, the summary and a merge.
    #[test]
    fn held_back_samples_count_everywhere() {
        let mut a = LatencyHist::new();
        let mut exact =
            Histogram::<u64>::new_with_bounds(LATENCY_NS_MIN, LATENCY_NS_MAX, SIGFIG).unwrap();
        for us in 1..=(PENDING_MAX as u64 + 10) {
            a.record_us(us);
            exact.record(us * 1000).unwrap();
        }
        assert_eq!(a.count(), PENDING_MAX as u64 + 10);
        assert!(!a.pending.is_empty(), "the test needs samples held back");
        let s = a.summary();
        assert_eq!(s.count, exact.len());
        assert_eq!(s.max_us, exact.max() as f64 / 1000.0);
        assert_eq!(s.p50_us, exact.value_at_quantile(0.5) as f64 / 1000.0);
        let mut b = LatencyHist::new();
        b.record_us(5);
        b.merge(&a);
        assert_eq!(b.count(), PENDING_MAX as u64 + 11);
        assert_eq!(LatencyHist::merged([&a, &a]).count(), 2 * a.count());
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(LatencyHist::new().summary(), LatencySummary::default());
    }
}
