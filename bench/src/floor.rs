//! The disk floor for an append workload: `hw::floor::durable_write_floor` with the batch bytes
//! the server writes for one record, and as many batches per durable write as there are appends
//! in flight (the best group commit could do), run for a time budget rather than a round count.

use anyhow::Context;
use chainlog_core::record::{HEADER_LEN, RECORD_OVERHEAD};
use chainlog_hw::floor::FloorSync;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Rounds of the calibration run that sizes the real one (they also warm the file system).
const CALIBRATION_ROUNDS: usize = 8;
/// Bounds on the measured rounds: enough for a p99, few enough that a fast disk stays bounded.
const ROUNDS_MIN: usize = 20;
const ROUNDS_MAX: usize = 200_000;

/// How a floor round lays out its `inflight` single-record batches before the fdatasync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One write per batch (with O_DIRECT each padded to a page, as a server that keeps
    /// batches page-aligned writes them).
    PerBatch,
    /// All batches back to back in one write (the fewest bytes a group commit can write).
    Packed,
    /// All batches back to back in one O_DIRECT write carrying `RWF_DSYNC`, no fdatasync (how
    /// the server's storage makes a group durable with O_DIRECT).
    PackedDsync,
}

/// One layout's measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FloorRun {
    pub layout: Layout,
    pub writes_per_sync: usize,
    /// Bytes of each write (before O_DIRECT page rounding).
    pub write_bytes: usize,
    pub rounds: usize,
    pub direct: bool,
    /// Records (single-record batches) made durable per second.
    pub records_per_s: f64,
    /// Latency of one round: its writes and the fdatasync.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// CPU (user + system, this process, io_uring workers included) per record: the kernel's
    /// own cost of making a record durable, to compare with the server's CPU per record.
    pub cpu_us_per_record: Option<f64>,
}

/// The floor for `inflight` appends: the better layout's figures, with every run kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskFloor {
    /// Appends in flight this floor stands for (= single-record batches per fdatasync).
    pub inflight: usize,
    pub record_bytes: usize,
    /// Bytes of one single-record batch (header + length prefix + payload).
    pub batch_bytes: usize,
    pub direct: bool,
    /// The layout with the higher records/s; the fields below are its.
    pub layout: Layout,
    pub rounds: usize,
    pub records_per_s: f64,
    /// Payload megabytes (10^6) per second, comparable with the append benchmark's MB/s.
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub runs: Vec<FloorRun>,
    /// Share of the machine's CPU time stolen by the hypervisor while this floor ran (set by
    /// the suite; absent in older reports).
    #[serde(default)]
    pub host_steal_share: Option<f64>,
}

/// Bytes the server stores for a batch holding one record of `record_bytes`.
pub fn single_record_batch_bytes(record_bytes: usize) -> usize {
    HEADER_LEN + RECORD_OVERHEAD + record_bytes
}

/// Runs hw's floor with `writes_per_sync` writes of `write_bytes` for about `budget`; each
/// write stands for `records_per_write` records.
fn measure(
    dir: &Path,
    layout: Layout,
    write_bytes: usize,
    writes_per_sync: usize,
    records_per_write: usize,
    budget: Duration,
) -> anyhow::Result<FloorRun> {
    let sync = match layout {
        Layout::PackedDsync => FloorSync::DsyncWrite,
        Layout::PerBatch | Layout::Packed => FloorSync::Fdatasync,
    };
    let floor = |rounds| {
        chainlog_hw::floor::durable_write_floor(dir, write_bytes, writes_per_sync, rounds, sync)
    };
    let cal_start = Instant::now();
    floor(CALIBRATION_ROUNDS)
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
    let cpu_before = crate::cpu::process_cpu_s(None);
    let r = floor(rounds).with_context(|| format!("disk floor in {}", dir.display()))?;
    let records = (r.rounds * writes_per_sync * records_per_write).max(1) as f64;
    let cpu_us_per_record = crate::cpu::process_cpu_s(None)
        .zip(cpu_before)
        .map(|(after, before)| (after - before) * 1e6 / records);
    Ok(FloorRun {
        layout,
        writes_per_sync,
        write_bytes,
        rounds: r.rounds,
        direct: r.direct,
        records_per_s: r.ops_per_s * records_per_write as f64,
        p50_us: r.p50_us as f64,
        p99_us: r.p99_us as f64,
        max_us: r.max_us as f64,
        cpu_us_per_record,
    })
}

/// Measures the floor for `inflight` appends of `record_bytes`: `inflight` single-record
/// batches per fdatasync, written one per write and (for more than one) packed into one write,
/// and with O_DIRECT packed into one `RWF_DSYNC` write; the best layout is the floor. About
/// `budget` per layout. Blocking: call from a blocking thread.
pub fn disk_floor(
    dir: &Path,
    record_bytes: usize,
    inflight: usize,
    budget: Duration,
) -> anyhow::Result<DiskFloor> {
    anyhow::ensure!(inflight >= 1, "floor needs at least one batch per sync");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let batch_bytes = single_record_batch_bytes(record_bytes);
    let mut runs = vec![measure(
        dir,
        Layout::PerBatch,
        batch_bytes,
        inflight,
        1,
        budget,
    )?];
    let packed_bytes = batch_bytes.saturating_mul(inflight);
    // One batch per sync is the same write either way; a packed group past the largest batch
    // is not something the server could write in one go either.
    if inflight > 1 && packed_bytes <= chainlog_core::limits::BATCH_BYTES_MAX {
        runs.push(measure(
            dir,
            Layout::Packed,
            packed_bytes,
            1,
            inflight,
            budget,
        )?);
    }
    if packed_bytes <= chainlog_core::limits::BATCH_BYTES_MAX && runs.iter().all(|r| r.direct) {
        runs.push(measure(
            dir,
            Layout::PackedDsync,
            packed_bytes,
            1,
            inflight,
            budget,
        )?);
    }
    let best = runs
        .iter()
        .max_by(|a, b| a.records_per_s.total_cmp(&b.records_per_s))
        .cloned()
        .context("at least one floor run")?;
    Ok(DiskFloor {
        inflight,
        record_bytes,
        batch_bytes,
        direct: runs.iter().all(|r| r.direct),
        layout: best.layout,
        rounds: best.rounds,
        records_per_s: best.records_per_s,
        mb_per_s: best.records_per_s * record_bytes as f64 / 1e6,
        p50_us: best.p50_us,
        p99_us: best.p99_us,
        max_us: best.max_us,
        runs,
        host_steal_share: None,
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
        assert_eq!(f.batch_bytes, 1108);
        assert_eq!(f.runs.len(), if caps.direct_ok { 3 } else { 2 });
        let (per, packed) = (&f.runs[0], &f.runs[1]);
        assert_eq!(
            (per.layout, per.writes_per_sync, per.write_bytes),
            (Layout::PerBatch, 4, 1108)
        );
        assert_eq!(
            (packed.layout, packed.writes_per_sync, packed.write_bytes),
            (Layout::Packed, 1, 4432)
        );
        // The floor is the best layout, in records (not writes) per second.
        let best = f.runs.iter().map(|r| r.records_per_s).fold(0.0, f64::max);
        assert_eq!(f.records_per_s, best);
        if let Some(d) = f.runs.get(2) {
            assert_eq!(
                (d.layout, d.writes_per_sync, d.write_bytes),
                (Layout::PackedDsync, 1, 4432)
            );
        }
        assert!(f.records_per_s > 0.0);
        assert!((f.mb_per_s - f.records_per_s * 1024.0 / 1e6).abs() < 1e-6);
        assert!(f.p50_us <= f.p99_us && f.p99_us <= f.max_us);
        // One batch per sync is one write: with fdatasync, and with O_DIRECT as RWF_DSYNC.
        let one = disk_floor(dir.path(), 1024, 1, Duration::from_millis(1)).unwrap();
        assert_eq!(one.runs.len(), if caps.direct_ok { 2 } else { 1 });
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
