//! The replica: one node's chain-replication state machine (events in, effects out, no I/O).
//!
//! Per log, every node tracks `written_end` (handed to storage, in order), `durable_end`
//! (covered by a completed sync) and `committed_end` (durable on every replica; computed by the
//! head, learned downstream). The head sequences client batches into groups (natural batching:
//! whatever queued while the previous group was being made durable), every node writes a group
//! and forwards it at once, and acknowledges upstream `min(durable_end, successor's ack)`.
//!
//! Rejoin rule (see `ARCHITECTURE.md` / protocol notes): no node ever truncates. A node that
//! comes back shorter than its successor *adopts* the successor's suffix (`Fetch`), and the head
//! sequences nothing on a log until it holds at least the longest log downstream
//! (`chain_end`). Only the head assigns offsets, so every copy of an offset anywhere holds the
//! same bytes, and committed data can never be destroyed by a lagging commit hint.
//!
//! Trim rule: a node tells its successor its start (`PeerMessage::Trim`) only once that start
//! is durable, so a successor never starts past its predecessor and a predecessor can always
//! fetch its lost suffix. A successor that lacks offsets its predecessor no longer holds (it
//! lost committed data the others have since trimmed) restarts its log at the predecessor's
//! start: trimmed offsets were committed, so nothing acknowledged and not trimmed goes.

use crate::chain::{ChainConfig, Place, Role};
use crate::effects::{ClientId, DiskEvent, Effect, ReadToken, RecoveredLog};
use crate::error::ErrorCode;
use crate::limits::{BATCH_BYTES_MAX, LOGS_MAX, PIPELINE_BYTES_DEFAULT, READ_BYTES_MAX};
use crate::record::{self, BatchHeader};
use crate::session::{Dedup, ProducerTable, PRODUCERS_PER_LOG_MAX};
use crate::types::{log_name_valid, ClusterId, Epoch, Instant, LogId, NodeId, Offset, ProducerId};
use crate::wire::{ClientReply, ClientRequest, PeerMessage};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Most records in one replication group (one `Effect::Append`, one `Append` message).
pub const GROUP_RECORDS_MAX: u32 = 64 * 1024;
/// Client reads waiting for a commit or in storage, per node.
pub const READS_PENDING_MAX: usize = 8192;
/// Subscriptions per node.
pub const SUBSCRIPTIONS_MAX: usize = 4096;
/// Bytes one subscription reads from storage at a time (one read in flight per subscriber).
pub const SUBSCRIPTION_READ_BYTES: usize = 1 << 20;
/// Clients waiting on one `CreateLog` or `Trim`.
pub const WAITERS_PER_LOG_MAX: usize = 256;
/// Arrivals not yet covered by a durable ack are reported at the first tick at least this long
/// after them (a flush normally acks them sooner).
pub const ARRIVAL_ACK_DELAY_US: u64 = 1_000;
/// The longest an idle node goes without a tick (see `Replica::tick_deadline`).
pub const IDLE_TICK_MAX_US: u64 = 50_000;
/// The tick period while a replica has work in flight (see `Replica::next_tick`).
pub const BUSY_TICK_US: u64 = 1_000;

/// Tunables of one replica. Defaults come from [`ReplicaConfig::new`].
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub node: NodeId,
    pub cluster_id: ClusterId,
    /// Un-acknowledged bytes per log towards the successor before the head stops admitting
    /// (default `limits::PIPELINE_BYTES_DEFAULT`; minimum 1: a batch larger than the window
    /// still goes alone when nothing else is in flight). Also bounds the bytes of appends
    /// waiting in the admission queue.
    pub pipeline_bytes_max: usize,
    /// Bytes of batches in one replication message (default 1 MiB, at most `BATCH_BYTES_MAX`;
    /// a single larger batch still travels alone).
    pub forward_bytes_max: usize,
    /// The head sends a standalone `Commit` downstream when no batch carried the committed end
    /// for this long (default 200 µs).
    pub commit_idle_us: u64,
    /// Probe / resend when a link makes no ack progress this long (default 200 ms).
    pub resend_timeout_us: u64,
    /// Appends queued at the head while the pipeline is full or the chain is not ready
    /// (default 4096); beyond it appends get `Unavailable`.
    pub admission_queue_max: usize,
    /// Groups the head hands to its own storage before the oldest is durable (default 4,
    /// 1..=64). With 1, what arrives during a flush waits for it and goes out as the next
    /// group; with more, it goes out at once and its flush overlaps the running one, which
    /// keeps the disk busy while replies and new requests cross the network.
    pub writes_in_flight_max: usize,
    /// Fault switch for checker tests: acknowledge upstream (and commit at the head) on the
    /// node's own durability, without waiting for the successor. Never set in production.
    #[doc(hidden)]
    pub bug_ack_before_successor: bool,
    /// Fault switch for checker tests: a successor never restarts its log at its
    /// predecessor's start, so one that lost committed data its predecessor has trimmed
    /// waits forever. Never set in production.
    #[doc(hidden)]
    pub bug_no_restart_at_pred_start: bool,
}

impl ReplicaConfig {
    pub fn new(node: NodeId, cluster_id: ClusterId) -> Self {
        ReplicaConfig {
            node,
            cluster_id,
            pipeline_bytes_max: PIPELINE_BYTES_DEFAULT,
            forward_bytes_max: 1 << 20,
            commit_idle_us: 200,
            resend_timeout_us: 200_000,
            admission_queue_max: 4096,
            writes_in_flight_max: 4,
            bug_ack_before_successor: false,
            bug_no_restart_at_pred_start: false,
        }
    }

    /// Checks the documented minimums.
    pub fn validate(&self) -> Result<(), String> {
        if self.pipeline_bytes_max == 0 {
            return Err("pipeline_bytes_max must be at least 1".into());
        }
        if self.forward_bytes_max == 0 || self.forward_bytes_max > BATCH_BYTES_MAX {
            return Err(format!(
                "forward_bytes_max {} must be in 1..={BATCH_BYTES_MAX}",
                self.forward_bytes_max
            ));
        }
        if self.admission_queue_max == 0 {
            return Err("admission_queue_max must be at least 1".into());
        }
        if self.resend_timeout_us == 0 {
            return Err("resend_timeout_us must be at least 1".into());
        }
        if !(1..=64).contains(&self.writes_in_flight_max) {
            return Err(format!(
                "writes_in_flight_max {} must be in 1..=64",
                self.writes_in_flight_max
            ));
        }
        Ok(())
    }
}

/// A node's view, for `Status` and for checkers.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub node: NodeId,
    pub epoch: Epoch,
    pub role: Role,
    pub chain: Vec<NodeId>,
    pub logs: Vec<LogStatus>,
    /// Payload bytes the head copied because a batch's buffer was shared (0 when the runtime
    /// hands over unique buffers, as it should).
    pub restamp_copy_bytes: u64,
}

/// One log's view on one node.
#[derive(Debug, Clone, Serialize)]
pub struct LogStatus {
    pub name: String,
    pub log: LogId,
    pub start: Offset,
    pub written_end: Offset,
    pub durable_end: Offset,
    /// What this node reports upstream (at the head: what it would commit).
    pub ack_end: Offset,
    pub committed_end: Offset,
    /// Un-acknowledged bytes held for the successor.
    pub pipeline_bytes: usize,
    /// Appends waiting in the head's admission queue.
    pub queued_appends: usize,
    /// Head only: the log holds the longest log of the chain and may sequence.
    pub ready: bool,
    pub failed: Option<ErrorCode>,
}

struct Queued {
    client: ClientId,
    request_id: u64,
    batch: Bytes,
    header: BatchHeader,
}

#[derive(Clone, Copy)]
struct Waiter {
    client: ClientId,
    request_id: u64,
    base: Offset,
    record_count: u32,
    /// Whose batch it is, to fence the producer should the write fail.
    producer: ProducerId,
    seq: u64,
}

struct WinBatch {
    base: Offset,
    end: Offset,
    bytes: Bytes,
}

/// This log's side of the link to the successor.
#[derive(Default)]
struct SuccLog {
    /// An `Ack` arrived in the current session, so `sent_end` is meaningful.
    known: bool,
    sent_end: Offset,
    last_ack_seq: u64,
    written_end: Offset,
    /// Largest ack of the current session. Not kept across sessions: a successor that lost
    /// acknowledged-but-uncommitted data (bit rot) may since hold other bytes at those
    /// offsets, and an old ack would vouch for them (protocol notes, "stale acks").
    ack_end: Offset,
    /// Longest log downstream, as last reported (kept across sessions: only we feed it).
    chain_end: Option<Offset>,
    commit_sent: Offset,
    /// Committed end the successor reported knowing (this session).
    commit_known: Offset,
    commit_due: Option<Instant>,
    last_heard: Instant,
    last_probe: Option<Instant>,
    reading: Option<ReadToken>,
    read_backoff_until: Option<Instant>,
    fetch_at: Option<Instant>,
    rewound: Option<(Offset, Instant)>,
    no_log: bool,
    /// Our start, last told to a successor that lacked offsets below it (rate limit).
    start_told: Option<(Offset, Instant)>,
    /// The successor's durable trim point, as its last ack reported it (this session).
    trim_known: Offset,
    /// When we last told it our trim point (rate limit).
    trim_told_at: Option<Instant>,
    /// Storage reads sent on to the successor this session that its acks do not yet show
    /// received: (end offset, bytes), oldest first. Reads are issued only while these hold
    /// less than `pipeline_bytes_max`: a successor catching up from far behind would otherwise
    /// be streamed to as fast as storage reads, and the link's queue grow without bound.
    streamed: VecDeque<(Offset, usize)>,
}

impl SuccLog {
    /// The successor's acks show it has everything below `written_end`.
    fn streamed_received(&mut self, written_end: Offset) {
        while let Some(&(end, _)) = self.streamed.front() {
            if end > written_end {
                break;
            }
            self.streamed.pop_front();
        }
    }

    fn streamed_bytes(&self) -> usize {
        self.streamed.iter().map(|&(_, bytes)| bytes).sum()
    }

    /// Streamed reads are presumed lost (a rewind or a silent successor): they no longer
    /// hold back the next read.
    fn streamed_forget(&mut self) {
        self.streamed.clear();
    }
}

/// This log's side of the link from the predecessor.
#[derive(Default)]
struct PredLog {
    ack_sent: Offset,
    chain_sent: Option<Offset>,
    /// When the chain end first moved past `chain_sent` (arrivals not yet reported).
    chain_moved_at: Option<Instant>,
    force: bool,
    resend: bool,
    /// The durable trim point last reported upstream.
    trim_sent: Offset,
    serving_fetch: Option<ReadToken>,
}

struct LogState {
    id: LogId,
    name: String,
    /// First offset served here (raised when a trim or restart is issued).
    start: Offset,
    /// The start storage reported durable (`Trimmed`, or recovery). Only this one is told to
    /// the successor.
    start_durable: Offset,
    /// The highest trim point asked of storage (since this node started, or made durable
    /// before it: `RecoveredLog::trim_point`). Nothing below it is served from the moment it
    /// is asked: storage may drop those segments under a read
    /// before `Trimmed` raises `start` (the simulator's verifier got `OffsetTrimmed` for a
    /// read at the start it had just been told, seed 219340), and storage trims whole
    /// segments, so `start` may stay below it.
    trim_asked: Offset,
    /// The trim point storage made durable (`Trimmed`, or recovery). Told to the successor
    /// with the durable start, so every replica stops serving below a client's trim.
    trim_durable: Offset,
    written_end: Offset,
    durable_end: Offset,
    committed_end: Offset,
    readable_seen: Offset,
    committed_saved: Offset,
    failed: Option<ErrorCode>,
    /// Head: appends sequenced before a failed write wait here, neither committed nor refused,
    /// until the log is reopened and the head holds the longest log of the chain again: what
    /// it then lacks was stored nowhere and is refused.
    in_doubt: bool,
    producers: ProducerTable,
    /// Producers whose batch at this sequence was refused (admission full): later batches of
    /// theirs are refused until they resend from it.
    fences: BTreeMap<ProducerId, u64>,
    queue: VecDeque<Queued>,
    queue_bytes: usize,
    commit_waiters: BTreeMap<Offset, Vec<Waiter>>,
    retry_waiters: usize,
    create_waiters: Vec<(ClientId, u64)>,
    trim_waiters: Vec<(ClientId, u64)>,
    window: VecDeque<WinBatch>,
    window_bytes: usize,
    /// Ends of the head's groups handed to storage and not yet durable, oldest first.
    head_writes: VecDeque<Offset>,
    succ: SuccLog,
    pred: PredLog,
    read_waits: BTreeSet<(Offset, u64)>,
    subs: BTreeSet<u64>,
}

impl LogState {
    /// First offset this node serves to clients: its start, or the point of a trim asked.
    fn served_start(&self) -> Offset {
        self.start.max(self.trim_asked)
    }

    /// Asks storage to trim below `before` and to keep `point` as the trim point
    /// (`Effect::Trim`); nothing below either is served from now on.
    fn ask_trim(&mut self, before: Offset, point: Offset, out: &mut Vec<Effect>) {
        let point = point.max(before);
        self.trim_asked = self.trim_asked.max(point);
        out.push(Effect::Trim {
            log: self.id,
            before,
            point,
        });
    }

    /// Tells a successor where this log durably starts and its durable trim point.
    fn trim_message(&self, epoch: Epoch, session: u64) -> PeerMessage {
        PeerMessage::Trim {
            epoch,
            session,
            log: self.id,
            before: self.start_durable,
            point: self.trim_durable,
        }
    }

    /// Answers a predecessor's `Fetch`. An empty answer also asks for an ack of where this log
    /// is: the fetch shows the predecessor believes an older ack of ours, which may have
    /// counted a write that failed full and was rolled back since (with that correction lost,
    /// a head fetched in vain for ever and never sequenced again, seed 1816695).
    fn fetch_reply(
        &mut self,
        epoch: Epoch,
        session: u64,
        base: Offset,
        batches: Vec<Bytes>,
    ) -> PeerMessage {
        if batches.is_empty() {
            self.pred.force = true;
        }
        PeerMessage::FetchReply {
            epoch,
            session,
            log: self.id,
            base,
            batches,
        }
    }

    /// Where reads start here durably: what `TrimOk` answers.
    fn durable_served_start(&self) -> Offset {
        self.start.max(self.trim_durable)
    }

    fn new(id: LogId, name: String, start: Offset, end: Offset, producers: ProducerTable) -> Self {
        LogState {
            id,
            name,
            start,
            start_durable: start,
            trim_asked: start,
            trim_durable: Offset::ZERO,
            written_end: end,
            durable_end: end,
            committed_end: Offset::ZERO,
            readable_seen: Offset::ZERO,
            committed_saved: Offset::ZERO,
            failed: None,
            in_doubt: false,
            producers,
            fences: BTreeMap::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
            commit_waiters: BTreeMap::new(),
            retry_waiters: 0,
            create_waiters: Vec::new(),
            trim_waiters: Vec::new(),
            window: VecDeque::new(),
            window_bytes: 0,
            head_writes: VecDeque::new(),
            succ: SuccLog::default(),
            pred: PredLog::default(),
            read_waits: BTreeSet::new(),
            subs: BTreeSet::new(),
        }
    }

    /// Committed entries this node holds durably: what it may serve to readers.
    fn readable_end(&self) -> Offset {
        self.committed_end.min(self.durable_end)
    }
}

struct Creating {
    name: String,
    waiters: Vec<(ClientId, u64)>,
}

enum ReadJob {
    Client {
        client: ClientId,
        request_id: u64,
        log: LogId,
        from: Offset,
        max_records: u32,
    },
    Subscription {
        id: u64,
    },
    Forward {
        log: LogId,
        session: u64,
    },
    FetchServe {
        log: LogId,
        session: u64,
    },
}

struct WaitingRead {
    client: ClientId,
    request_id: u64,
    log: LogId,
    from: Offset,
    max_records: u32,
    max_bytes: usize,
    deadline: Instant,
}

struct Subscription {
    client: ClientId,
    request_id: u64,
    log: LogId,
    next: Offset,
    reading: bool,
    /// Storage returned nothing at this readable end; wait for it to grow.
    stalled_at: Option<Offset>,
}

/// One node's replica of every log it hosts.
pub struct Replica {
    cfg: ReplicaConfig,
    chain: ChainConfig,
    place: Place,
    logs: BTreeMap<LogId, LogState>,
    creating: BTreeMap<LogId, Creating>,
    succ_up: bool,
    succ_session: u64,
    pred_session: Option<u64>,
    ack_seq: u64,
    next_token: u64,
    next_id: u64,
    reads: BTreeMap<ReadToken, ReadJob>,
    waits: BTreeMap<u64, WaitingRead>,
    wait_deadlines: BTreeSet<(Instant, u64)>,
    reads_pending: usize,
    subs: BTreeMap<u64, Subscription>,
    dirty: BTreeSet<LogId>,
    restamp_copy_bytes: u64,
    /// Set while `on_tick` pumps: acks that only report received (not yet durable) batches go
    /// out then, or with the next durable ack, whichever comes first.
    ticking: bool,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ClientReply {
    ClientReply::Error {
        code,
        message: message.into(),
    }
}

/// The answer to a batch past a producer's refused sequence.
fn fenced(producer: ProducerId, fence: u64) -> ClientReply {
    err(
        ErrorCode::Unavailable,
        format!("sequence {fence} of producer {producer} was refused; resend from it"),
    )
}

/// The answer to a read below where this node serves a log from.
fn trimmed(start: Offset) -> ClientReply {
    err(ErrorCode::OffsetTrimmed, format!("log starts at {start}"))
}

/// What an operator needs to read when a log's storage has failed on this node.
fn storage_failure(code: ErrorCode, log: &str) -> String {
    match code {
        ErrorCode::StorageFull => format!(
            "disk full: log '{log}' cannot store more on this node; appends are refused until \
             space is freed, then resume within seconds without a restart unless the node's \
             log says the log could not be repaired (then restart it). Nothing acknowledged is \
             affected; retry with the same producer sequence"
        ),
        _ => format!(
            "storage failed for log '{log}' on this node ({code:?}); appends are refused until \
             the node is restarted (nothing acknowledged is affected)"
        ),
    }
}

/// `b` cut to its batch length (drops receive-buffer padding), with its header.
fn cut(b: &Bytes) -> Option<(Bytes, BatchHeader)> {
    let h = BatchHeader::decode(b).ok()?;
    if b.len() < h.batch_len() {
        return None;
    }
    Some((b.slice(..h.batch_len()), h))
}

/// Stamps a producer batch with its place in the log. Mutates in place when the buffer is
/// ours alone (the runtime hands over unique buffers); otherwise copies just this batch.
/// Returns the stamped batch and how many bytes had to be copied (0 on the zero-copy path).
fn restamp(
    batch: Bytes,
    len: usize,
    cluster: ClusterId,
    epoch: Epoch,
    base: Offset,
) -> (Bytes, usize) {
    match batch.try_into_mut() {
        Ok(mut m) => {
            record::restamp(&mut m, cluster, epoch, base);
            (m.freeze(), 0)
        }
        Err(shared) => {
            let mut m = BytesMut::from(&shared[..len]);
            record::restamp(&mut m, cluster, epoch, base);
            (m.freeze(), len)
        }
    }
}

impl Replica {
    pub fn new(
        config: ReplicaConfig,
        chain: ChainConfig,
        recovered: Vec<RecoveredLog>,
        now: Instant,
    ) -> Replica {
        if let Err(e) = config.validate() {
            panic!("invalid replica config: {e}");
        }
        if let Err(e) = chain.validate() {
            panic!("invalid chain config: {e}");
        }
        let place = chain.place(config.node);
        let mut logs = BTreeMap::new();
        for r in recovered {
            let producers = ProducerTable::from_recovered(&r.producers, PRODUCERS_PER_LOG_MAX);
            let mut l = LogState::new(r.log, r.name, r.start, r.end, producers);
            // A trim point inside the oldest segment kept: what a client trimmed stays trimmed.
            l.trim_asked = l.trim_asked.max(r.trim_point);
            l.trim_durable = r.trim_point;
            // The hint may exceed what recovery kept (a corrupt segment was cut): this node
            // then knows it lacks committed data and repairs it from a neighbour. A chain of one
            // has no neighbour and no one else to agree with: what it holds durably is
            // committed, from the first read on (the hint only lags behind that).
            l.committed_end = if place.role == Role::Single {
                r.end
            } else {
                r.committed_hint
            };
            l.committed_saved = l.committed_end;
            l.succ.last_heard = now;
            logs.insert(r.log, l);
        }
        Replica {
            cfg: config,
            chain,
            place,
            logs,
            creating: BTreeMap::new(),
            succ_up: false,
            succ_session: 0,
            pred_session: None,
            ack_seq: 0,
            ticking: false,
            next_token: 0,
            next_id: 0,
            reads: BTreeMap::new(),
            waits: BTreeMap::new(),
            wait_deadlines: BTreeSet::new(),
            reads_pending: 0,
            subs: BTreeMap::new(),
            dirty: BTreeSet::new(),
            restamp_copy_bytes: 0,
        }
    }

    fn is_head(&self) -> bool {
        matches!(self.place.role, Role::Head | Role::Single)
    }

    fn not_head(&self) -> ClientReply {
        match self.place.head {
            Some(h) => err(
                ErrorCode::NotHead,
                format!(
                    "node {} is not the head; the head is node {}",
                    self.cfg.node, h
                ),
            ),
            None => err(ErrorCode::NotHead, "no chain configured"),
        }
    }

    fn token(&mut self) -> ReadToken {
        self.next_token += 1;
        ReadToken(self.next_token)
    }

    fn reply(out: &mut Vec<Effect>, client: ClientId, request_id: u64, reply: ClientReply) {
        out.push(Effect::Reply {
            client,
            request_id,
            reply,
        });
    }

    // ---------------------------------------------------------------- clients

    pub fn on_client(
        &mut self,
        now: Instant,
        client: ClientId,
        request_id: u64,
        req: ClientRequest,
        out: &mut Vec<Effect>,
    ) {
        match req {
            ClientRequest::Append { batch } => self.client_append(client, request_id, batch, out),
            ClientRequest::CreateLog { name } => self.client_create(client, request_id, name, out),
            ClientRequest::Read {
                log,
                from,
                max_records,
                max_bytes,
                wait_ms,
            } => self.client_read(
                now,
                client,
                request_id,
                log,
                from,
                max_records,
                max_bytes,
                wait_ms,
                out,
            ),
            ClientRequest::Subscribe { log, from } => {
                self.client_subscribe(client, request_id, log, from, out)
            }
            ClientRequest::Trim { log, before } => {
                self.client_trim(client, request_id, log, before, out)
            }
            ClientRequest::Status => Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::BadRequest, "status is answered by the runtime"),
            ),
        }
        self.finish(now, out);
    }

    fn client_append(
        &mut self,
        client: ClientId,
        request_id: u64,
        batch: Bytes,
        out: &mut Vec<Effect>,
    ) {
        if !self.is_head() {
            let r = self.not_head();
            return Self::reply(out, client, request_id, r);
        }
        let Ok(header) = BatchHeader::decode(&batch) else {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::BadRequest, "bad batch"),
            );
        };
        if batch.len() < header.batch_len() {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::BadRequest, "short batch"),
            );
        }
        let id = header.log_id;
        let queue_max = self.cfg.admission_queue_max;
        let bytes_max = self.cfg.pipeline_bytes_max;
        let Some(l) = self.logs.get_mut(&id) else {
            let r = if self.creating.contains_key(&id) {
                err(ErrorCode::Unavailable, format!("log {id} is being created"))
            } else {
                err(ErrorCode::UnknownLog, format!("no log {id}"))
            };
            return Self::reply(out, client, request_id, r);
        };
        let (producer, seq) = (header.producer_id, header.producer_seq);
        // Once a producer's batch is refused, its later batches are refused too until it
        // resends from the refused one: otherwise a later batch could be appended before the
        // earlier one and the producer's sequence would have a hole for good.
        if producer.0 != 0 {
            if let Some(&fence) = l.fences.get(&producer) {
                // (While storage is failed every batch gets the storage error below instead:
                // a client must see why, and the fence stays.)
                if seq > fence && l.failed.is_none() {
                    return Self::reply(out, client, request_id, fenced(producer, fence));
                }
                if seq == fence {
                    l.fences.remove(&producer);
                }
            }
        }
        // Fast path for retries of batches already in the log. New batches (and gaps, which
        // may be filled by batches still queued) are classified again when sequenced.
        if Self::wait_if_stored(l, client, request_id, &header, queue_max, out) {
            return;
        }
        if let Some(code) = l.failed {
            // A refusal tells the client the batch is stored nowhere (it may give the
            // sequence to other records): only true once this head holds the longest log of
            // the chain. Until then the batch may be a retry of one a successor keeps, and it
            // queues like any other (sequenced once the log is reopened and caught up).
            if holds_longest(self.place.role, l) {
                // Storage may take writes again later (a full disk is freed): the producer
                // must resend from here, not continue past it.
                Self::fence(l, producer, seq);
                return Self::reply(
                    out,
                    client,
                    request_id,
                    err(code, storage_failure(code, &l.name)),
                );
            }
        }
        let len = header.batch_len();
        if l.queue.len() >= queue_max || (l.queue_bytes + len > bytes_max && !l.queue.is_empty()) {
            Self::fence(l, producer, seq);
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::Unavailable, "append queue full; retry later"),
            );
        }
        l.queue_bytes += len;
        l.queue.push_back(Queued {
            client,
            request_id,
            batch,
            header,
        });
        self.dirty.insert(id);
    }

    fn client_create(
        &mut self,
        client: ClientId,
        request_id: u64,
        name: String,
        out: &mut Vec<Effect>,
    ) {
        if !self.is_head() {
            let r = self.not_head();
            return Self::reply(out, client, request_id, r);
        }
        if !log_name_valid(&name) {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::BadRequest, format!("invalid log name {name:?}")),
            );
        }
        let id = LogId::from_name(&name);
        if let Some(l) = self.logs.get_mut(&id) {
            let waiters = &mut l.create_waiters;
            if Self::wait_for_create(out, client, request_id, id, &l.name, &name, waiters) {
                self.dirty.insert(id);
            }
            return;
        }
        if let Some(c) = self.creating.get_mut(&id) {
            Self::wait_for_create(out, client, request_id, id, &c.name, &name, &mut c.waiters);
            return;
        }
        if self.logs.len() + self.creating.len() >= LOGS_MAX {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::LimitExceeded, format!("at most {LOGS_MAX} logs")),
            );
        }
        self.creating.insert(
            id,
            Creating {
                name: name.clone(),
                waiters: vec![(client, request_id)],
            },
        );
        out.push(Effect::CreateLog { log: id, name });
    }

    #[allow(clippy::too_many_arguments)]
    fn client_read(
        &mut self,
        now: Instant,
        client: ClientId,
        request_id: u64,
        log: LogId,
        from: Offset,
        max_records: u32,
        max_bytes: u32,
        wait_ms: u32,
        out: &mut Vec<Effect>,
    ) {
        let l = match Self::readable_log(&mut self.logs, log, from) {
            Ok(l) => l,
            Err(e) => return Self::reply(out, client, request_id, e),
        };
        if self.reads_pending >= READS_PENDING_MAX {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::LimitExceeded, "too many reads in progress"),
            );
        }
        let max_bytes = (max_bytes as usize).clamp(1, READ_BYTES_MAX);
        let max_records = max_records.max(1);
        let readable = l.readable_end();
        if from < readable {
            self.start_read(
                client,
                request_id,
                log,
                from,
                readable,
                max_records,
                max_bytes,
                out,
            );
        } else if wait_ms == 0 {
            let committed_end = l.committed_end;
            Self::reply(
                out,
                client,
                request_id,
                ClientReply::ReadOk {
                    committed_end,
                    batches: vec![],
                },
            );
        } else {
            self.next_id += 1;
            let id = self.next_id;
            let deadline = now.plus_us(u64::from(wait_ms) * 1000);
            l.read_waits.insert((from, id));
            self.waits.insert(
                id,
                WaitingRead {
                    client,
                    request_id,
                    log,
                    from,
                    max_records,
                    max_bytes,
                    deadline,
                },
            );
            self.wait_deadlines.insert((deadline, id));
            self.reads_pending += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_read(
        &mut self,
        client: ClientId,
        request_id: u64,
        log: LogId,
        from: Offset,
        end: Offset,
        max_records: u32,
        max_bytes: usize,
        out: &mut Vec<Effect>,
    ) {
        let token = self.token();
        self.reads.insert(
            token,
            ReadJob::Client {
                client,
                request_id,
                log,
                from,
                max_records,
            },
        );
        self.reads_pending += 1;
        out.push(Effect::Read {
            token,
            log,
            from,
            end,
            max_bytes,
        });
    }

    /// The log a read or subscription from `from` is served from, or the error to answer.
    fn readable_log(
        logs: &mut BTreeMap<LogId, LogState>,
        log: LogId,
        from: Offset,
    ) -> Result<&mut LogState, ClientReply> {
        let Some(l) = logs.get_mut(&log) else {
            return Err(err(ErrorCode::UnknownLog, format!("no log {log}")));
        };
        let start = l.served_start();
        if from < start {
            return Err(trimmed(start));
        }
        Ok(l)
    }

    /// The answer to a read (or subscription read) that storage failed with `code`. One that
    /// lost its segment to a trim under it is told where the log now starts, as a read
    /// refused up front is.
    fn read_failed(
        logs: &BTreeMap<LogId, LogState>,
        log: LogId,
        code: ErrorCode,
        what: &str,
    ) -> ClientReply {
        match code {
            ErrorCode::OffsetTrimmed => {
                trimmed(logs.get(&log).map_or(Offset::ZERO, |l| l.served_start()))
            }
            _ => err(code, what),
        }
    }

    fn client_subscribe(
        &mut self,
        client: ClientId,
        request_id: u64,
        log: LogId,
        from: Offset,
        out: &mut Vec<Effect>,
    ) {
        let l = match Self::readable_log(&mut self.logs, log, from) {
            Ok(l) => l,
            Err(e) => return Self::reply(out, client, request_id, e),
        };
        if self.subs.len() >= SUBSCRIPTIONS_MAX {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::LimitExceeded, "too many subscriptions"),
            );
        }
        self.next_id += 1;
        let id = self.next_id;
        l.subs.insert(id);
        self.subs.insert(
            id,
            Subscription {
                client,
                request_id,
                log,
                next: from,
                reading: false,
                stalled_at: None,
            },
        );
        self.pump_subscription(id, out);
    }

    fn client_trim(
        &mut self,
        client: ClientId,
        request_id: u64,
        log: LogId,
        before: Offset,
        out: &mut Vec<Effect>,
    ) {
        if !self.is_head() {
            let r = self.not_head();
            return Self::reply(out, client, request_id, r);
        }
        let Some(l) = self.logs.get_mut(&log) else {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::UnknownLog, format!("no log {log}")),
            );
        };
        // Only committed entries may go (they are on every replica already), and only those
        // held here: a head that restarted short and is still fetching its lost suffix must
        // not skip past it (its successor trims no further than it).
        let before = before.min(l.readable_end());
        if before <= l.durable_served_start() {
            let start = l.durable_served_start();
            return Self::reply(out, client, request_id, ClientReply::TrimOk { start });
        }
        if l.trim_waiters.len() >= WAITERS_PER_LOG_MAX {
            return Self::reply(
                out,
                client,
                request_id,
                err(ErrorCode::Unavailable, "too many trims waiting"),
            );
        }
        l.trim_waiters.push((client, request_id));
        // The successor hears of it once it is durable here (`DiskEvent::Trimmed`).
        l.ask_trim(before, before, out);
    }

    /// A create of a log that exists or is being created: the same name waits with the others
    /// (bounded), another name under the same id is refused. Returns whether it waits.
    fn wait_for_create(
        out: &mut Vec<Effect>,
        client: ClientId,
        request_id: u64,
        id: LogId,
        have: &str,
        name: &str,
        waiters: &mut Vec<(ClientId, u64)>,
    ) -> bool {
        let refused = if have != name {
            err(
                ErrorCode::LogExists,
                format!("log id {id} is taken by {have:?}"),
            )
        } else if waiters.len() >= WAITERS_PER_LOG_MAX {
            err(ErrorCode::Unavailable, "too many waiters")
        } else {
            waiters.push((client, request_id));
            return true;
        };
        Self::reply(out, client, request_id, refused);
        false
    }

    /// The client's connection closed: forget its reads and subscriptions. Appends it sent
    /// still complete (their replies go nowhere).
    pub fn on_client_gone(&mut self, now: Instant, client: ClientId, out: &mut Vec<Effect>) {
        let gone_subs: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.client == client)
            .map(|(id, _)| *id)
            .collect();
        for id in gone_subs {
            if let Some(s) = self.subs.remove(&id) {
                if let Some(l) = self.logs.get_mut(&s.log) {
                    l.subs.remove(&id);
                }
            }
        }
        let gone_waits: Vec<u64> = self
            .waits
            .iter()
            .filter(|(_, w)| w.client == client)
            .map(|(id, _)| *id)
            .collect();
        for id in gone_waits {
            if let Some(w) = self.waits.remove(&id) {
                self.wait_deadlines.remove(&(w.deadline, id));
                if let Some(l) = self.logs.get_mut(&w.log) {
                    l.read_waits.remove(&(w.from, id));
                }
                self.reads_pending -= 1;
            }
        }
        let gone_reads: Vec<ReadToken> = self
            .reads
            .iter()
            .filter(|(_, j)| matches!(j, ReadJob::Client { client: c, .. } if *c == client))
            .map(|(t, _)| *t)
            .collect();
        for t in gone_reads {
            self.reads.remove(&t);
            self.reads_pending -= 1;
        }
        self.finish(now, out);
    }

    // ---------------------------------------------------------------- peers

    pub fn on_peer(&mut self, now: Instant, from: NodeId, msg: PeerMessage, out: &mut Vec<Effect>) {
        if msg.epoch() != self.chain.epoch {
            return;
        }
        let session = msg.session();
        let from_pred = Some(from) == self.place.pred;
        let from_succ = Some(from) == self.place.succ;
        match msg {
            PeerMessage::Append { .. }
            | PeerMessage::Commit { .. }
            | PeerMessage::CreateLog { .. }
            | PeerMessage::Fetch { .. }
            | PeerMessage::Trim { .. } => {
                if !from_pred || !self.accept_pred_session(session) {
                    return;
                }
                self.pred_message(msg, out);
            }
            PeerMessage::Ack { .. }
            | PeerMessage::NoLog { .. }
            | PeerMessage::FetchReply { .. } => {
                if !from_succ || !self.succ_up || session != self.succ_session {
                    return;
                }
                self.succ_message(now, msg, out);
            }
        }
        self.finish(now, out);
    }

    /// The predecessor chooses sessions; a newer one replaces ours (it reconnected), an older
    /// one is a leftover of a previous connection and is dropped.
    fn accept_pred_session(&mut self, session: u64) -> bool {
        match self.pred_session {
            Some(s) if session == s => true,
            Some(s) if session < s => false,
            _ => {
                self.pred_session = Some(session);
                for l in self.logs.values_mut() {
                    if let Some(t) = l.pred.serving_fetch.take() {
                        self.reads.remove(&t);
                    }
                    l.pred = PredLog::default();
                }
                true
            }
        }
    }

    fn pred_message(&mut self, msg: PeerMessage, out: &mut Vec<Effect>) {
        let log = msg.log();
        if let PeerMessage::CreateLog { name, .. } = &msg {
            if let Some(l) = self.logs.get_mut(&log) {
                if l.name == *name {
                    l.pred.force = true;
                    self.dirty.insert(log);
                }
            } else if !self.creating.contains_key(&log)
                && self.logs.len() + self.creating.len() < LOGS_MAX
            {
                self.creating.insert(
                    log,
                    Creating {
                        name: name.clone(),
                        waiters: vec![],
                    },
                );
                out.push(Effect::CreateLog {
                    log,
                    name: name.clone(),
                });
            }
            return;
        }
        let Some(pred) = self.place.pred else { return };
        let epoch = self.chain.epoch;
        let session = msg.session();
        let Some(l) = self.logs.get_mut(&log) else {
            if !self.creating.contains_key(&log) {
                out.push(Effect::Send {
                    to: pred,
                    msg: PeerMessage::NoLog {
                        epoch,
                        session,
                        log,
                    },
                });
            }
            return;
        };
        self.dirty.insert(log);
        match msg {
            PeerMessage::Append {
                base,
                committed_end,
                batches,
                ..
            } => {
                l.committed_end = l.committed_end.max(committed_end);
                if batches.is_empty() {
                    l.pred.force = true;
                    if base > l.written_end {
                        l.pred.resend = true;
                    }
                    return;
                }
                match Self::accept_batches(l, &batches) {
                    Accept::From(i) => {
                        let batches = batches[i..].to_vec();
                        Self::write_local(
                            l,
                            self.place.succ.is_some(),
                            &self.cfg,
                            batches,
                            true,
                            out,
                        );
                    }
                    Accept::Duplicate => l.pred.force = true,
                    Accept::Gap => {
                        l.pred.force = true;
                        l.pred.resend = true;
                    }
                }
            }
            PeerMessage::Commit { committed_end, .. } => {
                l.committed_end = l.committed_end.max(committed_end);
            }
            PeerMessage::Fetch {
                from, max_bytes, ..
            } => {
                let max_bytes = (max_bytes as usize).clamp(1, self.cfg.forward_bytes_max);
                if let Some(batches) = Self::from_window(l, from, max_bytes) {
                    out.push(Effect::Send {
                        to: pred,
                        msg: l.fetch_reply(epoch, session, from, batches),
                    });
                } else if from >= l.start && from < l.durable_end {
                    if l.pred.serving_fetch.is_none() {
                        self.next_token += 1;
                        let token = ReadToken(self.next_token);
                        l.pred.serving_fetch = Some(token);
                        self.reads
                            .insert(token, ReadJob::FetchServe { log, session });
                        out.push(Effect::Read {
                            token,
                            log,
                            from,
                            end: l.durable_end,
                            max_bytes,
                        });
                    }
                } else {
                    out.push(Effect::Send {
                        to: pred,
                        msg: l.fetch_reply(epoch, session, from, vec![]),
                    });
                }
            }
            PeerMessage::Trim { before, point, .. } => {
                if self.cfg.bug_no_restart_at_pred_start {
                    let before = before.min(l.committed_end).min(l.written_end);
                    if before > l.start {
                        l.ask_trim(before, before, out);
                    }
                    return;
                }
                // The predecessor holds nothing below `before` durably and trims only
                // committed offsets: everything below is committed.
                l.committed_end = l.committed_end.max(before);
                if l.failed.is_some() {
                    return;
                }
                if before <= l.start && point <= l.trim_asked {
                    // Nothing new: the predecessor resent it because no ack told it our point.
                    l.pred.force = true;
                    return;
                }
                if before > l.written_end {
                    Self::restart_at(l, before, point, out);
                } else {
                    // Its segments go only below `before` (a successor never starts past its
                    // predecessor), but it serves nothing below `point` (the client's trim),
                    // like its predecessor. Told downstream once durable (`Trimmed`).
                    l.ask_trim(before, point, out);
                }
            }
            _ => {}
        }
    }

    fn succ_message(&mut self, now: Instant, msg: PeerMessage, out: &mut Vec<Effect>) {
        let log = msg.log();
        let Some(l) = self.logs.get_mut(&log) else {
            return;
        };
        self.dirty.insert(log);
        match msg {
            PeerMessage::Ack {
                seq,
                written_end,
                ack_end,
                chain_end,
                committed_end,
                resend,
                trim_point,
                ..
            } => {
                let s = &mut l.succ;
                s.commit_known = s.commit_known.max(committed_end);
                s.trim_known = s.trim_known.max(trim_point);
                if s.known && seq <= s.last_ack_seq {
                    return; // reordered: an older view
                }
                if !s.known {
                    s.known = true;
                    s.sent_end = written_end;
                }
                s.last_ack_seq = seq;
                s.last_heard = now;
                s.written_end = written_end;
                s.streamed_received(written_end);
                s.ack_end = s.ack_end.max(ack_end);
                s.chain_end = Some(chain_end);
                s.sent_end = s.sent_end.max(written_end);
                if resend && written_end < s.sent_end {
                    // Rate-limited: reordered gaps would otherwise make us resend the window
                    // once per gap seen.
                    let quiet = self.cfg.resend_timeout_us / 4;
                    let again = matches!(s.rewound, Some((o, at)) if o == written_end && now.saturating_since(at) < quiet);
                    if !again {
                        s.sent_end = written_end;
                        s.rewound = Some((written_end, now));
                        s.streamed_forget();
                        // A storage read still in flight was issued from the old position:
                        // its batches would move `sent_end` past the gap again (and the
                        // successor ask again, forever). Abandon it; the pump reads anew.
                        s.reading = None;
                        s.read_backoff_until = None;
                    }
                }
                Self::trim_window(l);
            }
            PeerMessage::NoLog { .. } => {
                l.succ.no_log = true;
            }
            PeerMessage::FetchReply { batches, .. } => {
                if batches.is_empty() {
                    return; // nothing there yet: the fetch timer asks again
                }
                l.succ.fetch_at = None;
                if l.failed.is_some() {
                    return;
                }
                if let Accept::From(i) = Self::accept_batches(l, &batches) {
                    let batches = batches[i..].to_vec();
                    Self::write_local(l, self.place.succ.is_some(), &self.cfg, batches, true, out);
                }
            }
            _ => {}
        }
    }

    /// Where a run of received batches continues this log.
    fn accept_batches(l: &LogState, batches: &[Bytes]) -> Accept {
        for (i, b) in batches.iter().enumerate() {
            let Ok(h) = BatchHeader::decode(b) else {
                return Accept::Gap;
            };
            if h.end_offset() <= l.written_end {
                continue;
            }
            if h.base_offset == l.written_end {
                return Accept::From(i);
            }
            // Past our end (a gap) or straddling it (cannot happen: batch boundaries are the
            // same on every node); either way ask for a resend from our end.
            return Accept::Gap;
        }
        Accept::Duplicate
    }

    /// Batches from the in-memory window starting exactly at `from`, if it holds them.
    fn from_window(l: &LogState, from: Offset, max_bytes: usize) -> Option<Vec<Bytes>> {
        let front = l.window.front()?;
        if from < front.base || from >= l.written_end {
            return None;
        }
        let i = l.window.partition_point(|b| b.base < from);
        let first = l.window.get(i)?;
        if first.base != from {
            return None;
        }
        let mut bytes = 0usize;
        let mut v = Vec::new();
        for b in l.window.range(i..) {
            if !v.is_empty() && bytes + b.bytes.len() > max_bytes {
                break;
            }
            bytes += b.bytes.len();
            v.push(b.bytes.clone());
        }
        Some(v)
    }

    /// Hands batches (already verified, dense from `written_end`) to storage, remembers them
    /// for the successor and for producer dedup.
    fn write_local(
        l: &mut LogState,
        has_succ: bool,
        cfg: &ReplicaConfig,
        batches: Vec<Bytes>,
        record_producers: bool,
        out: &mut Vec<Effect>,
    ) {
        let base = l.written_end;
        let mut next = base;
        for b in &batches {
            let Some((cut, h)) = cut(b) else {
                panic!("write_local: unverified batch");
            };
            assert_eq!(h.base_offset, next, "batches must be dense");
            if record_producers {
                l.producers
                    .record(h.producer_id, h.producer_seq, h.record_count, h.base_offset);
                Self::clear_fence(l, h.producer_id, h.producer_seq, h.record_count);
            }
            let end = h.end_offset();
            if has_succ {
                l.window_bytes += cut.len();
                l.window.push_back(WinBatch {
                    base: h.base_offset,
                    end,
                    bytes: cut,
                });
            }
            next = end;
        }
        l.written_end = next;
        // The window is a cache of what the successor may still need; beyond its bound the
        // oldest part is read back from storage if a resend needs it.
        let cap = cfg.pipeline_bytes_max + cfg.forward_bytes_max;
        while l.window_bytes > cap {
            let Some(b) = l.window.pop_front() else { break };
            l.window_bytes -= b.bytes.len();
        }
        out.push(Effect::Append {
            log: l.id,
            base,
            batches,
        });
    }

    /// If dedup finds `header`'s batch already in the log, answers this copy of it (a retry)
    /// at once when it is committed, else once it is (or with whatever settles it), and
    /// returns true. Never with a refusal that says "stored nowhere": the batch is stored,
    /// here and maybe downstream.
    fn wait_if_stored(
        l: &mut LogState,
        client: ClientId,
        request_id: u64,
        header: &BatchHeader,
        queue_max: usize,
        out: &mut Vec<Effect>,
    ) -> bool {
        let (producer, seq) = (header.producer_id, header.producer_seq);
        let Dedup::Duplicate {
            base_offset,
            record_count,
        } = l.producers.check(producer, seq, header.record_count)
        else {
            return false;
        };
        let end = base_offset.plus(u64::from(record_count));
        if end <= l.committed_end {
            let ok = ClientReply::AppendOk {
                base_offset,
                record_count,
            };
            Self::reply(out, client, request_id, ok);
        } else if l.retry_waiters >= queue_max {
            let busy = err(
                ErrorCode::RetryPending,
                "already in the log, too many retries waiting for its commit; ask again",
            );
            Self::reply(out, client, request_id, busy);
        } else {
            l.retry_waiters += 1;
            l.commit_waiters.entry(end).or_default().push(Waiter {
                client,
                request_id,
                base: base_offset,
                record_count,
                producer,
                seq,
            });
        }
        true
    }

    /// Answers every append waiting for a commit past `end` with `code`: none of it is stored
    /// anywhere and it never will be (the offsets are sequenced again). Its producer must
    /// resend from it.
    fn fail_waiters_above(l: &mut LogState, end: Offset, code: ErrorCode, out: &mut Vec<Effect>) {
        let lost = l.commit_waiters.split_off(&end.plus(1));
        for w in lost.into_values().flatten() {
            Self::fence(l, w.producer, w.seq);
            Self::reply(
                out,
                w.client,
                w.request_id,
                err(code, storage_failure(code, &l.name)),
            );
        }
        l.retry_waiters = l
            .retry_waiters
            .min(l.commit_waiters.values().map(Vec::len).sum());
    }

    /// Refuses the producer's batches past `seq` until it resends from `seq` (bounded: beyond
    /// `PRODUCERS_PER_LOG_MAX` fenced producers, new ones go unfenced).
    fn fence(l: &mut LogState, producer: ProducerId, seq: u64) {
        if producer.0 != 0
            && (l.fences.len() < PRODUCERS_PER_LOG_MAX || l.fences.contains_key(&producer))
        {
            let f = l.fences.entry(producer).or_insert(seq);
            *f = (*f).min(seq);
        }
    }

    /// Lifts a producer's fence once a batch at or past the refused sequence is in the log.
    fn clear_fence(l: &mut LogState, producer: ProducerId, seq: u64, record_count: u32) {
        if l.fences
            .get(&producer)
            .is_some_and(|f| seq.saturating_add(u64::from(record_count)) > *f)
        {
            l.fences.remove(&producer);
        }
    }

    /// Empties the log and restarts it at `start`: the predecessor trimmed past everything
    /// this node holds, so it cannot send what we lack and we take its stream from there.
    /// Storage drops every record and starts the log at `start` before the appends that
    /// follow (they are queued behind it); only committed offsets lie below `start`.
    fn restart_at(l: &mut LogState, start: Offset, point: Offset, out: &mut Vec<Effect>) {
        assert!(start > l.written_end, "restart_at must move past the end");
        l.window.clear();
        l.window_bytes = 0;
        l.head_writes.clear();
        l.start = start;
        l.written_end = start;
        l.durable_end = start;
        l.committed_end = l.committed_end.max(start);
        l.ask_trim(start, point, out);
    }

    fn trim_window(l: &mut LogState) {
        while let Some(b) = l.window.front() {
            if b.end > l.succ.ack_end {
                break;
            }
            l.window_bytes -= b.bytes.len();
            l.window.pop_front();
        }
    }

    // ---------------------------------------------------------------- links, disk, time

    /// The runtime's link to a neighbour came up or went down.
    pub fn on_link(&mut self, now: Instant, peer: NodeId, up: bool, out: &mut Vec<Effect>) {
        if Some(peer) == self.place.succ {
            self.succ_up = up;
            self.new_succ_session(now);
        }
        if Some(peer) == self.place.pred {
            // Whatever session the predecessor opens on the new connection is the current one.
            self.pred_session = None;
        }
        self.finish(now, out);
    }

    /// Starts a new session towards the successor (when the link is up): every message of
    /// the previous one is fenced, and each log learns the successor's state afresh from its
    /// first `Ack`.
    fn new_succ_session(&mut self, now: Instant) {
        if self.succ_up {
            self.succ_session = (self.succ_session + 1).max(now.0);
        }
        for l in self.logs.values_mut() {
            let s = &mut l.succ;
            s.known = false;
            s.sent_end = Offset::ZERO;
            s.last_ack_seq = 0;
            s.ack_end = Offset::ZERO;
            s.commit_sent = Offset::ZERO;
            s.commit_known = Offset::ZERO;
            s.commit_due = None;
            s.last_probe = None;
            s.last_heard = now;
            s.reading = None;
            s.read_backoff_until = None;
            s.fetch_at = None;
            s.rewound = None;
            s.no_log = false;
            s.start_told = None;
            s.trim_known = Offset::ZERO;
            s.streamed_forget();
            s.trim_told_at = None;
            self.dirty.insert(l.id);
        }
    }

    /// Storage takes writes of a log that failed full again, from its durable `end`: the log
    /// rejoins as if this node had restarted with it. Everything above `end` was never
    /// durable here (commit needs every replica's durability, so none of it is committed);
    /// the head failed those appends back to their clients, and a successor may still hold
    /// some, so the log is re-learned from a new link session before the head sequences
    /// again (`chain_end`), and the predecessor is asked to resend from `end`.
    fn reopen(&mut self, now: Instant, log: LogId, end: Offset) {
        let Some(l) = self.logs.get_mut(&log) else {
            return;
        };
        if l.failed != Some(ErrorCode::StorageFull) {
            return; // only a full disk recovers in place; other failures wait for a restart
        }
        assert!(
            end >= l.durable_end && end <= l.written_end.max(l.durable_end),
            "reopen of {log} at {end} outside durable {} .. written {}",
            l.durable_end,
            l.written_end
        );
        l.failed = None;
        l.written_end = end;
        l.durable_end = end;
        while l.window.back().is_some_and(|b| b.end > end) {
            if let Some(b) = l.window.pop_back() {
                l.window_bytes -= b.bytes.len();
            }
        }
        l.head_writes.clear();
        // Dedup state for batches this node no longer holds would answer a retry with
        // offsets that will hold other records.
        l.producers.forget_from(end);
        // Appends already waiting on such a batch (sequenced here before the failure, or
        // retries matched to it since, while only a successor might still hold it) are in
        // doubt until this head holds the chain's longest log again: then they commit if it
        // adopted the batch back, and are refused if nobody held it. A retry matched after
        // the failure was not counted when it failed (the simulator found one answered with
        // offsets that new appends had filled, seed 1493634).
        l.in_doubt |= l.commit_waiters.range(end.plus(1)..).next().is_some();
        // The successor's view of this log may be older than what was forwarded to it: the
        // head must not sequence at `end` before it knows the longest log downstream afresh.
        l.succ.chain_end = None;
        l.pred.force = true;
        l.pred.resend = true;
        self.dirty.insert(log);
        if self.place.succ.is_some() {
            self.new_succ_session(now);
        }
    }

    pub fn on_disk(&mut self, now: Instant, ev: DiskEvent, out: &mut Vec<Effect>) {
        match ev {
            DiskEvent::Durable { log, end } => {
                if let Some(l) = self.logs.get_mut(&log) {
                    assert!(end <= l.written_end, "durable past written on {log}");
                    l.durable_end = l.durable_end.max(end);
                    self.dirty.insert(log);
                }
            }
            DiskEvent::WriteFailed { log, at, code } => {
                if let Some(l) = self.logs.get_mut(&log) {
                    l.failed = Some(code);
                    // Never sequenced, and (holding the chain's longest log) not a retry of
                    // anything stored: a definite refusal. A head still catching up keeps them
                    // queued (see `client_append`).
                    if holds_longest(self.place.role, l) {
                        let queue_max = self.cfg.admission_queue_max;
                        for q in std::mem::take(&mut l.queue) {
                            // A copy queued while an earlier copy of the same batch waited
                            // (a client's retry) may find that one sequenced meanwhile: it is
                            // stored, and forwarded, so it waits with it (the simulator's
                            // checker caught a StorageFull here while node 2 held the batch,
                            // seed 223916).
                            if Self::wait_if_stored(
                                l,
                                q.client,
                                q.request_id,
                                &q.header,
                                queue_max,
                                out,
                            ) {
                                continue;
                            }
                            Self::fence(l, q.header.producer_id, q.header.producer_seq);
                            Self::reply(
                                out,
                                q.client,
                                q.request_id,
                                err(code, storage_failure(code, &l.name)),
                            );
                        }
                        l.queue_bytes = 0;
                    }
                    if self.place.succ.is_some() {
                        // Sequenced appends above `at` went to the successor before this
                        // write: it may keep them, and this node adopts them back when it
                        // rejoins. An error now would tell the client they are not stored
                        // (it may reuse the sequence for other records, which dedup would then
                        // answer with these offsets): they wait until settled (`in_doubt`).
                        l.in_doubt = l.commit_waiters.range(at.plus(1)..).next().is_some();
                    } else {
                        // Nothing at or past `at` is stored anywhere: a retry of it must not be
                        // answered with those offsets (they may come to hold other records).
                        l.producers.forget_from(at);
                        Self::fail_waiters_above(l, at, code, out);
                    }
                    self.dirty.insert(log);
                }
            }
            DiskEvent::Reopened { log, end } => self.reopen(now, log, end),
            DiskEvent::Truncated { log, end } => {
                if let Some(l) = self.logs.get_mut(&log) {
                    l.written_end = l.written_end.min(end);
                    l.durable_end = l.durable_end.min(end);
                    while l.window.back().is_some_and(|b| b.end > end) {
                        if let Some(b) = l.window.pop_back() {
                            l.window_bytes -= b.bytes.len();
                        }
                    }
                    self.dirty.insert(log);
                }
            }
            DiskEvent::Created { log, result } => {
                let Some(c) = self.creating.remove(&log) else {
                    return;
                };
                match result {
                    Ok(()) => {
                        let mut l = LogState::new(
                            log,
                            c.name,
                            Offset::ZERO,
                            Offset::ZERO,
                            ProducerTable::new(PRODUCERS_PER_LOG_MAX),
                        );
                        l.create_waiters = c.waiters;
                        l.succ.last_heard = now;
                        // The successor almost surely lacks a log we just created.
                        l.succ.no_log = self.succ_up;
                        self.logs.insert(log, l);
                        self.dirty.insert(log);
                    }
                    Err(code) => {
                        for (client, request_id) in c.waiters {
                            Self::reply(out, client, request_id, err(code, "create failed"));
                        }
                    }
                }
            }
            DiskEvent::Trimmed { log, start, point } => {
                if let Some(l) = self.logs.get_mut(&log) {
                    l.start = l.start.max(start);
                    l.start_durable = l.start_durable.max(start);
                    l.trim_durable = l.trim_durable.max(point);
                    // Where reads of this node's log durably start (they stay refused below
                    // the point asked: `served_start`).
                    let start = l.durable_served_start();
                    for (client, request_id) in l.trim_waiters.drain(..) {
                        Self::reply(out, client, request_id, ClientReply::TrimOk { start });
                    }
                    // Now durable here: the successor may drop it too (best effort; a lost
                    // message leaves it holding more, which is harmless).
                    if let (Some(succ), true) = (self.place.succ, self.succ_up) {
                        l.succ.trim_told_at = Some(now);
                        out.push(Effect::Send {
                            to: succ,
                            msg: l.trim_message(self.chain.epoch, self.succ_session),
                        });
                    }
                    self.dirty.insert(log);
                }
            }
            DiskEvent::ReadDone { token, result } => self.read_done(now, token, result, out),
        }
        self.finish(now, out);
    }

    fn read_done(
        &mut self,
        now: Instant,
        token: ReadToken,
        result: Result<Vec<Bytes>, ErrorCode>,
        out: &mut Vec<Effect>,
    ) {
        let Some(job) = self.reads.remove(&token) else {
            return;
        };
        let batches: Result<Vec<Bytes>, ErrorCode> = result.and_then(|v| {
            v.iter()
                .map(|b| cut(b).map(|(c, _)| c).ok_or(ErrorCode::Corruption))
                .collect()
        });
        // Clients are served from where this node serves the log from when their read
        // finishes, not when it started: storage may have read segments that a trim asked
        // meanwhile then dropped (the simulator's checker found such a read served after every
        // replica had trimmed it, seed 973606). A subscriber behind a trim ends here too.
        let client_from = match &job {
            ReadJob::Client { log, from, .. } => Some((*log, *from)),
            ReadJob::Subscription { id } => self.subs.get(id).map(|s| (s.log, s.next)),
            ReadJob::Forward { .. } | ReadJob::FetchServe { .. } => None,
        };
        let below_start = client_from.is_some_and(|(log, from)| {
            self.logs.get(&log).is_some_and(|l| from < l.served_start())
        });
        let batches = if below_start {
            Err(ErrorCode::OffsetTrimmed)
        } else {
            batches
        };
        let epoch = self.chain.epoch;
        match job {
            ReadJob::Client {
                client,
                request_id,
                log,
                max_records,
                ..
            } => {
                self.reads_pending -= 1;
                let committed_end = self
                    .logs
                    .get(&log)
                    .map_or(Offset::ZERO, |l| l.committed_end);
                let reply = match batches {
                    Ok(mut v) => {
                        let mut records = 0u64;
                        let mut keep = 0;
                        for b in &v {
                            let n = BatchHeader::decode(b).map_or(0, |h| u64::from(h.record_count));
                            if keep > 0 && records + n > u64::from(max_records) {
                                break;
                            }
                            records += n;
                            keep += 1;
                        }
                        v.truncate(keep);
                        ClientReply::ReadOk {
                            committed_end,
                            batches: v,
                        }
                    }
                    Err(code) => Self::read_failed(&self.logs, log, code, "read failed"),
                };
                Self::reply(out, client, request_id, reply);
            }
            ReadJob::Subscription { id } => {
                let Some(s) = self.subs.get_mut(&id) else {
                    return;
                };
                s.reading = false;
                let committed_end = self
                    .logs
                    .get(&s.log)
                    .map_or(Offset::ZERO, |l| l.committed_end);
                match batches {
                    Ok(v) if !v.is_empty() => {
                        if let Some(h) = v.last().and_then(|b| BatchHeader::decode(b).ok()) {
                            s.next = s.next.max(h.end_offset());
                        }
                        Self::reply(
                            out,
                            s.client,
                            s.request_id,
                            ClientReply::Records {
                                committed_end,
                                batches: v,
                            },
                        );
                        self.pump_subscription(id, out);
                    }
                    Ok(_) => {
                        let readable = self
                            .logs
                            .get(&s.log)
                            .map_or(Offset::ZERO, |l| l.readable_end());
                        s.stalled_at = Some(readable);
                    }
                    Err(code) => {
                        let what = "subscription read failed";
                        let reply = Self::read_failed(&self.logs, s.log, code, what);
                        Self::reply(out, s.client, s.request_id, reply);
                        self.end_subscription(id);
                    }
                }
            }
            ReadJob::Forward { log, session } => {
                let Some(l) = self.logs.get_mut(&log) else {
                    return;
                };
                if l.succ.reading != Some(token) {
                    return;
                }
                l.succ.reading = None;
                self.dirty.insert(log);
                let (Some(succ), true) = (
                    self.place.succ,
                    session == self.succ_session && self.succ_up,
                ) else {
                    return;
                };
                match batches {
                    Ok(v) if !v.is_empty() => {
                        let Some(first) = BatchHeader::decode(&v[0]).ok() else {
                            return;
                        };
                        // Only a read that continues the stream is sent; anything else is
                        // stale (the pump issues the right read next).
                        if first.base_offset != l.succ.sent_end {
                            return;
                        }
                        let Some(last) = v.last().and_then(|b| BatchHeader::decode(b).ok()) else {
                            return;
                        };
                        l.succ.sent_end = l.succ.sent_end.max(last.end_offset());
                        l.succ.commit_sent = l.succ.commit_sent.max(l.committed_end);
                        let bytes = crate::wire::total_len(&v);
                        l.succ.streamed.push_back((last.end_offset(), bytes));
                        out.push(Effect::Send {
                            to: succ,
                            msg: PeerMessage::Append {
                                epoch,
                                session,
                                log,
                                base: first.base_offset,
                                committed_end: l.committed_end,
                                batches: v,
                            },
                        });
                    }
                    _ => {
                        l.succ.read_backoff_until = Some(now.plus_us(self.cfg.resend_timeout_us));
                    }
                }
            }
            ReadJob::FetchServe { log, session } => {
                let Some(l) = self.logs.get_mut(&log) else {
                    return;
                };
                if l.pred.serving_fetch == Some(token) {
                    l.pred.serving_fetch = None;
                }
                let (Some(pred), Some(cur)) = (self.place.pred, self.pred_session) else {
                    return;
                };
                if cur != session {
                    return;
                }
                let v = batches.unwrap_or_default();
                if v.is_empty() {
                    self.dirty.insert(log); // for the ack `fetch_reply` asks for
                }
                let base = v
                    .first()
                    .and_then(|b| BatchHeader::decode(b).ok())
                    .map_or(l.written_end, |h| h.base_offset);
                out.push(Effect::Send {
                    to: pred,
                    msg: l.fetch_reply(epoch, session, base, v),
                });
            }
        }
    }

    /// Called when `next_tick` says: timers (idle commits, probes, resends, read deadlines).
    pub fn on_tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        while let Some(&(deadline, id)) = self.wait_deadlines.first() {
            if deadline > now {
                break;
            }
            self.wait_deadlines.pop_first();
            if let Some(w) = self.waits.remove(&id) {
                self.reads_pending -= 1;
                let committed_end = match self.logs.get_mut(&w.log) {
                    Some(l) => {
                        l.read_waits.remove(&(w.from, id));
                        l.committed_end
                    }
                    None => Offset::ZERO,
                };
                Self::reply(
                    out,
                    w.client,
                    w.request_id,
                    ClientReply::ReadOk {
                        committed_end,
                        batches: vec![],
                    },
                );
            }
        }
        let ids: Vec<LogId> = self.logs.keys().copied().collect();
        self.dirty.extend(ids);
        self.ticking = true;
        self.finish(now, out);
        self.ticking = false;
    }

    // ---------------------------------------------------------------- the pump

    /// Does everything the events of this call made possible, for every log they touched.
    fn finish(&mut self, now: Instant, out: &mut Vec<Effect>) {
        while let Some(id) = self.dirty.pop_first() {
            let Some(mut l) = self.logs.remove(&id) else {
                continue;
            };
            self.pump(&mut l, now, out);
            self.logs.insert(id, l);
        }
    }

    /// Ready to sequence: the head holds at least the longest log of its chain.
    fn ready(&self, l: &LogState) -> bool {
        holds_longest(self.place.role, l)
    }

    fn ack_end(&self, l: &LogState) -> Offset {
        match self.place.role {
            Role::Single | Role::Tail => l.durable_end,
            _ if self.cfg.bug_ack_before_successor => l.durable_end,
            _ => l.durable_end.min(l.succ.ack_end),
        }
    }

    fn pump(&mut self, l: &mut LogState, now: Instant, out: &mut Vec<Effect>) {
        // Batches adopted from the successor are already acknowledged by it.
        Self::trim_window(l);
        if self.is_head() {
            let acked = self.ack_end(l);
            if acked > l.committed_end {
                l.committed_end = acked;
            }
            if !l.create_waiters.is_empty()
                && (self.place.role == Role::Single || l.succ.chain_end.is_some())
            {
                for (client, request_id) in l.create_waiters.drain(..) {
                    Self::reply(
                        out,
                        client,
                        request_id,
                        ClientReply::CreateLogOk { log: l.id },
                    );
                }
            }
        }
        self.committed_effects(l, out);
        if l.durable_end == l.written_end {
            // Also after a truncation or an adopted suffix: nothing of ours is in flight.
            l.head_writes.clear();
        }
        while l.head_writes.front().is_some_and(|&e| e <= l.durable_end) {
            l.head_writes.pop_front();
        }
        if l.in_doubt && self.is_head() && l.failed.is_none() && self.ready(l) {
            // The chain's longest log is known afresh (new session) and held here.
            l.in_doubt = false;
            l.producers.forget_from(l.written_end);
            let end = l.written_end;
            Self::fail_waiters_above(l, end, ErrorCode::StorageFull, out);
        }
        while self.is_head()
            && l.failed.is_none()
            && l.head_writes.len() < self.cfg.writes_in_flight_max
            && !l.queue.is_empty()
            && self.ready(l)
        {
            let before = l.written_end;
            self.flush(l, out);
            if l.written_end == before {
                break; // nothing admitted (backpressure, or only duplicates and gaps)
            }
            l.head_writes.push_back(l.written_end);
        }
        if self.place.succ.is_some() && self.succ_up {
            self.pump_succ(l, now, out);
        }
        if self.place.pred.is_some() && self.pred_session.is_some() {
            self.pump_ack(l, now, out);
        }
    }

    /// Replies, wake-ups and the saved hint that follow a commit advance.
    fn committed_effects(&mut self, l: &mut LogState, out: &mut Vec<Effect>) {
        if l.committed_end > l.committed_saved {
            l.committed_saved = l.committed_end;
            out.push(Effect::SaveCommitted {
                log: l.id,
                end: l.committed_end,
            });
        }
        if let Some((&end, _)) = l.commit_waiters.first_key_value() {
            if end <= l.committed_end {
                let rest = l.commit_waiters.split_off(&l.committed_end.plus(1));
                let done = std::mem::replace(&mut l.commit_waiters, rest);
                for w in done.into_values().flatten() {
                    Self::reply(
                        out,
                        w.client,
                        w.request_id,
                        ClientReply::AppendOk {
                            base_offset: w.base,
                            record_count: w.record_count,
                        },
                    );
                }
                l.retry_waiters = l
                    .retry_waiters
                    .min(l.commit_waiters.values().map(Vec::len).sum());
            }
        }
        let readable = l.readable_end();
        if readable > l.readable_seen {
            l.readable_seen = readable;
            while let Some(&(from, id)) = l.read_waits.first() {
                if from >= readable {
                    break;
                }
                l.read_waits.pop_first();
                if let Some(w) = self.waits.remove(&id) {
                    self.wait_deadlines.remove(&(w.deadline, id));
                    self.reads_pending -= 1;
                    self.start_read(
                        w.client,
                        w.request_id,
                        l.id,
                        w.from,
                        readable,
                        w.max_records,
                        w.max_bytes,
                        out,
                    );
                }
            }
            let subs: Vec<u64> = l.subs.iter().copied().collect();
            for id in subs {
                self.pump_subscription_with(id, readable, out);
            }
        }
    }

    /// Forgets a subscription (its client has had its last reply).
    fn end_subscription(&mut self, id: u64) {
        if let Some(s) = self.subs.remove(&id) {
            if let Some(l) = self.logs.get_mut(&s.log) {
                l.subs.remove(&id);
            }
        }
    }

    fn pump_subscription(&mut self, id: u64, out: &mut Vec<Effect>) {
        let Some(s) = self.subs.get(&id) else { return };
        let readable = self
            .logs
            .get(&s.log)
            .map_or(Offset::ZERO, |l| l.readable_end());
        self.pump_subscription_with(id, readable, out);
    }

    /// Issues subscription `id`'s next read, up to `readable` (a read that falls below a trim
    /// point is answered when it finishes: `read_done`).
    fn pump_subscription_with(&mut self, id: u64, readable: Offset, out: &mut Vec<Effect>) {
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        if s.reading || s.next >= readable || s.stalled_at.is_some_and(|r| r >= readable) {
            return;
        }
        s.reading = true;
        s.stalled_at = None;
        let (log, from) = (s.log, s.next);
        self.next_token += 1;
        let token = ReadToken(self.next_token);
        self.reads.insert(token, ReadJob::Subscription { id });
        out.push(Effect::Read {
            token,
            log,
            from,
            end: readable,
            max_bytes: SUBSCRIPTION_READ_BYTES,
        });
    }

    /// Head: sequence queued appends into one group, write it and (via `pump_succ`) forward it.
    fn flush(&mut self, l: &mut LogState, out: &mut Vec<Effect>) {
        let has_succ = self.place.succ.is_some();
        let mut group: Vec<Bytes> = Vec::new();
        let mut group_bytes = 0usize;
        let mut records = 0u32;
        let mut next = l.written_end;
        while let Some(q) = l.queue.front() {
            let len = q.header.batch_len();
            if !group.is_empty()
                && (group_bytes + len > self.cfg.forward_bytes_max
                    || records + q.header.record_count > GROUP_RECORDS_MAX)
            {
                break;
            }
            let in_flight = if has_succ { l.window_bytes } else { 0 } + group_bytes;
            if in_flight > 0 && in_flight + len > self.cfg.pipeline_bytes_max {
                break; // backpressure: wait for acks
            }
            let Some(q) = l.queue.pop_front() else { break };
            l.queue_bytes -= len;
            let h = q.header;
            let dedup = l
                .producers
                .check(h.producer_id, h.producer_seq, h.record_count);
            if let (Dedup::New, Some(&fence)) = (&dedup, l.fences.get(&h.producer_id)) {
                if h.producer_seq > fence {
                    // Queued before an earlier batch of its producer was refused (a failed
                    // write's waiters are refused when the log is settled, and the producer
                    // table forgot them): sequencing it would leave a hole before it for good
                    // (the simulator found the producer refused with `SequenceGap` for ever,
                    // seed 1046744).
                    Self::reply(out, q.client, q.request_id, fenced(h.producer_id, fence));
                    continue;
                }
            }
            if !matches!(dedup, Dedup::Gap { .. }) {
                // An earlier copy of the refused sequence was queued (or is already in the
                // log): the producer's order is intact again.
                Self::clear_fence(l, h.producer_id, h.producer_seq, h.record_count);
            }
            match dedup {
                Dedup::Duplicate {
                    base_offset,
                    record_count,
                } => {
                    let end = base_offset.plus(u64::from(record_count));
                    let w = Waiter {
                        client: q.client,
                        request_id: q.request_id,
                        base: base_offset,
                        record_count,
                        producer: h.producer_id,
                        seq: h.producer_seq,
                    };
                    if end <= l.committed_end {
                        Self::reply(
                            out,
                            w.client,
                            w.request_id,
                            ClientReply::AppendOk {
                                base_offset,
                                record_count,
                            },
                        );
                    } else {
                        l.commit_waiters.entry(end).or_default().push(w);
                    }
                    continue;
                }
                Dedup::Gap { expected } => {
                    Self::reply(
                        out,
                        q.client,
                        q.request_id,
                        err(
                            ErrorCode::SequenceGap,
                            format!(
                                "producer {} sent sequence {}, expected {}",
                                h.producer_id, h.producer_seq, expected
                            ),
                        ),
                    );
                    continue;
                }
                Dedup::New => {}
            }
            let (stamped, copied) =
                restamp(q.batch, len, self.cfg.cluster_id, self.chain.epoch, next);
            self.restamp_copy_bytes += copied as u64;
            l.producers
                .record(h.producer_id, h.producer_seq, h.record_count, next);
            let end = next.plus(u64::from(h.record_count));
            l.commit_waiters.entry(end).or_default().push(Waiter {
                client: q.client,
                request_id: q.request_id,
                base: next,
                record_count: h.record_count,
                producer: h.producer_id,
                seq: h.producer_seq,
            });
            group.push(stamped);
            group_bytes += len;
            records += h.record_count;
            next = end;
        }
        if !group.is_empty() {
            Self::write_local(l, has_succ, &self.cfg, group, false, out);
        }
    }

    /// Everything towards the successor for one log: session probe, data, commits, repair.
    fn pump_succ(&mut self, l: &mut LogState, now: Instant, out: &mut Vec<Effect>) {
        let Some(succ) = self.place.succ else { return };
        let epoch = self.chain.epoch;
        let session = self.succ_session;
        let timeout = self.cfg.resend_timeout_us;
        let probe_due = |s: &SuccLog| {
            s.last_probe
                .is_none_or(|t| now.saturating_since(t) >= timeout)
        };
        if l.succ.no_log {
            l.succ.no_log = false;
            l.succ.last_probe = Some(now);
            out.push(Effect::Send {
                to: succ,
                msg: PeerMessage::CreateLog {
                    epoch,
                    session,
                    log: l.id,
                    name: l.name.clone(),
                },
            });
            return;
        }
        if !l.succ.known {
            if probe_due(&l.succ) {
                l.succ.last_probe = Some(now);
                self.probe(l, succ, l.written_end, out);
            }
            return;
        }
        if now.saturating_since(l.succ.last_heard) >= timeout && probe_due(&l.succ) {
            // Silent for a resend timeout (the probe below asks where it is): streamed reads
            // it never acknowledged no longer hold the stream back, so a lost ack cannot stall
            // it; at most a window more goes out per timeout.
            l.succ.streamed_forget();
        }
        self.forward(l, succ, now, out);
        // The successor reports a trim point below ours (it missed a `Trim`): tell it again,
        // at most once per resend timeout, so every replica stops serving below a client's
        // trim.
        if l.trim_durable > l.succ.trim_known
            && l.failed.is_none()
            && l.succ
                .trim_told_at
                .is_none_or(|t| now.saturating_since(t) >= timeout)
        {
            l.succ.trim_told_at = Some(now);
            out.push(Effect::Send {
                to: succ,
                msg: l.trim_message(epoch, session),
            });
        }
        if l.committed_end > l.succ.commit_sent {
            let send = if self.is_head() {
                let due = *l
                    .succ
                    .commit_due
                    .get_or_insert(now.plus_us(self.cfg.commit_idle_us));
                now >= due
            } else {
                true
            };
            if send {
                l.succ.commit_sent = l.committed_end;
                l.succ.commit_due = None;
                out.push(Effect::Send {
                    to: succ,
                    msg: PeerMessage::Commit {
                        epoch,
                        session,
                        log: l.id,
                        committed_end: l.committed_end,
                    },
                });
            }
        }
        // No ack progress for a while although the successor lacks data: ask where it is.
        // (Also when a `Commit` went missing: the probe carries the committed end.)
        let expecting = l.succ.ack_end < l.written_end
            || l.succ.sent_end < l.written_end
            || l.succ.commit_known < l.committed_end;
        if expecting && now.saturating_since(l.succ.last_heard) >= timeout && probe_due(&l.succ) {
            l.succ.last_probe = Some(now);
            self.probe(l, succ, l.succ.sent_end, out);
        }
        // Repair: the successor holds more than we do; adopt its suffix.
        if l.failed.is_none() && l.succ.chain_end.is_some_and(|c| c > l.written_end) {
            let due = l
                .succ
                .fetch_at
                .is_none_or(|t| now.saturating_since(t) >= timeout);
            if due {
                l.succ.fetch_at = Some(now);
                out.push(Effect::Send {
                    to: succ,
                    msg: PeerMessage::Fetch {
                        epoch,
                        session,
                        log: l.id,
                        from: l.written_end,
                        max_bytes: self.cfg.forward_bytes_max as u32,
                    },
                });
            }
        }
    }

    fn probe(&self, l: &mut LogState, succ: NodeId, base: Offset, out: &mut Vec<Effect>) {
        l.succ.commit_sent = l.succ.commit_sent.max(l.committed_end);
        out.push(Effect::Send {
            to: succ,
            msg: PeerMessage::Append {
                epoch: self.chain.epoch,
                session: self.succ_session,
                log: l.id,
                base,
                committed_end: l.committed_end,
                batches: vec![],
            },
        });
    }

    /// Sends the successor what it lacks: from memory when the window holds it, else one
    /// storage read at a time.
    fn forward(&mut self, l: &mut LogState, succ: NodeId, now: Instant, out: &mut Vec<Effect>) {
        let epoch = self.chain.epoch;
        let session = self.succ_session;
        while l.succ.sent_end < l.written_end {
            let from = l.succ.sent_end;
            if let Some(batches) = Self::from_window(l, from, self.cfg.forward_bytes_max) {
                let last = batches.last().and_then(|b| BatchHeader::decode(b).ok());
                let Some(last) = last else { break };
                l.succ.sent_end = last.end_offset();
                l.succ.commit_sent = l.succ.commit_sent.max(l.committed_end);
                l.succ.commit_due = None;
                out.push(Effect::Send {
                    to: succ,
                    msg: PeerMessage::Append {
                        epoch,
                        session,
                        log: l.id,
                        base: from,
                        committed_end: l.committed_end,
                        batches,
                    },
                });
                continue;
            }
            if from < l.start {
                // The successor lacks offsets we no longer hold. They were committed, so its
                // copy was lost after the commit (bit rot) and every other copy trimmed since:
                // tell it our durable start, from which it restarts its log.
                let due = |told: Option<(Offset, Instant)>| match told {
                    Some((o, at)) => {
                        o != l.start_durable
                            || now.saturating_since(at) >= self.cfg.resend_timeout_us
                    }
                    None => true,
                };
                if from < l.start_durable
                    && !self.cfg.bug_no_restart_at_pred_start
                    && due(l.succ.start_told)
                {
                    l.succ.start_told = Some((l.start_durable, now));
                    out.push(Effect::Send {
                        to: succ,
                        msg: l.trim_message(epoch, session),
                    });
                }
                break;
            }
            if l.succ.reading.is_some()
                || l.succ.read_backoff_until.is_some_and(|t| now < t)
                || l.succ.streamed_bytes() >= self.cfg.pipeline_bytes_max
            {
                break;
            }
            // Storage serves only what is durable here; the window covers the rest.
            let end = match l.window.front() {
                Some(f) => f.base.min(l.durable_end),
                None => l.durable_end,
            };
            if from >= end {
                break;
            }
            self.next_token += 1;
            let token = ReadToken(self.next_token);
            l.succ.reading = Some(token);
            l.succ.read_backoff_until = None;
            self.reads
                .insert(token, ReadJob::Forward { log: l.id, session });
            out.push(Effect::Read {
                token,
                log: l.id,
                from,
                end,
                max_bytes: self.cfg.forward_bytes_max,
            });
            break;
        }
    }

    /// Tells the predecessor how far this node and everything after it are durable.
    fn pump_ack(&mut self, l: &mut LogState, now: Instant, out: &mut Vec<Effect>) {
        let (Some(pred), Some(session)) = (self.place.pred, self.pred_session) else {
            return;
        };
        // Until we know the rest of the chain we cannot vouch for it: stay silent, the
        // predecessor probes again.
        let chain_end = match self.place.role {
            Role::Tail => l.written_end,
            _ => match l.succ.chain_end {
                Some(c) => c.max(l.written_end),
                None => return,
            },
        };
        let ack_end = self.ack_end(l);
        let p = &mut l.pred;
        // A chain end that moved only because batches arrived rides on the next durable ack
        // (one flush away), or goes with the first tick at least `ARRIVAL_ACK_DELAY_US` after
        // the arrival, whichever is first: an ack per received batch doubled the messages,
        // reads and wake-ups per hop, and the CPU they took on a small machine delayed the
        // successor's copy. (Any tick was not enough: the runtime's millisecond timer is
        // nearly always due when a batch wakes the node, so arrivals were still acked at once
        // in most cycles.) The first ack of a session, and every ack a gap, duplicate or
        // resend asks for (`force`, `resend`), still go at once.
        let chain_moved = p.chain_sent != Some(chain_end);
        if !chain_moved {
            p.chain_moved_at = None;
        } else if p.chain_moved_at.is_none() {
            p.chain_moved_at = Some(now);
        }
        let arrival_old = p
            .chain_moved_at
            .is_some_and(|t| now.saturating_since(t) >= ARRIVAL_ACK_DELAY_US);
        let chain_due = chain_moved && ((self.ticking && arrival_old) || p.chain_sent.is_none());
        let trim_due = l.trim_durable > p.trim_sent;
        if ack_end > p.ack_sent || chain_due || trim_due || p.force || p.resend {
            self.ack_seq += 1;
            out.push(Effect::Send {
                to: pred,
                msg: PeerMessage::Ack {
                    epoch: self.chain.epoch,
                    session,
                    log: l.id,
                    seq: self.ack_seq,
                    written_end: l.written_end,
                    ack_end,
                    chain_end,
                    committed_end: l.committed_end,
                    resend: p.resend,
                    trim_point: l.trim_durable,
                },
            });
            p.ack_sent = p.ack_sent.max(ack_end);
            p.trim_sent = p.trim_sent.max(l.trim_durable);
            p.chain_sent = Some(chain_end);
            p.chain_moved_at = None;
            p.force = false;
            p.resend = false;
        }
    }

    // ---------------------------------------------------------------- timers

    /// When the runtime must call `on_tick` next if nothing else happens first. `None` while
    /// anything is in flight on any log: tick at the runtime's fast period (1 ms), which the
    /// idle `Commit` (`commit_idle_us`) and the delayed arrival ack (`ARRIVAL_ACK_DELAY_US`)
    /// need. Otherwise the earliest read-wait deadline, or at most `idle_tick_us()` after
    /// `last_tick`: the remaining timers (probes, resends, fetch retries, read back-off) run on
    /// `resend_timeout_us`, of which that is a quarter. An idle node then wakes tens of times a
    /// second instead of a thousand (the dev chain idled at 8% of a CPU).
    pub fn tick_deadline(&self, last_tick: Instant) -> Option<Instant> {
        if self.logs.values().any(|l| self.busy(l)) {
            return None;
        }
        let idle = last_tick.plus_us(self.idle_tick_us());
        Some(match self.wait_deadlines.first() {
            Some(&(deadline, _)) => deadline.min(idle),
            None => idle,
        })
    }

    /// When the runtime ticks next after a tick at `last_tick`: [`Replica::tick_deadline`],
    /// or `BUSY_TICK_US` later while work is in flight.
    pub fn next_tick(&self, last_tick: Instant) -> Instant {
        self.tick_deadline(last_tick)
            .unwrap_or(last_tick.plus_us(BUSY_TICK_US))
    }

    /// The longest a node waits between ticks when idle.
    pub fn idle_tick_us(&self) -> u64 {
        (self.cfg.resend_timeout_us / 4).clamp(1, IDLE_TICK_MAX_US)
    }

    /// Work in flight on `l` whose next step may be due to a fast timer.
    fn busy(&self, l: &LogState) -> bool {
        let succ_behind = self.place.succ.is_some()
            && (l.succ.ack_end < l.written_end
                || l.succ.sent_end < l.written_end
                || l.succ.commit_sent < l.committed_end
                || l.succ.reading.is_some()
                || !l.window.is_empty());
        let pred_owed = self.place.pred.is_some()
            && (l.pred.chain_moved_at.is_some() || l.pred.force || l.pred.resend);
        !l.queue.is_empty()
            || !l.commit_waiters.is_empty()
            || !l.head_writes.is_empty()
            || l.written_end != l.durable_end
            || l.in_doubt
            || succ_behind
            || pred_owed
    }

    // ---------------------------------------------------------------- status

    pub fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            node: self.cfg.node,
            epoch: self.chain.epoch,
            role: self.place.role,
            restamp_copy_bytes: self.restamp_copy_bytes,
            chain: self.chain.nodes.clone(),
            logs: self
                .logs
                .values()
                .map(|l| LogStatus {
                    name: l.name.clone(),
                    log: l.id,
                    start: l.served_start(),
                    written_end: l.written_end,
                    durable_end: l.durable_end,
                    ack_end: self.ack_end(l),
                    committed_end: l.committed_end,
                    pipeline_bytes: l.window_bytes,
                    queued_appends: l.queue.len(),
                    ready: self.ready(l),
                    failed: l.failed,
                })
                .collect(),
        }
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    pub fn chain(&self) -> &ChainConfig {
        &self.chain
    }
}

/// Head: it holds at least the longest log of its chain, so its producer table knows every
/// batch stored anywhere in the chain (a batch it does not know is stored nowhere).
fn holds_longest(role: Role, l: &LogState) -> bool {
    match role {
        Role::Single => true,
        Role::Head => l.succ.chain_end.is_some_and(|c| l.written_end >= c),
        _ => false,
    }
}

enum Accept {
    /// Batches from this index continue the log.
    From(usize),
    /// Everything is already here.
    Duplicate,
    /// The batches start past our end (or do not line up with it).
    Gap,
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
