//! The disk's durable-write floor: io_uring writes of a batch plus one fdatasync per round (or
//! one `RWF_DSYNC` write per round) on a pre-zeroed file, with nothing else in the way.
//! Benchmarks report storage against this.

use crate::buf::{round_up_page, AlignedBuf};
use crate::disk;
use crate::error::{HwError, Result};
use crate::probe;
use crate::uring::{Op, Ring};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Largest scratch file; rounds wrap around inside it.
const FLOOR_FILE_BYTES_MAX: u64 = 64 << 20;

/// How a floor round makes its writes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FloorSync {
    /// The round's writes, then one `fdatasync`.
    Fdatasync,
    /// One write carrying `RWF_DSYNC` (the kernel flushes before completing it): O_DIRECT and
    /// one write per round only, as the server's storage writes a group.
    DsyncWrite,
}

/// What one floor measurement found.
#[derive(Clone, Debug, Serialize)]
pub struct FloorResult {
    pub batch_bytes: usize,
    pub writes_per_sync: usize,
    pub sync: FloorSync,
    pub rounds: usize,
    /// O_DIRECT was used (probe said it works), else buffered writes.
    pub direct: bool,
    /// Batches made durable per second.
    pub ops_per_s: f64,
    pub syncs_per_s: f64,
    pub bytes_per_s: f64,
    /// Latency of one round (its writes and the sync), microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Measures `rounds` rounds of `writes_per_sync` writes of `batch_bytes` each, made durable as
/// `sync` says, on a pre-zeroed scratch file in `dir` (removed afterwards).
pub fn durable_write_floor(
    dir: &Path,
    batch_bytes: usize,
    writes_per_sync: usize,
    rounds: usize,
    sync: FloorSync,
) -> Result<FloorResult> {
    if batch_bytes == 0 || writes_per_sync == 0 || rounds == 0 {
        return Err(HwError::Invalid("floor needs non-zero sizes".into()));
    }
    let caps = probe::probe(dir);
    if let Some(why) = caps.uring_unavailable() {
        return Err(HwError::UringUnavailable(why.to_string()));
    }
    let direct = caps.direct_ok;
    let dsync = sync == FloorSync::DsyncWrite;
    if dsync && (writes_per_sync != 1 || !direct) {
        return Err(HwError::Invalid(
            "an RWF_DSYNC floor takes one O_DIRECT write per round".into(),
        ));
    }
    // O_DIRECT writes whole pages; buffered writes the exact batch.
    let stride = if direct {
        round_up_page(batch_bytes)
    } else {
        batch_bytes
    } as u64;
    let round_bytes = stride * writes_per_sync as u64;
    let file_bytes = round_up_page(
        (round_bytes * rounds as u64)
            .min(FLOOR_FILE_BYTES_MAX)
            .max(round_bytes) as usize,
    ) as u64;
    let rounds_per_file = (file_bytes / round_bytes).max(1);
    let path = dir.join(format!(".chainlog-floor-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let r = (|| {
        disk::create_prezeroed(&path, file_bytes, direct)?;
        let file = Arc::new(disk::open_rw(&path, direct)?);
        let mut buf = AlignedBuf::new_unpooled(stride as usize);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        buf.set_len(stride as usize);
        let payload = buf.into_bytes();
        let mut ring = Ring::new((writes_per_sync + 2).min(4096) as u32)?;
        let chunk = ring.capacity().max(1);
        let mut lat_us = Vec::with_capacity(rounds);
        let mut done = Vec::new();
        let t0 = Instant::now();
        for r in 0..rounds as u64 {
            let start = Instant::now();
            let base = (r % rounds_per_file) * round_bytes;
            let mut w = 0usize;
            while w < writes_per_sync {
                let n = (writes_per_sync - w).min(chunk);
                for i in 0..n {
                    ring.push(
                        0,
                        Op::Writev {
                            file: file.clone(),
                            offset: base + (w + i) as u64 * stride,
                            bufs: vec![payload.clone()],
                            dsync,
                        },
                    )?;
                }
                let mut got = 0;
                while got < n {
                    ring.wait(None)?;
                    done.clear();
                    ring.complete(&mut done)?;
                    for c in &done {
                        let wrote = c.result.as_ref().map_err(|e| {
                            HwError::io("floor write", std::io::Error::from(e.kind()))
                        })?;
                        if *wrote != stride as usize {
                            return Err(HwError::Invalid(format!("short write {wrote}")));
                        }
                    }
                    got += done.len();
                }
                w += n;
            }
            if dsync {
                lat_us.push(start.elapsed().as_micros() as u64);
                continue;
            }
            let c = ring.run_chain(vec![(
                0,
                Op::Sync {
                    file: file.clone(),
                    datasync: true,
                },
            )])?;
            if let Err(e) = &c[0].result {
                return Err(HwError::io(
                    "floor fdatasync",
                    std::io::Error::from(e.kind()),
                ));
            }
            lat_us.push(start.elapsed().as_micros() as u64);
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        lat_us.sort_unstable();
        let pct = |p: f64| lat_us[((lat_us.len() as f64 - 1.0) * p).round() as usize];
        let ops = (rounds * writes_per_sync) as f64;
        Ok(FloorResult {
            batch_bytes,
            writes_per_sync,
            sync,
            rounds,
            direct,
            ops_per_s: ops / secs,
            syncs_per_s: rounds as f64 / secs,
            bytes_per_s: ops * batch_bytes as f64 / secs,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            max_us: lat_us[lat_us.len() - 1],
        })
    })();
    let _ = std::fs::remove_file(&path);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_runs() {
        let dir = tempfile::tempdir().unwrap();
        let caps = probe::probe(dir.path());
        if let Some(why) = caps.uring_unavailable() {
            eprintln!("skipping floor: {why}");
            return;
        }
        let r = durable_write_floor(dir.path(), 4096, 4, 5, FloorSync::Fdatasync).unwrap();
        assert_eq!(r.rounds, 5);
        assert!(r.ops_per_s > 0.0);
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        eprintln!("{r:?}");
        // RWF_DSYNC takes exactly one O_DIRECT write per round.
        assert!(durable_write_floor(dir.path(), 4096, 4, 5, FloorSync::DsyncWrite).is_err());
        let d = durable_write_floor(dir.path(), 4096, 1, 5, FloorSync::DsyncWrite);
        if caps.direct_ok {
            let d = d.unwrap();
            assert_eq!((d.rounds, d.sync), (5, FloorSync::DsyncWrite));
            assert!(d.ops_per_s > 0.0);
        } else {
            assert!(d.is_err());
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
