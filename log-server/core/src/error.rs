//! The core's typed errors and the error codes that travel on the wire.

use thiserror::Error;

/// Error codes carried in `Error` frames. Stable on the wire: never renumber, only add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed frame or request body.
    BadRequest = 1,
    /// Handshake carried another cluster id.
    WrongCluster = 2,
    /// Protocol version not supported.
    UnsupportedVersion = 3,
    /// No log with that name/id on this node.
    UnknownLog = 4,
    /// A record or batch exceeds the limits.
    RecordTooLarge = 5,
    /// Checksum mismatch in a received batch.
    Corruption = 6,
    /// Message from an older (or newer) chain configuration.
    WrongEpoch = 7,
    /// Appends must go to the head; the message names it.
    NotHead = 8,
    /// The chain is not accepting appends now (pipeline full, node recovering, successor down).
    Unavailable = 9,
    /// Disk full or storage failure; nothing of the request was acknowledged.
    StorageFull = 10,
    /// Storage failed in another way; the node stops taking appends.
    StorageError = 11,
    /// The requested offset is below the log's retention start.
    OffsetTrimmed = 12,
    /// The requested offset is past what this node knows to be committed.
    OffsetOutOfRange = 13,
    /// The log already exists (with another name hashing to the same id, or the same name).
    LogExists = 14,
    /// The request timed out waiting (e.g. for a commit).
    Timeout = 15,
    /// Producer sequence out of order for an idempotent producer.
    SequenceGap = 16,
    /// Too many logs / connections / requests in flight.
    LimitExceeded = 17,
    /// The node is shutting down.
    ShuttingDown = 18,
    /// Anything else; the message says what.
    Internal = 19,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => BadRequest,
            2 => WrongCluster,
            3 => UnsupportedVersion,
            4 => UnknownLog,
            5 => RecordTooLarge,
            6 => Corruption,
            7 => WrongEpoch,
            8 => NotHead,
            9 => Unavailable,
            10 => StorageFull,
            11 => StorageError,
            12 => OffsetTrimmed,
            13 => OffsetOutOfRange,
            14 => LogExists,
            15 => Timeout,
            16 => SequenceGap,
            17 => LimitExceeded,
            18 => ShuttingDown,
            19 => Internal,
            _ => return None,
        })
    }

    /// Whether a client may retry the same request (same producer id and sequence) elsewhere or
    /// later and expect it to succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotHead
                | ErrorCode::Unavailable
                | ErrorCode::Timeout
                | ErrorCode::WrongEpoch
                | ErrorCode::ShuttingDown
        )
    }
}

/// Errors of the core: decoding and validation of bytes that came from a network or a disk.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("corruption: {0}")]
    Corruption(String),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("too large: {what} is {size} bytes, limit {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("unsupported version {0}")]
    UnsupportedVersion(u16),
    #[error("{code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
}

impl Error {
    /// The wire code that reports this error to a peer or client.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Corruption(_) => ErrorCode::Corruption,
            Error::Malformed(_) => ErrorCode::BadRequest,
            Error::TooLarge { .. } => ErrorCode::RecordTooLarge,
            Error::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Error::Remote { code, .. } => *code,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
