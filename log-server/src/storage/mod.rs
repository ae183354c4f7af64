//! Durable single-node log storage: named logs of segment files written through io_uring with
//! group commit, recovered (torn tail cut, index and producer table rebuilt) at open.
//!
//! Threads: the writer owns the io_uring ring and every log's write state, either on a thread
//! of its own ([`Storage::open`]) or driven by the caller's event loop
//! ([`Storage::open_driven`], what the server uses); one reader serves reads with `pread` on its
//! own file descriptors so reads never stall the write path; one preparer keeps a pre-zeroed
//! spare segment ready. Results come back as [`chainlog_core::effects::DiskEvent`]s through the
//! `events` callback.
//!
//! Zero copy: in buffered mode the caller's `Bytes` go to `writev` as they are. In O_DIRECT mode
//! a batch already page-aligned and zero-padded to a page (received into a pool buffer) goes as
//! is; any other batch is copied into a pool buffer, and that copy is counted in
//! [`StorageStats::copy_bytes`].

mod format;
mod producers;
mod reader;
mod recovery;
mod writer;

#[cfg(test)]
mod tests;

use bytes::Bytes;
use chainlog_core::effects::{DiskEvent, ReadToken, RecoveredLog};
use chainlog_core::{LogId, Offset};
use chainlog_hw::HwError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

pub use format::SEGMENT_HEADER_BYTES;

/// How segment files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// O_DIRECT if the start-up probe says it works on the data dir, else buffered.
    #[default]
    Auto,
    /// O_DIRECT with page-aligned, page-padded batches; fails to open if unsupported.
    Direct,
    /// Page-cache writes made durable by fdatasync.
    Buffered,
}

/// Storage configuration. Every field has a default; `validate` checks the minimums.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// Data directory (created if missing). Default `data`.
    pub dir: PathBuf,
    /// Size of one segment file. Default 64 MiB, minimum 1 MiB, a multiple of 4096.
    pub segment_bytes: u64,
    /// Default `auto`.
    pub io_mode: IoMode,
    /// Bytes between sparse index entries. Default 4096, minimum 512.
    pub index_interval_bytes: u32,
    /// Delete whole oldest segments while a log holds more than this. Default none.
    pub retention_bytes: Option<u64>,
    /// Delete whole oldest segments last written longer ago than this. Default none.
    pub retention_ms: Option<u64>,
    /// Most bytes one write + fdatasync carries (a single larger batch still goes alone).
    /// Default 8 MiB, minimum 4096.
    pub group_commit_bytes_max: usize,
    /// Write + fdatasync groups of one log in flight at once (1..=16, default 4). Concurrent
    /// flushes keep the disk busy while the previous group's replies travel: on this VM's
    /// virtio disk 2 and 4 concurrent write + fdatasync loops give 1.4x and 1.9x the syncs/s of
    /// one. Groups complete in order: a log is durable up to the end of the oldest group not
    /// yet synced.
    pub groups_in_flight_max: usize,
    /// io_uring submission queue entries; bounds operations in flight. Default 64, 8..=4096.
    pub queue_depth: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: PathBuf::from("data"),
            segment_bytes: 64 << 20,
            io_mode: IoMode::Auto,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: None,
            group_commit_bytes_max: 8 << 20,
            groups_in_flight_max: 4,
            queue_depth: 64,
        }
    }
}

/// Most commands queued to the writer (appends, truncates, ...) before `append` blocks the
/// caller: backpressure instead of unbounded growth.
pub const COMMANDS_QUEUED_MAX: usize = 64 * 1024;
/// Most reads queued to the reader before `read` blocks the caller.
pub const READS_QUEUED_MAX: usize = 4096;

impl StorageConfig {
    pub fn validate(&self) -> Result<(), StorageError> {
        let bad = |m: String| Err(StorageError::Config(m));
        if self.segment_bytes < (1 << 20) || !self.segment_bytes.is_multiple_of(4096) {
            return bad(format!(
                "segment_bytes {} must be >= 1 MiB and a multiple of 4096",
                self.segment_bytes
            ));
        }
        if self.index_interval_bytes < 512 {
            return bad(format!(
                "index_interval_bytes {} must be >= 512",
                self.index_interval_bytes
            ));
        }
        if self.group_commit_bytes_max < 4096 {
            return bad(format!(
                "group_commit_bytes_max {} must be >= 4096",
                self.group_commit_bytes_max
            ));
        }
        if !(1..=16).contains(&self.groups_in_flight_max) {
            return bad(format!(
                "groups_in_flight_max {} must be in 1..=16",
                self.groups_in_flight_max
            ));
        }
        if !(8..=4096).contains(&self.queue_depth) {
            return bad(format!(
                "queue_depth {} must be in 8..=4096",
                self.queue_depth
            ));
        }
        if self.retention_bytes == Some(0) || self.retention_ms == Some(0) {
            return bad("retention limits must be positive when set".into());
        }
        Ok(())
    }
}

/// Errors opening storage (runtime failures are reported as `DiskEvent`s).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage config: {0}")]
    Config(String),
    #[error("storage cannot run here: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Hw(#[from] HwError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt storage in {}: {what}", path.display())]
    Corruption { path: PathBuf, what: String },
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Per-log figures in [`StorageStats`].
#[derive(Clone, Debug, Serialize)]
pub struct LogStats {
    pub log: LogId,
    pub name: String,
    pub segments: usize,
    pub start: Offset,
    /// The durable trim point: nothing below it is served, though its segment may remain.
    pub trim_point: Offset,
    pub durable_end: Offset,
}

/// Counters since open.
#[derive(Clone, Debug, Serialize)]
pub struct StorageStats {
    /// "direct" or "buffered" (what `auto` resolved to).
    pub io_mode: &'static str,
    /// Bytes handed to write operations (including O_DIRECT padding).
    pub bytes_written: u64,
    /// Of `bytes_written`, zero padding added to fill pages in O_DIRECT mode.
    pub padding_bytes: u64,
    pub writes: u64,
    pub fsyncs: u64,
    /// Of `fsyncs`, groups made durable by a whole-file fdatasync after their write rather
    /// than by the write itself (`RWF_DSYNC`): every group in buffered mode; with O_DIRECT the
    /// first group of a new segment and of each start-up, whose header went through the page
    /// cache and which `RWF_DSYNC` would not sync.
    pub file_syncs: u64,
    /// Batches made durable.
    pub batches: u64,
    /// Write + fdatasync groups completed (batches / groups is the group-commit factor).
    pub groups: u64,
    /// Payload bytes copied in user space on the way to disk (0 on the zero-copy path).
    pub copy_bytes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    /// Segments created by rolling.
    pub segments_created: u64,
    /// Segments deleted by trim, retention or truncation.
    pub segments_deleted: u64,
    /// Deleted segments kept as the next spare (no zeroing needed for the roll that takes it).
    pub segments_recycled: u64,
    /// Spare segments written full of zeros (what recycling saves).
    pub spares_zeroed: u64,
    /// Spare segments still to be zeroed now (a gauge; 0 once the pool is full).
    pub spares_pending: u64,
    pub logs: Vec<LogStats>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub bytes_written: AtomicU64,
    pub padding_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub file_syncs: AtomicU64,
    pub batches: AtomicU64,
    pub groups: AtomicU64,
    pub copy_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub segments_recycled: AtomicU64,
    /// Shared with the spare preparer, which counts into it.
    pub spares_zeroed: Arc<AtomicU64>,
    /// Set by the spare preparer: spares it still has to zero.
    pub spares_pending: Arc<AtomicU64>,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the reader may see of one segment: only durable bytes.
#[derive(Clone)]
pub(crate) struct SegView {
    pub base: Offset,
    pub file: Arc<File>,
    pub align: u32,
    /// Sparse index (first offset of a batch, its position), only durable entries.
    pub index: Vec<(Offset, u64)>,
    pub durable_end: Offset,
    pub durable_pos: u64,
}

/// What the reader may see of one log.
pub(crate) struct LogView {
    pub name: String,
    pub start: Offset,
    pub trim_point: Offset,
    pub durable_end: Offset,
    pub segs: Vec<SegView>,
}

pub(crate) type Views = Arc<RwLock<BTreeMap<LogId, Arc<RwLock<LogView>>>>>;
pub(crate) type Events = Arc<Mutex<Box<dyn FnMut(DiskEvent) + Send>>>;

pub(crate) fn emit(events: &Events, ev: DiskEvent) {
    let mut f = events.lock().unwrap_or_else(|e| e.into_inner());
    (f)(ev)
}

/// Handles the storage threads share with the `Storage` handle.
pub(crate) struct Shared {
    pub events: Events,
    pub counters: Arc<Counters>,
    pub views: Views,
    pub failpoints: Arc<Failpoints>,
    pub sleeping: Arc<AtomicBool>,
}

pub(crate) enum Cmd {
    Append {
        log: LogId,
        base: Offset,
        batches: Vec<Bytes>,
    },
    Truncate {
        log: LogId,
        end: Offset,
    },
    Create {
        log: LogId,
        name: String,
    },
    Trim {
        log: LogId,
        before: Offset,
        point: Offset,
    },
    SaveCommitted {
        log: LogId,
        end: Offset,
    },
    Shutdown,
}

pub(crate) struct ReadReq {
    pub token: ReadToken,
    pub log: LogId,
    pub from: Offset,
    pub end: Offset,
    pub max_bytes: usize,
}

/// Fault injection for paths the simulator cannot reach (io_uring write errors, short writes).
/// Each counter makes that many upcoming write completions misbehave; all are zero unless a
/// test arms them through [`Storage::failpoints`].
#[derive(Default, Debug)]
pub struct Failpoints {
    /// Next N writes complete with ENOSPC.
    pub write_enospc: AtomicU64,
    /// Next N writes complete with EIO.
    pub write_eio: AtomicU64,
    /// Next N writes report only half their bytes written (the rest is written again).
    pub short_write: AtomicU64,
    /// Next N free-space checks of a log that failed full find no room (it stays failed).
    pub no_free_space: AtomicU64,
    /// Next N zeroings of a failed write's range fail (its bytes stay on disk).
    pub zero_fail: AtomicU64,
    /// Next N directory fsyncs after a segment roll fail.
    pub dir_sync_fail: AtomicU64,
    /// Next N deletions of a segment (retention, trim) can neither recycle nor remove its file.
    pub delete_fail: AtomicU64,
}

impl Failpoints {
    /// Takes one shot of `c` if any is left.
    pub(crate) fn take(c: &AtomicU64) -> bool {
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
            .is_ok()
    }
}

/// Handle to a running storage. `Send + Sync`; share it with an `Arc`.
pub struct Storage {
    cmd_tx: Option<crossbeam_channel::Sender<Cmd>>,
    read_tx: Option<crossbeam_channel::Sender<ReadReq>>,
    waker: chainlog_hw::uring::RingWaker,
    counters: Arc<Counters>,
    views: Views,
    direct: bool,
    threads: Vec<JoinHandle<()>>,
    failpoints: Arc<Failpoints>,
    /// Set by the writer just before it sleeps in the ring: only then does a command need an
    /// eventfd write (a syscall) to wake it.
    sleeping: Arc<AtomicBool>,
    /// The writer, when the caller's event loop drives it ([`Storage::open_driven`]) instead
    /// of a thread.
    driven: Option<Mutex<writer::Writer>>,
    /// Held (flock) while open; dropped after the threads stop.
    _lock: File,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("direct", &self.direct)
            .finish()
    }
}

impl Storage {
    /// Opens (creating if needed) the data dir, recovers every log, and starts the storage
    /// threads. `events` receives every completion, from the storage threads.
    pub fn open(
        cfg: StorageConfig,
        events: Box<dyn FnMut(DiskEvent) + Send>,
    ) -> Result<(Storage, Vec<RecoveredLog>), StorageError> {
        let (s, recovered, _) = Self::open_with(cfg, events, false)?;
        Ok((s, recovered))
    }

    /// Like [`Storage::open`], but the writer runs on the caller's event loop: no writer
    /// thread, so an append reaches io_uring and its completion reaches the caller without two
    /// thread wake-ups per group (on this VM each costs more than the append's own work).
    /// The caller calls [`Storage::drive`] after queuing commands and whenever the returned
    /// eventfd is readable (read it first, to reset it); `events` then runs on the caller's
    /// thread for writes (reads still complete on the reader thread). Segment rolls, creates,
    /// truncates and trims run inside `drive`, so they briefly block that loop.
    pub fn open_driven(
        cfg: StorageConfig,
        events: Box<dyn FnMut(DiskEvent) + Send>,
    ) -> Result<(Storage, Vec<RecoveredLog>, File), StorageError> {
        let (s, recovered, efd) = Self::open_with(cfg, events, true)?;
        let Some(efd) = efd else {
            unreachable!("a driven storage has a completion eventfd")
        };
        Ok((s, recovered, efd))
    }

    /// Reaps write completions and starts queued writes (a no-op for threaded storage).
    pub fn drive(&self) {
        if let Some(w) = &self.driven {
            w.lock().unwrap_or_else(|e| e.into_inner()).step();
        }
    }

    fn open_with(
        cfg: StorageConfig,
        events: Box<dyn FnMut(DiskEvent) + Send>,
        driven: bool,
    ) -> Result<(Storage, Vec<RecoveredLog>, Option<File>), StorageError> {
        cfg.validate()?;
        chainlog_hw::disk::create_dir_synced(&cfg.dir)?;
        let lock_path = cfg.dir.join(format::LOCK_FILE);
        let lock = chainlog_hw::disk::lock_exclusive(&lock_path).map_err(|e| {
            StorageError::Unsupported(format!(
                "cannot lock {} ({e}): is another log-server using this data dir?",
                lock_path.display()
            ))
        })?;
        let caps = chainlog_hw::probe::probe(&cfg.dir);
        if let Some(why) = caps.uring_unavailable() {
            return Err(StorageError::Unsupported(why.to_string()));
        }
        let direct = match cfg.io_mode {
            IoMode::Buffered => false,
            IoMode::Auto => caps.direct_ok,
            IoMode::Direct => {
                if let Some(why) = caps.direct_unavailable() {
                    return Err(StorageError::Unsupported(why.to_string()));
                }
                true
            }
        };
        tracing::info!(
            dir = %cfg.dir.display(),
            direct,
            reason = %caps.direct_reason,
            "opening storage"
        );
        let events: Events = Arc::new(Mutex::new(events));
        let counters = Arc::new(Counters::default());
        let views: Views = Arc::default();
        let failpoints = Arc::new(Failpoints::default());
        let (cmd_tx, cmd_rx) = crossbeam_channel::bounded(COMMANDS_QUEUED_MAX);
        let (read_tx, read_rx) = crossbeam_channel::bounded(READS_QUEUED_MAX);

        let sleeping = Arc::new(AtomicBool::new(false));
        let (mut writer, recovered) = writer::Writer::open(
            cfg.clone(),
            direct,
            cmd_rx,
            Shared {
                events: events.clone(),
                counters: counters.clone(),
                views: views.clone(),
                failpoints: failpoints.clone(),
                sleeping: sleeping.clone(),
            },
        )?;
        let waker = writer.waker();
        let mut threads = Vec::new();
        let (driven, efd) = if driven {
            let efd = writer.completion_eventfd()?;
            (Some(Mutex::new(writer)), Some(efd))
        } else {
            threads.push(
                std::thread::Builder::new()
                    .name("chainlog-storage-w".into())
                    .spawn(move || writer.run())
                    .map_err(|e| StorageError::io("spawn writer", &cfg.dir, e))?,
            );
            (None, None)
        };
        let (v2, e2, c2) = (views.clone(), events.clone(), counters.clone());
        threads.push(
            std::thread::Builder::new()
                .name("chainlog-storage-r".into())
                .spawn(move || reader::run(read_rx, v2, e2, c2))
                .map_err(|e| StorageError::io("spawn reader", &cfg.dir, e))?,
        );
        Ok((
            Storage {
                cmd_tx: Some(cmd_tx),
                read_tx: Some(read_tx),
                waker,
                counters,
                views,
                direct,
                threads,
                failpoints,
                sleeping,
                driven,
                _lock: lock,
            },
            recovered,
            efd,
        ))
    }

    fn send(&self, c: Cmd) {
        let Some(tx) = &self.cmd_tx else { return };
        if tx.send(c).is_err() {
            tracing::error!("storage writer is gone; command dropped");
            return;
        }
        // Pairs with the writer's store-then-recheck: either it sees this command in the
        // channel before sleeping, or we see it asleep and wake it.
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// Appends whole batches at `base` (== the log's current end). Reports `Durable` (group
    /// commit may cover several appends with one event) or `WriteFailed`.
    pub fn append(&self, log: LogId, base: Offset, batches: Vec<Bytes>) {
        self.send(Cmd::Append { log, base, batches });
    }

    /// Discards every record at or past `end`; reports `Truncated` once durable.
    pub fn truncate(&self, log: LogId, end: Offset) {
        self.send(Cmd::Truncate { log, end });
    }

    /// Creates a log; reports `Created` (Ok again for the same name, `LogExists` for another
    /// name with the same id).
    pub fn create_log(&self, log: LogId, name: &str) {
        self.send(Cmd::Create {
            log,
            name: name.to_string(),
        });
    }

    /// Reads whole durable batches from the one containing `from`; reports `ReadDone`.
    /// `max_bytes` is capped at `READ_BYTES_MAX` (the first batch is returned even if larger).
    pub fn read(&self, token: ReadToken, log: LogId, from: Offset, end: Offset, max_bytes: usize) {
        let Some(tx) = &self.read_tx else { return };
        let req = ReadReq {
            token,
            log,
            from,
            end,
            max_bytes,
        };
        if tx.send(req).is_err() {
            tracing::error!("storage reader is gone; read dropped");
        }
    }

    /// Makes `point` the log's durable trim point if it is higher, then deletes whole segments
    /// entirely below `before` (never the active one); reports `Trimmed`. `before` past the
    /// log's end (everything written before this call) empties the log and restarts it at
    /// `before`: the next append goes there.
    pub fn trim(&self, log: LogId, before: Offset, point: Offset) {
        self.send(Cmd::Trim { log, before, point });
    }

    /// Remembers `end` as a lower bound of the committed end (lazily persisted).
    pub fn save_committed(&self, log: LogId, end: Offset) {
        self.send(Cmd::SaveCommitted { log, end });
    }

    pub fn stats(&self) -> StorageStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let logs = self
            .views
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, v)| {
                let v = v.read().unwrap_or_else(|e| e.into_inner());
                LogStats {
                    log: *id,
                    name: v.name.clone(),
                    segments: v.segs.len(),
                    start: v.start,
                    trim_point: v.trim_point,
                    durable_end: v.durable_end,
                }
            })
            .collect();
        StorageStats {
            io_mode: if self.direct { "direct" } else { "buffered" },
            bytes_written: l(&c.bytes_written),
            padding_bytes: l(&c.padding_bytes),
            writes: l(&c.writes),
            fsyncs: l(&c.fsyncs),
            file_syncs: l(&c.file_syncs),
            batches: l(&c.batches),
            groups: l(&c.groups),
            copy_bytes: l(&c.copy_bytes),
            reads: l(&c.reads),
            read_bytes: l(&c.read_bytes),
            segments_created: l(&c.segments_created),
            segments_deleted: l(&c.segments_deleted),
            segments_recycled: l(&c.segments_recycled),
            spares_zeroed: l(&c.spares_zeroed),
            spares_pending: l(&c.spares_pending),
            logs,
        }
    }

    /// Whether segments are written with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Fault injection for tests: arm a counter and the next writes misbehave. Never armed in
    /// production (nothing else touches it).
    #[doc(hidden)]
    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }

    /// Drains: every command sent before is durable or failed (its event delivered), every
    /// read answered; then the threads stop.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.cmd_tx.take() {
            let _ = tx.send(Cmd::Shutdown);
            self.waker.wake();
        }
        if let Some(w) = self.driven.take() {
            // Finish on this thread what the event loop left in flight.
            w.into_inner().unwrap_or_else(|e| e.into_inner()).run();
        }
        self.read_tx.take();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a storage thread panicked");
            }
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.stop();
    }
}
