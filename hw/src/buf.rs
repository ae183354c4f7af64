//! Page-aligned buffer pool shared by disk (O_DIRECT) and network reads: size classes, bounded
//! free lists, an outstanding-bytes bound, and zero-copy conversion into `bytes::Bytes`.
//!
//! A buffer's memory is always initialised (allocated zeroed), so handing out the whole capacity
//! as `&mut [u8]` is sound; reused buffers may hold old bytes past `len`, which is why freezing
//! zeroes the padding up to the next page boundary (that padding goes to disk in O_DIRECT mode).

use crate::error::{HwError, Result};
use bytes::Bytes;
use chainlog_core::limits::{
    DISK_ALIGN_BYTES, FRAME_BODY_BYTES_MAX, PIPELINE_BYTES_DEFAULT, READ_BYTES_MAX,
};
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment and granularity of every buffer: one page, which is also the O_DIRECT block.
pub const PAGE_BYTES: usize = DISK_ALIGN_BYTES;

/// Rounds `n` up to a whole number of pages.
pub const fn round_up_page(n: usize) -> usize {
    n.div_ceil(PAGE_BYTES) * PAGE_BYTES
}

/// Whether `b` may be handed to an O_DIRECT write as is: page-aligned address and length.
pub fn is_page_aligned(b: &[u8]) -> bool {
    (b.as_ptr() as usize).is_multiple_of(PAGE_BYTES) && b.len().is_multiple_of(PAGE_BYTES)
}

/// Capacities of the size classes, smallest first.
pub const CLASS_BYTES: [usize; 4] = [
    // Small frames (requests, acks) and single-page disk headers.
    4 << 10,
    // Typical batches of a few KiB..64 KiB.
    64 << 10,
    // Group-commit copy buffers and larger batches.
    1 << 20,
    // The largest frame body (one max batch plus envelope), so every frame fits one buffer.
    round_up_page(FRAME_BODY_BYTES_MAX),
];

/// Bounds of a pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most buffers kept on each class's free list; more are freed back to the allocator.
    pub free_max: [usize; CLASS_BYTES.len()],
    /// Most bytes (capacity) handed out and not yet returned, across all classes.
    pub outstanding_bytes_max: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            free_max: [
                // One page per in-flight small request of a few hundred connections.
                1024,
                // 16 MiB of mid-size buffers: half a default pipeline window.
                (PIPELINE_BYTES_DEFAULT / 2) / (64 << 10),
                // 32 MiB of 1 MiB buffers: one pipeline window of copies.
                PIPELINE_BYTES_DEFAULT / (1 << 20),
                // A handful of max-size frames: receiving, writing and forwarding one each, plus slack.
                4,
            ],
            outstanding_bytes_max:
                // A full pipeline window in flight to the successor for a few busy logs ...
                4 * PIPELINE_BYTES_DEFAULT
                // ... plus one max-size read reply being assembled ...
                + READ_BYTES_MAX
                // ... plus two max-size frames being received while the window is full.
                + 2 * round_up_page(FRAME_BODY_BYTES_MAX),
        }
    }
}

struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a RawBuf is exclusively owned memory (no aliasing pointer exists while it sits on a
// free list), so moving it to another thread is sound.
unsafe impl Send for RawBuf {}

impl RawBuf {
    fn alloc_zeroed(cap: usize) -> RawBuf {
        assert!(cap > 0 && cap.is_multiple_of(PAGE_BYTES));
        let layout = layout_for(cap);
        // SAFETY: `layout` has non-zero size (asserted above) and a power-of-two alignment.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            alloc::handle_alloc_error(layout)
        };
        RawBuf { ptr, cap }
    }

    fn free(self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once,
        // because `free` consumes the only owner.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout_for(self.cap)) }
    }
}

fn layout_for(cap: usize) -> Layout {
    match Layout::from_size_align(cap, PAGE_BYTES) {
        Ok(l) => l,
        Err(e) => panic!("buffer layout {cap} bytes: {e}"),
    }
}

struct PoolShared {
    cfg: PoolConfig,
    free: [Mutex<Vec<RawBuf>>; CLASS_BYTES.len()],
    outstanding_bytes: AtomicUsize,
    allocated_total: AtomicUsize,
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        for list in &self.free {
            let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
            for b in l.drain(..) {
                b.free();
            }
        }
    }
}

/// A pool of page-aligned buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("outstanding_bytes", &self.outstanding_bytes())
            .finish()
    }
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool::new(PoolConfig::default())
    }
}

impl BufPool {
    pub fn new(cfg: PoolConfig) -> BufPool {
        assert!(cfg.outstanding_bytes_max >= CLASS_BYTES[CLASS_BYTES.len() - 1]);
        BufPool {
            shared: Arc::new(PoolShared {
                cfg,
                free: Default::default(),
                outstanding_bytes: AtomicUsize::new(0),
                allocated_total: AtomicUsize::new(0),
            }),
        }
    }

    /// A buffer with capacity at least `min_bytes` (and `len` 0). Fails with `PoolExhausted`
    /// when the outstanding bound would be passed, `Invalid` above the largest class.
    pub fn get(&self, min_bytes: usize) -> Result<AlignedBuf> {
        let Some(class) = CLASS_BYTES.iter().position(|&c| c >= min_bytes.max(1)) else {
            return Err(HwError::Invalid(format!(
                "buffer of {min_bytes} bytes exceeds the largest class ({} bytes)",
                CLASS_BYTES[CLASS_BYTES.len() - 1]
            )));
        };
        let cap = CLASS_BYTES[class];
        let limit = self.shared.cfg.outstanding_bytes_max;
        let prev = self
            .shared
            .outstanding_bytes
            .fetch_add(cap, Ordering::AcqRel);
        if prev + cap > limit {
            self.shared
                .outstanding_bytes
                .fetch_sub(cap, Ordering::AcqRel);
            return Err(HwError::PoolExhausted {
                wanted: cap,
                outstanding: prev,
                limit,
            });
        }
        let reused = self.shared.free[class]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let raw = match reused {
            Some(r) => r,
            None => {
                self.shared
                    .allocated_total
                    .fetch_add(cap, Ordering::Relaxed);
                RawBuf::alloc_zeroed(cap)
            }
        };
        Ok(AlignedBuf {
            raw: Some(raw),
            len: 0,
            class: Some(class),
            pool: Some(self.shared.clone()),
        })
    }

    /// Bytes handed out and not yet returned.
    pub fn outstanding_bytes(&self) -> usize {
        self.shared.outstanding_bytes.load(Ordering::Acquire)
    }

    /// Bytes ever allocated from the system allocator (reuse keeps this flat).
    pub fn allocated_bytes_total(&self) -> usize {
        self.shared.allocated_total.load(Ordering::Relaxed)
    }
}

/// A page-aligned buffer: capacity a multiple of [`PAGE_BYTES`], `len` bytes valid.
/// Returned to its pool (if any) on drop.
pub struct AlignedBuf {
    // `None` only during drop.
    raw: Option<RawBuf>,
    len: usize,
    class: Option<usize>,
    pool: Option<Arc<PoolShared>>,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl AlignedBuf {
    /// A zeroed buffer outside any pool (start-up scratch, probes, benchmarks).
    pub fn new_unpooled(min_bytes: usize) -> AlignedBuf {
        AlignedBuf {
            raw: Some(RawBuf::alloc_zeroed(round_up_page(min_bytes.max(1)))),
            len: 0,
            class: None,
            pool: None,
        }
    }

    fn raw(&self) -> &RawBuf {
        match &self.raw {
            Some(r) => r,
            None => unreachable!("AlignedBuf used after drop"),
        }
    }

    pub fn capacity(&self) -> usize {
        self.raw().cap
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` rounded up to whole pages: what an O_DIRECT write of this buffer covers.
    pub fn padded_len(&self) -> usize {
        round_up_page(self.len)
    }

    /// Marks the first `len` bytes valid (after filling them through [`Self::as_mut_slice`]).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "set_len {len} past capacity");
        self.len = len;
    }

    /// The valid bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.full()[..self.len]
    }

    /// The whole capacity, for filling in place (socket reads, disk reads); then `set_len`.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let r = self.raw();
        // SAFETY: `ptr` points to `cap` initialised bytes (allocated zeroed; written since
        // only through safe slices or by the kernel, whose writes leave them initialised)
        // exclusively owned by `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(r.ptr.as_ptr(), r.cap) }
    }

    fn full(&self) -> &[u8] {
        let r = self.raw();
        // SAFETY: as in `as_mut_slice`; shared borrow of `self` means no mutable alias exists.
        unsafe { std::slice::from_raw_parts(r.ptr.as_ptr(), r.cap) }
    }

    /// Appends bytes (a counted copy in the caller's books). Panics past capacity.
    pub fn extend_from_slice(&mut self, b: &[u8]) {
        let at = self.len;
        assert!(at + b.len() <= self.capacity(), "extend past capacity");
        self.as_mut_slice()[at..at + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// Zeroes `[len, padded_len)` so a page-granular write never carries stale bytes.
    pub fn zero_padding(&mut self) {
        let (a, b) = (self.len, self.padded_len());
        self.as_mut_slice()[a..b].fill(0);
    }

    /// Raw pointer for an I/O operation that owns this buffer until completion.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.raw().ptr.as_ptr()
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw().ptr.as_ptr()
    }

    /// Zero-copy conversion: exactly the `len` valid bytes (padding zeroed behind them, so the
    /// memory under the `Bytes` is page-aligned and zero-padded to a page).
    pub fn into_bytes(mut self) -> Bytes {
        self.zero_padding();
        let visible = self.len;
        Bytes::from_owner(Frozen { buf: self, visible })
    }

    /// Zero-copy conversion including the zeroed padding up to the next page: the form an
    /// O_DIRECT write takes without copying.
    pub fn into_padded_bytes(mut self) -> Bytes {
        self.zero_padding();
        let visible = self.padded_len();
        Bytes::from_owner(Frozen { buf: self, visible })
    }
}

// SAFETY: AlignedBuf exclusively owns its memory; `&AlignedBuf` only gives shared reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`; no interior mutability is reachable through `&AlignedBuf`.
unsafe impl Sync for AlignedBuf {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let Some(raw) = self.raw.take() else { return };
        let (Some(pool), Some(class)) = (self.pool.take(), self.class) else {
            raw.free();
            return;
        };
        let cap = raw.cap;
        {
            let mut list = pool.free[class].lock().unwrap_or_else(|e| e.into_inner());
            if list.len() < pool.cfg.free_max[class] {
                list.push(raw);
            } else {
                drop(list);
                raw.free();
            }
        }
        pool.outstanding_bytes.fetch_sub(cap, Ordering::AcqRel);
    }
}

/// The owner behind a `Bytes` made from an `AlignedBuf`.
struct Frozen {
    buf: AlignedBuf,
    visible: usize,
}

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        &self.buf.full()[..self.visible]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zero_padded() {
        let pool = BufPool::default();
        let mut b = pool.get(100).unwrap();
        assert_eq!(b.capacity(), 4096);
        assert_eq!(b.as_ptr() as usize % PAGE_BYTES, 0);
        b.as_mut_slice().fill(0xAB);
        b.set_len(10);
        let bytes = b.into_padded_bytes();
        assert_eq!(bytes.len(), 4096);
        assert!(is_page_aligned(&bytes));
        assert!(bytes[..10].iter().all(|&x| x == 0xAB));
        assert!(bytes[10..].iter().all(|&x| x == 0));
    }

    #[test]
    fn returns_to_pool_and_reuses() {
        let pool = BufPool::default();
        let mut b = pool.get(70_000).unwrap();
        assert_eq!(b.capacity(), 1 << 20);
        b.set_len(70_000);
        let p = b.as_ptr();
        let bytes = b.into_bytes();
        assert_eq!(pool.outstanding_bytes(), 1 << 20);
        let clone = bytes.slice(1..2);
        drop(bytes);
        assert_eq!(
            pool.outstanding_bytes(),
            1 << 20,
            "a slice keeps the buffer out"
        );
        drop(clone);
        assert_eq!(pool.outstanding_bytes(), 0);
        let again = pool.get(1 << 20).unwrap();
        assert_eq!(again.as_ptr(), p, "buffer reused from the free list");
        assert_eq!(pool.allocated_bytes_total(), 1 << 20);
    }

    #[test]
    fn bounded() {
        let pool = BufPool::new(PoolConfig {
            free_max: [1; 4],
            outstanding_bytes_max: CLASS_BYTES[3],
        });
        let a = pool.get(CLASS_BYTES[3]).unwrap();
        assert!(matches!(pool.get(1), Err(HwError::PoolExhausted { .. })));
        drop(a);
        assert!(pool.get(1).is_ok());
        assert!(matches!(
            pool.get(CLASS_BYTES[3] + 1),
            Err(HwError::Invalid(_))
        ));
    }
}
