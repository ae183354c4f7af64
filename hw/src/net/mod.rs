//! Message transports: whole frames in and out over a byte stream (TCP today); the seam RDMA fills.
//!
//! The replica core speaks in messages (`chainlog_core::wire`); a transport's only job is to move
//! whole frames without copying payload bytes. A received frame body is a `Bytes` slice of the
//! buffer the socket read into (no copy), and a sent frame's batch chunks go to the kernel with
//! one vectored write straight from the buffers they were received or stored in. An RDMA
//! transport implements the same two traits over registered memory.

pub mod tcp;

use bytes::Bytes;
use chainlog_core::wire::{Encoded, FrameHeader};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

/// One received frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub header: FrameHeader,
    /// The body; for a split peer frame (see `tcp::BodyPolicy::split_peer_batches`) only the
    /// fixed part before the batches.
    pub body: Bytes,
    /// The batches of a split peer frame, each in a buffer of its own; empty otherwise.
    pub batches: Vec<Bytes>,
}

/// Errors of a transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    BadFrame(#[from] chainlog_core::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Receives whole frames, in order.
pub trait FrameRecv: Send {
    /// The next frame; `Ok(None)` on a clean close between frames.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Frame>, NetError>> + Send;
}

/// Sends whole frames, in order. `send` returns once the bytes are handed to the transport.
pub trait FrameSend: Send {
    fn send(&mut self, frames: &[Encoded]) -> impl Future<Output = Result<(), NetError>> + Send;
}

/// Process-wide count of payload bytes a transport had to copy in user space (the zero-copy
/// claim is checked against this; it stays 0 unless a frame outgrows its receive buffer).
static COPY_BYTES: AtomicU64 = AtomicU64::new(0);

pub fn copy_bytes_total() -> u64 {
    COPY_BYTES.load(Ordering::Relaxed)
}

pub(crate) fn count_copy(n: usize) {
    COPY_BYTES.fetch_add(n as u64, Ordering::Relaxed);
}
