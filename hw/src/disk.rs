//! Segment files: open (O_DIRECT when probed OK), create pre-allocated and pre-zeroed (so later
//! appends never change file metadata and fdatasync stays one flush), zero ranges, sync
//! directories, and a background preparer that keeps spare segments ready ahead of need.

use crate::buf::{AlignedBuf, PAGE_BYTES};
use crate::error::{HwError, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes of one pre-zeroing write (one aligned write at a time). No larger than a full
/// 128-record batch of 1 KiB records: once a zeroing write is on the device, an append's
/// durable write queued behind it waits for it (the idle I/O class only orders requests still
/// in the scheduler). With 1 MiB writes a growing dev chain's p99 at 128 in flight was 2.3x
/// that with 128 KiB ones (3 of 3 A/B pairs); 64 KiB was no better.
const ZERO_CHUNK_BYTES: usize = 128 << 10;

/// Opens an existing segment for reading and writing, with O_DIRECT when `direct`.
pub fn open_rw(path: &Path, direct: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| HwError::io("open segment", e))
}

/// Opens a file for buffered reads only (the read path, separate from the writer's fd).
pub fn open_read(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| HwError::io("open segment for reading", e))
}

/// Reserves `len` bytes of blocks for `file` without changing visible content.
pub fn fallocate(file: &File, offset: u64, len: u64) -> Result<()> {
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(HwError::Invalid(format!("fallocate {offset}+{len}")));
    };
    // SAFETY: fallocate takes no pointers; the fd is valid for the borrow of `file`.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, off, l) };
    if r != 0 {
        return Err(HwError::io("fallocate", io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes zeros over `[offset, offset + len)`. With an O_DIRECT fd both must be page-aligned.
pub fn write_zeros(file: &File, offset: u64, len: u64) -> Result<()> {
    let zeros = AlignedBuf::new_unpooled(ZERO_CHUNK_BYTES);
    let mut zeros = zeros;
    zeros.set_len(ZERO_CHUNK_BYTES);
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros.as_slice()[..n], at)
            .map_err(|e| HwError::io("write zeros", e))?;
        at += n as u64;
    }
    Ok(())
}

/// Bytes an unprivileged writer can still allocate on the filesystem holding `path`
/// (`statvfs`: available blocks times the fragment size).
pub fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| HwError::Invalid(format!("path with a NUL byte: {}", path.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated string that outlives the call, and `st` points to
    // writable memory of the type statvfs fills.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(HwError::io("statvfs", io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    // (Both are u64 on 64-bit Linux but narrower on some targets.)
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

pub fn fdatasync(file: &File) -> Result<()> {
    file.sync_data().map_err(|e| HwError::io("fdatasync", e))
}

/// Creates `dir` and any missing parents, each made durable in its parent (a directory that
/// already exists is taken as it is): the entries a data directory's files hang from must
/// survive a crash as the files' own syncs do.
pub fn create_dir_synced(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_synced(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(HwError::io("create dir", e)),
    }
    fsync_dir(parent)
}

/// Makes a directory entry change (create, rename, unlink) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| HwError::io("open dir for fsync", e))?;
    d.sync_all().map_err(|e| HwError::io("fsync dir", e))
}

/// Takes an exclusive advisory lock on `path` (created if missing) for as long as the returned
/// file stays open, so two processes never run on one data directory. Fails at once (no
/// waiting) if another process holds it.
pub fn lock_exclusive(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| HwError::io("open lock file", e))?;
    // SAFETY: flock takes no pointers; the fd is valid for the borrow of `f`.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(HwError::io("flock", io::Error::last_os_error()));
    }
    Ok(f)
}

/// Creates `path` (which must not exist) with `len` bytes allocated and written as zeros, then
/// fdatasync: afterwards writes inside it are pure data writes. `len` must be page-aligned.
pub fn create_prezeroed(path: &Path, len: u64, direct: bool) -> Result<()> {
    create_prezeroed_unless(path, len, direct, &AtomicBool::new(false)).map(|_| ())
}

/// [`create_prezeroed`] that gives up between chunks of zeros once `stop` is set (a node
/// stopping must not wait for a whole large segment to be zeroed at idle I/O priority).
/// Returns whether the file was completed; an abandoned one is left for the caller to remove.
pub fn create_prezeroed_unless(
    path: &Path,
    len: u64,
    direct: bool,
    stop: &AtomicBool,
) -> Result<bool> {
    if len == 0 || !len.is_multiple_of(PAGE_BYTES as u64) {
        return Err(HwError::Invalid(format!(
            "segment length {len} not a positive multiple of {PAGE_BYTES}"
        )));
    }
    let f = create_allocated(path, len, direct)?;
    // Whole chunks per step (each a multiple of the page), so O_DIRECT alignment holds.
    let step = (ZERO_CHUNK_BYTES as u64) * ZERO_CHUNKS_PER_STOP_CHECK;
    let mut at = 0;
    while at < len {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        let n = (len - at).min(step);
        write_zeros(&f, at, n)?;
        at += n;
    }
    fdatasync(&f)?;
    Ok(true)
}

/// Chunks of zeros written between checks of a preparer's stop flag.
const ZERO_CHUNKS_PER_STOP_CHECK: u64 = 64;

/// Creates a file of `len` bytes that is only allocated (`fallocate`: unwritten extents, no
/// zeroing), open for reading and writing, with O_DIRECT when `direct`. A durable write into
/// it also commits the conversion of the extents it covers; the file's creation is not synced.
pub fn create_allocated(path: &Path, len: u64, direct: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create_new(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(path).map_err(|e| HwError::io("create segment", e))?;
    fallocate(&f, 0, len)?;
    Ok(f)
}

/// Puts the calling thread's disk I/O in the idle class: the scheduler (mq-deadline, bfq)
/// then serves its writes only when nothing else waits, so pre-zeroing a spare does not queue
/// ahead of the appends' writes and flushes. Best effort: with no I/O scheduler it changes
/// nothing, and a failure is only logged.
fn lower_io_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_IDLE: libc::c_int = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    // SAFETY: ioprio_set takes three integers and no pointers; who = 0 is the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r != 0 {
        tracing::debug!(
            "could not lower the spare preparer's I/O priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// Keeps pre-zeroed spare files of one size ready in a directory, prepared by a background
/// thread, so rolling a segment costs a rename instead of writing a whole file of zeros.
pub struct SpareFiles {
    shared: Arc<SpareShared>,
    thread: Option<JoinHandle<()>>,
}

struct SpareShared {
    dir: PathBuf,
    len: u64,
    direct: bool,
    keep: usize,
    stop: AtomicBool,
    seq: AtomicU64,
    /// Counts spares written full of zeros (by the preparer or inline): the caller's counter.
    zeroed: Arc<AtomicU64>,
    /// Mirrors `SpareState::wanted` for readers without the lock (the caller's gauge).
    pending: Arc<AtomicU64>,
    lock: std::sync::Mutex<SpareState>,
    cv: std::sync::Condvar,
}

struct SpareState {
    ready: Vec<PathBuf>,
    /// Spares the preparer is asked to make: set by `start` and `replenish`, never by `take`.
    wanted: usize,
    last_error: Option<String>,
}

impl std::fmt::Debug for SpareFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpareFiles")
            .field("dir", &self.shared.dir)
            .field("len", &self.shared.len)
            .finish()
    }
}

const SPARE_SUFFIX: &str = ".spare";
const TMP_SUFFIX: &str = ".tmp";

impl SpareFiles {
    /// Starts keeping `keep` (>= 1) spare files of `len` bytes in `dir` (created if missing).
    /// Complete spares left from an earlier run with the right length are reused; partial ones
    /// are deleted.
    /// Every spare it zeroes adds one to `zeroed`; `pending` always holds how many spares it
    /// still has to prepare (0: the pool is full and no zeroing runs).
    pub fn start(
        dir: PathBuf,
        len: u64,
        direct: bool,
        keep: usize,
        zeroed: Arc<AtomicU64>,
        pending: Arc<AtomicU64>,
    ) -> Result<SpareFiles> {
        assert!(keep >= 1);
        create_dir_synced(&dir)?;
        let mut ready = Vec::new();
        let mut seq = 0u64;
        let entries = std::fs::read_dir(&dir).map_err(|e| HwError::io("list spare dir", e))?;
        for e in entries {
            let e = e.map_err(|e| HwError::io("list spare dir", e))?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            if let Some(n) = name
                .strip_suffix(SPARE_SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            {
                seq = seq.max(n + 1);
                if size == len && ready.len() < keep {
                    ready.push(p);
                    continue;
                }
            }
            let _ = std::fs::remove_file(&p);
        }
        let wanted = keep.saturating_sub(ready.len());
        pending.store(wanted as u64, Ordering::Relaxed);
        let shared = Arc::new(SpareShared {
            dir,
            len,
            direct,
            keep,
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(seq),
            zeroed,
            pending,
            lock: std::sync::Mutex::new(SpareState {
                wanted,
                ready,
                last_error: None,
            }),
            cv: std::sync::Condvar::new(),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("chainlog-spare".into())
            .spawn(move || s2.run())
            .map_err(|e| HwError::io("spawn spare preparer", e))?;
        Ok(SpareFiles {
            shared,
            thread: Some(thread),
        })
    }

    /// Length of every spare.
    pub fn len(&self) -> u64 {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    /// A prepared spare (the caller renames it into place), or one made now if none is ready
    /// (slow path: a whole file of zeros is written on the caller's thread). The preparer
    /// does not start the next one until [`SpareFiles::replenish`]: call it once the caller's
    /// rename is durable, so the caller's directory fsync does not wait (under ext4's ordered
    /// mode) for the writeback of a spare being zeroed at that moment.
    pub fn take(&self) -> Result<PathBuf> {
        if let Some(p) = self.try_take() {
            return Ok(p);
        }
        tracing::debug!("no spare segment ready; preparing one inline");
        // Only `Drop` sets the stop flag, and it cannot run while `self` is borrowed.
        self.shared
            .make_one()?
            .ok_or_else(|| HwError::Invalid("spare preparer stopped".into()))
    }

    /// A prepared spare if one is ready (see [`SpareFiles::take`] on replenishing).
    pub fn try_take(&self) -> Option<PathBuf> {
        let mut st = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        st.ready.pop()
    }

    /// Where a file about to be recycled is renamed to (in the spare directory, under a spare's
    /// name). The caller renames it there, makes that rename durable, then hands it over with
    /// [`SpareFiles::add_recycled`]; a crash in between leaves it as a spare that
    /// [`SpareFiles::start`] reuses, which is right: a spare's content never matters, because
    /// a segment's header is rewritten when it is taken and recovery reads only batches that
    /// continue the log (offsets and log id).
    pub fn recycle_path(&self) -> PathBuf {
        let n = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        self.shared.dir.join(format!("{n:020}{SPARE_SUFFIX}"))
    }

    /// Takes a file of the spares' length renamed to [`SpareFiles::recycle_path`] (the rename
    /// durable) as a ready spare, so the next roll needs no zeroing. Keeps at most one more
    /// than the number kept (a spare being zeroed at the moment may arrive too); beyond that,
    /// deletes it. Returns whether it was kept. Call [`SpareFiles::replenish`] afterwards as
    /// usual: it then asks for no new zeroing.
    pub fn add_recycled(&self, path: PathBuf) -> bool {
        let mut st = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        if st.ready.len() > self.shared.keep {
            drop(st);
            let _ = std::fs::remove_file(&path);
            return false;
        }
        st.ready.push(path);
        self.shared.cv.notify_all();
        true
    }

    /// Lets the preparer make spares again up to the number kept.
    pub fn replenish(&self) {
        let mut st = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        st.wanted = self.shared.keep.saturating_sub(st.ready.len());
        self.shared
            .pending
            .store(st.wanted as u64, Ordering::Relaxed);
        self.shared.cv.notify_all();
    }

    /// Blocks until at least one spare is ready or the preparer failed (for tests and start-up).
    pub fn wait_ready(&self) -> Result<()> {
        let mut st = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if !st.ready.is_empty() {
                return Ok(());
            }
            if let Some(e) = &st.last_error {
                return Err(HwError::Invalid(format!("spare preparer failed: {e}")));
            }
            st = self.shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl SpareShared {
    /// A new spare, or `None` if the preparer was stopped while zeroing it.
    fn make_one(&self) -> Result<Option<PathBuf>> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{n:020}{SPARE_SUFFIX}{TMP_SUFFIX}"));
        let done = self.dir.join(format!("{n:020}{SPARE_SUFFIX}"));
        let r =
            create_prezeroed_unless(&tmp, self.len, self.direct, &self.stop).and_then(|complete| {
                complete
                    .then(|| std::fs::rename(&tmp, &done).map(|()| done))
                    .transpose()
                    .map_err(|e| HwError::io("rename spare", e))
            });
        match &r {
            Ok(Some(_)) => {
                self.zeroed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) | Err(_) => {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        r
    }

    fn run(&self) {
        lower_io_priority();
        loop {
            {
                let mut st = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                while !self.stop.load(Ordering::Acquire) && st.wanted == 0 {
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
            }
            match self.make_one() {
                Ok(None) => return,
                Ok(Some(p)) => {
                    let mut st = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    st.ready.push(p);
                    st.wanted = st.wanted.saturating_sub(1);
                    self.pending.store(st.wanted as u64, Ordering::Relaxed);
                    st.last_error = None;
                    self.cv.notify_all();
                }
                Err(_) if self.stop.load(Ordering::Acquire) => return,
                Err(e) => {
                    tracing::warn!("preparing a spare segment failed: {e}");
                    let mut st = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    st.last_error = Some(e.to_string());
                    self.cv.notify_all();
                    // Back off so a full disk does not spin this thread; `take` still works
                    // inline and reports the error to its caller.
                    let (st, _) = self
                        .cv
                        .wait_timeout(st, std::time::Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
                    drop(st);
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for SpareFiles {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _st = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_reports_the_filesystem_and_refuses_a_missing_path() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            free_bytes(d.path()).unwrap() > 0,
            "a temp dir's filesystem has room"
        );
        assert!(free_bytes(&d.path().join("missing")).is_err());
    }

    #[test]
    fn create_dir_synced_makes_missing_parents_and_takes_what_exists() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a").join("b").join("c");
        create_dir_synced(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_synced(&deep).unwrap();
        // A file in the way is an error, not a directory.
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(create_dir_synced(&f.join("under")).is_err());
        assert!(create_dir_synced(&f).is_err());
    }

    #[test]
    fn prezeroed_file_is_allocated_and_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.seg");
        create_prezeroed(&p, 64 * 1024, false).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 64 * 1024);
        assert!(data.iter().all(|&b| b == 0));
        assert!(
            create_prezeroed(&p, 4096, false).is_err(),
            "must not overwrite"
        );
        assert!(create_prezeroed(&dir.path().join("b"), 100, false).is_err());
    }

    /// A stopping preparer leaves a large spare half done instead of zeroing all of it.
    #[test]
    fn prezeroing_gives_up_once_told_to_stop() {
        let dir = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(true);
        let len = 256 << 20;
        let p = dir.path().join("big.spare");
        assert!(!create_prezeroed_unless(&p, len, false, &stop).unwrap());
        // Left allocated at its length for the caller to remove.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
        stop.store(false, Ordering::Release);
        let q = dir.path().join("small.spare");
        assert!(create_prezeroed_unless(&q, 1 << 20, false, &stop).unwrap());
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("LOCK");
        let a = lock_exclusive(&p).unwrap();
        assert!(lock_exclusive(&p).is_err());
        drop(a);
        assert!(lock_exclusive(&p).is_ok());
    }

    #[test]
    fn spares_are_kept_ready_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("spare");
        let pending = Arc::new(AtomicU64::new(0));
        let s =
            SpareFiles::start(sd.clone(), 8192, false, 1, Arc::default(), pending.clone()).unwrap();
        s.wait_ready().unwrap();
        // The gauge drops to 0 under the same lock that publishes the spare.
        assert_eq!(pending.load(Ordering::Relaxed), 0);
        let a = s.take().unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 8192);
        std::fs::rename(&a, dir.path().join("used")).unwrap();
        // The next one is made only when asked for.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(s.try_take().is_none());
        assert_eq!(pending.load(Ordering::Relaxed), 0);
        s.replenish();
        s.wait_ready().unwrap();
        assert_eq!(pending.load(Ordering::Relaxed), 0);
        drop(s);
        // Starting with none ready asks for one: the gauge says so until it is made.
        std::fs::remove_dir_all(&sd).unwrap();
        let s =
            SpareFiles::start(sd.clone(), 8192, false, 1, Arc::default(), pending.clone()).unwrap();
        let seen = pending.load(Ordering::Relaxed);
        s.wait_ready().unwrap();
        assert!(seen <= 1);
        assert_eq!(pending.load(Ordering::Relaxed), 0);
        drop(s);
        // The prepared spare survives a restart and is reused.
        let s =
            SpareFiles::start(sd.clone(), 8192, false, 1, Arc::default(), Arc::default()).unwrap();
        assert!(s.try_take().is_some());
    }
}
