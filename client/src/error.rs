//! The client's typed errors: what went wrong, and whether retrying the same request can help.

use chainlog_core::{ClusterId, ErrorCode};
use thiserror::Error;

/// Everything a client call can fail with.
///
/// `Clone` because one failed batch fails every `append` merged into it; I/O errors are kept
/// as their kind and text for that reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// Connecting, reading or writing a socket failed.
    #[error("i/o error with {addr}: {message}")]
    Io {
        addr: String,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// The connection closed (or broke) while the request was in flight: it may or may not
    /// have been executed. Appends are retried with the same producer sequence, so the server
    /// deduplicates them.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost { addr: String, reason: String },
    /// The peer sent bytes that do not decode (bad frame, bad batch, wrong reply kind).
    #[error("protocol error with {addr}: {message}")]
    Protocol { addr: String, message: String },
    /// The server answered with an `Error` frame.
    #[error("server error {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// No reply within the configured time.
    #[error("timed out after {after_ms} ms waiting for {what}")]
    Timeout { what: &'static str, after_ms: u64 },
    /// The node belongs to another cluster than the one configured (or than the other nodes).
    #[error("wrong cluster: expected {expected}, node {addr} is in {got}")]
    WrongCluster {
        addr: String,
        expected: ClusterId,
        got: ClusterId,
    },
    /// The caller passed something the protocol cannot carry (empty batch, bad log name,
    /// record or batch over the limits, node index out of range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A limit of this client's own configuration is reached (e.g. `subscriptions_max`): the
    /// call would need more than it allows until something held is given back.
    #[error("client limit reached: at most {max} {what}")]
    LimitExceeded { what: &'static str, max: usize },
    /// The client is shutting down (its handles were dropped while a call was pending).
    #[error("client closed")]
    Closed,
    /// An append gave up without proof either way: the batch may or may not have been stored
    /// (the last attempt timed out or lost its connection with no retries left, or the server
    /// answered with a code that does not prove it stored nothing, see
    /// [`ErrorCode::proves_not_stored`]). If stored, it may also land after appends that
    /// were queued behind it. Its producer sequence is never given to other records: later
    /// appends to the log continue under a fresh producer id. Read the log to find out.
    #[error("append outcome unknown: the records may or may not have been stored ({cause})")]
    InDoubt { cause: Box<Error> },
}

impl Error {
    /// Whether the same request may succeed if sent again (possibly to another node): lost
    /// connections, timeouts and the server's retriable codes (`NotHead`, `Unavailable`, ...).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Io { .. } | Error::ConnectionLost { .. } | Error::Timeout { .. } => true,
            Error::Server { code, .. } => code.is_retriable(),
            Error::Protocol { .. }
            | Error::WrongCluster { .. }
            | Error::InvalidArgument(_)
            | Error::LimitExceeded { .. }
            | Error::Closed
            // Retrying under the same sequence already ran out (or cannot be trusted).
            | Error::InDoubt { .. } => false,
        }
    }

    /// Whether a failed append attempt that got this error may have stored its batch (the
    /// request was sent: callers handle errors from before sending themselves). Only a
    /// server code that proves the request stored nothing says no.
    pub(crate) fn append_may_be_stored(&self) -> bool {
        match self {
            Error::Server { code, .. } => !code.proves_not_stored(),
            _ => true,
        }
    }

    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn io(addr: &str, e: &std::io::Error) -> Error {
        Error::Io {
            addr: addr.to_string(),
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    pub(crate) fn protocol(addr: &str, message: impl Into<String>) -> Error {
        Error::Protocol {
            addr: addr.to_string(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
