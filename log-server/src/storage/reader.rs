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
use chainlog_core::Offset;
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
    let r = collect(&segs, req.from, end, max_bytes, &mut out, &mut total);
    Counters::add(&counters.reads, 1);
    Counters::add(&counters.read_bytes, total as u64);
    match r {
        Ok(()) => Ok(out),
        Err(code) if out.is_empty() => Err(code),
        // What was read before the bad batch is still good.
        Err(_) => Ok(out),
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
    from: Offset,
    end: Offset,
    max_bytes: usize,
    out: &mut Vec<Bytes>,
    total: &mut usize,
) -> Result<(), ErrorCode> {
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
                        return Err(ErrorCode::Corruption);
                    }
                };
                let len = h.batch_len();
                if h.end_offset() > end || (!out.is_empty() && *total + len > max_bytes) {
                    return Ok(());
                }
                out.push(chunk.slice(at..at + len));
                *total += len;
                took += 1;
                at += format::stride(len, s.align) as usize;
            }
            if took == 0 {
                tracing::error!("stored batch does not fit the durable part of its segment");
                return Err(ErrorCode::Corruption);
            }
            pos += at as u64;
        }
    }
    Ok(())
}
