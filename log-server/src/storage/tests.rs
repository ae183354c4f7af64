//! Storage tests: round trips across segment rolls, recovery of torn and corrupt tails, group
//! commit, injected write failures, truncate, trim and retention, in both I/O modes.
#![allow(clippy::unwrap_used)]

use super::format::{self, SEGMENT_HEADER_BYTES};
use super::recovery;
use super::*;
use bytes::BytesMut;
use chainlog_core::effects::ProducerBatch;
use chainlog_core::record::{self, BatchBuilder, BatchHeader};
use chainlog_core::{ClusterId, Epoch, ErrorCode, ProducerId};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn small_cfg(dir: &Path, mode: IoMode) -> StorageConfig {
    StorageConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 1 << 20,
        io_mode: mode,
        index_interval_bytes: 1024,
        retention_bytes: None,
        retention_ms: None,
        group_commit_bytes_max: 256 << 10,
        groups_in_flight_max: 4,
        queue_depth: 32,
    }
}

/// The modes this machine can run: buffered always, direct when the probe allows.
fn modes() -> Vec<IoMode> {
    let d = tempfile::tempdir().unwrap();
    let caps = chainlog_hw::probe::probe(d.path());
    if let Some(why) = caps.uring_unavailable() {
        eprintln!("skipping storage tests: {why}");
        return vec![];
    }
    let mut m = vec![IoMode::Buffered];
    match caps.direct_unavailable() {
        None => m.push(IoMode::Direct),
        Some(why) => eprintln!("skipping direct mode: {why}"),
    }
    m
}

struct Node {
    st: Option<Storage>,
    rx: Receiver<DiskEvent>,
    rec: Vec<RecoveredLog>,
}

impl Node {
    fn open(cfg: &StorageConfig) -> Node {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (st, rec) = Storage::open(
            cfg.clone(),
            Box::new(move |e| {
                let _ = tx.send(e);
            }),
        )
        .unwrap();
        Node {
            st: Some(st),
            rx,
            rec,
        }
    }

    fn st(&self) -> &Storage {
        self.st.as_ref().unwrap()
    }

    fn shutdown(mut self) {
        self.st.take().unwrap().shutdown();
    }

    fn next(&self) -> DiskEvent {
        match self.rx.recv_timeout(WAIT) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => panic!("no storage event within {WAIT:?}"),
            Err(e) => panic!("{e}"),
        }
    }

    fn create(&self, log: LogId, name: &str) {
        self.st().create_log(log, name);
        match self.next() {
            DiskEvent::Created { log: l, result } => {
                assert_eq!(l, log);
                result.unwrap();
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    /// The next event, which must be a `WriteFailed`: (log, at, code).
    fn next_failed(&self) -> (LogId, Offset, ErrorCode) {
        match self.next() {
            DiskEvent::WriteFailed { log, at, code } => (log, at, code),
            e => panic!("unexpected {e:?}"),
        }
    }

    /// Appends and waits until durable; returns the new end.
    fn append(&self, log: LogId, base: Offset, batches: Vec<Bytes>) -> Offset {
        let end = end_of(base, &batches);
        self.st().append(log, base, batches);
        loop {
            match self.next() {
                DiskEvent::Durable { log: l, end: e } if l == log => {
                    if e == end {
                        return end;
                    }
                    assert!(e < end);
                }
                e => panic!("unexpected {e:?}"),
            }
        }
    }

    fn read(
        &self,
        log: LogId,
        from: Offset,
        end: Offset,
        max: usize,
    ) -> Result<Vec<Bytes>, ErrorCode> {
        self.st().read(ReadToken(7), log, from, end, max);
        match self.next() {
            DiskEvent::ReadDone { token, result } => {
                assert_eq!(token, ReadToken(7));
                result
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    fn read_all(&self, log: LogId, from: Offset, end: Offset) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = from;
        while at < end {
            let got = self.read(log, at, end, 64 << 10).unwrap();
            assert!(!got.is_empty(), "read at {at} of {end} returned nothing");
            for b in got {
                let h = record::verify(&b).unwrap();
                assert!(h.base_offset <= at && at < h.end_offset());
                at = h.end_offset();
                out.push(b);
            }
        }
        out
    }

    fn recovered(&self, log: LogId) -> &RecoveredLog {
        self.rec.iter().find(|r| r.log == log).unwrap()
    }
}

fn end_of(base: Offset, batches: &[Bytes]) -> Offset {
    let mut e = base;
    for b in batches {
        let h = BatchHeader::decode(b).unwrap();
        assert_eq!(h.base_offset, e);
        e = h.end_offset();
    }
    e
}

/// A batch at `base` with `records` records of `size` bytes each, contents derived from the
/// offset so a read can be checked.
fn batch(log: LogId, base: Offset, records: u32, size: usize, producer: (u64, u64)) -> Bytes {
    let mut b = BatchBuilder::with_capacity(records as usize * (size + 4) + 80);
    for i in 0..records {
        let o = base.0 + u64::from(i);
        let p: Vec<u8> = (0..size).map(|j| (o as usize * 31 + j) as u8).collect();
        b.push(&p).unwrap();
    }
    let raw = b.finish(ClusterId(1), log, ProducerId(producer.0), producer.1, 0);
    let mut m = BytesMut::from(&raw[..]);
    record::restamp(&mut m, ClusterId(1), Epoch(1), base);
    m.freeze()
}

fn seg_files(dir: &Path, log: LogId) -> Vec<PathBuf> {
    let d = dir.join(format::LOGS_DIR).join(format::log_dir_name(log));
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_across_segment_rolls_and_reopen() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let log = LogId::from_name("a");
        let n = Node::open(&cfg);
        assert!(n.rec.is_empty());
        n.create(log, "a");
        let mut end = Offset(0);
        let mut written = Vec::new();
        for i in 0..160u32 {
            // 1..4 batches per append, 1..8 records of 100..1500 bytes.
            let k = 1 + i % 4;
            let mut bs = Vec::new();
            let mut e = end;
            for j in 0..k {
                let b = batch(
                    log,
                    e,
                    1 + (i + j) % 8,
                    100 + ((i * 37 + j * 11) % 3000) as usize,
                    (0, 0),
                );
                e = BatchHeader::decode(&b).unwrap().end_offset();
                bs.push(b);
            }
            written.extend(bs.iter().cloned());
            end = n.append(log, end, bs);
        }
        let stats = n.st().stats();
        let ls = &stats.logs[0];
        assert!(
            ls.segments >= 3,
            "{mode:?}: expected rolls, got {} segments",
            ls.segments
        );
        assert_eq!(ls.durable_end, end);
        if mode == IoMode::Buffered {
            assert_eq!(stats.copy_bytes, 0);
        } else {
            // Batches built in a Vec are not page-aligned: O_DIRECT needs them copied.
            assert!(stats.copy_bytes > 0);
        }
        let got = n.read_all(log, Offset(0), end);
        assert_eq!(got, written, "{mode:?}");
        // A read from inside a batch starts with the batch holding it.
        let mid = BatchHeader::decode(&written[50]).unwrap();
        let r = n
            .read(
                log,
                mid.base_offset.plus(u64::from(mid.record_count) - 1),
                end,
                1,
            )
            .unwrap();
        assert_eq!(r, vec![written[50].clone()]);
        // None past `end`.
        let r = n
            .read(log, mid.base_offset, mid.end_offset().plus(0), 1 << 20)
            .unwrap();
        assert_eq!(r, vec![written[50].clone()]);
        let r = n.read(log, end, end.plus(10), 1 << 20).unwrap();
        assert!(r.is_empty());
        n.shutdown();

        let n = Node::open(&cfg);
        let r = n.recovered(log);
        assert_eq!(
            (r.name.as_str(), r.start, r.end),
            ("a", Offset(0), end),
            "{mode:?}"
        );
        assert_eq!(
            n.read_all(log, Offset(0), end),
            written,
            "{mode:?} after reopen"
        );
        // And appending continues where it was.
        let b = batch(log, end, 3, 10, (0, 0));
        let end2 = n.append(log, end, vec![b.clone()]);
        assert_eq!(n.read(log, end, end2, 1 << 20).unwrap(), vec![b]);
        n.shutdown();
    }
}

/// Lays down `count` batches and returns (segment path, position of last batch, its length,
/// end before it, end after it).
fn log_with_tail(
    cfg: &StorageConfig,
    log: LogId,
    count: u32,
) -> (PathBuf, u64, usize, Offset, Offset) {
    let n = Node::open(cfg);
    n.create(log, "t");
    let mut end = Offset(0);
    let mut before = end;
    for i in 0..count {
        before = end;
        end = n.append(
            log,
            end,
            vec![batch(log, end, 1 + i % 3, 40 + i as usize * 7, (0, 0))],
        );
    }
    let last_len = {
        let b = n.read(log, before, end, 1).unwrap();
        b[0].len()
    };
    n.shutdown();
    let segs = seg_files(&cfg.dir, log);
    assert_eq!(segs.len(), 1);
    let align = if cfg.io_mode == IoMode::Direct {
        4096
    } else {
        1
    };
    // Find the last batch's position by walking the segment.
    let data = std::fs::read(&segs[0]).unwrap();
    let mut pos = SEGMENT_HEADER_BYTES as usize;
    let mut last = pos;
    while let Ok(h) = BatchHeader::decode(&data[pos..]) {
        last = pos;
        pos += format::stride(h.batch_len(), align) as usize;
    }
    (segs[0].clone(), last as u64, last_len, before, end)
}

fn log_dir(cfg: &StorageConfig, log: LogId) -> PathBuf {
    cfg.dir
        .join(format::LOGS_DIR)
        .join(format::log_dir_name(log))
}

#[test]
fn torn_last_batch_cut_at_every_byte_is_dropped_and_rest_kept() {
    use std::os::unix::fs::FileExt;
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let log = LogId::from_name("t");
        let (seg, pos, len, before, end) = log_with_tail(&cfg, log, 6);
        let original = std::fs::read(&seg).unwrap();
        let ldir = log_dir(&cfg, log);
        let align = if mode == IoMode::Direct { 4096 } else { 1 };
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        for cut in 0..=len {
            // The batch made it to disk up to `cut` bytes; the rest is still pre-zeroed.
            f.write_all_at(&original[pos as usize..pos as usize + len], pos)
                .unwrap();
            f.write_all_at(&vec![0u8; len - cut], pos + cut as u64)
                .unwrap();
            let rec = recovery::recover_log(&ldir, align, cfg.index_interval_bytes).unwrap();
            // Zeroing bytes that were zero anyway leaves the batch whole.
            let intact = original[pos as usize + cut..pos as usize + len]
                .iter()
                .all(|&b| b == 0);
            let want = if intact { end } else { before };
            assert_eq!(
                rec.end, want,
                "{mode:?} cut at byte {cut} of {len} (batch at {pos})"
            );
            let now = std::fs::read(&seg).unwrap();
            assert_eq!(
                &now[..pos as usize],
                &original[..pos as usize],
                "complete batches kept"
            );
            if !intact {
                let rest = &now[pos as usize..];
                assert!(rest == vec![0u8; rest.len()], "torn bytes zeroed");
            }
        }
        // Through the full open path too: the torn batch is gone, appends continue.
        f.write_all_at(&vec![0u8; len - len / 2], pos + (len / 2) as u64)
            .unwrap();
        drop(f);
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, before);
        let b = batch(log, before, 2, 33, (0, 0));
        let e = n.append(log, before, vec![b.clone()]);
        assert_eq!(n.read(log, before, e, 1 << 20).unwrap(), vec![b]);
        n.shutdown();
    }
}

#[test]
fn bit_flip_in_last_batch_cuts_it() {
    use std::os::unix::fs::FileExt;
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let log = LogId::from_name("t");
        let (seg, pos, len, before, end) = log_with_tail(&cfg, log, 5);
        let original = std::fs::read(&seg).unwrap();
        let ldir = log_dir(&cfg, log);
        let align = if mode == IoMode::Direct { 4096 } else { 1 };
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        for byte in 0..len {
            let mut b = original[pos as usize..pos as usize + len].to_vec();
            b[byte] ^= 1 << (byte % 8);
            f.write_all_at(&b, pos).unwrap();
            let rec = recovery::recover_log(&ldir, align, cfg.index_interval_bytes).unwrap();
            assert_eq!(rec.end, before, "{mode:?} flip in byte {byte}");
        }
        f.write_all_at(&original[pos as usize..pos as usize + len], pos)
            .unwrap();
        let rec = recovery::recover_log(&ldir, align, cfg.index_interval_bytes).unwrap();
        assert_eq!(rec.end, end);
    }
}

#[test]
fn group_commit_coalesces_appends() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let n = Node::open(&small_cfg(dir.path(), mode));
        let log = LogId::from_name("g");
        n.create(log, "g");
        let count = 1000u64;
        for i in 0..count {
            n.st()
                .append(log, Offset(i), vec![batch(log, Offset(i), 1, 64, (0, 0))]);
        }
        let mut last = Offset(0);
        let mut events = 0;
        while last < Offset(count) {
            match n.next() {
                DiskEvent::Durable { end, .. } => {
                    assert!(end > last, "durable end must grow");
                    last = end;
                    events += 1;
                }
                e => panic!("unexpected {e:?}"),
            }
        }
        let s = n.st().stats();
        assert_eq!(s.batches, count);
        // One durable event may cover several groups that completed together.
        assert!(s.groups >= events);
        assert_eq!(s.fsyncs, s.groups);
        assert!(
            s.fsyncs < count / 2,
            "{mode:?}: {} fsyncs for {count} appends: group commit did not coalesce",
            s.fsyncs
        );
        eprintln!("{mode:?}: {count} appends in {} groups", s.groups);
        n.shutdown();
    }
}

#[test]
fn enospc_reports_storage_full_and_the_log_recovers() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("f");
        n.create(log, "f");
        let e1 = n.append(log, Offset(0), vec![batch(log, Offset(0), 2, 50, (0, 0))]);
        n.st().failpoints().write_enospc.store(1, Ordering::Release);
        let a = batch(log, e1, 3, 50, (0, 0));
        let ea = end_of(e1, std::slice::from_ref(&a));
        n.st().append(log, e1, vec![a]);
        // Sent before the failure was seen: dropped with it.
        n.st().append(log, ea, vec![batch(log, ea, 1, 50, (0, 0))]);
        assert_eq!(n.next_failed(), (log, e1, ErrorCode::StorageFull));
        // The caller retries from the durable end.
        let c = batch(log, e1, 1, 77, (0, 0));
        let ec = n.append(log, e1, vec![c.clone()]);
        assert_eq!(n.read(log, e1, ec, 1 << 20).unwrap(), vec![c.clone()]);
        // EIO is a storage error.
        n.st().failpoints().write_eio.store(1, Ordering::Release);
        n.st().append(log, ec, vec![batch(log, ec, 1, 10, (0, 0))]);
        let (_, at, code) = n.next_failed();
        assert_eq!((at, code), (ec, ErrorCode::StorageError));
        n.shutdown();
        // Nothing of the failed writes comes back.
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, ec, "{mode:?}");
        n.shutdown();
    }
}

/// A full disk whose failed range cannot be zeroed is a storage error, not `StorageFull`: the
/// failed write's bytes stay on disk and come back after a restart, so the failure is no
/// proof that the append is stored nowhere.
#[test]
fn a_failed_range_that_cannot_be_zeroed_is_no_proof_of_storing_nothing() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("z");
        n.create(log, "z");
        let e1 = n.append(log, Offset(0), vec![batch(log, Offset(0), 2, 50, (0, 0))]);
        // The injected ENOSPC replaces the result of a write that did reach the file.
        n.st().failpoints().zero_fail.store(1, Ordering::Release);
        n.st().failpoints().write_enospc.store(1, Ordering::Release);
        let a = batch(log, e1, 3, 50, (0, 0));
        let ea = end_of(e1, std::slice::from_ref(&a));
        n.st().append(log, e1, vec![a.clone()]);
        assert_eq!(
            n.next_failed(),
            (log, e1, ErrorCode::StorageError),
            "{mode:?}"
        );
        // The log stays failed (no reopening: it is not merely full).
        n.st().append(log, e1, vec![batch(log, e1, 1, 10, (0, 0))]);
        assert_eq!(n.next_failed().1, e1);
        n.shutdown();
        // After a restart the batch the failure was reported for is there after all.
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, ea, "{mode:?}");
        assert_eq!(n.read(log, e1, ea, 1 << 20).unwrap(), vec![a], "{mode:?}");
        n.shutdown();
    }
}

/// The directory fsync that makes a rolled segment's name durable fails: nothing written into
/// that segment is reported durable (the name may not survive a crash, and the records with
/// it), the log fails with a storage error and stays failed, and a restart finds the log
/// ending where the old segment did.
#[test]
fn a_failed_directory_sync_after_a_roll_reports_nothing_in_the_new_segment_durable() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("d");
        n.create(log, "d");
        let created = n.st().stats().segments_created;
        n.st()
            .failpoints()
            .dir_sync_fail
            .store(1, Ordering::Release);
        let mut durable = Offset(0);
        let failed = loop {
            assert!(durable.0 < 4096, "{mode:?}: no roll");
            let b = batch(log, durable, 8, 4000, (0, 0));
            let end = end_of(durable, std::slice::from_ref(&b));
            n.st().append(log, durable, vec![b]);
            match n.next() {
                DiskEvent::Durable { log: l, end: e } => {
                    assert_eq!((l, e), (log, end), "{mode:?}");
                    assert_eq!(
                        n.st().stats().segments_created,
                        created,
                        "{mode:?}: reported durable in the segment whose name is not"
                    );
                    durable = e;
                }
                DiskEvent::WriteFailed { log: l, at, code } => {
                    assert_eq!(l, log);
                    break (at, code);
                }
                e => panic!("unexpected {e:?}"),
            }
        };
        let rolls = n.st().stats().segments_created - created;
        assert_eq!(rolls, 1, "{mode:?}: failed at the roll");
        assert_eq!(failed, (durable, ErrorCode::StorageError), "{mode:?}");
        // Stays failed: the next append is refused too.
        n.st()
            .append(log, durable, vec![batch(log, durable, 1, 10, (0, 0))]);
        assert_eq!(n.next_failed(), (log, durable, ErrorCode::StorageError));
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, durable, "{mode:?}");
        n.shutdown();
    }
}

/// A log that failed full is reopened at its durable end by the writer's once-a-second
/// free-space check, only once the check finds room; one that failed with EIO is not.
#[test]
fn a_log_that_failed_full_is_reopened_once_space_is_free() {
    for (i, mode) in modes().into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("r");
        n.create(log, "r");
        let e1 = n.append(log, Offset(0), vec![batch(log, Offset(0), 2, 50, (0, 0))]);
        // The first check finds the disk still full.
        n.st()
            .failpoints()
            .no_free_space
            .store(1, Ordering::Release);
        n.st().failpoints().write_enospc.store(1, Ordering::Release);
        n.st().append(log, e1, vec![batch(log, e1, 3, 50, (0, 0))]);
        assert_eq!(n.next_failed(), (log, e1, ErrorCode::StorageFull));
        match n.next() {
            DiskEvent::Reopened { log: l, end } => assert_eq!((l, end), (log, e1), "{mode:?}"),
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(
            n.st().failpoints().no_free_space.load(Ordering::Acquire),
            0,
            "{mode:?}: reopened before the check that found no room"
        );
        // Appends continue at the reopened end and survive a restart.
        let c = batch(log, e1, 1, 77, (0, 0));
        let ec = n.append(log, e1, vec![c.clone()]);
        assert_eq!(n.read(log, e1, ec, 1 << 20).unwrap(), vec![c]);
        // An I/O error is not a full disk: the log stays failed however much room there is.
        n.st().failpoints().write_eio.store(1, Ordering::Release);
        n.st().append(log, ec, vec![batch(log, ec, 1, 10, (0, 0))]);
        let (_, at, code) = n.next_failed();
        assert_eq!((at, code), (ec, ErrorCode::StorageError));
        // (Two free-space ticks; once is enough, the check does not depend on the mode.)
        if i == 0 {
            match n.rx.recv_timeout(Duration::from_millis(2500)) {
                Err(RecvTimeoutError::Timeout) => {}
                other => panic!("{mode:?}: after EIO: {other:?}"),
            }
        }
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, ec, "{mode:?}");
        n.shutdown();
    }
}

/// Several groups of one log in flight: all become durable in order; then a write error in
/// one of them fails the log at the end of the groups before it, and nothing after that end
/// survives a reopen (the writes still in flight were waited for before the range was zeroed).
#[test]
fn groups_in_flight_complete_in_order_and_fail_together() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            segment_bytes: 16 << 20,
            group_commit_bytes_max: 64 << 10,
            groups_in_flight_max: 4,
            ..small_cfg(dir.path(), mode)
        };
        let n = Node::open(&cfg);
        let log = LogId::from_name("p");
        n.create(log, "p");
        // 1 MiB queued at once: sixteen 64 KiB groups, four at a time.
        let mut all = Vec::new();
        let mut end = Offset(0);
        for _ in 0..32 {
            let b = batch(log, end, 8, 4000, (0, 0));
            end = end_of(end, std::slice::from_ref(&b));
            all.push(b);
        }
        assert_eq!(n.append(log, Offset(0), all.clone()), end);
        let s = n.st().stats();
        assert!(s.groups >= 8, "{mode:?}: {} groups for 1 MiB", s.groups);
        assert_eq!(n.read_all(log, Offset(0), end), all);

        // The first write to complete fails while the others are in flight.
        n.st().failpoints().write_eio.store(1, Ordering::Release);
        let mut more = Vec::new();
        let mut e2 = end;
        for _ in 0..32 {
            let b = batch(log, e2, 8, 4000, (0, 0));
            e2 = end_of(e2, std::slice::from_ref(&b));
            more.push(b);
        }
        n.st().append(log, end, more.clone());
        let at = loop {
            match n.next() {
                DiskEvent::Durable { end: d, .. } => assert!(d < e2),
                DiskEvent::WriteFailed { at, code, .. } => {
                    assert_eq!(code, ErrorCode::StorageError);
                    break at;
                }
                e => panic!("unexpected {e:?}"),
            }
        };
        assert!(at >= end && at < e2, "{mode:?}: failed at {at}");
        // The log takes appends again at the reported end.
        let c = batch(log, at, 1, 100, (0, 0));
        let ec = n.append(log, at, vec![c.clone()]);
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, ec, "{mode:?}");
        let back = n.read_all(log, Offset(0), ec);
        let kept = (at.0 - end.0) as usize / 8;
        let mut want = all.clone();
        want.extend(more[..kept].iter().cloned());
        want.push(c);
        assert_eq!(back, want, "{mode:?}");
        n.shutdown();
    }
}

/// Many logs rolling small segments through a tiny ring: every roll's directory fsync and
/// every log's groups share seven slots, and everything still lands, in order, once.
#[test]
fn rolls_and_groups_of_many_logs_share_a_small_ring() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            group_commit_bytes_max: 64 << 10,
            groups_in_flight_max: 4,
            queue_depth: 8,
            ..small_cfg(dir.path(), mode)
        };
        let n = Node::open(&cfg);
        let logs: Vec<LogId> = (0..4).map(|i| LogId::from_name(&format!("m{i}"))).collect();
        for (i, l) in logs.iter().enumerate() {
            n.create(*l, &format!("m{i}"));
        }
        let mut want: Vec<Vec<Bytes>> = vec![Vec::new(); logs.len()];
        let mut ends = vec![Offset(0); logs.len()];
        // Interleaved, all queued at once: 3 MiB per log over 1 MiB segments.
        for _ in 0..96 {
            for (i, l) in logs.iter().enumerate() {
                let b = batch(*l, ends[i], 4, 8000, (0, 0));
                let e = end_of(ends[i], std::slice::from_ref(&b));
                n.st().append(*l, ends[i], vec![b.clone()]);
                want[i].push(b);
                ends[i] = e;
            }
        }
        let mut durable = vec![Offset(0); logs.len()];
        while durable != ends {
            match n.next() {
                DiskEvent::Durable { log, end } => {
                    let i = logs.iter().position(|l| *l == log).unwrap();
                    assert!(end > durable[i]);
                    durable[i] = end;
                }
                e => panic!("unexpected {e:?}"),
            }
        }
        for (i, l) in logs.iter().enumerate() {
            assert_eq!(n.read_all(*l, Offset(0), ends[i]), want[i], "{mode:?}");
        }
        assert!(n.st().stats().segments_created >= 12);
        n.shutdown();
        let n = Node::open(&cfg);
        for (i, l) in logs.iter().enumerate() {
            assert_eq!(n.recovered(*l).end, ends[i], "{mode:?}");
        }
        n.shutdown();
    }
}

/// `RWF_DSYNC` syncs only the bytes it writes, and a roll writes the new segment's header
/// through the page cache: the first group of every segment (and of a start-up) must be made
/// durable by a whole-file fdatasync, or a crash could leave acknowledged batches behind a
/// blank header, which recovery takes for an unused segment. The others need not be.
#[test]
fn the_first_group_of_each_segment_syncs_the_whole_file() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("h");
        n.create(log, "h");
        let mut end = Offset(0);
        // One group at a time, 64 KiB each: 16 per 1 MiB segment, about 4 segments.
        for _ in 0..60 {
            end = n.append(log, end, vec![batch(log, end, 8, 8000, (0, 0))]);
        }
        let s = n.st().stats();
        assert!(s.segments_created >= 3, "{s:?}");
        if mode == IoMode::Buffered {
            assert_eq!(s.file_syncs, s.fsyncs, "buffered groups all use fdatasync");
        } else {
            assert!(
                s.file_syncs >= s.segments_created,
                "{mode:?}: {} whole-file syncs for {} segments",
                s.file_syncs,
                s.segments_created
            );
            assert!(
                s.file_syncs < s.fsyncs / 4,
                "{mode:?}: {} of {} groups synced the whole file",
                s.file_syncs,
                s.fsyncs
            );
        }
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, end, "{mode:?}");
        let before = n.st().stats().file_syncs;
        let e2 = n.append(log, end, vec![batch(log, end, 1, 10, (0, 0))]);
        assert!(e2 > end);
        assert_eq!(
            n.st().stats().file_syncs,
            before + 1,
            "{mode:?}: the first group after a start-up syncs the whole file"
        );
        n.shutdown();
    }
}

#[test]
fn short_write_is_completed() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("s");
        n.create(log, "s");
        n.st().failpoints().short_write.store(1, Ordering::Release);
        let bs = vec![batch(log, Offset(0), 4, 3000, (0, 0))];
        let bs = {
            let mut v = bs;
            let e = end_of(Offset(0), &v);
            v.push(batch(log, e, 4, 3000, (0, 0)));
            v
        };
        let end = n.append(log, Offset(0), bs.clone());
        assert_eq!(
            n.st().failpoints().short_write.load(Ordering::Acquire),
            0,
            "failpoint fired"
        );
        assert_eq!(
            n.st().stats().writes,
            2,
            "the rest was written by a second write"
        );
        assert_eq!(n.read_all(log, Offset(0), end), bs);
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, end);
        n.shutdown();
    }
}

#[test]
fn logs_are_independent_and_create_is_idempotent() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let names = ["x", "y", "z"];
        let ids: Vec<LogId> = names.iter().map(|s| LogId::from_name(s)).collect();
        for (id, name) in ids.iter().zip(names) {
            n.create(*id, name);
            n.create(*id, name);
        }
        n.st().create_log(ids[0], "other");
        match n.next() {
            DiskEvent::Created { result, .. } => assert_eq!(result, Err(ErrorCode::LogExists)),
            e => panic!("unexpected {e:?}"),
        }
        n.st().create_log(LogId(1), "bad/name");
        match n.next() {
            DiskEvent::Created { result, .. } => assert_eq!(result, Err(ErrorCode::BadRequest)),
            e => panic!("unexpected {e:?}"),
        }
        let mut ends = [Offset(0); 3];
        let mut data: Vec<Vec<Bytes>> = vec![vec![]; 3];
        for round in 0..20u32 {
            for k in 0..3 {
                if (round + k as u32).is_multiple_of(3) {
                    continue;
                }
                let b = batch(ids[k], ends[k], 1 + k as u32, 100 * (k + 1), (0, 0));
                data[k].push(b.clone());
                ends[k] = n.append(ids[k], ends[k], vec![b]);
            }
        }
        for k in 0..3 {
            assert_eq!(n.read_all(ids[k], Offset(0), ends[k]), data[k]);
        }
        assert_eq!(
            n.read(LogId(99), Offset(0), Offset(1), 1),
            Err(ErrorCode::UnknownLog)
        );
        n.shutdown();
        let n = Node::open(&cfg);
        for k in 0..3 {
            let r = n.recovered(ids[k]);
            assert_eq!((r.name.as_str(), r.end), (names[k], ends[k]));
            assert_eq!(n.read_all(ids[k], Offset(0), ends[k]), data[k]);
        }
        n.shutdown();
    }
}

/// Fills a log until it has at least `segs` segments; returns the end.
fn fill_segments(n: &Node, log: LogId, segs: usize) -> Offset {
    let mut end = Offset(0);
    while n
        .st()
        .stats()
        .logs
        .iter()
        .find(|l| l.log == log)
        .unwrap()
        .segments
        < segs
    {
        let b = batch(log, end, 8, 2000, (0, 0));
        end = n.append(log, end, vec![b]);
    }
    end
}

#[test]
fn trim_deletes_whole_segments_only() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("r");
        n.create(log, "r");
        let end = fill_segments(&n, log, 4);
        let files = seg_files(dir.path(), log);
        let bases: Vec<Offset> = files
            .iter()
            .map(|p| format::parse_base(p.file_name().unwrap().to_str().unwrap(), ".seg").unwrap())
            .collect();
        // A successor's trim: segments go below its predecessor's start only (none here),
        // though reads stop below the point.
        n.st()
            .trim(log, Offset(bases[1].0 - 1), Offset(bases[2].0 + 1));
        match n.next() {
            DiskEvent::Trimmed { start, point, .. } => {
                assert_eq!((start, point), (Offset(0), Offset(bases[2].0 + 1)))
            }
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(seg_files(dir.path(), log).len(), files.len());
        // Just below the third segment's base: only the first segment is entirely below.
        n.st()
            .trim(log, Offset(bases[2].0 - 1), Offset(bases[2].0 - 1));
        match n.next() {
            DiskEvent::Trimmed { start, point, .. } => {
                assert_eq!((start, point), (bases[1], Offset(bases[2].0 + 1)))
            }
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(seg_files(dir.path(), log).len(), files.len() - 1);
        assert_eq!(
            n.read(log, Offset(0), end, 100),
            Err(ErrorCode::OffsetTrimmed)
        );
        assert!(!n.read(log, bases[1], end, 100).unwrap().is_empty());
        // Trimming up to the end keeps the active segment.
        n.st().trim(log, end, end);
        match n.next() {
            DiskEvent::Trimmed { start, .. } => assert_eq!(start, *bases.last().unwrap()),
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(seg_files(dir.path(), log).len(), 1);
        n.shutdown();
        let n = Node::open(&cfg);
        let r = n.recovered(log);
        assert_eq!((r.start, r.end), (*bases.last().unwrap(), end));
        // The point asked survives the restart, though its segment is still there.
        assert_eq!(r.trim_point, end);
        assert_eq!(n.st().stats().logs[0].trim_point, end, "status shows it");
        // A lower trim keeps the higher point.
        n.st().trim(log, bases[1], bases[1]);
        match n.next() {
            DiskEvent::Trimmed { point, .. } => assert_eq!(point, end),
            e => panic!("unexpected {e:?}"),
        }
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).trim_point, end);
        n.shutdown();
    }
}

#[test]
fn a_damaged_trim_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), IoMode::Buffered);
    let n = Node::open(&cfg);
    let log = LogId::from_name("t");
    n.create(log, "t");
    let end = n.append(log, Offset(0), vec![batch(log, Offset(0), 5, 10, (0, 0))]);
    n.st().trim(log, Offset(3), Offset(3));
    assert!(matches!(
        n.next(),
        DiskEvent::Trimmed {
            start: Offset(0),
            ..
        }
    ));
    n.shutdown();
    let n = Node::open(&cfg);
    assert_eq!(n.recovered(log).trim_point, Offset(3));
    n.shutdown();
    let path = dir
        .path()
        .join(format::LOGS_DIR)
        .join(format::log_dir_name(log))
        .join(format::TRIM_FILE);
    let mut b = std::fs::read(&path).unwrap();
    b[9] ^= 0x10;
    std::fs::write(&path, &b).unwrap();
    // Served from the oldest segment again (all committed), rather than refusing to start.
    let n = Node::open(&cfg);
    let r = n.recovered(log);
    assert_eq!((r.start, r.end, r.trim_point), (Offset(0), end, Offset(0)));
    n.shutdown();
}

#[test]
fn trim_past_the_end_restarts_the_log_there() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("r");
        n.create(log, "r");
        let end = fill_segments(&n, log, 3);
        // A replica whose predecessor trimmed past all it holds: the trim and the first
        // append at the new start are queued together, in that order.
        let start = end.plus(1000);
        let b = batch(log, start, 3, 100, (0, 0));
        n.st().trim(log, start, start);
        n.st().append(log, start, vec![b.clone()]);
        match n.next() {
            DiskEvent::Trimmed { start: s, .. } => assert_eq!(s, start),
            e => panic!("unexpected {e:?}"),
        }
        let new_end = start.plus(3);
        match n.next() {
            DiskEvent::Durable { end: e, .. } => assert_eq!(e, new_end),
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(seg_files(dir.path(), log).len(), 1);
        assert_eq!(
            n.read(log, Offset(0), end, 100),
            Err(ErrorCode::OffsetTrimmed)
        );
        assert_eq!(n.read_all(log, start, new_end), vec![b.clone()]);
        n.shutdown();
        let n = Node::open(&cfg);
        let r = n.recovered(log);
        assert_eq!((r.start, r.end), (start, new_end));
        assert_eq!(n.read_all(log, start, new_end), vec![b]);
        n.shutdown();
    }
}

#[test]
fn a_crash_while_restarting_the_log_keeps_the_old_log() {
    // The restart names its new segment durably before it deletes an old one; a crash in
    // between leaves a segment that does not continue the log, which recovery drops.
    let mode = IoMode::Buffered;
    if modes().is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), mode);
    let n = Node::open(&cfg);
    let log = LogId::from_name("r");
    n.create(log, "r");
    let end = fill_segments(&n, log, 2);
    let before = seg_files(dir.path(), log);
    n.shutdown();
    let start = end.plus(1000);
    let path = dir
        .path()
        .join(format::LOGS_DIR)
        .join(format::log_dir_name(log))
        .join(format::segment_name(start));
    std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
    let h = format::SegmentHeader {
        base: start,
        log,
        align: 1,
    };
    recovery::write_segment_header(&path, &h, true).unwrap();
    let n = Node::open(&cfg);
    let r = n.recovered(log);
    assert_eq!((r.start, r.end), (Offset(0), end), "the old log, whole");
    assert_eq!(seg_files(dir.path(), log), before);
    n.shutdown();
}

#[test]
fn retention_by_size_and_age_deletes_oldest_segments() {
    let mode = IoMode::Buffered;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path(), mode);
    cfg.retention_bytes = Some(2 << 20);
    let n = Node::open(&cfg);
    let log = LogId::from_name("ret");
    n.create(log, "ret");
    let (end, trimmed) = append_with_retention(&n, log, Offset(0), 400);
    let start = trimmed.expect("size retention trimmed");
    let s = n.st().stats();
    let l = &s.logs[0];
    assert_eq!(l.start, start);
    // At most the limit in sealed segments plus the active one.
    assert!(l.segments <= 4, "{} segments", l.segments);
    let files = seg_files(dir.path(), log);
    assert_eq!(files.len(), l.segments);
    n.shutdown();

    // Age: everything but the active segment goes once older than the limit.
    let mut cfg = small_cfg(dir.path(), mode);
    cfg.retention_ms = Some(200);
    let n = Node::open(&cfg);
    std::thread::sleep(Duration::from_millis(300));
    let b = batch(log, end, 1, 10, (0, 0));
    n.st().append(log, end, vec![b]);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "age retention never ran"
        );
        match n.rx.recv_timeout(WAIT) {
            Ok(DiskEvent::Trimmed { .. }) if n.st().stats().logs[0].segments == 1 => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(seg_files(dir.path(), log).len(), 1);
    n.shutdown();
}

/// A segment retention cannot delete (its file can be neither recycled nor removed) stays
/// part of the log, and the next pass deletes it. Dropped from the log while its file stayed,
/// it left a gap on disk once a newer segment went, and recovery kept the stale file as the
/// log and dropped every newer segment: the log came back as old data.
#[test]
fn a_segment_that_cannot_be_deleted_stays_in_the_log() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = small_cfg(dir.path(), mode);
        cfg.retention_bytes = Some(2 << 20);
        let n = Node::open(&cfg);
        let log = LogId::from_name("keep");
        n.create(log, "keep");
        n.st().failpoints().delete_fail.store(1, Ordering::Release);
        let (end, trimmed) = append_with_retention(&n, log, Offset(0), 400);
        assert!(trimmed.is_some(), "{mode:?}: retention never ran");
        assert_eq!(
            n.st().failpoints().delete_fail.load(Ordering::Acquire),
            0,
            "{mode:?}: no deletion was attempted"
        );
        let s = n.st().stats();
        assert!(s.segments_deleted >= 2, "{mode:?}: {s:?}");
        let start = s.logs[0].start;
        assert_eq!(
            seg_files(dir.path(), log).len(),
            s.logs[0].segments,
            "{mode:?}"
        );
        n.shutdown();
        let n = Node::open(&cfg);
        let r = n.recovered(log);
        assert_eq!((r.start, r.end), (start, end), "{mode:?}");
        assert!(!n.read_all(log, start, end).is_empty(), "{mode:?}");
        n.shutdown();
    }
}

/// Appends `count` 16 KiB batches, each waited for, collecting `Trimmed` starts; returns the
/// end and the latest start reported (None if nothing was trimmed).
fn append_with_retention(
    n: &Node,
    log: LogId,
    from: Offset,
    count: usize,
) -> (Offset, Option<Offset>) {
    let mut end = from;
    let mut start = None;
    for _ in 0..count {
        let base = end;
        let b = batch(log, base, 8, 2000, (0, 0));
        end = end_of(base, std::slice::from_ref(&b));
        n.st().append(log, base, vec![b]);
        loop {
            match n.next() {
                DiskEvent::Durable { end: e, .. } if e == end => break,
                DiskEvent::Durable { .. } => {}
                DiskEvent::Trimmed { start: s, .. } => start = start.max(Some(s)),
                e => panic!("unexpected {e:?}"),
            }
        }
    }
    (end, start)
}

/// Every batch of `[from, end)` reads back with exactly the bytes that were appended.
fn assert_reads_back(n: &Node, log: LogId, from: Offset, end: Offset) {
    let got = n.read_all(log, from, end);
    assert!(!got.is_empty());
    for b in got {
        let h = BatchHeader::decode(&b).unwrap();
        assert_eq!(
            b,
            batch(log, h.base_offset, 8, 2000, (0, 0)),
            "at {}",
            h.base_offset
        );
    }
}

#[test]
fn retention_recycles_deleted_segments_instead_of_zeroing_new_ones() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = small_cfg(dir.path(), mode);
        cfg.retention_bytes = Some(2 << 20);
        let n = Node::open(&cfg);
        let log = LogId::from_name("rc");
        n.create(log, "rc");
        // About 19 segments of 1 MiB, all but the last 2-3 deleted by retention.
        let (end, trimmed) = append_with_retention(&n, log, Offset(0), 1200);
        let s = n.st().stats();
        assert!(s.segments_created >= 15, "{s:?}");
        assert!(s.segments_recycled >= 10, "{mode:?}: {s:?}");
        // Only the rolls before retention first deleted a segment needed fresh zeros.
        assert!(s.spares_zeroed <= 6, "{mode:?}: {s:?}");
        let start = s.logs[0].start;
        assert!(
            start > Offset(0) && Some(start) == trimmed,
            "{start} vs {trimmed:?}"
        );
        // Recycled segments still hold older batches after the end: reads and recovery
        // must see only the log.
        assert_reads_back(&n, log, start, end);
        n.shutdown();
        let n = Node::open(&cfg);
        let r = n.recovered(log);
        assert_eq!((r.start, r.end), (start, end), "{mode:?}");
        assert_reads_back(&n, log, start, end);
        let (end2, _) = append_with_retention(&n, log, end, 100);
        assert_reads_back(&n, log, end, end2);
        n.shutdown();
    }
}

#[test]
fn recovery_ignores_another_logs_batches_after_the_end() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let (a, b) = (LogId::from_name("a"), LogId::from_name("b"));
        let n = Node::open(&cfg);
        n.create(a, "a");
        n.create(b, "b");
        let mut end = Offset(0);
        for _ in 0..3 {
            end = n.append(b, end, vec![batch(b, end, 2, 100, (0, 0))]);
        }
        n.shutdown();
        // What a segment recycled from log `a` can leave after `b`'s end: `a`'s batches at
        // exactly the offsets `b` expects next (both logs started at 0).
        let align = if mode == IoMode::Direct { 4096 } else { 1 };
        let seg = seg_files(dir.path(), b).pop().unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        let mut pos = SEGMENT_HEADER_BYTES as usize;
        while let Ok(h) = BatchHeader::decode(&data[pos..]) {
            pos += format::stride(h.batch_len(), align) as usize;
        }
        let mut o = end;
        for _ in 0..3 {
            let x = batch(a, o, 2, 100, (0, 0));
            data[pos..pos + x.len()].copy_from_slice(&x);
            pos += format::stride(x.len(), align) as usize;
            o = end_of(o, std::slice::from_ref(&x));
        }
        std::fs::write(&seg, &data).unwrap();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(b).end, end, "{mode:?}: a's batches are not b's");
        n.shutdown();
        let data = std::fs::read(&seg).unwrap();
        assert!(
            data[pos - 1..].iter().all(|&x| x == 0),
            "the stale batches were zeroed"
        );
    }
}

#[test]
fn a_newest_segment_with_the_header_of_its_previous_use_is_used_empty() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let log = LogId::from_name("h");
        let n = Node::open(&cfg);
        n.create(log, "h");
        let end = fill_segments(&n, log, 2);
        n.shutdown();
        // A roll into a recycled file that crashed before its new header was durable: the
        // newest segment is named for the end but still carries segment 0's header and data.
        let segs = seg_files(dir.path(), log);
        let next = log_dir(&cfg, log).join(format::segment_name(end));
        assert!(!next.exists());
        std::fs::copy(&segs[0], &next).unwrap();
        let n = Node::open(&cfg);
        let r = n.recovered(log);
        assert_eq!((r.start, r.end), (Offset(0), end), "{mode:?}");
        assert!(next.exists(), "used, not dropped");
        let e2 = n.append(log, end, vec![batch(log, end, 8, 2000, (0, 0))]);
        assert_reads_back(&n, log, Offset(0), e2);
        n.shutdown();
    }
}

#[test]
fn truncate_discards_suffix_durably() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("tr");
        n.create(log, "tr");
        let end = fill_segments(&n, log, 3);
        let all = n.read_all(log, Offset(0), end);
        // Cut in the middle of the first segment: later segments go too.
        let keep = &all[..5];
        let cut = end_of(Offset(0), keep);
        n.st().truncate(log, cut);
        match n.next() {
            DiskEvent::Truncated { end: e, .. } => assert_eq!(e, cut),
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(seg_files(dir.path(), log).len(), 1);
        assert_eq!(n.read_all(log, Offset(0), cut), keep.to_vec());
        assert!(n.read(log, cut, end, 1 << 20).unwrap().is_empty());
        let b = batch(log, cut, 2, 5, (0, 0));
        let e2 = n.append(log, cut, vec![b.clone()]);
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, e2, "{mode:?}");
        let mut want = keep.to_vec();
        want.push(b);
        assert_eq!(n.read_all(log, Offset(0), e2), want);
        n.shutdown();
    }
}

#[test]
fn producer_table_rebuilt_across_segments() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("p");
        n.create(log, "p");
        let mut end = Offset(0);
        let mut expect: Vec<ProducerBatch> = Vec::new();
        let mut seqs = [0u64; 3];
        for i in 0..200u32 {
            let pid = u64::from(i % 3); // 0 = not idempotent
            let recs = 1 + i % 4;
            let b = batch(log, end, recs, 3000, (pid, seqs[pid as usize]));
            if pid != 0 {
                expect.push(ProducerBatch {
                    producer: ProducerId(pid),
                    seq: seqs[pid as usize],
                    record_count: recs,
                    base_offset: end,
                });
            }
            seqs[pid as usize] += u64::from(recs);
            end = n.append(log, end, vec![b]);
        }
        assert!(n.st().stats().logs[0].segments >= 2);
        n.shutdown();
        let n = Node::open(&cfg);
        let got = &n.recovered(log).producers;
        let mut want: Vec<ProducerBatch> = Vec::new();
        for pid in [1u64, 2] {
            let v: Vec<_> = expect
                .iter()
                .filter(|b| b.producer.0 == pid)
                .cloned()
                .collect();
            want.extend(
                v[v.len() - chainlog_core::effects::PRODUCER_BATCHES_KEPT..]
                    .iter()
                    .cloned(),
            );
        }
        want.sort_by_key(|b| b.base_offset);
        assert_eq!(got, &want, "{mode:?}");
        n.shutdown();
    }
}

#[test]
fn committed_hint_persists() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), IoMode::Buffered);
    let n = Node::open(&cfg);
    let log = LogId::from_name("h");
    n.create(log, "h");
    let end = n.append(log, Offset(0), vec![batch(log, Offset(0), 5, 10, (0, 0))]);
    n.st().save_committed(log, Offset(3));
    n.st().save_committed(log, Offset(2)); // lower: ignored
    n.shutdown();
    let n = Node::open(&cfg);
    assert_eq!(n.recovered(log).committed_hint, Offset(3));
    n.st().save_committed(log, end);
    n.append(log, end, vec![batch(log, end, 1, 10, (0, 0))]);
    n.shutdown();
    let n = Node::open(&cfg);
    assert_eq!(n.recovered(log).committed_hint, end);
    n.shutdown();
}

#[test]
fn corrupt_batch_in_sealed_segment_ends_the_log_there() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), IoMode::Buffered);
    let n = Node::open(&cfg);
    let log = LogId::from_name("c");
    n.create(log, "c");
    let end = fill_segments(&n, log, 3);
    let all = n.read_all(log, Offset(0), end);
    n.shutdown();
    let files = seg_files(dir.path(), log);
    // Damage the 4th batch of the first (sealed) segment and lose its index.
    let pos: u64 = SEGMENT_HEADER_BYTES + all[..3].iter().map(|b| b.len() as u64).sum::<u64>();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    f.write_all_at(&[0xFF], pos + 100).unwrap();
    let _ = std::fs::remove_file(files[0].with_extension("idx"));
    let n = Node::open(&cfg);
    assert_eq!(n.recovered(log).end, end_of(Offset(0), &all[..3]));
    assert_eq!(
        seg_files(dir.path(), log).len(),
        1,
        "later segments dropped"
    );
    assert_eq!(
        n.read_all(log, Offset(0), n.recovered(log).end),
        all[..3].to_vec()
    );
    n.shutdown();
}

/// An event-loop-driven writer learns of its completions from the ring's eventfd alone: each
/// `drive` below is triggered only by the signal (a broken signal would time out here, while
/// the server's 1 ms tick would hide it).
#[test]
fn driven_storage_is_woken_by_its_completion_signal() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, rx) = crossbeam_channel::unbounded();
            let (st, _, efd) = Storage::open_driven(
                cfg.clone(),
                Box::new(move |e| {
                    let _ = tx.send(e);
                }),
            )
            .unwrap();
            let signal = chainlog_hw::uring::CompletionSignal::new(efd).unwrap();
            let log = LogId::from_name("d");
            st.create_log(log, "d");
            st.drive();
            assert!(matches!(
                rx.try_recv(),
                Ok(DiskEvent::Created { result: Ok(()), .. })
            ));
            let mut end = Offset(0);
            let mut want = Vec::new();
            for _ in 0..20 {
                let b = batch(log, end, 3, 500, (0, 0));
                let e = end_of(end, std::slice::from_ref(&b));
                st.append(log, end, vec![b.clone()]);
                want.push(b);
                end = e;
                st.drive();
                let mut durable = Offset(0);
                while durable < end {
                    tokio::time::timeout(WAIT, signal.wait())
                        .await
                        .expect("a completion signals the eventfd")
                        .unwrap();
                    st.drive();
                    while let Ok(ev) = rx.try_recv() {
                        match ev {
                            DiskEvent::Durable { end: d, .. } => durable = d,
                            e => panic!("unexpected {e:?}"),
                        }
                    }
                }
            }
            st.shutdown();
        });
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(LogId::from_name("d")).end.0, 60, "{mode:?}");
        n.shutdown();
    }
}

#[test]
fn direct_mode_writes_aligned_pool_buffers_without_copy() {
    if !modes().contains(&IoMode::Direct) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), IoMode::Direct);
    let n = Node::open(&cfg);
    assert!(n.st().is_direct());
    let log = LogId::from_name("d");
    n.create(log, "d");
    let pool = chainlog_hw::BufPool::default();
    let mut end = Offset(0);
    let mut written = Vec::new();
    for i in 0..20u32 {
        let b = batch(log, end, 1 + i % 5, 700, (0, 0));
        // What the runtime does: the frame body is read from the socket into a pool buffer.
        let mut ab = pool.get(b.len()).unwrap();
        ab.extend_from_slice(&b);
        let padded = ab.into_padded_bytes();
        written.push(b);
        end = n.append(log, end, vec![padded]);
    }
    let s = n.st().stats();
    assert_eq!(
        s.copy_bytes, 0,
        "aligned, padded batches are written as they are"
    );
    assert!(s.padding_bytes > 0);
    assert_eq!(n.read_all(log, Offset(0), end), written);
    // An unaligned batch is copied, and the copy is counted.
    let b = batch(log, end, 1, 700, (0, 0));
    let e = n.append(log, end, vec![b.clone()]);
    assert_eq!(n.st().stats().copy_bytes, b.len() as u64);
    assert_eq!(n.read(log, end, e, 1 << 20).unwrap(), vec![b]);
    n.shutdown();
}

#[test]
fn buffered_mode_never_copies() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(&small_cfg(dir.path(), IoMode::Buffered));
    let log = LogId::from_name("b");
    n.create(log, "b");
    let mut end = Offset(0);
    for i in 0..50u32 {
        end = n.append(log, end, vec![batch(log, end, 1 + i % 3, 500, (0, 0))]);
    }
    let s = n.st().stats();
    assert_eq!(s.io_mode, "buffered");
    assert_eq!(s.copy_bytes, 0);
    assert_eq!(s.padding_bytes, 0);
    n.shutdown();
}

#[test]
fn config_validation() {
    let mut c = StorageConfig::default();
    assert!(c.validate().is_ok());
    c.segment_bytes = 1000;
    assert!(c.validate().is_err());
    let c: StorageConfig =
        serde_json::from_str(r#"{"io_mode":"direct","segment_bytes":2097152}"#).unwrap();
    assert_eq!(c.io_mode, IoMode::Direct);
    assert_eq!(c.index_interval_bytes, 4096);
}

#[test]
fn storage_is_send_sync_and_dir_is_locked() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Storage>();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), IoMode::Buffered);
    let n = Node::open(&cfg);
    let second = Storage::open(cfg.clone(), Box::new(|_| {}));
    assert!(matches!(second, Err(StorageError::Unsupported(_))));
    n.shutdown();
    // Released on shutdown.
    Node::open(&cfg).shutdown();
}

#[test]
fn read_respects_max_bytes_but_returns_at_least_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(&small_cfg(dir.path(), IoMode::Buffered));
    let log = LogId::from_name("m");
    n.create(log, "m");
    let mut bs = Vec::new();
    let mut e = Offset(0);
    for _ in 0..10 {
        let b = batch(log, e, 2, 400, (0, 0));
        e = end_of(e, std::slice::from_ref(&b));
        bs.push(b);
    }
    let end = n.append(log, Offset(0), bs.clone());
    let one = bs[0].len();
    assert_eq!(n.read(log, Offset(0), end, 0).unwrap(), bs[..1].to_vec());
    assert_eq!(
        n.read(log, Offset(0), end, 3 * one).unwrap(),
        bs[..3].to_vec()
    );
    assert_eq!(
        n.read(log, Offset(0), end, 3 * one - 1).unwrap(),
        bs[..2].to_vec()
    );
    assert_eq!(
        n.read(log, Offset(3), end, usize::MAX).unwrap(),
        bs[1..].to_vec()
    );
    // `end` inside a batch: that batch is not returned.
    assert_eq!(
        n.read(log, Offset(0), Offset(5), usize::MAX).unwrap(),
        bs[..2].to_vec()
    );
    n.shutdown();
}

#[test]
fn batch_larger_than_a_segment_gets_its_own() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path(), mode);
        let n = Node::open(&cfg);
        let log = LogId::from_name("big");
        n.create(log, "big");
        let small = batch(log, Offset(0), 1, 10, (0, 0));
        let e1 = n.append(log, Offset(0), vec![small.clone()]);
        // Two records of 700 KiB: 1.4 MiB, more than a 1 MiB segment holds.
        let big = batch(log, e1, 2, 700 << 10, (0, 0));
        let e2 = n.append(log, e1, vec![big.clone()]);
        let after = batch(log, e2, 1, 10, (0, 0));
        let e3 = n.append(log, e2, vec![after.clone()]);
        let want = vec![small, big, after];
        assert_eq!(n.read_all(log, Offset(0), e3), want, "{mode:?}");
        n.shutdown();
        let n = Node::open(&cfg);
        assert_eq!(n.recovered(log).end, e3);
        assert_eq!(
            n.read_all(log, Offset(0), e3),
            want,
            "{mode:?} after reopen"
        );
        n.shutdown();
    }
}

#[test]
fn unusable_first_segment_header_keeps_the_log_position() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path(), IoMode::Buffered);
    let n = Node::open(&cfg);
    let log = LogId::from_name("h0");
    n.create(log, "h0");
    let end = fill_segments(&n, log, 3);
    n.st().trim(log, end, end);
    let start = match n.next() {
        DiskEvent::Trimmed { start, .. } => start,
        e => panic!("unexpected {e:?}"),
    };
    assert!(start > Offset(0));
    n.shutdown();
    let files = seg_files(dir.path(), log);
    assert_eq!(files.len(), 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    f.write_all_at(&[0xAB; 16], 0).unwrap();
    let n = Node::open(&cfg);
    let r = n.recovered(log);
    // The data is gone (the replica repairs it from peers) but offsets do not restart at 0.
    assert_eq!((r.start, r.end), (start, start));
    let e = n.append(log, start, vec![batch(log, start, 1, 10, (0, 0))]);
    assert_eq!(e, start.plus(1));
    n.shutdown();
}
