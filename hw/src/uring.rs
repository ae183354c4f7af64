//! The io_uring owner: one thread owns a [`Ring`], pushes operations that take ownership of their
//! buffers and files, and gets them back with the completion, so nothing the kernel still reads
//! or writes is ever freed early. A [`RingWaker`] lets other threads wake the owner's wait.

use crate::buf::AlignedBuf;
use crate::error::{HwError, Result};
use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// Most buffers in one vectored write (Linux `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;
/// Smallest ring we build: a chain of writes plus its sync, plus the waker's read.
pub const RING_ENTRIES_MIN: u32 = 8;
/// Largest ring we build; in-flight operations are bounded by the ring size.
pub const RING_ENTRIES_MAX: u32 = 4096;

/// An operation and the resources it owns until completion.
#[derive(Debug)]
pub enum Op {
    /// Writes `bufs` back to back starting at `offset` (at most [`IOV_MAX`] buffers); with
    /// `dsync` as `RWF_DSYNC` (durable, device cache flushed, when it completes).
    Writev {
        file: Arc<File>,
        offset: u64,
        bufs: Vec<Bytes>,
        dsync: bool,
    },
    /// Writes `buf.as_slice()` at `offset`; with `dsync` as `RWF_DSYNC`.
    Write {
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
        dsync: bool,
    },
    /// Reads up to `len` bytes at `offset` into the start of `buf`; the completion's buffer has
    /// `len()` set to the bytes read.
    Read {
        file: Arc<File>,
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
    /// `fdatasync` (or `fsync` when `datasync` is false).
    Sync { file: Arc<File>, datasync: bool },
    /// `fallocate(mode, offset, len)`.
    Fallocate {
        file: Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

impl Op {
    /// Bytes this operation transfers when it fully succeeds.
    pub fn expected_len(&self) -> usize {
        match self {
            Op::Writev { bufs, .. } => bufs.iter().map(|b| b.len()).sum(),
            Op::Write { buf, .. } => buf.len(),
            Op::Read { len, .. } => *len,
            Op::Sync { .. } | Op::Fallocate { .. } => 0,
        }
    }
}

/// A finished operation: the caller's tag, the kernel's result (bytes for reads and writes),
/// and the operation with its buffers handed back.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: io::Result<usize>,
    pub op: Op,
}

// Held only to keep the array alive while the kernel reads it.
struct IoVecs(#[allow(dead_code)] Vec<libc::iovec>);
// SAFETY: the iovecs point into `Bytes` held by the same slot; they are plain addresses that
// are only dereferenced by the kernel while the slot (and so the Bytes) is alive.
unsafe impl Send for IoVecs {}

struct Slot {
    tag: u64,
    op: Op,
    _iovecs: Option<IoVecs>,
}

const WAKE_USER_DATA: u64 = u64::MAX;

struct Wake {
    efd: Arc<File>,
    buf: Box<[u8; 8]>,
    armed: bool,
}

/// Wakes the ring owner out of [`Ring::wait`] (after, e.g., queuing a command for it).
#[derive(Clone, Debug)]
pub struct RingWaker {
    efd: Arc<File>,
}

impl RingWaker {
    pub fn wake(&self) {
        // An eventfd write only fails if the counter would overflow, which means a wake is
        // already pending: ignoring the error loses nothing.
        let _ = (&*self.efd).write(&1u64.to_ne_bytes());
    }
}

/// An io_uring instance owned by one thread.
pub struct Ring {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    wake: Option<Wake>,
    closing: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight())
            .field("capacity", &self.slots.len())
            .finish()
    }
}

impl Ring {
    /// A ring with `entries` submission slots (clamped to the supported range); one slot is
    /// kept for the waker, the rest bound the operations in flight.
    pub fn new(entries: u32) -> Result<Ring> {
        let entries = entries.clamp(RING_ENTRIES_MIN, RING_ENTRIES_MAX);
        let ring = IoUring::new(entries).map_err(|e| {
            HwError::UringUnavailable(format!(
                "io_uring_setup({entries}) failed: {e} (check kernel.io_uring_disabled=0, \
                 seccomp/container policy, and RLIMIT_MEMLOCK)"
            ))
        })?;
        let cap = entries as usize - 1;
        Ok(Ring {
            ring,
            slots: (0..cap).map(|_| None).collect(),
            free_slots: (0..cap).rev().collect(),
            wake: None,
            closing: false,
        })
    }

    /// A waker for this ring (the eventfd is created and armed on first use).
    pub fn waker(&mut self) -> Result<RingWaker> {
        if self.wake.is_none() {
            // SAFETY: eventfd has no memory arguments; the result is checked before use.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(HwError::io("eventfd", io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            self.wake = Some(Wake {
                efd: Arc::new(File::from(owned)),
                buf: Box::new([0; 8]),
                armed: false,
            });
            self.arm_wake()?;
        }
        let Some(w) = &self.wake else {
            unreachable!("waker created above")
        };
        Ok(RingWaker { efd: w.efd.clone() })
    }

    /// Makes the kernel signal a new eventfd each time it posts a completion, so an event loop
    /// (epoll, tokio's `AsyncFd`) can wait for this ring alongside its sockets instead of a
    /// thread sleeping in [`Ring::wait`]. The eventfd is non-blocking: read it (to reset it)
    /// before reaping with [`Ring::complete`], so a completion posted after the reap signals
    /// it again.
    pub fn completion_eventfd(&mut self) -> Result<File> {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(HwError::io("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // The kernel takes its own reference to the eventfd: the caller may close its copy.
        self.ring
            .submitter()
            .register_eventfd(file.as_raw_fd())
            .map_err(|e| HwError::io("io_uring_register(EVENTFD)", e))?;
        Ok(file)
    }

    fn arm_wake(&mut self) -> Result<()> {
        let Some(w) = &mut self.wake else {
            return Ok(());
        };
        if w.armed || self.closing {
            return Ok(());
        }
        let e = opcode::Read::new(types::Fd(w.efd.as_raw_fd()), w.buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: the 8-byte buffer is boxed inside `self.wake`, which lives until the read
        // completes (Drop waits for it), and the eventfd is kept open by the same struct.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            return Err(HwError::QueueFull(self.ring.params().sq_entries()));
        }
        w.armed = true;
        Ok(())
    }

    /// Operations pushed and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Whether `n` more operations can be pushed now.
    pub fn has_room(&self, n: usize) -> bool {
        self.free_slots.len() >= n
    }

    /// Most operations that can ever be in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Pushes `ops` as one chain: each runs only after the previous one fully succeeded
    /// (`IOSQE_IO_LINK`); after a failure or a short transfer the rest complete with
    /// `ECANCELED`. Every op comes back in a [`Completion`] with its tag. Needs
    /// `has_room(ops.len())`.
    pub fn push_chain(&mut self, ops: Vec<(u64, Op)>) -> Result<()> {
        if !self.has_room(ops.len()) {
            return Err(HwError::QueueFull(self.slots.len() as u32));
        }
        let n = ops.len();
        for (i, (tag, op)) in ops.into_iter().enumerate() {
            self.push_one(tag, op, i + 1 < n)?;
        }
        Ok(())
    }

    /// Pushes one independent operation.
    pub fn push(&mut self, tag: u64, op: Op) -> Result<()> {
        self.push_chain(vec![(tag, op)])
    }

    fn push_one(&mut self, tag: u64, mut op: Op, link: bool) -> Result<()> {
        if self.free_slots.is_empty() {
            return Err(HwError::QueueFull(self.slots.len() as u32));
        }
        // The slot is taken only once the entry is built: an operation refused below must not
        // leak it (in-flight would never reach zero, and the drop would wait for ever).
        let mut iovecs = None;
        let entry = match &mut op {
            Op::Writev {
                file,
                offset,
                bufs,
                dsync,
            } => {
                if bufs.len() > IOV_MAX {
                    return Err(HwError::Invalid(format!(
                        "writev of {} buffers",
                        bufs.len()
                    )));
                }
                let v: Vec<libc::iovec> = bufs
                    .iter()
                    .map(|b| libc::iovec {
                        iov_base: b.as_ptr() as *mut libc::c_void,
                        iov_len: b.len(),
                    })
                    .collect();
                let e =
                    opcode::Writev::new(types::Fd(file.as_raw_fd()), v.as_ptr(), v.len() as u32)
                        .offset(*offset)
                        .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                        .build();
                iovecs = Some(IoVecs(v));
                e
            }
            Op::Write {
                file,
                offset,
                buf,
                dsync,
            } => {
                let len = u32::try_from(buf.len())
                    .map_err(|_| HwError::Invalid(format!("write of {} bytes", buf.len())))?;
                opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), len)
                    .offset(*offset)
                    .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Op::Read {
                file,
                offset,
                len,
                buf,
            } => {
                assert!(*len <= buf.capacity(), "read past buffer capacity");
                let n = u32::try_from(*len)
                    .map_err(|_| HwError::Invalid(format!("read of {len} bytes")))?;
                opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), n)
                    .offset(*offset)
                    .build()
            }
            Op::Sync { file, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(flags)
                    .build()
            }
            Op::Fallocate {
                file,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        };
        let Some(idx) = self.free_slots.pop() else {
            return Err(HwError::QueueFull(self.slots.len() as u32));
        };
        let entry = entry.user_data(idx as u64).flags(if link {
            squeue::Flags::IO_LINK
        } else {
            squeue::Flags::empty()
        });
        // SAFETY: every pointer in `entry` (iovec array, the buffers it names, the read/write
        // buffer, the file descriptor) is owned by the slot stored just below, and a slot is
        // only released when its completion has been reaped (see `complete` and `Drop`).
        // Slots are one fewer than SQ entries, so the queue cannot be full here.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Not yet visible to the kernel: releasing the slot is safe.
            self.free_slots.push(idx);
            return Err(HwError::QueueFull(self.slots.len() as u32));
        }
        self.slots[idx] = Some(Slot {
            tag,
            op,
            _iovecs: iovecs,
        });
        Ok(())
    }

    /// Submits pushed operations without waiting.
    pub fn submit(&mut self) -> Result<usize> {
        self.ring
            .submit()
            .map_err(|e| HwError::io("io_uring_enter", e))
    }

    /// Submits pushed operations and waits until at least one completion is ready, a waker
    /// fires, or `timeout` passes (`None`: no timeout; then something must be in flight or a
    /// waker must exist, else this would sleep forever).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.arm_wake()?;
        if !self.ring.completion().is_empty() {
            self.submit()?;
            return Ok(());
        }
        let r = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => {
                assert!(
                    self.in_flight() > 0 || self.wake.is_some(),
                    "wait with nothing in flight and no waker would never return"
                );
                self.ring.submit_and_wait(1)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(HwError::io("io_uring_enter", e)),
        }
    }

    /// Moves every ready completion into `out` (the waker's own reads are handled here).
    pub fn complete(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let mut rearm = false;
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == WAKE_USER_DATA {
                if let Some(w) = &mut self.wake {
                    w.armed = false;
                }
                rearm = true;
                continue;
            }
            let idx = ud as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
                panic!("io_uring completion for unknown slot {idx}");
            };
            self.free_slots.push(idx);
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            let mut op = slot.op;
            if let (Op::Read { buf, .. }, Ok(n)) = (&mut op, &result) {
                buf.set_len(*n);
            }
            out.push(Completion {
                tag: slot.tag,
                result,
                op,
            });
        }
        if rearm {
            self.arm_wake()?;
        }
        Ok(())
    }

    /// Pushes, submits and waits for one chain; returns its completions in push order.
    /// For start-up and maintenance paths that are allowed to block.
    pub fn run_chain(&mut self, ops: Vec<(u64, Op)>) -> Result<Vec<Completion>> {
        assert_eq!(self.in_flight(), 0, "run_chain needs an idle ring");
        let n = ops.len();
        let mut tags = Vec::with_capacity(n);
        let mut indexed = Vec::with_capacity(n);
        for (i, (tag, op)) in ops.into_iter().enumerate() {
            tags.push(tag);
            indexed.push((i as u64, op));
        }
        self.push_chain(indexed)?;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            self.wait(None)?;
            self.complete(&mut out)?;
        }
        out.sort_by_key(|c| c.tag);
        for c in &mut out {
            c.tag = tags[c.tag as usize];
        }
        Ok(out)
    }
}

/// A ring's completion eventfd ([`Ring::completion_eventfd`]) registered with the tokio
/// reactor, for a ring owned by an event loop rather than by a thread of its own.
#[derive(Debug)]
pub struct CompletionSignal {
    fd: tokio::io::unix::AsyncFd<File>,
}

impl CompletionSignal {
    /// Registers `efd` with the current tokio runtime (call from inside it).
    pub fn new(efd: File) -> Result<CompletionSignal> {
        // SAFETY: the `File` owns an open eventfd; the `AsyncFd` owns the `File`, so the
        // descriptor stays open and unchanged until the registration is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| HwError::io("register eventfd with the reactor", e.into()))?;
        Ok(CompletionSignal { fd })
    }

    /// Waits until the ring has posted a completion since the last call, and resets the
    /// eventfd, so that one posted after the caller's next reap fires it again.
    pub async fn wait(&self) -> Result<()> {
        let mut ready = self
            .fd
            .readable()
            .await
            .map_err(|e| HwError::io("wait for ring completions", e))?;
        // Non-blocking read of the eventfd counter; WouldBlock only means another reset got
        // there first.
        let _ = (&mut ready.get_inner()).read(&mut [0u8; 8]);
        ready.clear_ready();
        Ok(())
    }
}

impl Ring {
    /// The drain cannot tell when the kernel is done with what is in flight: leak those
    /// buffers (and the waker's) rather than free them under an operation.
    fn leak_in_flight(&mut self, e: &dyn std::fmt::Display) {
        tracing::error!("io_uring drain failed ({e}); leaking in-flight buffers");
        std::mem::forget(std::mem::take(&mut self.slots));
        if let Some(w) = self.wake.take() {
            std::mem::forget(w);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.closing = true;
        if let Some(w) = &self.wake {
            if w.armed {
                let _ = (&*w.efd).write(&1u64.to_ne_bytes());
            }
        }
        // Buffers may only be freed once the kernel is done with them: wait for everything.
        let mut sink = Vec::new();
        while self.in_flight() > 0 || self.wake.as_ref().is_some_and(|w| w.armed) {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.leak_in_flight(&e);
                return;
            }
            if let Err(e) = self.complete(&mut sink) {
                self.leak_in_flight(&e);
                return;
            }
            sink.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// An operation the ring refuses takes no slot: every slot stays usable, nothing counts
    /// as in flight, and the ring drops without waiting for a completion that cannot come.
    #[test]
    fn a_refused_operation_takes_no_slot() {
        let mut ring = match Ring::new(4) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(std::fs::File::create(dir.path().join("f")).unwrap());
        let slots = ring.capacity();
        for _ in 0..slots + 2 {
            let too_many = Op::Writev {
                file: f.clone(),
                offset: 0,
                bufs: vec![Bytes::from_static(b"x"); IOV_MAX + 1],
                dsync: false,
            };
            assert!(matches!(ring.push(1, too_many), Err(HwError::Invalid(_))));
        }
        assert_eq!(ring.in_flight(), 0);
        let done = ring
            .run_chain(vec![(
                2,
                Op::Sync {
                    file: f.clone(),
                    datasync: true,
                },
            )])
            .unwrap();
        assert!(done[0].result.is_ok());
        drop(ring);
    }

    #[test]
    fn write_sync_read_round_trip() {
        let mut ring = match Ring::new(16) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        let a = Bytes::from_static(b"hello ");
        let b = Bytes::from_static(b"world");
        let done = ring
            .run_chain(vec![
                (
                    1,
                    Op::Fallocate {
                        file: f.clone(),
                        mode: 0,
                        offset: 0,
                        len: 4096,
                    },
                ),
                (
                    2,
                    Op::Writev {
                        file: f.clone(),
                        offset: 10,
                        bufs: vec![a, b],
                        dsync: false,
                    },
                ),
                (
                    3,
                    Op::Sync {
                        file: f.clone(),
                        datasync: true,
                    },
                ),
            ])
            .unwrap();
        assert_eq!(done.len(), 3);
        for c in &done {
            assert!(c.result.is_ok(), "{c:?}");
        }
        let mut got = [0u8; 11];
        f.read_at(&mut got, 10).unwrap();
        assert_eq!(&got, b"hello world");

        let buf = AlignedBuf::new_unpooled(4096);
        let done = ring
            .run_chain(vec![(
                9,
                Op::Read {
                    file: f.clone(),
                    offset: 0,
                    len: 4096,
                    buf,
                },
            )])
            .unwrap();
        let Op::Read { buf, .. } = &done[0].op else {
            panic!("not a read")
        };
        assert_eq!(buf.len(), 4096);
        assert_eq!(&buf.as_slice()[10..21], b"hello world");
    }

    #[test]
    fn waker_interrupts_wait() {
        let mut ring = match Ring::new(8) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let w = ring.waker().unwrap();
        let t = std::thread::spawn(move || w.wake());
        ring.wait(None).unwrap();
        let mut out = Vec::new();
        ring.complete(&mut out).unwrap();
        assert!(out.is_empty());
        t.join().unwrap();
        ring.wait(Some(Duration::from_millis(1))).unwrap();
    }

    #[test]
    fn failed_link_cancels_rest() {
        let mut ring = match Ring::new(8) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        // Read-only file: the write fails with EBADF and the linked sync is cancelled.
        std::fs::write(dir.path().join("ro"), b"x").unwrap();
        let f = Arc::new(std::fs::File::open(dir.path().join("ro")).unwrap());
        let done = ring
            .run_chain(vec![
                (
                    1,
                    Op::Writev {
                        file: f.clone(),
                        offset: 0,
                        bufs: vec![Bytes::from_static(b"abc")],
                        dsync: false,
                    },
                ),
                (
                    2,
                    Op::Sync {
                        file: f,
                        datasync: true,
                    },
                ),
            ])
            .unwrap();
        assert!(done[0].result.is_err());
        assert_eq!(
            done[1].result.as_ref().unwrap_err().raw_os_error(),
            Some(libc::ECANCELED)
        );
    }
}
