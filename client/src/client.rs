//! The async `Client`: connection management, head/replica routing, retries, and the request
//! methods (append, read, subscribe, status, create-log, trim).

use crate::conn::{Conn, ConnOptions};
use crate::error::{Error, Result};
use crate::producer::{self, Item, Producer};
use crate::routing::{Nodes, Slot};
use crate::subscribe::Subscription;
use crate::{ClientConfig, Record};
use bytes::Bytes;
use chainlog_core::limits::LOGS_MAX;
use chainlog_core::record;
use chainlog_core::types::log_name_valid;
use chainlog_core::wire::{ClientReply, ClientRequest};
use chainlog_core::{ClusterId, ErrorCode, LogId, Offset, ProducerId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// A handle to a chainlog cluster. Clones share connections and per-log batching state.
///
/// ```no_run
/// # async fn demo() -> chainlog_client::Result<()> {
/// use chainlog_client::{Client, ClientConfig};
/// let mut cfg = ClientConfig::new(["10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"]);
/// cfg.linger_us = 1000; // wait up to 1 ms to fill a batch
/// let client = Client::connect(cfg).await?;
/// let offset = client.append("default", b"hello".to_vec()).await?;
/// println!("stored at {offset}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("nodes", &self.inner.nodes.addrs())
            .field("producer_id", &self.inner.producer_id)
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ClientConfig,
    pub(crate) nodes: Nodes,
    /// The cluster id in use: configured, or learned from the first handshake.
    cluster_id: AtomicU64,
    pub(crate) producer_id: ProducerId,
    producers: Mutex<HashMap<LogId, mpsc::Sender<Item>>>,
    /// Per log, the highest committed end this client has learned (appends' `AppendOk`,
    /// reads' and subscriptions' `committed_end`): a read below it has records to return
    /// even from a replica that has not heard of the commit yet. At most
    /// `COMMITTED_ENDS_MAX` logs.
    committed: Mutex<HashMap<LogId, Offset>>,
    /// Payload bytes accepted by `append` and not yet answered.
    pub(crate) buffer: Arc<Semaphore>,
    /// Subscriptions open (`subscriptions_max`); each holds a permit until dropped.
    pub(crate) subscriptions: Arc<Semaphore>,
}

/// Logs whose committed end a client remembers: as many as a server holds. Past that one is
/// forgotten, which only costs a later read of it the wait below.
const COMMITTED_ENDS_MAX: usize = LOGS_MAX;

/// How long a read below the committed end this client knows may wait at a replica that has
/// not learned that commit yet. A commit reaches every replica within one hop (on the head's
/// next batch or its idle `Commit`), so this is many hops' worth even on a loaded machine;
/// a replica still behind after it is passed over for the head, which knows every commit.
pub(crate) const READ_COMMIT_WAIT: Duration = Duration::from_millis(300);

/// An offset past the end of any log: a read from it asks only for the committed end.
const PAST_ANY_END: Offset = Offset(u64::MAX);

/// How to read.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Most records returned. Default 1000.
    pub max_records: u32,
    /// Bytes of batches the node may return (whole batches, so one larger batch still comes
    /// back). Default: the config's `read_bytes_max`.
    pub max_bytes: Option<u32>,
    /// If nothing at `from` is committed yet, how long the node may wait for it. Default 0.
    /// A read from below a committed end this client has learned (from its own appends, say)
    /// waits at least `READ_COMMIT_WAIT` (300 ms) at a replica that has not learned it yet,
    /// and is then sent to the head unless `node` pins the replica: such a read does not come
    /// back empty because one replica lags.
    pub wait: Duration,
    /// Read from `addrs[i]` instead of the config's choice. An index past the known
    /// addresses is `InvalidArgument`.
    pub node: Option<usize>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_records: 1000,
            max_bytes: None,
            wait: Duration::ZERO,
            node: None,
        }
    }
}

/// What a read returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// Records at or after `from`, in offset order.
    pub records: Vec<Record>,
    /// One past the last offset the answering node knew to be committed.
    pub committed_end: Offset,
}

/// A random-enough nonzero producer id without a `rand` dependency: time, pid and a counter
/// through splitmix64. Two clients colliding would only merge their dedup state.
pub(crate) fn new_producer_id() -> ProducerId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    let mut z = now
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (&local as *const u8 as u64);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ProducerId(z.max(1))
}

/// Checks a log name before it goes on the wire.
pub(crate) fn log_id(name: &str) -> Result<LogId> {
    if !log_name_valid(name) {
        return Err(Error::InvalidArgument(format!(
            "log name {name:?} must be 1..=200 bytes of [A-Za-z0-9._-]"
        )));
    }
    Ok(LogId::from_name(name))
}

impl Client {
    /// A client that connects lazily, on the first request.
    pub fn new(cfg: ClientConfig) -> Result<Client> {
        cfg.validate()?;
        let producer_id = if cfg.idempotent {
            new_producer_id()
        } else {
            ProducerId(0)
        };
        Ok(Client {
            inner: Arc::new(Inner {
                nodes: Nodes::new(&cfg.addrs),
                cluster_id: AtomicU64::new(cfg.cluster_id.0),
                producer_id,
                producers: Mutex::new(HashMap::new()),
                committed: Mutex::new(HashMap::new()),
                buffer: Arc::new(Semaphore::new(cfg.buffer_bytes_max)),
                subscriptions: Arc::new(Semaphore::new(cfg.subscriptions_max)),
                cfg,
            }),
        })
    }

    /// A client that has completed a handshake with the first reachable node, so a wrong
    /// address or cluster id fails here rather than at the first request.
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        let client = Client::new(cfg)?;
        let mut last = None;
        for i in 0..client.inner.nodes.len() {
            let Some(slot) = client.inner.nodes.get(i) else {
                break;
            };
            match client.inner.conn(&slot).await {
                Ok(_) => return Ok(client),
                Err(e @ Error::WrongCluster { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(Error::Closed))
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// This client's producer id (0 when not idempotent): every log starts with it. A log
    /// whose append ended in doubt ([`Error::InDoubt`]) continues under a fresh id, so this
    /// is then no longer the id in that log's new batches.
    pub fn producer_id(&self) -> ProducerId {
        self.inner.producer_id
    }

    /// The cluster id in use (0 until learned from a handshake, if none was configured).
    pub fn cluster_id(&self) -> ClusterId {
        ClusterId(self.inner.cluster_id.load(Ordering::Relaxed))
    }

    /// Known node addresses: the configured ones, then any learned from redirects.
    pub fn nodes(&self) -> Vec<String> {
        self.inner.nodes.addrs()
    }

    /// The batching producer for `log` (shared by every clone of this client).
    pub fn producer(&self, log: &str) -> Result<Producer> {
        let id = log_id(log)?;
        let mut map = self
            .inner
            .producers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&id) {
            if !tx.is_closed() {
                return Ok(Producer::new(self.clone(), log.to_string(), tx.clone()));
            }
        }
        if map.len() >= LOGS_MAX {
            map.retain(|_, tx| !tx.is_closed());
            if map.len() >= LOGS_MAX {
                return Err(Error::InvalidArgument(format!(
                    "this client already produces to {LOGS_MAX} logs"
                )));
            }
        }
        let tx = producer::spawn(Arc::downgrade(&self.inner), id);
        map.insert(id, tx.clone());
        Ok(Producer::new(self.clone(), log.to_string(), tx))
    }

    /// Appends one record; returns its offset once it is durable on every replica.
    pub async fn append(&self, log: &str, payload: impl Into<Bytes>) -> Result<Offset> {
        self.producer(log)?.append(payload).await
    }

    /// Appends records as one batch: all or none are stored, at consecutive offsets. Returns
    /// the first offset and the count.
    pub async fn append_batch<P: AsRef<[u8]>>(
        &self,
        log: &str,
        payloads: &[P],
    ) -> Result<(Offset, u32)> {
        let payloads = payloads
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_ref()))
            .collect();
        self.producer(log)?.send_batch(payloads).await?.await
    }

    /// Reads up to `max_records` committed records from `from` on, from one replica (the
    /// pinned one, else round-robin; unless pinned, a replica that cannot answer is passed
    /// over for the next, each tried once). Returns fewer (possibly none) at the end of the
    /// log.
    pub async fn read(&self, log: &str, from: Offset, max_records: u32) -> Result<Vec<Record>> {
        let opts = ReadOptions {
            max_records,
            ..ReadOptions::default()
        };
        Ok(self.read_with(log, from, &opts).await?.records)
    }

    /// A read with every knob (long-poll wait, byte budget, node).
    ///
    /// Below a committed end this client has learned, the read returns at least one record
    /// (see [`ReadOptions::wait`]); at or past it, possibly none.
    pub async fn read_with(
        &self,
        log: &str,
        from: Offset,
        opts: &ReadOptions,
    ) -> Result<ReadResult> {
        let log = log_id(log)?;
        let known = self.inner.known_committed(log);
        let behind = from < known;
        let wait = if behind {
            opts.wait.max(READ_COMMIT_WAIT)
        } else {
            opts.wait
        };
        let req = ClientRequest::Read {
            log,
            from,
            max_records: opts.max_records,
            max_bytes: opts.max_bytes.unwrap_or(self.inner.cfg.read_bytes_max),
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        let timeout = self.inner.cfg.request_timeout() + wait;
        let pinned = opts.node.or(self.inner.cfg.read_from);
        let (index, addr, reply) = self
            .inner
            .call_replica(&req, timeout, "read", pinned)
            .await?;
        let mut res = read_result(&addr, log, from, opts, reply)?;
        if behind && res.records.is_empty() && pinned.is_none() {
            // The replica did not learn within the wait what this client knows committed (it
            // restarted, or its predecessor's link is slow): the head knows every commit.
            let (head_index, slot) = self.inner.nodes.head();
            if head_index != index {
                let conn = self.inner.conn(&slot).await?;
                let reply = conn.call(&req, timeout, "read").await?;
                res = read_result(&slot.addr, log, from, opts, reply)?;
            }
        }
        self.inner.learn_committed(log, res.committed_end);
        Ok(res)
    }

    /// One past the last committed offset of `log`: what a replica answers, or more if this
    /// client has learned more (its own appends, say).
    pub async fn committed_end(&self, log: &str) -> Result<Offset> {
        let opts = ReadOptions {
            max_records: 1,
            max_bytes: Some(1),
            ..ReadOptions::default()
        };
        // From past any end: a replica answers at once with no records and its committed end,
        // wherever the log starts (a read below a trimmed log's start is `OffsetTrimmed`).
        let res = self.read_with(log, PAST_ANY_END, &opts).await?;
        Ok(res
            .committed_end
            .max(self.inner.known_committed(log_id(log)?)))
    }

    /// Every committed record from `from` on, as it commits, from one replica (the pinned
    /// one, else the next in round-robin order, or the others in turn while that fails).
    /// Survives lost connections by resubscribing (to the next replica unless pinned) after
    /// the last record delivered.
    pub async fn subscribe(&self, log: &str, from: Offset) -> Result<Subscription> {
        let id = log_id(log)?;
        Subscription::start(self.inner.clone(), id, from).await
    }

    /// The status document of one node (the pinned one, else the first).
    pub async fn status(&self) -> Result<serde_json::Value> {
        self.status_of(self.inner.cfg.read_from.unwrap_or(0)).await
    }

    /// The status document of `addrs[node]`.
    pub async fn status_of(&self, node: usize) -> Result<serde_json::Value> {
        let raw = self.status_raw_of(node).await?;
        serde_json::from_slice(&raw).map_err(|e| {
            let addr = self
                .inner
                .nodes
                .get(node)
                .map(|s| s.addr.clone())
                .unwrap_or_default();
            Error::protocol(&addr, format!("status is not JSON: {e}"))
        })
    }

    /// The status document of `addrs[node]`, as the server sent it.
    pub async fn status_raw_of(&self, node: usize) -> Result<Bytes> {
        let slot = self
            .inner
            .nodes
            .get(node)
            .ok_or_else(|| Error::InvalidArgument(format!("no node {node}")))?;
        let conn = self.inner.conn(&slot).await?;
        match conn
            .call(
                &ClientRequest::Status,
                self.inner.cfg.request_timeout(),
                "status",
            )
            .await?
        {
            ClientReply::StatusOk { json } => Ok(json),
            other => Err(unexpected(&slot.addr, "StatusOk", &other)),
        }
    }

    /// Creates a log on the chain; returns its id.
    pub async fn create_log(&self, name: &str) -> Result<LogId> {
        let id = log_id(name)?;
        let req = ClientRequest::CreateLog {
            name: name.to_string(),
        };
        match self.inner.call_head(&req, "create-log").await? {
            (addr, ClientReply::CreateLogOk { log }) => {
                if log != id {
                    return Err(Error::protocol(
                        &addr,
                        format!("created {log}, expected {id}"),
                    ));
                }
                Ok(log)
            }
            (addr, other) => Err(unexpected(&addr, "CreateLogOk", &other)),
        }
    }

    /// Trims `log` below `before` (retention): no replica serves those offsets from then on,
    /// across restarts too (storage deletes whole segments; the rest goes with its segment).
    /// Returns where reads of the log now start.
    pub async fn trim(&self, log: &str, before: Offset) -> Result<Offset> {
        let req = ClientRequest::Trim {
            log: log_id(log)?,
            before,
        };
        match self.inner.call_head(&req, "trim").await? {
            (_, ClientReply::TrimOk { start }) => Ok(start),
            (addr, other) => Err(unexpected(&addr, "TrimOk", &other)),
        }
    }
}

/// A read's reply as a `ReadResult`.
fn read_result(
    addr: &str,
    log: LogId,
    from: Offset,
    opts: &ReadOptions,
    reply: ClientReply,
) -> Result<ReadResult> {
    match reply {
        ClientReply::ReadOk {
            committed_end,
            batches,
        } => Ok(ReadResult {
            records: decode_records(addr, log, from, opts.max_records as usize, &batches)?,
            committed_end,
        }),
        other => Err(unexpected(addr, "ReadOk", &other)),
    }
}

pub(crate) fn unexpected(addr: &str, want: &str, got: &ClientReply) -> Error {
    let kind = match got {
        ClientReply::CreateLogOk { .. } => "CreateLogOk",
        ClientReply::AppendOk { .. } => "AppendOk",
        ClientReply::ReadOk { .. } => "ReadOk",
        ClientReply::Records { .. } => "Records",
        ClientReply::StatusOk { .. } => "StatusOk",
        ClientReply::TrimOk { .. } => "TrimOk",
        ClientReply::Error { .. } => "Error",
    };
    Error::protocol(addr, format!("expected {want}, got {kind}"))
}

/// Records of `log` at or after `from` (the first batch may start earlier), at most `max`.
pub(crate) fn decode_records(
    addr: &str,
    log: LogId,
    from: Offset,
    max: usize,
    batches: &[Bytes],
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut expect: Option<Offset> = None;
    for b in batches {
        let h = record::verify(b).map_err(|e| Error::protocol(addr, e.to_string()))?;
        if h.log_id != log {
            return Err(Error::protocol(
                addr,
                format!("batch of {}, asked for {log}", h.log_id),
            ));
        }
        match expect {
            Some(e) if h.base_offset != e => {
                return Err(Error::protocol(
                    addr,
                    format!("batches not contiguous: {} after end {e}", h.base_offset),
                ));
            }
            // Records from `from` on, or none: a first batch past it would skip records
            // without a word (a trimmed start is answered `OffsetTrimmed`, not with later data).
            None if h.base_offset > from => {
                return Err(Error::protocol(
                    addr,
                    format!("records asked from {from} start at {}", h.base_offset),
                ));
            }
            _ => {}
        }
        expect = Some(h.end_offset());
        let recs = record::records(b).map_err(|e| Error::protocol(addr, e.to_string()))?;
        for (offset, payload) in recs {
            if out.len() >= max {
                return Ok(out);
            }
            if offset >= from {
                out.push(Record {
                    offset,
                    payload,
                    timestamp_us: h.timestamp_us,
                });
            }
        }
    }
    Ok(out)
}

impl Inner {
    pub(crate) fn conn_options(&self) -> ConnOptions {
        ConnOptions {
            cluster_id: ClusterId(self.cluster_id.load(Ordering::Relaxed)),
            connect_timeout: Duration::from_millis(self.cfg.connect_timeout_ms),
            in_flight_max: self.cfg.in_flight_max,
        }
    }

    pub(crate) fn cluster_id(&self) -> ClusterId {
        ClusterId(self.cluster_id.load(Ordering::Relaxed))
    }

    /// Remembers that `log` is committed up to `end` (it never decreases).
    pub(crate) fn learn_committed(&self, log: LogId, end: Offset) {
        let mut map = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = map.get_mut(&log) {
            *known = (*known).max(end);
            return;
        }
        if end == Offset::ZERO {
            return;
        }
        if map.len() >= COMMITTED_ENDS_MAX {
            // Forgetting a log's end only costs a later read of it the wait.
            if let Some(k) = map.keys().next().copied() {
                map.remove(&k);
            }
        }
        map.insert(log, end);
    }

    /// The highest committed end of `log` this client has learned (0 if none).
    pub(crate) fn known_committed(&self, log: LogId) -> Offset {
        let map = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&log).copied().unwrap_or(Offset::ZERO)
    }

    /// Opens a fresh connection (not shared) and checks its cluster.
    pub(crate) async fn open(&self, addr: &str) -> Result<Conn> {
        let conn = Conn::connect(addr, &self.conn_options()).await?;
        let got = conn.hello().cluster_id;
        match self
            .cluster_id
            .compare_exchange(0, got.0, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Ok(conn),
            Err(known) if known == got.0 => Ok(conn),
            Err(known) => Err(Error::WrongCluster {
                addr: addr.to_string(),
                expected: ClusterId(known),
                got,
            }),
        }
    }

    /// The shared connection to a node, reopened if it failed.
    pub(crate) async fn conn(&self, slot: &Slot) -> Result<Arc<Conn>> {
        let mut guard = slot.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let c = Arc::new(self.open(&slot.addr).await?);
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Adjusts the head after a failed head request; says whether to retry without a pause.
    pub(crate) fn head_failed(&self, index: usize, e: &Error) -> bool {
        match e {
            Error::Server {
                code: ErrorCode::NotHead,
                message,
            } => {
                self.nodes.redirect(index, message);
                crate::routing::parse_not_head(message).is_some()
            }
            Error::Io { .. } | Error::ConnectionLost { .. } => {
                self.nodes.rotate_head(index);
                false
            }
            _ => false,
        }
    }

    /// A request for the head, retried on retriable errors (following redirects).
    pub(crate) async fn call_head(
        &self,
        req: &ClientRequest,
        what: &'static str,
    ) -> Result<(String, ClientReply)> {
        let mut attempt = 0u32;
        loop {
            let (index, slot) = self.nodes.head();
            let r = match self.conn(&slot).await {
                Ok(c) => c.call(req, self.cfg.request_timeout(), what).await,
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(reply) => return Ok((slot.addr.clone(), reply)),
                Err(e) => e,
            };
            let immediate = self.head_failed(index, &e);
            if !e.is_retriable() || attempt >= self.cfg.retries_max {
                return Err(e);
            }
            attempt += 1;
            if !immediate {
                tokio::time::sleep(self.cfg.backoff(attempt)).await;
            }
        }
    }

    /// A request any replica can answer: the pinned replica, else the next in round-robin
    /// order and, while one fails in a way another may not (`another_replica_may_answer`),
    /// each of the others once. Other errors are returned as they are.
    pub(crate) async fn call_replica(
        &self,
        req: &ClientRequest,
        timeout: Duration,
        what: &'static str,
        pinned: Option<usize>,
    ) -> Result<(usize, String, ClientReply)> {
        let mut last = Error::Closed;
        for (index, slot) in self.nodes.read_order(pinned)? {
            let r = match self.conn(&slot).await {
                Ok(c) => c.call(req, timeout, what).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(reply) => return Ok((index, slot.addr.clone(), reply)),
                Err(e) if another_replica_may_answer(&e) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// Whether a read or subscription that failed this way at one replica may succeed at another:
/// the node is unreachable, slow or going away, or out of room for one more reader (its
/// limits are its own). A refusal about the request itself (unknown log, trimmed offset)
/// would be the same everywhere.
pub(crate) fn another_replica_may_answer(e: &Error) -> bool {
    match e {
        Error::Io { .. } | Error::ConnectionLost { .. } | Error::Timeout { .. } => true,
        Error::Server { code, .. } => matches!(
            code,
            ErrorCode::ShuttingDown
                | ErrorCode::Unavailable
                | ErrorCode::LimitExceeded
                | ErrorCode::Timeout
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chainlog_core::Epoch;

    #[test]
    fn producer_ids_are_nonzero_and_differ() {
        let a = new_producer_id();
        let b = new_producer_id();
        assert_ne!(a, ProducerId(0));
        assert_ne!(a, b);
    }

    #[test]
    fn decode_skips_below_from_and_caps() {
        let log = LogId::from_name("l");
        let b1 = record::build(log, Offset(10), Epoch(1), &[b"a", b"b", b"c"]).unwrap();
        let b2 = record::build(log, Offset(13), Epoch(1), &[b"d", b"e"]).unwrap();
        let got = decode_records("x:1", log, Offset(12), 100, &[b1.clone(), b2.clone()]).unwrap();
        let offs: Vec<u64> = got.iter().map(|r| r.offset.0).collect();
        assert_eq!(offs, vec![12, 13, 14]);
        assert_eq!(got[0].payload, Bytes::from_static(b"c"));
        let got = decode_records("x:1", log, Offset(11), 2, &[b1.clone(), b2.clone()]).unwrap();
        assert_eq!(got.len(), 2);
        // A gap between batches or another log's batch is a protocol error, not data.
        let b3 = record::build(log, Offset(20), Epoch(1), &[b"z"]).unwrap();
        assert!(decode_records("x:1", log, Offset(10), 100, &[b1.clone(), b3]).is_err());
        let other = record::build(LogId(1), Offset(13), Epoch(1), &[b"z"]).unwrap();
        assert!(decode_records("x:1", log, Offset(10), 100, &[b1.clone(), other]).is_err());
        // So is an answer that starts past where it was asked from: records would be skipped
        // (a subscription's next frame, or a read, from 12 answered from 13).
        assert!(decode_records("x:1", log, Offset(10), 100, std::slice::from_ref(&b1)).is_ok());
        let skipped = decode_records("x:1", log, Offset(12), 100, std::slice::from_ref(&b2));
        assert!(
            matches!(&skipped, Err(Error::Protocol { message, .. }) if message.contains("start at 13")),
            "{skipped:?}"
        );
        assert!(decode_records("x:1", log, Offset(13), 100, &[b2]).is_ok());
    }

    /// `ReadOptions.node = Some(5)` with three addresses read from node `5 % 3` without a
    /// word; it is the caller's mistake, refused before anything is sent.
    #[tokio::test]
    async fn a_pinned_node_out_of_range_is_an_invalid_argument() {
        let c = Client::new(ClientConfig::new([
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:3",
        ]))
        .unwrap();
        for node in [3, 5] {
            let opts = ReadOptions {
                node: Some(node),
                ..ReadOptions::default()
            };
            let e = c.read_with("l", Offset(0), &opts).await.unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        }
    }

    #[test]
    fn log_names_checked() {
        assert!(log_id("default").is_ok());
        assert!(matches!(log_id("a/b"), Err(Error::InvalidArgument(_))));
    }
}
