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
    /// A retry of a batch the log already holds, not yet committed, met too many retries
    /// waiting for their commit: ask again later (the batch is stored; it commits or the chain
    /// reports its fate).
    RetryPending = 20,
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
            20 => RetryPending,
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
                | ErrorCode::RetryPending
                | ErrorCode::Timeout
                | ErrorCode::WrongEpoch
                | ErrorCode::ShuttingDown
        )
    }

    /// Whether this code, replied to an `Append`, proves that *that request* stored its batch
    /// on no replica and never will (so a client may give the batch's producer sequence to
    /// other records). `false` means the batch may be stored, now or later: the client must
    /// not reuse its sequence. It speaks of the request answered only: an earlier attempt of
    /// the same batch that timed out or lost its connection is not covered (dedup memory is
    /// bounded), so the client also tracks its own attempts.
    ///
    /// Code by code, from where the server produces it for an append:
    /// - `BadRequest`, `Corruption`, `RecordTooLarge`, `UnsupportedVersion`: the runtime could
    ///   not decode the frame or verify the batch (`ClientRequest::decode`) and answered before
    ///   the core saw it; `Replica::client_append` answers `BadRequest` for a short or
    ///   undecodable header before anything else. Never sequenced.
    /// - `WrongCluster`: only the handshake refuses it, before any request is read.
    /// - `UnknownLog`: the head has no such log (`client_append`, before sequencing).
    /// - `NotHead`: a non-head refuses every append before looking at it.
    /// - `SequenceGap`: the head found the sequence out of order when sequencing it and did
    ///   not append it (`Dedup::Gap`).
    /// - `StorageFull`: the head refuses only what it can prove is stored nowhere: new appends
    ///   while it holds the chain's longest log, queued ones never sequenced, a single node's
    ///   appends above a failed write whose range it zeroed, and in-doubt ones it settled after
    ///   reopening (ARCHITECTURE.md, "A full disk recovers in place").
    ///
    /// Not proof:
    /// - `Unavailable`: refused before sequencing here (queue full, producer fenced, log being
    ///   created), but by a head that may not yet hold the chain's longest log: a successor
    ///   may keep the batch from an earlier attempt (the simulator's checker found such
    ///   replies while node 2 held the batch, 18 of 15 000 seeds).
    /// - `RetryPending`: the batch *is* in the log, waiting for its commit.
    /// - `LimitExceeded`: a slow consumer's connection is cut with this code *in place of*
    ///   whatever reply was due, an `AppendOk` included.
    /// - `StorageError`: replied on the same paths as `StorageFull`, but after EIO the device
    ///   is suspect, and "stored nowhere" rests on zeroing the failed range on that device
    ///   (a failed zeroing is only logged, and the bytes may come back at recovery).
    /// - `Timeout`, `ShuttingDown`: the request may have been sequenced and forwarded before
    ///   the wait or the node ended (neither is sent for appends today; their meaning is).
    /// - `WrongEpoch`: not sent to clients today; reconfiguration will fence appends of an
    ///   older epoch whose fate is unknown.
    /// - `Internal`: "anything else", and also what a code unknown to this build decodes to.
    /// - `OffsetTrimmed`, `OffsetOutOfRange`, `LogExists`: not answers to an append; an
    ///   unexpected answer proves nothing.
    pub fn proves_not_stored(self) -> bool {
        // Exhaustive on purpose: a new code must be classified here, not default to "proof".
        match self {
            ErrorCode::BadRequest
            | ErrorCode::Corruption
            | ErrorCode::RecordTooLarge
            | ErrorCode::UnsupportedVersion
            | ErrorCode::WrongCluster
            | ErrorCode::UnknownLog
            | ErrorCode::NotHead
            | ErrorCode::SequenceGap
            | ErrorCode::StorageFull => true,
            ErrorCode::Unavailable
            | ErrorCode::RetryPending
            | ErrorCode::LimitExceeded
            | ErrorCode::StorageError
            | ErrorCode::Timeout
            | ErrorCode::ShuttingDown
            | ErrorCode::WrongEpoch
            | ErrorCode::Internal
            | ErrorCode::OffsetTrimmed
            | ErrorCode::OffsetOutOfRange
            | ErrorCode::LogExists => false,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_before_storage_prove_not_stored() {
        let all: Vec<ErrorCode> = (0..=u16::MAX).filter_map(ErrorCode::from_u16).collect();
        assert_eq!(
            all.len(),
            20,
            "a new code: classify it in proves_not_stored"
        );
        let proving: Vec<ErrorCode> = all
            .iter()
            .copied()
            .filter(|c| c.proves_not_stored())
            .collect();
        assert_eq!(
            proving,
            vec![
                ErrorCode::BadRequest,
                ErrorCode::WrongCluster,
                ErrorCode::UnsupportedVersion,
                ErrorCode::UnknownLog,
                ErrorCode::RecordTooLarge,
                ErrorCode::Corruption,
                ErrorCode::NotHead,
                ErrorCode::StorageFull,
                ErrorCode::SequenceGap,
            ]
        );
        // The server may hold a batch answered with these: reusing its sequence would make
        // dedup answer other records with its offsets.
        for c in [
            ErrorCode::Internal,
            ErrorCode::StorageError,
            ErrorCode::Timeout,
            ErrorCode::ShuttingDown,
            ErrorCode::Unavailable,
            ErrorCode::RetryPending,
            ErrorCode::LimitExceeded,
        ] {
            assert!(!c.proves_not_stored(), "{c:?}");
        }
        // What an unknown (newer) code decodes to is not proof either.
        assert!(ErrorCode::from_u16(999).is_none());
        assert!(!ErrorCode::Internal.proves_not_stored());
    }
}
