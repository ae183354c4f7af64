//! The read thread: serves `read` with `pread` on buffered descriptors of its own, so reads
//! never wait behind the writer's groups, and only ever looks at durable bytes. Every batch is
//! verified after reading; returned batches are zero-copy slices of one read buffer.

use super::format::{self, SEGMENT_HEADER_BYTES};
use super::{emit, Counters, Events, ReadReq, Views};
use bytes::{Bytes, BytesMut};
use chainlog_core::effects::DiskEvent;
use chainlog_core::error::ErrorCode;
use chainlog_core::limits::READ_BYTES_MAX;
use chainlog_core::record::{self, BatchHeader, HEADER_LEN};
use chainlog_core::{LogId, Offset};
use crossbeam_channel::Receiver;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

pub(crate) fn run(rx: Receiver<ReadReq>, views: Views, events: Events, counters: Arc<Counters>) {
    for req in rx.iter() {
        let result = read_one(&views, &req, &counters);
        emit(
            &events,
            DiskEvent::ReadDone {
                token: req.token,
                result,
            },
        );
    }
}

struct SegRef {
    file: Arc<File>,
    align: u32,
    start_pos: u64,
    durable_pos: u64,
}

fn read_one(views: &Views, req: &ReadReq, counters: &Counters) -> Result<Vec<Bytes>, ErrorCode> {
    let view = views
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&req.log)
        .cloned()
        .ok_or(ErrorCode::UnknownLog)?;
    let (segs, end) = {
        let v = view.read().unwrap_or_else(|e| e.into_inner());
        if req.from < v.start {
            return Err(ErrorCode::OffsetTrimmed);
        }
        let end = req.end.min(v.durable_end);
        if req.from >= end {
            return Ok(Vec::new());
        }
        let k = v.segs.partition_point(|s| s.base <= req.from);
        if k == 0 {
            return Err(ErrorCode::OffsetTrimmed);
        }
        let segs: Vec<SegRef> = v.segs[k - 1..]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let start_pos = if i == 0 {
                    let j = s.index.partition_point(|(o, _)| *o <= req.from);
                    if j == 0 {
                        SEGMENT_HEADER_BYTES
                    } else {
                        s.index[j - 1].1
                    }
                } else {
                    SEGMENT_HEADER_BYTES
                };
                SegRef {
                    file: s.file.clone(),
                    align: s.align,
                    start_pos,
                    durable_pos: s.durable_pos,
                }
            })
            .collect();
        (segs, end)
    };
    let mut out = Vec::new();
    let mut total = 0usize;
    let max_bytes = req.max_bytes.min(READ_BYTES_MAX);
    let r = collect(
        &segs, req.log, req.from, end, max_bytes, &mut out, &mut total,
    );
    Counters::add(&counters.reads, 1);
    Counters::add(&counters.read_bytes, total as u64);
    match r {
        Ok(()) => Ok(out),
        // What was read before the bad batch is still good.
        Err(_) if !out.is_empty() => Ok(out),
        Err(bad) => {
            // Retention may have recycled the segment while this read held its descriptor
            // (the file now holds a newer part of some log): then the offsets are trimmed,
            // whatever the bytes looked like.
            let start = view.read().unwrap_or_else(|e| e.into_inner()).start;
            match bad {
                _ if req.from < start => Err(ErrorCode::OffsetTrimmed),
                Bad::Code(code) => Err(code),
                Bad::Discontinuous => {
                    tracing::error!(log = %req.log, from = %req.from, "stored batches do not continue the log");
                    Err(ErrorCode::Corruption)
                }
            }
        }
    }
}

/// Why a read stopped short.
#[derive(Debug)]
enum Bad {
    Code(ErrorCode),
    /// A batch that is not the one the log holds there (another log's, or another offset).
    Discontinuous,
}

impl From<ErrorCode> for Bad {
    fn from(c: ErrorCode) -> Bad {
        Bad::Code(c)
    }
}

/// Whether `h` is the batch the read needs next: the one holding `from` first, then each
/// following the last.
fn continues(h: &BatchHeader, log: LogId, from: Offset, next: Option<Offset>) -> bool {
    h.log_id == log
        && match next {
            Some(n) => h.base_offset == n,
            None => h.base_offset <= from && from < h.end_offset(),
        }
}

fn header_at(f: &File, pos: u64) -> Result<BatchHeader, ErrorCode> {
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact_at(&mut hb, pos).map_err(|e| {
        tracing::error!("read of a batch header failed: {e}");
        ErrorCode::StorageError
    })?;
    BatchHeader::decode(&hb).map_err(|e| {
        tracing::error!("stored batch header does not verify: {e}");
        ErrorCode::Corruption
    })
}

fn collect(
    segs: &[SegRef],
    log: LogId,
    from: Offset,
    end: Offset,
    max_bytes: usize,
    out: &mut Vec<Bytes>,
    total: &mut usize,
) -> Result<(), Bad> {
    let mut next: Option<Offset> = None;
    for (i, s) in segs.iter().enumerate() {
        let mut pos = s.start_pos;
        if i == 0 {
            // From the index point to the batch holding `from`, by headers only.
            while pos < s.durable_pos {
                let h = header_at(&s.file, pos)?;
                if h.end_offset() > from {
                    break;
                }
                pos += format::stride(h.batch_len(), s.align);
            }
        }
        while pos < s.durable_pos {
            let h = header_at(&s.file, pos)?;
            if !continues(&h, log, from, next) {
                return Err(Bad::Discontinuous);
            }
            let len = h.batch_len();
            if h.end_offset() > end {
                return Ok(());
            }
            if !out.is_empty() && *total + len > max_bytes {
                return Ok(());
            }
            // One read for as many following batches as the budget allows.
            let budget = max_bytes.saturating_sub(*total).max(len) as u64;
            let want = format::stride(len, s.align)
                .max(budget.next_multiple_of(u64::from(s.align.max(1))))
                .min(s.durable_pos - pos);
            let mut buf = BytesMut::zeroed(want as usize);
            s.file.read_exact_at(&mut buf, pos).map_err(|e| {
                tracing::error!("segment read failed: {e}");
                ErrorCode::StorageError
            })?;
            let chunk = buf.freeze();
            let mut at = 0usize;
            let mut took = 0;
            while at + HEADER_LEN <= chunk.len() {
                let h = match record::verify(&chunk[at..]) {
                    Ok(h) => h,
                    // Runs past the chunk: read again from here.
                    Err(_)
                        if BatchHeader::decode(&chunk[at..])
                            .is_ok_and(|h| at + h.batch_len() > chunk.len()) =>
                    {
                        break
                    }
                    Err(e) => {
                        tracing::error!("stored batch does not verify: {e}");
                        return Err(ErrorCode::Corruption.into());
                    }
                };
                if !continues(&h, log, from, next) {
                    return Err(Bad::Discontinuous);
                }
                let len = h.batch_len();
                if h.end_offset() > end || (!out.is_empty() && *total + len > max_bytes) {
                    return Ok(());
                }
                out.push(chunk.slice(at..at + len));
                next = Some(h.end_offset());
                *total += len;
                took += 1;
                at += format::stride(len, s.align) as usize;
            }
            if took == 0 {
                tracing::error!("stored batch does not fit the durable part of its segment");
                return Err(ErrorCode::Corruption.into());
            }
            pos += at as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chainlog_core::Epoch;
    use std::io::Write;

    /// A segment file holding one batch of `log` at `base` (unaligned, as in buffered mode).
    fn seg(log: LogId, base: Offset) -> (tempfile::NamedTempFile, SegRef) {
        let b = record::build(log, base, Epoch(1), &[b"one", b"two"]).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0u8; SEGMENT_HEADER_BYTES as usize])
            .unwrap();
        f.write_all(&b).unwrap();
        let r = SegRef {
            file: Arc::new(File::open(f.path()).unwrap()),
            align: 1,
            start_pos: SEGMENT_HEADER_BYTES,
            durable_pos: SEGMENT_HEADER_BYTES + b.len() as u64,
        };
        (f, r)
    }

    fn run(s: &SegRef, log: LogId, from: Offset) -> Result<usize, Bad> {
        let (mut out, mut total) = (Vec::new(), 0);
        collect(
            std::slice::from_ref(s),
            log,
            from,
            Offset(1000),
            1 << 20,
            &mut out,
            &mut total,
        )
        .map(|()| out.len())
    }

    #[test]
    fn a_read_returns_only_batches_that_continue_the_log() {
        let log = LogId(7);
        let (_f, s) = seg(log, Offset(100));
        assert_eq!(run(&s, log, Offset(100)).unwrap(), 1);
        assert_eq!(run(&s, log, Offset(101)).unwrap(), 1);
        // A descriptor of a segment retention recycled: the file now holds a later part of
        // the log, or another log.
        assert!(matches!(run(&s, log, Offset(50)), Err(Bad::Discontinuous)));
        assert!(matches!(
            run(&s, LogId(8), Offset(100)),
            Err(Bad::Discontinuous)
        ));
        // Across segments, each must start where the one before ended.
        let (_g, t) = seg(log, Offset(103));
        let (mut out, mut total) = (Vec::new(), 0);
        let r = collect(
            &[s, t],
            log,
            Offset(100),
            Offset(1000),
            1 << 20,
            &mut out,
            &mut total,
        );
        assert!(matches!(r, Err(Bad::Discontinuous)), "{r:?}");
        assert_eq!(out.len(), 1, "the good prefix is kept");
    }
}
