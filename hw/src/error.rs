//! The hw crate's one error type: every fallible operation here returns [`HwError`].

use std::io;
use thiserror::Error;

/// Errors of the hardware layer (buffers, io_uring, files, probes).
#[derive(Debug, Error)]
pub enum HwError {
    /// A system call or an io_uring operation failed; `op` names what we were doing.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// io_uring cannot be used here; the message says why and how to fix it.
    #[error("io_uring unavailable: {0}")]
    UringUnavailable(String),
    /// The buffer pool reached its outstanding-bytes bound; the caller must wait for buffers
    /// to come back (backpressure) instead of allocating more.
    #[error("buffer pool exhausted: {wanted} bytes wanted, {outstanding} of {limit} bytes out")]
    PoolExhausted {
        wanted: usize,
        outstanding: usize,
        limit: usize,
    },
    /// A request outside what the layer supports (size, alignment, queue depth).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The ring's submission queue is full even after submitting; too many operations queued.
    #[error("io_uring submission queue full ({0} entries)")]
    QueueFull(u32),
}

impl HwError {
    /// Wraps an `io::Error` with the name of the operation that failed.
    pub fn io(op: &'static str, source: io::Error) -> HwError {
        HwError::Io { op, source }
    }

    /// The OS error number, if this is an OS error (e.g. `libc::ENOSPC`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            HwError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T, E = HwError> = std::result::Result<T, E>;
