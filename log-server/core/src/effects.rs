//! What the replica is told (inputs) and what it asks its driver to do (effects).
//!
//! This is the seam between the I/O-free core and its two drivers: the real runtime
//! (`chainlog-server`: io_uring storage, TCP/RDMA links) and the simulator (`chainlog-sim`).
//! Both must honour the same contract, stated on each variant.

use crate::error::ErrorCode;
use crate::types::{LogId, NodeId, Offset, ProducerId};
use crate::wire::{ClientReply, PeerMessage};
use bytes::Bytes;

/// A client connection, numbered by the driver; replies are routed by (client, request_id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// Token the core puts on a storage read so it can match the completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadToken(pub u64);

/// Effects, in the order the driver must start them.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Send to a peer node over the link to it. Delivery may fail or reorder across
    /// reconnects; the protocol copes (session ids, resends).
    Send { to: NodeId, msg: PeerMessage },
    /// Answer a client request. At most one `Reply` per request, except `Subscribe`, which gets
    /// any number of `Records` pushes until the client disconnects.
    Reply {
        client: ClientId,
        request_id: u64,
        reply: ClientReply,
    },
    /// Append whole batches at `base` (== the log's current written end on this node).
    /// Storage writes appends in the order given and makes them durable by group commit,
    /// then reports `DiskEvent::Durable` with the new durable end.
    Append {
        log: LogId,
        base: Offset,
        batches: Vec<Bytes>,
    },
    /// Discard every record at or past `end` (a successor dropping an unsynced suffix that its
    /// restarted predecessor lost). The core never asks for `end` below its committed end.
    /// Storage reports `DiskEvent::Truncated` once it is durable.
    Truncate { log: LogId, end: Offset },
    /// Create a log (idempotent for the same name); storage reports `DiskEvent::Created`.
    CreateLog { log: LogId, name: String },
    /// Read whole batches starting with the one containing `from`, none reaching past `end`,
    /// at most `max_bytes` (but always at least one batch if any). Storage answers with
    /// `DiskEvent::ReadDone`.
    Read {
        token: ReadToken,
        log: LogId,
        from: Offset,
        end: Offset,
        max_bytes: usize,
    },
    /// Delete whole segments entirely below `before`, and make `point` the log's durable
    /// trim point if it is higher (the node serves nothing below it; recovery returns it as
    /// `RecoveredLog::trim_point`). Storage answers `DiskEvent::Trimmed` once both are
    /// durable. `before` past the log's end (every `Append` issued before this) empties the
    /// log and restarts it at `before`, durably before any later append lands: the next
    /// `Append` has `base == before`.
    Trim {
        log: LogId,
        before: Offset,
        point: Offset,
    },
    /// Remember `end` as a lower bound of the committed end (`RecoveredLog::committed_hint`).
    /// Best effort and lazy: storage may coalesce these and persist them with its next sync.
    SaveCommitted { log: LogId, end: Offset },
}

/// Storage completions fed back with `Replica::on_disk`.
#[derive(Clone, Debug)]
pub enum DiskEvent {
    /// Every record below `end` is on stable storage. Monotonic per log (except after a
    /// `Truncate`, after which it restarts from the truncated end).
    Durable {
        log: LogId,
        end: Offset,
    },
    /// A write or sync failed; nothing at or past `at` is durable. `code` is
    /// `StorageFull` for ENOSPC, `StorageError` otherwise.
    WriteFailed {
        log: LogId,
        at: Offset,
        code: ErrorCode,
    },
    Truncated {
        log: LogId,
        end: Offset,
    },
    /// A log that failed with `StorageFull` takes writes again (space was freed): storage
    /// holds exactly `[start, end)` durably (the failed range was discarded) and the next
    /// `Append` must start at `end`.
    Reopened {
        log: LogId,
        end: Offset,
    },
    Created {
        log: LogId,
        result: Result<(), ErrorCode>,
    },
    ReadDone {
        token: ReadToken,
        result: Result<Vec<Bytes>, ErrorCode>,
    },
    /// After a `Trim`, or a trim of storage's own (retention): the log durably starts at
    /// `start` (a segment's base) and its durable trim point is `point`.
    Trimmed {
        log: LogId,
        start: Offset,
        point: Offset,
    },
}

/// One producer's recent batches, rebuilt from the log at recovery (dedup survives restarts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer: ProducerId,
    /// Sequence of the first record.
    pub seq: u64,
    pub record_count: u32,
    pub base_offset: Offset,
}

/// What storage found for one log at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredLog {
    pub log: LogId,
    pub name: String,
    /// First offset still stored (after retention).
    pub start: Offset,
    /// One past the last intact, durable record (a torn tail already cut off).
    pub end: Offset,
    /// Up to `PRODUCER_BATCHES_KEPT` most recent batches per producer, oldest first.
    pub producers: Vec<ProducerBatch>,
    /// A lower bound of the chain's committed end, as last saved by `Effect::SaveCommitted`
    /// (0 if never saved). Lets a restarted node notice that recovery cut committed data.
    pub committed_hint: Offset,
    /// The highest `point` of an `Effect::Trim` storage made durable (0 if none). Storage
    /// drops whole segments only, so `start` may lie below it; the node serves nothing below
    /// it, so a trim stays a trim across restarts.
    pub trim_point: Offset,
}

/// Batches per producer remembered for deduplication of retries: as many as a producer may
/// have in flight.
pub const PRODUCER_BATCHES_KEPT: usize = crate::limits::PRODUCER_BATCHES_IN_FLIGHT_MAX;
