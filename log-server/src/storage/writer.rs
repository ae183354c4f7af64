//! The writer: owns the io_uring ring and every log's write state, on a thread of its own or
//! driven by the node's event loop (`step`). Appends queue per log; while
//! `groups_in_flight_max` of a log's write + fdatasync groups are in flight its new batches wait
//! and then go out together in the next one (group commit). Groups complete in order. Truncate,
//! trim, create and segment rolls are rare and run synchronously (a roll's directory fsync
//! through the ring) when the log has nothing in flight.

use super::format::{self, SegmentHeader, SEGMENT_HEADER_BYTES};
use super::producers::ProducerTable;
use super::recovery::{self, Recovered, SegState};
use super::{
    emit, Cmd, Counters, Events, Failpoints, LogView, SegView, Shared, StorageConfig, StorageError,
    Views,
};
use bytes::Bytes;
use chainlog_core::effects::{DiskEvent, ProducerBatch, RecoveredLog};
use chainlog_core::error::ErrorCode;
use chainlog_core::limits::LOGS_MAX;
use chainlog_core::record::{self, BatchHeader, HEADER_LEN};
use chainlog_core::types::log_name_valid;
use chainlog_core::{LogId, Offset};
use chainlog_hw::buf::{round_up_page, BufPool, PoolConfig, CLASS_BYTES, PAGE_BYTES};
use chainlog_hw::disk::{self, SpareFiles};
use chainlog_hw::uring::{Completion, Op, Ring, RingWaker, IOV_MAX};
use chainlog_hw::HwError;
use crossbeam_channel::Receiver;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often the writer wakes when idle: age retention and committed-hint syncs run then.
const TICK: Duration = Duration::from_secs(1);
/// Short writes are continued this many times before the group is reported failed.
const SHORT_WRITE_RETRIES_MAX: u32 = 8;
/// A log that failed full is reopened once this many segment sizes are free: the next roll
/// needs one for its segment (made inline when no spare is ready) and the spare preparer
/// another right after; with less, the reopened log would likely fail again at once.
const REOPEN_FREE_SEGMENTS: u64 = 2;

enum Item {
    Batch(Bytes, BatchHeader),
    Truncate(Offset),
    Trim { before: Offset, point: Offset },
}

#[derive(Clone, Copy, Debug)]
enum OpKind {
    GroupWrite,
    GroupSync,
    HintSync,
    /// The log directory's fsync after a segment roll.
    DirSync,
}

struct Group {
    /// Tags of this group's operations carry it, so a completion finds its group.
    seq: u64,
    start_pos: u64,
    end_pos: u64,
    end_off: Offset,
    /// (base offset, position, header) of each batch, for the index and producer table.
    batches: Vec<(u64, BatchHeader)>,
    /// Bytes of the write in flight, and where it starts.
    write_pos: u64,
    write_len: u64,
    ops_pending: usize,
    write_result: Option<io::Result<usize>>,
    sync_result: Option<io::Result<usize>>,
    bufs_back: Vec<Bytes>,
    retries: u32,
    /// Made durable by a whole-file fdatasync after the write, not by the write's own
    /// `RWF_DSYNC` (which syncs only the bytes it wrote): see `LogW::header_unsynced`.
    full_sync: bool,
    /// Written in full and synced: waits only for older groups to finish.
    synced: bool,
}

struct LogW {
    id: LogId,
    name: String,
    dir: PathBuf,
    segs: Vec<SegState>,
    /// Writer's descriptor of the last segment (O_DIRECT in direct mode).
    active_file: Option<Arc<File>>,
    durable_end: Offset,
    /// End after every accepted append (queued or in flight): the next append's base.
    accepted_end: Offset,
    queue: VecDeque<Item>,
    /// Groups in flight, oldest first (positions contiguous).
    inflight: VecDeque<Group>,
    /// A group failed while others may still be in flight. The failure is handled once every
    /// in-flight operation of the log has come back, so no stale write can land after the
    /// failed range is zeroed.
    failing: Option<ErrorCode>,
    /// A rolled segment's directory entry is not yet durable: groups in it may complete but
    /// are not reported durable until it is.
    dir_sync_pending: bool,
    /// After a failed write: appends that do not start at `accepted_end` were sent before the
    /// caller saw the failure and are dropped.
    failed: bool,
    /// A failure we could not clean up after (zeroing the failed range failed, or a rolled
    /// segment's directory fsync): refuse writes and report nothing more durable.
    broken: bool,
    /// Failed with `StorageFull`: the tick reopens it (`DiskEvent::Reopened`) once space is
    /// free. Other failures stay until a restart (the device is suspect).
    full: bool,
    must_roll: bool,
    /// The active segment's header was written through the page cache by a roll and is not
    /// durable yet. An `RWF_DSYNC` group write syncs only its own range, so until a whole-file
    /// fdatasync has succeeded, groups use one: else a crash could leave acknowledged batches
    /// behind a blank header, which recovery takes for an unused segment.
    header_unsynced: bool,
    /// Segments retention took off the log while the roll's directory fsync was in flight:
    /// their files (renamed into the spare directory) join the spare pool, and `Trimmed` is
    /// reported, once that fsync has made the renames durable. A file is written again only
    /// after the rename that took it out of the log is durable, so a crash can never bring
    /// back an old segment name holding a new header.
    trim_unsynced: bool,
    recycled_unsynced: Vec<PathBuf>,
    producers: ProducerTable,
    hint: Offset,
    hint_saved: Offset,
    hint_seq: u64,
    hint_unsynced: bool,
    /// The trim point in the log's trim file (durable).
    trim_point: Offset,
    view: Arc<RwLock<LogView>>,
}

impl LogW {
    fn start(&self) -> Offset {
        self.segs.first().map_or(self.durable_end, |s| s.base)
    }

    /// The report of a trim (or retention) once its deletions and point are durable.
    fn trimmed(&self) -> DiskEvent {
        DiskEvent::Trimmed {
            log: self.id,
            start: self.start(),
            point: self.trim_point,
        }
    }
}

pub(crate) struct Writer {
    cfg: StorageConfig,
    direct: bool,
    align: u32,
    ring: Ring,
    waker: RingWaker,
    cmd_rx: Receiver<Cmd>,
    sleeping: Arc<AtomicBool>,
    events: Events,
    counters: Arc<Counters>,
    views: Views,
    failpoints: Arc<Failpoints>,
    logs: BTreeMap<LogId, LogW>,
    /// Logs with queued items and nothing in flight blocking them.
    pending: BTreeSet<LogId>,
    spares: SpareFiles,
    pool: BufPool,
    logs_dir: PathBuf,
    spare_dir: PathBuf,
    /// Operation tag -> (log, kind, group seq; 0 for hint syncs).
    tags: HashMap<u64, (LogId, OpKind, u64)>,
    next_group: u64,
    next_tag: u64,
    shutting_down: bool,
    last_tick: Instant,
    /// Reused for reaped completions.
    done: Vec<Completion>,
}

/// ENOSPC and EDQUOT are "full"; everything else is a storage error.
fn code_of(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorCode::StorageFull,
        _ => ErrorCode::StorageError,
    }
}

fn code_of_storage(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::Hw(HwError::Io { source, .. }) | StorageError::Io { source, .. } => {
            code_of(source)
        }
        _ => ErrorCode::StorageError,
    }
}

fn view_of(rec: &Recovered) -> LogView {
    LogView {
        name: rec.name.clone(),
        start: rec.start(),
        trim_point: rec.trim_point,
        durable_end: rec.end,
        segs: rec.segs.iter().map(seg_view).collect(),
    }
}

fn seg_view(s: &SegState) -> SegView {
    SegView {
        base: s.base,
        file: s.read_file.clone(),
        align: s.align,
        index: s.index.clone(),
        durable_end: s.end,
        durable_pos: s.end_pos,
    }
}

impl Writer {
    pub(crate) fn open(
        cfg: StorageConfig,
        direct: bool,
        cmd_rx: Receiver<Cmd>,
        shared: Shared,
    ) -> Result<(Writer, Vec<RecoveredLog>), StorageError> {
        let Shared {
            events,
            counters,
            views,
            failpoints,
            sleeping,
        } = shared;
        let align = if direct { PAGE_BYTES as u32 } else { 1 };
        let logs_dir = cfg.dir.join(format::LOGS_DIR);
        let spare_dir = cfg.dir.join(format::SPARE_DIR);
        disk::create_dir_synced(&logs_dir)?;
        let mut ring = Ring::new(cfg.queue_depth)?;
        let waker = ring.waker()?;
        let spares = SpareFiles::start(
            spare_dir.clone(),
            cfg.segment_bytes,
            direct,
            1,
            counters.spares_zeroed.clone(),
            counters.spares_pending.clone(),
        )?;
        let pool = BufPool::new(PoolConfig {
            free_max: [64, 64, 8, 2],
            // Copies for O_DIRECT: the groups in flight and one being built per busy log are
            // bounded by the group size; beyond this the writer allocates outside the pool.
            outstanding_bytes_max: (cfg.groups_in_flight_max + 1)
                * cfg.group_commit_bytes_max.max(CLASS_BYTES[3]),
        });
        let mut w = Writer {
            cfg,
            direct,
            align,
            ring,
            waker,
            cmd_rx,
            sleeping,
            events,
            counters,
            views,
            failpoints,
            logs: BTreeMap::new(),
            pending: BTreeSet::new(),
            spares,
            pool,
            logs_dir: logs_dir.clone(),
            spare_dir,
            tags: HashMap::new(),
            next_group: 1,
            next_tag: 1,
            shutting_down: false,
            last_tick: Instant::now(),
            done: Vec::new(),
        };
        let mut recovered = Vec::new();
        let listing = std::fs::read_dir(&logs_dir)
            .map_err(|e| StorageError::io("list logs dir", &logs_dir, e))?;
        let mut dirs = Vec::new();
        for e in listing {
            let e = e.map_err(|e| StorageError::io("list logs dir", &logs_dir, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(format::TMP_PREFIX) {
                // A create that crashed before its rename: never reported, remove it.
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            dirs.push(e.path());
        }
        dirs.sort();
        for d in dirs {
            let rec = recovery::recover_log(&d, align, w.cfg.index_interval_bytes)?;
            recovered.push(RecoveredLog {
                log: rec.log,
                name: rec.name.clone(),
                start: rec.start(),
                end: rec.end,
                producers: rec.producers.to_vec(),
                committed_hint: rec.committed_hint,
                trim_point: rec.trim_point,
            });
            tracing::info!(log = %rec.log, name = %rec.name, start = %rec.start(), end = %rec.end, segments = rec.segs.len(), "recovered log");
            w.install(rec, VecDeque::new())?;
        }
        Ok((w, recovered))
    }

    pub(crate) fn waker(&self) -> RingWaker {
        self.waker.clone()
    }

    /// Takes over a recovered log (at open, or after a truncate re-read it).
    fn install(&mut self, rec: Recovered, queue: VecDeque<Item>) -> Result<(), StorageError> {
        let view = match self.logs.get(&rec.log) {
            Some(old) => {
                let mut v = view_of(&rec);
                // A truncate re-read the log: the point saved meanwhile still holds.
                v.trim_point = v.trim_point.max(old.trim_point);
                *old.view.write().unwrap_or_else(|e| e.into_inner()) = v;
                old.view.clone()
            }
            None => Arc::new(RwLock::new(view_of(&rec))),
        };
        let (old_hint, old_seq, old_trim) = self
            .logs
            .get(&rec.log)
            .map_or((Offset::ZERO, 0, Offset::ZERO), |l| {
                (l.hint, l.hint_seq, l.trim_point)
            });
        let active_file = match rec.segs.last() {
            Some(s) if s.align == self.align => {
                Some(Arc::new(disk::open_rw(&s.path, self.direct)?))
            }
            _ => None,
        };
        let must_roll = active_file.is_none();
        let hint = rec.committed_hint.max(old_hint);
        let l = LogW {
            id: rec.log,
            name: rec.name,
            dir: rec.dir,
            segs: rec.segs,
            active_file,
            durable_end: rec.end,
            accepted_end: rec.end,
            queue,
            inflight: VecDeque::new(),
            failing: None,
            dir_sync_pending: false,
            failed: false,
            broken: false,
            full: false,
            must_roll,
            // Recovery may have read the header from the page cache (a crash without power
            // loss): the first group after start-up syncs the whole file.
            header_unsynced: true,
            // A log is (re)installed only with no directory fsync in flight, so nothing waits.
            trim_unsynced: false,
            recycled_unsynced: Vec::new(),
            producers: rec.producers,
            hint,
            hint_saved: rec.committed_hint,
            hint_seq: rec.hint_seq.max(old_seq),
            hint_unsynced: false,
            trim_point: rec.trim_point.max(old_trim),
            view: view.clone(),
        };
        if !l.queue.is_empty() {
            self.pending.insert(l.id);
        }
        self.views
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(l.id, view);
        self.logs.insert(l.id, l);
        Ok(())
    }

    /// One turn without blocking: reaps completions, takes queued commands, starts what the
    /// logs' queues allow, runs the once-a-second tick. Returns true once a shutdown has
    /// drained everything. The threaded writer calls it between sleeps in the ring; an event
    /// loop that owns the writer calls it whenever the ring's completion eventfd fires or it
    /// has queued commands.
    pub(crate) fn step(&mut self) -> bool {
        let mut done = std::mem::take(&mut self.done);
        if let Err(e) = self.ring.complete(&mut done) {
            tracing::error!("io_uring completion handling failed: {e}");
        }
        for c in done.drain(..) {
            self.on_completion(c);
        }
        self.done = done;
        while let Ok(c) = self.cmd_rx.try_recv() {
            self.on_cmd(c);
        }
        let ids: Vec<LogId> = self.pending.iter().copied().collect();
        for id in ids {
            self.pump(id);
        }
        if self.last_tick.elapsed() >= TICK {
            self.last_tick = Instant::now();
            self.tick();
        }
        self.shutting_down
            && self.pending.is_empty()
            && self.ring.in_flight() == 0
            && self.logs.values().all(|l| l.queue.is_empty())
    }

    /// The ring's completion eventfd, for an event loop that drives [`Writer::step`] itself.
    pub(crate) fn completion_eventfd(&mut self) -> Result<File, StorageError> {
        Ok(self.ring.completion_eventfd()?)
    }

    /// Runs the writer on the calling thread until a shutdown has drained everything: the
    /// writer thread's body, and the last act of an event-loop-driven writer.
    pub(crate) fn run(mut self) {
        while !self.step() {
            self.sleeping.store(true, Ordering::SeqCst);
            if self.cmd_rx.is_empty() {
                if let Err(e) = self.ring.wait(Some(TICK)) {
                    tracing::error!("io_uring wait failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
        }
        let ids: Vec<LogId> = self.logs.keys().copied().collect();
        for id in ids {
            self.save_hint(id, true);
        }
        tracing::info!("storage writer stopped");
    }

    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Append { log, base, batches } => self.on_append(log, base, batches),
            Cmd::Truncate { log, end } => {
                let Some(l) = self.logs.get_mut(&log) else {
                    emit(
                        &self.events,
                        DiskEvent::WriteFailed {
                            log,
                            at: end,
                            code: ErrorCode::UnknownLog,
                        },
                    );
                    return;
                };
                l.accepted_end = l.accepted_end.min(end);
                l.queue.push_back(Item::Truncate(end));
                self.pending.insert(log);
            }
            Cmd::Trim { log, before, point } => {
                let Some(l) = self.logs.get_mut(&log) else {
                    tracing::warn!(%log, "trim of an unknown log ignored");
                    return;
                };
                // Past the end, the log restarts empty at `before`: appends queued behind the
                // trim continue from there.
                l.accepted_end = l.accepted_end.max(before);
                l.queue.push_back(Item::Trim { before, point });
                self.pending.insert(log);
            }
            Cmd::SaveCommitted { log, end } => {
                if let Some(l) = self.logs.get_mut(&log) {
                    l.hint = l.hint.max(end);
                }
            }
            Cmd::Create { log, name } => {
                let result = self.create_log(log, &name);
                emit(&self.events, DiskEvent::Created { log, result });
            }
            Cmd::Shutdown => self.shutting_down = true,
        }
    }

    fn on_append(&mut self, log: LogId, base: Offset, batches: Vec<Bytes>) {
        let Some(l) = self.logs.get_mut(&log) else {
            emit(
                &self.events,
                DiskEvent::WriteFailed {
                    log,
                    at: base,
                    code: ErrorCode::UnknownLog,
                },
            );
            return;
        };
        if l.broken {
            emit(
                &self.events,
                DiskEvent::WriteFailed {
                    log,
                    at: l.durable_end,
                    code: ErrorCode::StorageError,
                },
            );
            return;
        }
        if base != l.accepted_end && l.failed {
            tracing::debug!(%log, %base, expected = %l.accepted_end, "append sent before a write failure was seen; dropped");
            return;
        }
        assert_eq!(
            base, l.accepted_end,
            "append to {log} at {base} but its end is {}: caller bug",
            l.accepted_end
        );
        l.failed = false;
        // The caller resumed from the durable end on its own: nothing left to reopen.
        l.full = false;
        for b in batches {
            // Every batch was verified whole (body CRC, record framing) when it was decoded
            // off the wire, and since then only the head's restamp touched it, which
            // re-seals the header. So the header check suffices here: a second body CRC sat
            // between the tail's receive and its durable write, the chain's critical path.
            let h = match record::BatchHeader::decode(&b) {
                Ok(h) if b.len() >= h.batch_len() => h,
                Ok(h) => panic!(
                    "append to {log} of a batch cut short ({} of {} bytes): caller bug",
                    b.len(),
                    h.batch_len()
                ),
                Err(e) => {
                    panic!(
                        "append to {log} of a batch whose header does not verify ({e}): caller bug"
                    )
                }
            };
            debug_assert!(
                record::verify(&b).is_ok(),
                "append of a batch whose body does not verify"
            );
            assert_eq!(
                h.base_offset, l.accepted_end,
                "batches of an append must be contiguous"
            );
            l.accepted_end = h.end_offset();
            l.queue.push_back(Item::Batch(b, h));
        }
        self.pending.insert(log);
    }

    /// Starts whatever the log's queue allows: truncates and trims in order when nothing is in
    /// flight, then groups while fewer than `groups_in_flight_max` are.
    fn pump(&mut self, id: LogId) {
        let groups_max = self.cfg.groups_in_flight_max;
        loop {
            let Some(l) = self.logs.get_mut(&id) else {
                self.pending.remove(&id);
                return;
            };
            let busy = !l.inflight.is_empty() || l.dir_sync_pending;
            let blocked = l.failing.is_some()
                || l.inflight.len() >= groups_max
                || busy && !matches!(l.queue.front(), Some(Item::Batch(..)));
            if blocked {
                // Re-armed when a group finishes.
                self.pending.remove(&id);
                return;
            }
            match l.queue.front() {
                None => {
                    self.pending.remove(&id);
                    return;
                }
                Some(Item::Truncate(end)) => {
                    let end = *end;
                    l.queue.pop_front();
                    self.truncate(id, end);
                }
                Some(Item::Trim { before, point }) => {
                    let (before, point) = (*before, *point);
                    l.queue.pop_front();
                    self.trim(id, before, point);
                }
                Some(Item::Batch(..)) => {
                    // A group needs its write and its sync in the ring together.
                    if !self.ring.has_room(2) {
                        return;
                    }
                    if !self.start_group(id) {
                        // A roll must wait for the groups in flight.
                        self.pending.remove(&id);
                        return;
                    }
                }
            }
        }
    }

    fn tag(&mut self, log: LogId, kind: OpKind, group: u64) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        self.tags.insert(t, (log, kind, group));
        t
    }

    /// Starts a group from the front of the queue (rolling the segment first if needed).
    /// Returns false, starting nothing, when a roll is needed but groups are still in flight.
    fn start_group(&mut self, id: LogId) -> bool {
        let (first_len, needs_roll) = {
            let Some(l) = self.logs.get(&id) else {
                return true;
            };
            let Some(Item::Batch(_, h)) = l.queue.front() else {
                return true;
            };
            let stride = format::stride(h.batch_len(), self.align);
            let issued_pos = l.inflight.back().map(|g| g.end_pos);
            let fits = l
                .segs
                .last()
                .is_some_and(|s| issued_pos.unwrap_or(s.end_pos) + stride <= s.cap);
            let needs_roll = l.must_roll || l.active_file.is_none() || !fits;
            if needs_roll && (!l.inflight.is_empty() || l.dir_sync_pending) {
                return false;
            }
            (stride, needs_roll)
        };
        if needs_roll {
            if let Err(e) = self.roll(id, first_len) {
                tracing::error!(log = %id, "segment roll failed: {e}");
                let code = code_of_storage(&e);
                self.fail(id, code, None);
                return true;
            }
        }
        let group_max = self.cfg.group_commit_bytes_max as u64;
        let align = self.align;
        let direct = self.direct;
        let seq = self.next_group;
        self.next_group += 1;
        let Some(l) = self.logs.get_mut(&id) else {
            return true;
        };
        let Some(seg) = l.segs.last() else {
            return true;
        };
        let Some(file) = l.active_file.clone() else {
            return true;
        };
        // Groups in flight are contiguous: this one starts where the newest one ends.
        let (start_pos, mut end_off) = match l.inflight.back() {
            Some(g) => (g.end_pos, g.end_off),
            None => (seg.end_pos, l.durable_end),
        };
        let cap = seg.cap;
        let mut pos = start_pos;
        let mut bufs = Vec::new();
        let mut batches = Vec::new();
        let (mut copied, mut padding) = (0u64, 0u64);
        while let Some(Item::Batch(_, h)) = l.queue.front() {
            let len = h.batch_len();
            let stride = format::stride(len, align);
            if !bufs.is_empty() && (pos - start_pos + stride > group_max || bufs.len() >= IOV_MAX) {
                break;
            }
            if pos + stride > cap {
                break;
            }
            let Some(Item::Batch(b, h)) = l.queue.pop_front() else {
                unreachable!("front was a batch")
            };
            assert_eq!(h.base_offset, end_off);
            let buf = if !direct {
                b.slice(..len)
            } else {
                let padded = round_up_page(len);
                padding += (padded - len) as u64;
                let reusable = (b.as_ptr() as usize).is_multiple_of(PAGE_BYTES)
                    && b.len() >= padded
                    && b[len..padded].iter().all(|&x| x == 0);
                if reusable {
                    b.slice(..padded)
                } else {
                    copied += len as u64;
                    let mut ab = match self.pool.get(padded) {
                        Ok(ab) => ab,
                        Err(HwError::PoolExhausted { .. }) | Err(HwError::Invalid(_)) => {
                            chainlog_hw::AlignedBuf::new_unpooled(padded)
                        }
                        Err(e) => panic!("buffer pool: {e}"),
                    };
                    ab.extend_from_slice(&b[..len]);
                    ab.into_padded_bytes()
                }
            };
            batches.push((pos, h));
            bufs.push(buf);
            pos += stride;
            end_off = h.end_offset();
        }
        assert!(
            !bufs.is_empty(),
            "group with no batch: roll should have made room"
        );
        Counters::add(&self.counters.copy_bytes, copied);
        Counters::add(&self.counters.padding_bytes, padding);
        let full_sync = !direct || l.header_unsynced;
        l.inflight.push_back(Group {
            seq,
            start_pos,
            end_pos: pos,
            end_off,
            batches,
            write_pos: start_pos,
            write_len: pos - start_pos,
            ops_pending: group_ops(full_sync),
            write_result: None,
            sync_result: None,
            bufs_back: Vec::new(),
            retries: 0,
            full_sync,
            synced: false,
        });
        self.submit_write(id, seq, file, start_pos, bufs, full_sync);
        true
    }

    /// Submits a group's write: with `full_sync` a write and an `fdatasync` of the whole file
    /// linked after it (buffered mode, and a segment whose header is not durable yet), else
    /// one O_DIRECT `RWF_DSYNC` write.
    ///
    /// Both make the written bytes durable before they complete (the kernel flushes the
    /// device cache either way), but `RWF_DSYNC` covers only its own range. With O_DIRECT the
    /// flush follows the write inside the kernel; a linked fdatasync starts only after the
    /// write's completion has run on this thread (io_uring task work) and then waits for an
    /// io-wq worker: two wake-ups on the critical path that cost more on this two-core VM than
    /// the flush itself. On buffered files `RWF_DSYNC` writes back and flushes per write and
    /// measured an order of magnitude slower (platform notes).
    fn submit_write(
        &mut self,
        id: LogId,
        seq: u64,
        file: Arc<File>,
        pos: u64,
        bufs: Vec<Bytes>,
        full_sync: bool,
    ) {
        let n: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        Counters::add(&self.counters.bytes_written, n);
        Counters::add(&self.counters.writes, 1);
        Counters::add(&self.counters.fsyncs, 1);
        if full_sync {
            Counters::add(&self.counters.file_syncs, 1);
        }
        let tw = self.tag(id, OpKind::GroupWrite, seq);
        let mut ops = vec![(
            tw,
            Op::Writev {
                file: file.clone(),
                offset: pos,
                bufs,
                dsync: !full_sync,
            },
        )];
        if full_sync {
            let ts = self.tag(id, OpKind::GroupSync, seq);
            ops.push((
                ts,
                Op::Sync {
                    file,
                    datasync: true,
                },
            ));
        }
        if let Err(e) = self.ring.push_chain(ops) {
            // has_room was checked; this is a bug in the accounting.
            panic!("io_uring push failed after has_room: {e}");
        }
        if let Err(e) = self.ring.submit() {
            tracing::warn!("io_uring submit failed (will retry on wait): {e}");
        }
    }

    /// Applies armed failpoints to a write completion (all zero outside tests: one atomic
    /// load each).
    fn inject(&self, r: io::Result<usize>, expected: usize) -> io::Result<usize> {
        if Failpoints::take(&self.failpoints.write_enospc) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        if Failpoints::take(&self.failpoints.write_eio) {
            return Err(io::Error::other("injected EIO"));
        }
        if r.is_ok() && expected >= 2 * PAGE_BYTES && Failpoints::take(&self.failpoints.short_write)
        {
            return Ok(expected / 2 / PAGE_BYTES * PAGE_BYTES);
        }
        r
    }

    fn on_completion(&mut self, c: Completion) {
        let Some((id, kind, seq)) = self.tags.remove(&c.tag) else {
            tracing::error!(tag = c.tag, "completion for an unknown tag");
            return;
        };
        match kind {
            OpKind::HintSync => {
                if let Err(e) = c.result {
                    tracing::warn!(log = %id, "committed-hint sync failed: {e}");
                }
            }
            OpKind::DirSync => {
                let Some(l) = self.logs.get_mut(&id) else {
                    self.spares.replenish();
                    return;
                };
                l.dir_sync_pending = false;
                let result = if Failpoints::take(&self.failpoints.dir_sync_fail) {
                    Err(io::Error::other("injected"))
                } else {
                    c.result.map(|_| ())
                };
                let ok = result.is_ok();
                if let Err(e) = result {
                    tracing::error!(log = %id, "fsync of the log directory failed: {e}; the log refuses writes until the node is restarted");
                    // Not `StorageFull` even for ENOSPC: a log reopened after a full disk
                    // would go on writing into the segment whose name is not durable.
                    // Broken: nothing written into it is ever reported durable either.
                    l.broken = true;
                    l.failing = Some(ErrorCode::StorageError);
                }
                let trimmed = std::mem::take(&mut l.trim_unsynced).then(|| l.trimmed());
                self.take_recycled(id, ok);
                self.spares.replenish();
                if let Some(ev) = trimmed {
                    emit(&self.events, ev);
                }
                self.settle(id);
            }
            OpKind::GroupWrite | OpKind::GroupSync => {
                let result = match kind {
                    OpKind::GroupWrite => {
                        let expected = c.op.expected_len();
                        self.inject(c.result, expected)
                    }
                    _ => c.result,
                };
                let Some(g) = self
                    .logs
                    .get_mut(&id)
                    .and_then(|l| l.inflight.iter_mut().find(|g| g.seq == seq))
                else {
                    return;
                };
                if let OpKind::GroupWrite = kind {
                    if let Op::Writev { bufs, .. } = c.op {
                        g.bufs_back = bufs;
                    }
                    g.write_result = Some(result);
                } else {
                    g.sync_result = Some(result);
                }
                g.ops_pending -= 1;
                if g.ops_pending == 0 {
                    self.group_done(id, seq);
                }
            }
        }
    }

    /// Both operations of group `seq` came back: retry a short write, start failing the log
    /// on an error, or mark it synced and finish every synced group at the front, in order.
    fn group_done(&mut self, id: LogId, seq: u64) {
        let direct = self.direct;
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        let Some(g) = l.inflight.iter_mut().find(|g| g.seq == seq) else {
            return;
        };
        if l.failing.is_none() {
            let outcome = match g.write_result.take() {
                Some(Err(e)) => {
                    tracing::error!(log = %id, "write failed: {e}");
                    Err(code_of(&e))
                }
                Some(Ok(n)) if (n as u64) < g.write_len => Ok(Some(n as u64)),
                None => Ok(Some(0)),
                Some(Ok(_)) => match g.sync_result.take() {
                    // After a failed fdatasync the page cache state is unknown (the kernel may
                    // have dropped the dirty pages): never report durable, stop writing.
                    Some(Err(e)) => {
                        tracing::error!(log = %id, "fdatasync failed: {e}");
                        Err(code_of(&e))
                    }
                    _ => Ok(None),
                },
            };
            match outcome {
                Ok(None) => {
                    g.synced = true;
                    if g.full_sync {
                        // A whole-file fdatasync: the segment's header is durable now.
                        l.header_unsynced = false;
                    }
                }
                Ok(Some(wrote)) => {
                    // Short write: the linked sync was cancelled. Continue with the rest.
                    g.retries += 1;
                    let aligned = !direct || wrote % PAGE_BYTES as u64 == 0;
                    if g.retries > SHORT_WRITE_RETRIES_MAX
                        || !aligned
                        || wrote == 0 && g.retries > 1
                        || !self.ring.has_room(2)
                    {
                        // (A ring full of other logs' groups is rare enough to fail on rather
                        // than add a retry queue.)
                        tracing::error!(log = %id, wrote, of = g.write_len, "short writes did not complete the group");
                        l.failing = Some(ErrorCode::StorageError);
                    } else {
                        let mut skip = wrote as usize;
                        let mut rest = Vec::with_capacity(g.bufs_back.len());
                        for b in std::mem::take(&mut g.bufs_back) {
                            if skip >= b.len() {
                                skip -= b.len();
                            } else {
                                rest.push(b.slice(skip..));
                                skip = 0;
                            }
                        }
                        g.write_pos += wrote;
                        g.write_len -= wrote;
                        g.ops_pending = group_ops(g.full_sync);
                        g.write_result = None;
                        g.sync_result = None;
                        let pos = g.write_pos;
                        let Some(file) = l.active_file.clone() else {
                            return;
                        };
                        let full_sync = g.full_sync;
                        self.submit_write(id, seq, file, pos, rest, full_sync);
                        return;
                    }
                }
                Err(code) => l.failing = Some(code),
            }
        }
        self.settle(id);
    }

    /// After an operation of the log came back: finish what is durable, or, if the log is
    /// failing and nothing of it is in flight any more, fail it (groups older than the failed
    /// one that did sync still count as durable).
    fn settle(&mut self, id: LogId) {
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        let Some(code) = l.failing else {
            self.finish_synced(id);
            return;
        };
        if l.dir_sync_pending || l.inflight.iter().any(|g| g.ops_pending > 0) {
            return;
        }
        self.finish_synced(id);
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        let dirty_to = l.inflight.iter().map(|g| g.end_pos).max();
        l.failing = None;
        self.fail(id, code, dirty_to);
    }

    /// Applies every synced group at the front of the log's in-flight queue and reports the
    /// new durable end once.
    fn finish_synced(&mut self, id: LogId) {
        let interval = self.cfg.index_interval_bytes;
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        let before = l.durable_end;
        while !l.dir_sync_pending && !l.broken && l.inflight.front().is_some_and(|g| g.synced) {
            let Some(g) = l.inflight.pop_front() else {
                break;
            };
            let Some(seg) = l.segs.last_mut() else { return };
            let first_new_index = seg.index.len();
            for (pos, h) in &g.batches {
                seg.maybe_index(h.base_offset, *pos, interval);
                if h.producer_id.0 != 0 {
                    l.producers.add(ProducerBatch {
                        producer: h.producer_id,
                        seq: h.producer_seq,
                        record_count: h.record_count,
                        base_offset: h.base_offset,
                    });
                }
            }
            assert_eq!(seg.end_pos, g.start_pos, "groups finish in order");
            seg.end = g.end_off;
            seg.end_pos = g.end_pos;
            seg.modified = SystemTime::now();
            assert!(g.end_off > l.durable_end, "durable end must grow");
            l.durable_end = g.end_off;
            {
                let mut v = l.view.write().unwrap_or_else(|e| e.into_inner());
                v.durable_end = l.durable_end;
                if let Some(sv) = v.segs.last_mut() {
                    assert_eq!(sv.base, seg.base);
                    sv.index.extend_from_slice(&seg.index[first_new_index..]);
                    sv.durable_end = seg.end;
                    sv.durable_pos = seg.end_pos;
                }
            }
            Counters::add(&self.counters.batches, g.batches.len() as u64);
            Counters::add(&self.counters.groups, 1);
        }
        let end = l.durable_end;
        if !l.queue.is_empty() {
            self.pending.insert(id);
        }
        if end > before {
            emit(&self.events, DiskEvent::Durable { log: id, end });
        }
    }

    /// Reports a failed write and resets the log to its durable end. `dirty_to` is how far the
    /// failed write may have put bytes on disk: that range is zeroed so none of it can come
    /// back at recovery as if it had been acknowledged.
    fn fail(&mut self, id: LogId, code: ErrorCode, dirty_to: Option<u64>) {
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        assert!(
            l.inflight.iter().all(|g| g.ops_pending == 0) && !l.dir_sync_pending,
            "a log fails only with nothing in flight"
        );
        l.inflight.clear();
        let at = l.durable_end;
        l.queue.retain(|i| !matches!(i, Item::Batch(..)));
        l.accepted_end = at;
        l.failed = true;
        let mut code = code;
        if let (Some(to), Some(seg)) = (dirty_to, l.segs.last()) {
            let from = seg.end_pos;
            let r = if Failpoints::take(&self.failpoints.zero_fail) {
                Err(HwError::io(
                    "zero a failed range",
                    io::Error::other("injected"),
                ))
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(|e| HwError::io("open segment", e))
                    .and_then(|f| {
                        disk::write_zeros(&f, from, to.saturating_sub(from))?;
                        disk::fdatasync(&f)
                    })
            };
            if let Err(e) = r {
                tracing::error!(log = %id, "could not zero the range of a failed write ({e}); the log refuses writes until the node is restarted");
                l.broken = true;
                // What the failed writes put on disk stays there, and recovery may find it
                // intact after a restart: the failure no longer proves those appends stored
                // nowhere, which is what `StorageFull` tells a client.
                if code == ErrorCode::StorageFull {
                    code = ErrorCode::StorageError;
                }
            }
        }
        l.full = code == ErrorCode::StorageFull;
        if !l.queue.is_empty() {
            self.pending.insert(id);
        }
        emit(&self.events, DiskEvent::WriteFailed { log: id, at, code });
    }

    /// Seals the active segment (writes its index) and starts a new one at the durable end
    /// from a prepared spare (or a file made to measure for a batch larger than a segment).
    fn roll(&mut self, id: LogId, first_stride: u64) -> Result<(), StorageError> {
        let align = self.align;
        let direct = self.direct;
        let seg_bytes = self.cfg.segment_bytes;
        let Some(l) = self.logs.get_mut(&id) else {
            return Ok(());
        };
        assert!(l.inflight.is_empty());
        let empty_at_base = l
            .segs
            .last()
            .is_some_and(|s| s.base == l.durable_end && s.end_pos == SEGMENT_HEADER_BYTES);
        if empty_at_base {
            // An empty segment at the same base (of the other alignment, or too small for an
            // oversized batch): replace it.
            if let Some(s) = l.segs.pop() {
                let _ = std::fs::remove_file(l.dir.join(format::index_name(s.base)));
                std::fs::remove_file(&s.path)
                    .map_err(|e| StorageError::io("remove empty segment", &s.path, e))?;
                l.view.write().unwrap_or_else(|e| e.into_inner()).segs.pop();
            }
        } else if let Some(s) = l.segs.last() {
            if let Err(e) = recovery::write_index(&l.dir, &s.to_index(&l.producers)) {
                tracing::warn!(log = %id, "could not write the index of a sealed segment: {e}");
            }
        }
        l.active_file = None;
        let base = l.durable_end;
        let need = SEGMENT_HEADER_BYTES + first_stride;
        let src = if need <= seg_bytes {
            self.spares.take()?
        } else {
            let p = self
                .spare_dir
                .join(format!("{}oversize-{}", format::TMP_PREFIX, base.0));
            let _ = std::fs::remove_file(&p);
            disk::create_prezeroed(&p, round_up_page(need as usize) as u64, direct)?;
            p
        };
        let header = SegmentHeader {
            base,
            log: id,
            align,
        };
        super::recovery::write_segment_header(&src, &header, false)?;
        let path = l.dir.join(format::segment_name(base));
        std::fs::rename(&src, &path).map_err(|e| StorageError::io("rename spare", &path, e))?;
        // The new name must be durable before anything in the segment counts as durable, but
        // not before it is written: the directory fsync runs in the ring (a journal commit
        // takes milliseconds here, on the event loop's thread) and holds back only `Durable`.
        let dir = File::open(&l.dir).map_err(|e| StorageError::io("open log dir", &l.dir, e))?;
        let dir_file = Arc::new(dir);
        let read_file = Arc::new(disk::open_read(&path)?);
        let cap = read_file
            .metadata()
            .map_err(|e| StorageError::io("stat segment", &path, e))?
            .len();
        let wfile = Arc::new(disk::open_rw(&path, direct)?);
        let seg = SegState {
            base,
            path,
            cap,
            align,
            end: base,
            end_pos: SEGMENT_HEADER_BYTES,
            index: Vec::new(),
            last_index_pos: None,
            read_file,
            modified: SystemTime::now(),
        };
        l.view
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .segs
            .push(seg_view(&seg));
        l.segs.push(seg);
        l.active_file = Some(wfile);
        l.must_roll = false;
        l.header_unsynced = true;
        Counters::add(&self.counters.segments_created, 1);
        // A roll is followed at once by its first group's write and sync: keep their slots.
        if self.ring.has_room(3) {
            let t = self.tag(id, OpKind::DirSync, 0);
            let op = Op::Sync {
                file: dir_file,
                datasync: false,
            };
            match self.ring.push(t, op) {
                Ok(()) => {
                    if let Some(l) = self.logs.get_mut(&id) {
                        l.dir_sync_pending = true;
                    }
                }
                Err(e) => {
                    self.tags.remove(&t);
                    tracing::warn!(
                        "io_uring push of a directory fsync failed ({e}); syncing inline"
                    );
                    self.fsync_dir_inline(id)?;
                }
            }
        } else {
            self.fsync_dir_inline(id)?;
        }
        self.save_hint(id, false);
        self.apply_retention(id);
        Ok(())
    }

    /// Hands the files retention renamed out of log `id` to the spare pool once those renames
    /// are durable (`durable`), or deletes them.
    fn take_recycled(&mut self, id: LogId, durable: bool) {
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        for p in std::mem::take(&mut l.recycled_unsynced) {
            if !durable {
                let _ = std::fs::remove_file(&p);
            } else if self.spares.add_recycled(p) {
                Counters::add(&self.counters.segments_recycled, 1);
            }
        }
    }

    fn fsync_dir_inline(&mut self, id: LogId) -> Result<(), StorageError> {
        if let Some(l) = self.logs.get(&id) {
            disk::fsync_dir(&l.dir)?;
        }
        // The next spare's zeroing would have slowed that fsync (ext4 ordered mode).
        self.spares.replenish();
        Ok(())
    }

    /// Deletes the oldest segment (never the last). Returns false if there is none to delete,
    /// or if its file could be neither recycled nor removed: it then stays part of the log
    /// (retention tries again later). Dropping it from the log while its file stays would
    /// leave a gap on disk once the next one goes, and recovery, which keeps a log's oldest
    /// run of segments, would take the stale file for the log and drop every newer segment.
    fn delete_oldest(&mut self, id: LogId) -> bool {
        let Some(l) = self.logs.get_mut(&id) else {
            return false;
        };
        if l.segs.len() <= 1 {
            return false;
        }
        let (path, base, cap) = (l.segs[0].path.clone(), l.segs[0].base, l.segs[0].cap);
        let injected = Failpoints::take(&self.failpoints.delete_fail);
        // A whole-size segment becomes the next spare instead of zeroing a new one: a
        // growing file, or zeroing one, costs as much disk time again as the appends.
        let recycled = !injected && cap == self.cfg.segment_bytes && {
            let to = self.spares.recycle_path();
            match std::fs::rename(&path, &to) {
                Ok(()) => {
                    l.recycled_unsynced.push(to);
                    true
                }
                Err(e) => {
                    tracing::warn!(log = %id, "could not recycle segment {}: {e}", path.display());
                    false
                }
            }
        };
        if !recycled {
            let removed = if injected {
                Err(io::Error::other("injected"))
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::error!(log = %id, "removing segment {}: {e}; it stays in the log", path.display());
                return false;
            }
        }
        let _ = std::fs::remove_file(l.dir.join(format::index_name(base)));
        l.segs.remove(0);
        {
            let mut v = l.view.write().unwrap_or_else(|e| e.into_inner());
            v.segs.remove(0);
            v.start = l.segs[0].base;
        }
        Counters::add(&self.counters.segments_deleted, 1);
        true
    }

    fn finish_deletes(&mut self, id: LogId) {
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        if l.dir_sync_pending {
            // A roll's directory fsync is in flight and covers these renames too.
            l.trim_unsynced = true;
            return;
        }
        let r = disk::fsync_dir(&l.dir);
        if let Err(e) = &r {
            tracing::error!(log = %id, "fsync of log dir after deleting segments: {e}");
        }
        let ev = l.trimmed();
        self.take_recycled(id, r.is_ok());
        self.spares.replenish();
        emit(&self.events, ev);
    }

    fn apply_retention(&mut self, id: LogId) {
        if self.cfg.retention_bytes.is_none() && self.cfg.retention_ms.is_none() {
            return;
        }
        let max_bytes = self.cfg.retention_bytes.unwrap_or(u64::MAX);
        let max_age = self.cfg.retention_ms;
        let mut deleted = false;
        loop {
            let Some(l) = self.logs.get(&id) else { return };
            if l.segs.len() <= 1 {
                break;
            }
            let total: u64 = l.segs.iter().map(|s| s.data_bytes()).sum();
            let too_big = total > max_bytes;
            let too_old = max_age.is_some_and(|ms| {
                l.segs[0]
                    .modified
                    .elapsed()
                    .is_ok_and(|age| age > Duration::from_millis(ms))
            });
            if !(too_big || too_old) || !self.delete_oldest(id) {
                break;
            }
            deleted = true;
        }
        if deleted {
            self.finish_deletes(id);
        }
    }

    fn trim(&mut self, id: LogId, before: Offset, point: Offset) {
        self.save_trim_point(id, point);
        if self.logs.get(&id).is_some_and(|l| before > l.durable_end) {
            // Everything written is before `before` (nothing is in flight when a trim runs).
            match self.restart_at(id, before) {
                Ok(()) => {
                    let point = self.logs.get(&id).map_or(point, |l| l.trim_point);
                    emit(
                        &self.events,
                        DiskEvent::Trimmed {
                            log: id,
                            start: before,
                            point,
                        },
                    )
                }
                Err(e) => {
                    tracing::error!(log = %id, "restarting the log at {before} failed: {e}; the log refuses writes until the node is restarted");
                    if let Some(l) = self.logs.get_mut(&id) {
                        l.broken = true;
                        let at = l.durable_end.min(before);
                        emit(
                            &self.events,
                            DiskEvent::WriteFailed {
                                log: id,
                                at,
                                code: code_of_storage(&e),
                            },
                        );
                    }
                }
            }
            return;
        }
        let mut deleted = false;
        while let Some(l) = self.logs.get(&id) {
            if l.segs.len() <= 1 || l.segs[1].base > before {
                break;
            }
            if !self.delete_oldest(id) {
                break;
            }
            deleted = true;
        }
        if deleted {
            self.finish_deletes(id);
        } else if let Some(l) = self.logs.get(&id) {
            emit(&self.events, l.trimmed());
        }
    }

    /// Empties the log and restarts it at `start`, past its end (a replica whose predecessor
    /// trimmed past everything it holds; all of it was committed). The new empty segment's
    /// name is durable before any old segment goes, and old ones go oldest first: a crash in
    /// between leaves the old log (recovery drops a segment that does not continue the log)
    /// or a suffix of it, never a log with a hole, and a segment at `start` is used only once
    /// nothing older is left.
    fn restart_at(&mut self, id: LogId, start: Offset) -> Result<(), StorageError> {
        let align = self.align;
        let Some(l) = self.logs.get(&id) else {
            return Ok(());
        };
        assert!(l.inflight.is_empty() && start > l.durable_end);
        let src = self.spares.take()?;
        let Some(l) = self.logs.get_mut(&id) else {
            return Ok(());
        };
        let header = SegmentHeader {
            base: start,
            log: id,
            align,
        };
        // Durable at once (a rare path): the groups that follow may be RWF_DSYNC writes, which
        // would not sync it.
        recovery::write_segment_header(&src, &header, true)?;
        let path = l.dir.join(format::segment_name(start));
        std::fs::rename(&src, &path).map_err(|e| StorageError::io("rename spare", &path, e))?;
        disk::fsync_dir(&l.dir)?;
        Counters::add(&self.counters.segments_created, 1);
        l.active_file = None;
        for s in l.segs.drain(..) {
            let _ = std::fs::remove_file(l.dir.join(format::index_name(s.base)));
            std::fs::remove_file(&s.path)
                .map_err(|e| StorageError::io("remove segment", &s.path, e))?;
            Counters::add(&self.counters.segments_deleted, 1);
        }
        disk::fsync_dir(&l.dir)?;
        let dir = l.dir.clone();
        let queue = std::mem::take(&mut l.queue);
        tracing::info!(log = %id, %start, "log restarted at its predecessor's start");
        // The log is one empty segment at `start` now: it recovers ending there.
        self.reinstall(id, &dir, queue)?;
        Ok(())
    }

    /// Re-reads a log whose files were just rewritten under it (truncate, restart) and puts it
    /// back with the appends queued meanwhile; those were accepted against the new end, so the
    /// accepted end follows them. Returns the log's new end.
    fn reinstall(
        &mut self,
        id: LogId,
        dir: &Path,
        queue: VecDeque<Item>,
    ) -> Result<Offset, StorageError> {
        let rec = recovery::recover_log(dir, self.align, self.cfg.index_interval_bytes)?;
        let new_end = rec.end;
        self.install(rec, queue)?;
        if let Some(l) = self.logs.get_mut(&id) {
            l.accepted_end = l
                .queue
                .iter()
                .rev()
                .find_map(|i| match i {
                    Item::Batch(_, h) => Some(h.end_offset()),
                    _ => None,
                })
                .unwrap_or(new_end);
        }
        Ok(new_end)
    }

    fn truncate(&mut self, id: LogId, end: Offset) {
        let r = self.truncate_inner(id, end);
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        match r {
            Ok(new_end) => {
                emit(
                    &self.events,
                    DiskEvent::Truncated {
                        log: id,
                        end: new_end,
                    },
                );
            }
            Err(e) => {
                tracing::error!(log = %id, "truncate failed: {e}; the log refuses writes until the node is restarted");
                l.broken = true;
                let at = l.durable_end;
                emit(
                    &self.events,
                    DiskEvent::WriteFailed {
                        log: id,
                        at,
                        code: code_of_storage(&e),
                    },
                );
            }
        }
    }

    fn truncate_inner(&mut self, id: LogId, end: Offset) -> Result<Offset, StorageError> {
        let (dir, queue, cut) = {
            let Some(l) = self.logs.get_mut(&id) else {
                return Ok(end);
            };
            assert!(l.inflight.is_empty());
            if end >= l.durable_end {
                return Ok(l.durable_end);
            }
            let end = end.max(l.start());
            let Some(k) = l.segs.iter().rposition(|s| s.base <= end) else {
                return Ok(l.durable_end);
            };
            // Newest first, so a crash midway leaves a shorter log, never one with a hole.
            for s in l.segs.drain(k + 1..).rev() {
                let _ = std::fs::remove_file(l.dir.join(format::index_name(s.base)));
                std::fs::remove_file(&s.path)
                    .map_err(|e| StorageError::io("remove segment", &s.path, e))?;
                Counters::add(&self.counters.segments_deleted, 1);
            }
            disk::fsync_dir(&l.dir)?;
            let seg = &l.segs[k];
            recovery::remove_index_durably(&l.dir, seg.base)?;
            let cut = find_cut(seg, end)
                .map_err(|e| StorageError::io("find truncation point", &seg.path, e))?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(|e| StorageError::io("open segment", &seg.path, e))?;
            disk::write_zeros(&f, cut, seg.end_pos - cut)?;
            disk::fdatasync(&f)?;
            (l.dir.clone(), std::mem::take(&mut l.queue), cut)
        };
        tracing::info!(log = %id, %end, cut, "truncated");
        self.reinstall(id, &dir, queue)
    }

    fn create_log(&mut self, log: LogId, name: &str) -> Result<(), ErrorCode> {
        // Ids normally come from `LogId::from_name`, but storage only needs them unique: a
        // second name under one id is refused with LogExists.
        if !log_name_valid(name) {
            return Err(ErrorCode::BadRequest);
        }
        if let Some(l) = self.logs.get(&log) {
            return if l.name == name {
                Ok(())
            } else {
                Err(ErrorCode::LogExists)
            };
        }
        if self.logs.len() >= LOGS_MAX {
            return Err(ErrorCode::LimitExceeded);
        }
        let r = (|| -> Result<(), StorageError> {
            let tmp = self.logs_dir.join(format!(
                "{}{}",
                format::TMP_PREFIX,
                format::log_dir_name(log)
            ));
            let dst = self.logs_dir.join(format::log_dir_name(log));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir(&tmp).map_err(|e| StorageError::io("create log dir", &tmp, e))?;
            write_synced(
                &tmp.join(format::META_FILE),
                &format::encode_meta(log, name),
            )?;
            write_synced(
                &tmp.join(format::HINT_FILE),
                &vec![0u8; format::HINT_FILE_BYTES as usize],
            )?;
            disk::fsync_dir(&tmp)?;
            std::fs::rename(&tmp, &dst).map_err(|e| StorageError::io("rename log dir", &dst, e))?;
            disk::fsync_dir(&self.logs_dir)?;
            let rec = recovery::recover_log(&dst, self.align, self.cfg.index_interval_bytes)?;
            self.install(rec, VecDeque::new())
        })();
        r.map_err(|e| {
            tracing::error!(%log, name, "create failed: {e}");
            code_of_storage(&e)
        })
    }

    /// Makes `point` the log's durable trim point if it is past the saved one, before the
    /// trim is reported, so a restarted node still serves nothing below it. A failure (say,
    /// no room for the new file on a full disk) must not stop the trim that frees space: the
    /// point is then lost at a restart and the node serves its oldest segment again, which
    /// holds only committed records.
    fn save_trim_point(&mut self, id: LogId, point: Offset) {
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        if point <= l.trim_point {
            return;
        }
        let tmp = l
            .dir
            .join(format!("{}{}", format::TMP_PREFIX, format::TRIM_FILE));
        let dst = l.dir.join(format::TRIM_FILE);
        let r = write_synced(&tmp, &format::encode_trim(point)).and_then(|()| {
            std::fs::rename(&tmp, &dst).map_err(|e| StorageError::io("rename", &dst, e))?;
            Ok(disk::fsync_dir(&l.dir)?)
        });
        match r {
            Ok(()) => {
                l.trim_point = point;
                l.view.write().unwrap_or_else(|e| e.into_inner()).trim_point = point;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(log = %id, "saving trim point {point}: {e}; after a restart this node serves the log from its oldest segment");
            }
        }
    }

    /// Writes the committed hint if it moved (page cache only unless `sync`): it is a lower
    /// bound, so losing the newest value in a crash only makes it less useful, never wrong.
    fn save_hint(&mut self, id: LogId, sync: bool) {
        let Some(l) = self.logs.get_mut(&id) else {
            return;
        };
        if l.hint > l.hint_saved {
            l.hint_seq += 1;
            let slot = l.hint_seq % 2;
            let p = l.dir.join(format::HINT_FILE);
            let r = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .and_then(|f| {
                    f.write_all_at(
                        &format::encode_hint(l.hint_seq, l.hint),
                        slot * format::HINT_SLOT_BYTES,
                    )?;
                    if sync {
                        f.sync_data()?;
                    }
                    Ok(())
                });
            match r {
                Ok(()) => {
                    l.hint_saved = l.hint;
                    l.hint_unsynced = !sync;
                }
                Err(e) => tracing::warn!(log = %id, "saving committed hint: {e}"),
            }
        } else if sync && l.hint_unsynced {
            let p = l.dir.join(format::HINT_FILE);
            match File::open(&p).and_then(|f| f.sync_data()) {
                Ok(()) => l.hint_unsynced = false,
                Err(e) => tracing::warn!(log = %id, "syncing committed hint: {e}"),
            }
        }
    }

    /// Reopens every log that failed full, at its durable end, once the filesystem has room
    /// again (one `statvfs` a tick, and only while some log is full).
    fn reopen_if_space(&mut self) {
        if !self.logs.values().any(|l| l.full) {
            return;
        }
        let free = if Failpoints::take(&self.failpoints.no_free_space) {
            Ok(0)
        } else {
            disk::free_bytes(&self.logs_dir)
        };
        let need = REOPEN_FREE_SEGMENTS.saturating_mul(self.cfg.segment_bytes);
        match free {
            Ok(free) if free >= need => {}
            Ok(free) => {
                tracing::debug!(free, need, "disk still full; logs stay failed");
                return;
            }
            Err(e) => {
                tracing::warn!("checking free space: {e}");
                return;
            }
        }
        for l in self.logs.values_mut() {
            // Only once the failure is fully handled: nothing in flight, nothing queued but
            // what the failure left (the next append then starts at the durable end).
            let idle = l.inflight.is_empty()
                && !l.dir_sync_pending
                && l.failing.is_none()
                && !l.queue.iter().any(|i| matches!(i, Item::Batch(..)))
                && l.accepted_end == l.durable_end;
            if !l.full || l.broken || !idle {
                continue;
            }
            l.full = false;
            let end = l.durable_end;
            tracing::info!(log = %l.id, name = %l.name, %end, free = ?free, "space is free again; log reopened");
            emit(&self.events, DiskEvent::Reopened { log: l.id, end });
        }
    }

    fn tick(&mut self) {
        self.reopen_if_space();
        let ids: Vec<LogId> = self.logs.keys().copied().collect();
        for id in ids {
            if self.cfg.retention_ms.is_some() {
                let idle = self.logs.get(&id).is_some_and(|l| l.inflight.is_empty());
                if idle {
                    self.apply_retention(id);
                }
            }
            // The hint is a lower bound that may lag: write it once a tick, not once a group
            // (an open + pwrite + close per fsync cost more CPU than the append itself).
            self.save_hint(id, false);
            // Sync hints written since the last tick, asynchronously through the ring.
            let Some(l) = self.logs.get(&id) else {
                continue;
            };
            if l.hint_unsynced && self.ring.has_room(1) {
                let p = l.dir.join(format::HINT_FILE);
                if let Ok(f) = File::open(&p) {
                    let t = self.tag(id, OpKind::HintSync, 0);
                    if self
                        .ring
                        .push(
                            t,
                            Op::Sync {
                                file: Arc::new(f),
                                datasync: true,
                            },
                        )
                        .is_ok()
                    {
                        if let Some(l) = self.logs.get_mut(&id) {
                            l.hint_unsynced = false;
                        }
                    } else {
                        self.tags.remove(&t);
                    }
                }
            }
        }
    }
}

/// Operations a group's write takes: the write, and with `full_sync` its linked fdatasync.
fn group_ops(full_sync: bool) -> usize {
    if full_sync {
        2
    } else {
        1
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), StorageError> {
    let f = File::create(path).map_err(|e| StorageError::io("create", path, e))?;
    f.write_all_at(data, 0)
        .map_err(|e| StorageError::io("write", path, e))?;
    f.sync_all().map_err(|e| StorageError::io("fsync", path, e))
}

/// Position of the first batch of `seg` that has records at or past `end` (where a truncate
/// to `end` cuts), from the sparse index point at or before `end`.
fn find_cut(seg: &SegState, end: Offset) -> io::Result<u64> {
    let i = seg.index.partition_point(|(o, _)| *o <= end);
    let mut pos = if i == 0 {
        SEGMENT_HEADER_BYTES
    } else {
        seg.index[i - 1].1
    };
    let mut hb = [0u8; HEADER_LEN];
    while pos < seg.end_pos {
        seg.read_file.read_exact_at(&mut hb, pos)?;
        let h = BatchHeader::decode(&hb)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if h.end_offset() > end {
            return Ok(pos);
        }
        pos += format::stride(h.batch_len(), seg.align);
    }
    Ok(seg.end_pos)
}
