//! The disk floor for an append workload: `hw::floor::durable_write_floor` with the batch bytes
//! the server writes for one record, and as many batches per fdatasync as there are appends in
//! flight (the best group commit could do), run for a time budget rather than a round count.

use anyhow::Context;
use chainlog_core::record::{HEADER_LEN, RECORD_OVERHEAD};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Rounds of the calibration run that sizes the real one (they also warm the file system).
const CALIBRATION_ROUNDS: usize = 8;
/// Bounds on the measured rounds: enough for a p99, few enough that a fast disk stays bounded.
const ROUNDS_MIN: usize = 20;
const ROUNDS_MAX: usize = 200_000;

/// One floor measurement, in the units the append benchmark reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskFloor {
    /// Appends in flight this floor stands for (= batches per fdatasync).
    pub inflight: usize,
    pub record_bytes: usize,
    /// Bytes of one single-record batch (header + length prefix + payload).
    pub batch_bytes: usize,
    pub writes_per_sync: usize,
    pub rounds: usize,
    pub direct: bool,
    /// Records (= batches) made durable per second.
    pub records_per_s: f64,
    /// Payload megabytes (10^6) per second, comparable with the append benchmark's MB/s.
    pub mb_per_s: f64,
    /// Latency of one round: `writes_per_sync` writes and one fdatasync.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Bytes the server stores for a batch holding one record of `record_bytes`.
pub fn single_record_batch_bytes(record_bytes: usize) -> usize {
    HEADER_LEN + RECORD_OVERHEAD + record_bytes
}

/// Measures the floor for `inflight` appends of `record_bytes` for about `budget` (blocking:
/// call from a blocking thread).
pub fn disk_floor(
    dir: &Path,
    record_bytes: usize,
    inflight: usize,
    budget: Duration,
) -> anyhow::Result<DiskFloor> {
    let batch_bytes = single_record_batch_bytes(record_bytes);
    let cal_start = Instant::now();
    chainlog_hw::floor::durable_write_floor(dir, batch_bytes, inflight, CALIBRATION_ROUNDS)
        .with_context(|| format!("disk floor calibration in {}", dir.display()))?;
    // The calibration also pre-zeroes a file, so this over-estimates a round: the real run
    // ends up a little shorter than the budget, never much longer.
    let per_round = cal_start.elapsed() / CALIBRATION_ROUNDS as u32;
    let rounds = if per_round.is_zero() {
        ROUNDS_MAX
    } else {
        (budget.as_secs_f64() / per_round.as_secs_f64()) as usize
    }
    .clamp(ROUNDS_MIN, ROUNDS_MAX);
    let r = chainlog_hw::floor::durable_write_floor(dir, batch_bytes, inflight, rounds)
        .with_context(|| format!("disk floor in {}", dir.display()))?;
    Ok(DiskFloor {
        inflight,
        record_bytes,
        batch_bytes,
        writes_per_sync: r.writes_per_sync,
        rounds: r.rounds,
        direct: r.direct,
        records_per_s: r.ops_per_s,
        mb_per_s: r.ops_per_s * record_bytes as f64 / 1e6,
        p50_us: r.p50_us as f64,
        p99_us: r.p99_us as f64,
        max_us: r.max_us as f64,
    })
}

/// [`disk_floor`] on tokio's blocking pool.
pub async fn disk_floor_async(
    dir: PathBuf,
    record_bytes: usize,
    inflight: usize,
    budget: Duration,
) -> anyhow::Result<DiskFloor> {
    tokio::task::spawn_blocking(move || disk_floor(&dir, record_bytes, inflight, budget))
        .await
        .context("floor thread panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_bytes_match_the_record_format() {
        let b = chainlog_core::record::build(
            chainlog_core::LogId(1),
            chainlog_core::Offset(0),
            chainlog_core::Epoch(1),
            &[&[7u8; 1024]],
        )
        .unwrap();
        assert_eq!(single_record_batch_bytes(1024), b.len());
    }

    /// A tiny real floor run (a few milliseconds of fdatasync): the numbers are consistent.
    #[test]
    fn tiny_floor_smoke() {
        let dir = tempfile::tempdir().unwrap();
        let caps = chainlog_hw::probe::probe(dir.path());
        if let Some(why) = caps.uring_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let f = disk_floor(dir.path(), 1024, 4, Duration::from_millis(1)).unwrap();
        assert_eq!(f.rounds, ROUNDS_MIN);
        assert_eq!(f.writes_per_sync, 4);
        assert_eq!(f.batch_bytes, 1108);
        assert!(f.records_per_s > 0.0);
        assert!((f.mb_per_s - f.records_per_s * 1024.0 / 1e6).abs() < 1e-6);
        assert!(f.p50_us <= f.p99_us && f.p99_us <= f.max_us);
    }
}
