//! Client-side batching and idempotent, ordered delivery of appends for one log.
//!
//! Every log this client writes has one flusher task. Appends queue to it; it merges whatever
//! has queued (plus what runnable tasks add during one yield, or what arrives within
//! `linger_us`) into one batch, up to `batch_bytes_max`,
//! gives the batch the next producer sequence, and keeps up to `batches_in_flight_max` batches
//! on the wire. When the window is full, appends keep queuing, so batches grow exactly when the
//! server is the bottleneck. Replies are taken in send order.
//!
//! Failures: a retriable failure (lost connection, timeout, `NotHead`, `Unavailable`...) puts
//! the batch on a resend queue; no new batch is sent until the in-flight ones are answered and
//! the resend queue has drained, one batch at a time, each with its original bytes and
//! sequence (so the server deduplicates anything it already stored). Each batch remembers
//! whether any attempt of it may have stored it: one that was sent and not answered with a
//! code that proves the request stored nothing ([`ErrorCode::proves_not_stored`]). When a
//! batch gives up:
//! - if no attempt may have stored it, its callers get the error, and the batches after it
//!   that still need sending are re-sequenced down so the producer's sequence has no gap
//!   (unless a batch after it was or may have been stored: then, as below, the log moves
//!   to a fresh producer id, since a rewind would hand that batch's sequence to new records);
//! - otherwise its callers get [`Error::InDoubt`]. Its sequence is never given to other
//!   records: the server's dedup (producer id + sequence) would answer them with the old
//!   batch's offsets, losing them silently. The later batches' sequences may now have a hole
//!   that never fills, so once nothing is in flight the log continues under a fresh producer
//!   id from sequence 0 (the server takes an unknown producer as a new one). Waiting batches
//!   that may be stored keep their id and sequence, so dedup still finds them; the others are
//!   restamped under the new id.
//!
//! Order: batches are stored in the order their records were queued, with one exception: an
//! in-doubt batch that the server did store (or still stores, from a request it had not
//! finished) may land after batches queued behind it.

use crate::client::{unexpected, Client, Inner};
use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use chainlog_core::limits::{BATCH_BYTES_MAX, BATCH_RECORDS_MAX, RECORD_BYTES_MAX};
use chainlog_core::record::{BatchBuilder, BatchHeader, HEADER_LEN, RECORD_OVERHEAD};
use chainlog_core::wire::{ClientReply, ClientRequest};
use chainlog_core::{ErrorCode, LogId, Offset, ProducerId};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

/// Appends queued per log before `send` waits (the byte budget usually binds first).
const ITEMS_QUEUED_MAX: usize = 4096;

type Ack = Result<(Offset, u32)>;

/// One `send`/`send_batch` call: records that must land in the same batch.
pub(crate) struct Item {
    payloads: Vec<Bytes>,
    /// Bytes these records add to a batch (length prefixes included).
    bytes: usize,
    tx: oneshot::Sender<Ack>,
    permit: OwnedSemaphorePermit,
}

/// Appends to one log, with client-side batching. Cheap to clone; all clones (and
/// [`Client::append`]) feed the same per-log batcher, so sequence order is call order.
///
/// ```no_run
/// # async fn demo(client: chainlog_client::Client) -> chainlog_client::Result<()> {
/// let producer = client.producer("events")?;
/// // Queue many records without waiting for each acknowledgement...
/// let mut tickets = Vec::new();
/// for i in 0..1000 {
///     tickets.push(producer.send(format!("event {i}")).await?);
/// }
/// // ...then wait for them: each resolves to (offset, count) once durable.
/// for t in tickets {
///     let (offset, _) = t.await?;
///     assert!(offset.0 < u64::MAX);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Producer {
    client: Client,
    log: String,
    tx: mpsc::Sender<Item>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("log", &self.log).finish()
    }
}

/// The acknowledgement of a queued append: resolves to `(first offset, record count)` once the
/// records are durable on every replica, or to the error that ended the attempts.
#[derive(Debug)]
pub struct AppendTicket {
    rx: oneshot::Receiver<Ack>,
}

impl Future for AppendTicket {
    type Output = Result<(Offset, u32)>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

impl AppendTicket {
    /// The offset of the first (for `send`, the only) record.
    pub async fn offset(self) -> Result<Offset> {
        Ok(self.await?.0)
    }
}

/// Checks a group of records against the batch limits; returns the bytes it adds to a batch.
pub(crate) fn group_bytes(payloads: &[Bytes]) -> Result<usize> {
    if payloads.is_empty() {
        return Err(Error::InvalidArgument("empty batch".into()));
    }
    if payloads.len() > BATCH_RECORDS_MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "{} records in one batch, limit {BATCH_RECORDS_MAX}",
            payloads.len()
        )));
    }
    let mut bytes = 0usize;
    for p in payloads {
        if p.len() > RECORD_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "record of {} bytes, limit {RECORD_BYTES_MAX}",
                p.len()
            )));
        }
        bytes += RECORD_OVERHEAD + p.len();
    }
    if HEADER_LEN + bytes > BATCH_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "batch of {} bytes, limit {BATCH_BYTES_MAX}",
            HEADER_LEN + bytes
        )));
    }
    Ok(bytes)
}

impl Producer {
    pub(crate) fn new(client: Client, log: String, tx: mpsc::Sender<Item>) -> Producer {
        Producer { client, log, tx }
    }

    pub fn log(&self) -> &str {
        &self.log
    }

    /// Queues one record; waits only for buffer room, not for the acknowledgement.
    pub async fn send(&self, payload: impl Into<Bytes>) -> Result<AppendTicket> {
        self.send_batch(vec![payload.into()]).await
    }

    /// Queues records that are stored atomically, at consecutive offsets, in one batch.
    pub async fn send_batch(&self, payloads: Vec<Bytes>) -> Result<AppendTicket> {
        let bytes = group_bytes(&payloads)?;
        // `buffer_bytes_max` >= BATCH_BYTES_MAX (validated), so one group always fits.
        let permit = self
            .client
            .inner
            .buffer
            .clone()
            .acquire_many_owned(bytes.max(1) as u32)
            .await
            .map_err(|_| Error::Closed)?;
        let (tx, rx) = oneshot::channel();
        let item = Item {
            payloads,
            bytes,
            tx,
            permit,
        };
        self.tx.send(item).await.map_err(|_| Error::Closed)?;
        Ok(AppendTicket { rx })
    }

    /// Appends one record and waits until it is durable; returns its offset.
    pub async fn append(&self, payload: impl Into<Bytes>) -> Result<Offset> {
        self.send(payload).await?.offset().await
    }
}

struct Group {
    tx: oneshot::Sender<Ack>,
    /// Index of the group's first record in the batch.
    start: u32,
    count: u32,
}

/// Records merged into the next batch.
pub(crate) struct Accum {
    builder: BatchBuilder,
    groups: Vec<Group>,
    /// Every group's share of the buffer budget, merged: one release when the batch ends
    /// (a permit per record took the semaphore's lock once per record).
    permits: Option<OwnedSemaphorePermit>,
}

impl Accum {
    fn new(capacity: usize) -> Accum {
        Accum {
            builder: BatchBuilder::with_capacity(capacity),
            groups: Vec::new(),
            permits: None,
        }
    }

    fn len(&self) -> usize {
        self.builder.len()
    }

    /// Adds a whole group, or gives it back if it would push the batch past `bytes_max` (a
    /// group is always accepted into an empty batch: it was checked against the hard limits).
    fn try_add(&mut self, item: Item, bytes_max: usize) -> std::result::Result<(), Item> {
        let count = item.payloads.len() as u32;
        if !self.groups.is_empty()
            && (self.builder.len() + item.bytes > bytes_max
                || self.builder.record_count() + count > BATCH_RECORDS_MAX)
        {
            return Err(item);
        }
        let start = self.builder.record_count();
        for p in &item.payloads {
            let pushed = self.builder.push(p);
            assert!(
                pushed.is_ok(),
                "group passed group_bytes but not the builder"
            );
        }
        self.groups.push(Group {
            tx: item.tx,
            start,
            count,
        });
        match &mut self.permits {
            // All permits come from the client's one buffer semaphore.
            Some(p) => p.merge(item.permit),
            None => self.permits = Some(item.permit),
        }
        Ok(())
    }

    fn finish(self, inner: &Inner, log: LogId, producer: ProducerId, seq: u64) -> Batch {
        let count = self.builder.record_count();
        let timestamp_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let bytes = self
            .builder
            .finish(inner.cluster_id(), log, producer, seq, timestamp_us);
        Batch {
            bytes,
            producer,
            seq,
            count,
            groups: self.groups,
            _permits: self.permits,
            attempts: 0,
            immediate: false,
            maybe_stored: false,
        }
    }
}

/// A sealed batch and who waits for it.
struct Batch {
    bytes: Bytes,
    /// The producer id and sequence in `bytes`: the batch's identity for the server's dedup.
    producer: ProducerId,
    seq: u64,
    count: u32,
    groups: Vec<Group>,
    /// Buffer budget, returned when the batch is answered.
    _permits: Option<OwnedSemaphorePermit>,
    /// Failed attempts so far.
    attempts: u32,
    /// The last failure named the new head: resend without a pause.
    immediate: bool,
    /// Some attempt was sent and not refused with proof that it stored nothing: the server
    /// may hold this batch (now, or later from a request it has not finished).
    maybe_stored: bool,
}

impl Batch {
    fn fail(self, e: &Error) {
        for g in self.groups {
            let _ = g.tx.send(Err(e.clone()));
        }
    }

    /// Ends the batch with `e`; if the server may hold it, the callers learn the outcome is
    /// unknown instead (`e` alone would read as a refusal).
    fn give_up(self, e: Error) {
        if self.maybe_stored {
            self.fail(&Error::InDoubt { cause: Box::new(e) });
        } else {
            self.fail(&e);
        }
    }

    fn succeed(self, base: Offset) {
        for g in self.groups {
            let _ = g.tx.send(Ok((base.plus(u64::from(g.start)), g.count)));
        }
    }

    /// Gives the batch another producer id and sequence (only for batches the server never
    /// stored: a stored one would then be stored twice).
    fn restamp(&mut self, producer: ProducerId, seq: u64) {
        if (producer, seq) == (self.producer, self.seq) {
            return;
        }
        let Ok(mut h) = BatchHeader::decode(&self.bytes) else {
            return;
        };
        h.producer_id = producer;
        h.producer_seq = seq;
        let mut m = BytesMut::from(&self.bytes[..]);
        h.encode_into(&mut m[..HEADER_LEN]);
        self.bytes = m.freeze();
        self.producer = producer;
        self.seq = seq;
    }
}

struct InFlight {
    batch: Batch,
    /// Which node we took for the head when sending.
    head_index: usize,
    /// The request reached the connection's writer (`reply` is `Ok`). An error before that
    /// (no connection, writer stopped, no permit in time) means the server never saw it.
    sent: bool,
    reply: Result<crate::conn::PendingReply>,
}

impl InFlight {
    async fn wait(&mut self) -> Result<ClientReply> {
        match &mut self.reply {
            Ok(p) => p.wait().await,
            Err(e) => Err(e.clone()),
        }
    }
}

/// The queue side of a flusher: waits for the first item, then drains (or lingers for) more.
struct Input {
    rx: mpsc::Receiver<Item>,
    carry: Option<Item>,
    done: bool,
}

impl Input {
    /// Cancel-safe: either takes the carried item or waits on the channel.
    async fn first(&mut self) -> Option<Item> {
        if let Some(i) = self.carry.take() {
            return Some(i);
        }
        self.rx.recv().await
    }

    /// Merges more queued items into `acc` (not cancel-safe: called outside `select!`).
    async fn fill(&mut self, acc: &mut Accum, bytes_max: usize, linger_us: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_micros(linger_us);
        let mut yielded = false;
        while acc.len() < bytes_max {
            let next = if linger_us == 0 {
                match self.rx.try_recv() {
                    Ok(i) => i,
                    Err(mpsc::error::TryRecvError::Empty) if !yielded => {
                        // Tasks already woken (by the replies that freed them, say) may be
                        // about to append: let them run once before sealing the batch. On a
                        // multi-thread runtime the woken flusher otherwise runs first (tokio's
                        // LIFO slot) and seals batches of one record. No timer: not a linger.
                        yielded = true;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Err(_) => return,
                }
            } else {
                tokio::select! {
                    i = self.rx.recv() => match i {
                        Some(i) => i,
                        None => return,
                    },
                    _ = tokio::time::sleep_until(deadline) => return,
                }
            };
            if let Err(i) = acc.try_add(next, bytes_max) {
                self.carry = Some(i);
                return;
            }
        }
    }
}

/// Ordered sending state of one log.
struct Pipeline {
    log: LogId,
    /// The producer id new batches get (0: not idempotent, no dedup on the server).
    producer: ProducerId,
    next_seq: u64,
    window: VecDeque<InFlight>,
    resend: VecDeque<Batch>,
    /// Lowest sequence of a batch of `producer` the server refused with proof it stored
    /// nothing: later unsent batches move down to it.
    rewind: Option<u64>,
    /// A batch of `producer` went in doubt: its sequence can never be reused, so once nothing
    /// is in flight the log moves to a fresh producer id.
    abandon: bool,
    /// One past the highest sequence of a batch of `producer` the server acknowledged: a
    /// rewind below it would give stored sequences to new records.
    stored_end: u64,
    /// Bytes of the last batch sealed: the next one's buffer starts that large.
    last_batch_bytes: usize,
}

async fn wait_front(window: &mut VecDeque<InFlight>) -> Result<ClientReply> {
    match window.front_mut() {
        Some(f) => f.wait().await,
        None => std::future::pending().await,
    }
}

impl Pipeline {
    fn recovering(&self) -> bool {
        !self.resend.is_empty() || self.rewind.is_some() || self.abandon
    }

    async fn launch(&mut self, inner: &Inner, batch: Batch) {
        let (head_index, slot) = inner.nodes.head();
        let req = ClientRequest::Append {
            batch: batch.bytes.clone(),
        };
        let reply = match inner.conn(&slot).await {
            Ok(c) => c.submit(&req, inner.cfg.request_timeout(), "append").await,
            Err(e) => Err(e),
        };
        self.window.push_back(InFlight {
            batch,
            head_index,
            sent: reply.is_ok(),
            reply,
        });
    }

    fn complete(&mut self, inner: &Inner, f: InFlight, r: Result<ClientReply>) {
        let mut batch = f.batch;
        match r {
            Ok(ClientReply::AppendOk {
                base_offset,
                record_count,
            }) if record_count == batch.count => {
                // Acknowledged means committed: reads of it must find it on every replica.
                inner.learn_committed(self.log, base_offset.plus(u64::from(record_count)));
                if batch.producer == self.producer {
                    self.stored_end = self.stored_end.max(batch.seq + u64::from(batch.count));
                }
                batch.succeed(base_offset);
            }
            Ok(ClientReply::AppendOk { record_count, .. }) => {
                let addr = inner
                    .nodes
                    .get(f.head_index)
                    .map(|s| s.addr.clone())
                    .unwrap_or_default();
                let e = Error::protocol(
                    &addr,
                    format!("AppendOk for {record_count} records, sent {}", batch.count),
                );
                // The server stored something for this request: what, we cannot tell.
                batch.maybe_stored = true;
                self.give_up(batch, e);
            }
            Ok(other) => {
                let addr = inner
                    .nodes
                    .get(f.head_index)
                    .map(|s| s.addr.clone())
                    .unwrap_or_default();
                batch.maybe_stored = true;
                self.give_up(batch, unexpected(&addr, "AppendOk", &other));
            }
            Err(e) => {
                let immediate = inner.head_failed(f.head_index, &e);
                if f.sent && e.append_may_be_stored() {
                    batch.maybe_stored = true;
                }
                let gap = e.code() == Some(ErrorCode::SequenceGap);
                // After a refusal or a failure ahead of it, the server may see this batch's
                // sequence as a gap: that is cured by resending in order.
                let gap_expected = gap && self.recovering();
                // Unless the hole is a batch in doubt: it may never fill, and this batch may
                // be stored (so it cannot move to a fresh producer id either).
                let orphaned = batch.producer != self.producer || self.abandon;
                let gap_hopeless = gap && orphaned && batch.maybe_stored;
                if (e.is_retriable() || gap_expected)
                    && !gap_hopeless
                    && batch.attempts < inner.cfg.retries_max
                {
                    batch.attempts += 1;
                    batch.immediate = immediate;
                    self.resend.push_back(batch);
                } else if gap && orphaned && !batch.maybe_stored {
                    // Never stored, refused only for the hole behind an in-doubt batch:
                    // `switch_producer` restamps it under the fresh id (no attempt limit,
                    // that happens once nothing is in flight).
                    self.resend.push_back(batch);
                } else if gap
                    && !batch.maybe_stored
                    && self.producer.0 != 0
                    && batch.attempts < inner.cfg.retries_max
                {
                    // A gap nothing here explains: the server's view of this producer is not
                    // ours. It takes an unknown producer at any sequence, so a later batch of
                    // ours can be stored there (sent to a new head while this one went to the
                    // old) and no rewind can fill the hole: every batch after it would be
                    // refused for good. This one was stored nowhere; it goes again as the
                    // first batch of a fresh producer id.
                    self.abandon = true;
                    batch.attempts += 1;
                    self.resend.push_back(batch);
                } else {
                    self.give_up(batch, e);
                }
            }
        }
    }

    /// Ends a batch for good: a proven refusal frees its sequence for the batches after it;
    /// a batch that may be stored retires its producer id instead.
    fn give_up(&mut self, batch: Batch, e: Error) {
        if batch.producer == self.producer {
            if !batch.maybe_stored {
                self.rewind = Some(self.rewind.map_or(batch.seq, |r| r.min(batch.seq)));
            } else if self.producer.0 != 0 {
                // (Without a producer id the server does no dedup and checks no order.)
                self.abandon = true;
            }
        }
        batch.give_up(e);
    }

    /// With nothing in flight, after a batch of `producer` went in doubt: continue under
    /// `fresh` from sequence 0. Waiting batches the server may hold keep their identity, so a
    /// resend is answered from dedup; the rest were stored nowhere and become new batches.
    fn switch_producer(&mut self, fresh: ProducerId) {
        assert!(self.window.is_empty(), "switch with batches in flight");
        self.abandon = false;
        self.rewind = None;
        self.stored_end = 0;
        self.producer = fresh;
        let mut seq = 0;
        for b in self.resend.iter_mut() {
            if !b.maybe_stored {
                b.restamp(fresh, seq);
                seq = b.seq + u64::from(b.count);
            }
        }
        self.next_seq = seq;
    }

    /// With nothing in flight: close the sequence gap left by refused batches.
    fn apply_rewind(&mut self) {
        let Some(mut seq) = self.rewind.take() else {
            return;
        };
        // A later batch of this producer was stored, or may be: the refused one was sent
        // before it and failed after it was sent (a log still being created refused the
        // first, the second arrived once it existed). Rewinding would give that batch's
        // sequence to new records, and dedup would answer them with its offsets; restamping
        // one that may be stored could store it twice. A fresh producer id instead.
        let later_stored = self.stored_end > seq
            || self
                .resend
                .iter()
                .any(|b| b.producer == self.producer && b.seq > seq && b.maybe_stored);
        if later_stored && self.producer.0 != 0 {
            self.abandon = true;
            return;
        }
        // Batches of an older producer id (kept, in doubt, for dedup) are not in this sequence.
        for b in self
            .resend
            .iter_mut()
            .filter(|b| b.producer == self.producer)
        {
            if b.seq > seq {
                b.restamp(self.producer, seq);
            }
            if b.seq >= seq {
                seq = b.seq + u64::from(b.count);
            }
        }
        // Only batches refused or never stored were above the rewind point, so nothing stored
        // uses a sequence at or past `seq`.
        self.next_seq = seq;
    }
}

/// Starts the flusher of one log; it ends when every sender is gone and all is answered.
pub(crate) fn spawn(inner: Weak<Inner>, log: LogId) -> mpsc::Sender<Item> {
    let (tx, rx) = mpsc::channel(ITEMS_QUEUED_MAX);
    tokio::spawn(run(inner, log, rx));
    tx
}

async fn run(weak: Weak<Inner>, log: LogId, rx: mpsc::Receiver<Item>) {
    let mut input = Input {
        rx,
        carry: None,
        done: false,
    };
    let producer = weak
        .upgrade()
        .map_or(ProducerId(0), |inner| inner.producer_id);
    let mut p = Pipeline {
        log,
        producer,
        next_seq: 0,
        window: VecDeque::new(),
        resend: VecDeque::new(),
        rewind: None,
        abandon: false,
        stored_end: 0,
        last_batch_bytes: 0,
    };
    loop {
        if p.window.is_empty() {
            // First close the gaps of proven refusals (a kept batch may take such a sequence
            // back), then leave a producer id whose sequence holds a batch in doubt.
            p.apply_rewind();
            if p.abandon {
                p.switch_producer(crate::client::new_producer_id());
            }
            if let Some(b) = p.resend.pop_front() {
                let Some(inner) = weak.upgrade() else {
                    b.give_up(Error::Closed);
                    continue;
                };
                if !b.immediate {
                    tokio::time::sleep(inner.cfg.backoff(b.attempts)).await;
                }
                p.launch(&inner, b).await;
                continue;
            }
            if input.done {
                return;
            }
        }
        let window_max = match weak.upgrade() {
            Some(inner) => inner.cfg.batches_in_flight_max,
            None => 0,
        };
        let can_take = !input.done && !p.recovering() && p.window.len() < window_max;
        tokio::select! {
            r = wait_front(&mut p.window), if !p.window.is_empty() => {
                let Some(f) = p.window.pop_front() else { continue };
                match weak.upgrade() {
                    Some(inner) => p.complete(&inner, f, r),
                    None => {
                        let mut b = f.batch;
                        b.maybe_stored |= f.sent;
                        b.give_up(Error::Closed);
                    }
                }
            }
            first = input.first(), if can_take => {
                let Some(first) = first else {
                    input.done = true;
                    continue;
                };
                let Some(inner) = weak.upgrade() else {
                    let _ = first.tx.send(Err(Error::Closed));
                    continue;
                };
                let cfg = &inner.cfg;
                // Sized like the last batch: a buffer that grows by doubling copies what it
                // holds each time (twice per batch of 128 KiB records from 64 KiB).
                let hint = p.last_batch_bytes.max(64 << 10).min(cfg.batch_bytes_max);
                let mut acc = Accum::new(first.bytes.max(hint) + HEADER_LEN);
                if let Err(i) = acc.try_add(first, cfg.batch_bytes_max) {
                    // Unreachable: an empty batch takes any checked group.
                    let _ = i.tx.send(Err(Error::InvalidArgument("group does not fit".into())));
                    continue;
                }
                input.fill(&mut acc, cfg.batch_bytes_max, cfg.linger_us).await;
                let seq = p.next_seq;
                let batch = acc.finish(&inner, p.log, p.producer, seq);
                p.last_batch_bytes = batch.bytes.len();
                p.next_seq = seq + u64::from(batch.count);
                p.launch(&inner, batch).await;
            }
            // Neither branch enabled: only reachable with the client gone (window size 0) and
            // nothing in flight; anything still queued can no longer be sent.
            else => {
                while let Some(b) = p.resend.pop_front() {
                    b.give_up(Error::Closed);
                }
                input.rx.close();
                while let Ok(i) = input.rx.try_recv() {
                    let _ = i.tx.send(Err(Error::Closed));
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn item(sem: &Arc<Semaphore>, payloads: &[&[u8]]) -> (Item, oneshot::Receiver<Ack>) {
        let payloads: Vec<Bytes> = payloads.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let bytes = group_bytes(&payloads).unwrap();
        let (tx, rx) = oneshot::channel();
        let permit = sem.clone().try_acquire_many_owned(bytes as u32).unwrap();
        (
            Item {
                payloads,
                bytes,
                tx,
                permit,
            },
            rx,
        )
    }

    const P: ProducerId = ProducerId(5);

    fn batch(sem: &Arc<Semaphore>, seq: u64, n: usize) -> Batch {
        batch_rx(sem, seq, n).0
    }

    /// A batch of producer `P` and the receiver of its (single) caller.
    fn batch_rx(sem: &Arc<Semaphore>, seq: u64, n: usize) -> (Batch, oneshot::Receiver<Ack>) {
        let mut acc = Accum::new(1024);
        let (i, rx) = item(sem, &vec![&b"x"[..]; n]);
        assert!(acc.try_add(i, 1 << 20).is_ok());
        let b = Batch {
            bytes: acc
                .builder
                .finish(chainlog_core::ClusterId(0), LogId(1), P, seq, 0),
            producer: P,
            seq,
            count: n as u32,
            groups: acc.groups,
            _permits: acc.permits,
            attempts: 1,
            immediate: false,
            maybe_stored: false,
        };
        (b, rx)
    }

    fn pipeline(next_seq: u64, resend: Vec<Batch>, rewind: Option<u64>) -> Pipeline {
        Pipeline {
            log: LogId(1),
            producer: P,
            next_seq,
            window: VecDeque::new(),
            resend: VecDeque::from(resend),
            rewind,
            abandon: false,
            stored_end: 0,
            last_batch_bytes: 0,
        }
    }

    fn in_flight(batch: Batch, sent: bool) -> InFlight {
        InFlight {
            batch,
            head_index: 0,
            sent,
            reply: Err(Error::Closed),
        }
    }

    fn server(code: ErrorCode) -> Error {
        Error::Server {
            code,
            message: "scripted".into(),
        }
    }

    fn lost() -> Error {
        Error::ConnectionLost {
            addr: "test".into(),
            reason: "scripted".into(),
        }
    }

    /// A client that never connects: `complete` only reads its config and head routing.
    fn client(retries_max: u32) -> Client {
        let mut cfg = crate::ClientConfig::new(["127.0.0.1:1"]);
        cfg.retries_max = retries_max;
        Client::new(cfg).unwrap()
    }

    #[test]
    fn groups_stay_whole_and_respect_the_byte_target() {
        let sem = Arc::new(Semaphore::new(1 << 30));
        let mut acc = Accum::new(256);
        let bytes_max = HEADER_LEN + 3 * (RECORD_OVERHEAD + 10);
        let (a, _) = item(&sem, &[&[1u8; 10]]);
        let (b, _) = item(&sem, &[&[2u8; 10], &[3u8; 10]]);
        let (c, _) = item(&sem, &[&[4u8; 10]]);
        assert!(acc.try_add(a, bytes_max).is_ok());
        assert!(acc.try_add(b, bytes_max).is_ok());
        // Would exceed the target: handed back whole for the next batch.
        assert!(acc.try_add(c, bytes_max).is_err());
        assert_eq!(acc.builder.record_count(), 3);
        let starts: Vec<(u32, u32)> = acc.groups.iter().map(|g| (g.start, g.count)).collect();
        assert_eq!(starts, vec![(0, 1), (1, 2)]);

        // An oversized group is still accepted alone.
        let mut acc = Accum::new(64);
        let (big, _) = item(&sem, &[&[0u8; 1000]]);
        assert!(acc.try_add(big, bytes_max).is_ok());
    }

    #[tokio::test]
    async fn each_caller_gets_its_own_offsets() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let mut acc = Accum::new(256);
        let (a, ra) = item(&sem, &[b"a"]);
        let (b, rb) = item(&sem, &[b"b", b"c", b"d"]);
        let (c, rc) = item(&sem, &[b"e"]);
        for i in [a, b, c] {
            assert!(acc.try_add(i, 1 << 20).is_ok());
        }
        let batch = Batch {
            bytes: Bytes::new(),
            producer: P,
            seq: 0,
            count: acc.builder.record_count(),
            groups: acc.groups,
            _permits: acc.permits,
            attempts: 0,
            immediate: false,
            maybe_stored: false,
        };
        assert_eq!(
            sem.available_permits(),
            (1 << 20) - 5 * (RECORD_OVERHEAD + 1)
        );
        batch.succeed(Offset(100));
        assert_eq!(ra.await.unwrap().unwrap(), (Offset(100), 1));
        assert_eq!(rb.await.unwrap().unwrap(), (Offset(101), 3));
        assert_eq!(rc.await.unwrap().unwrap(), (Offset(104), 1));
        // The buffer budget came back with the answer.
        assert_eq!(sem.available_permits(), 1 << 20);
    }

    #[test]
    fn limits_checked_before_queueing() {
        assert!(group_bytes(&[]).is_err());
        assert!(group_bytes(&[Bytes::from(vec![0u8; RECORD_BYTES_MAX + 1])]).is_err());
        let many: Vec<Bytes> = (0..=BATCH_RECORDS_MAX).map(|_| Bytes::new()).collect();
        assert!(group_bytes(&many).is_err());
        let five_mb: Vec<Bytes> = (0..5)
            .map(|_| Bytes::from(vec![0u8; RECORD_BYTES_MAX]))
            .collect();
        assert!(group_bytes(&five_mb).is_err());
        assert_eq!(group_bytes(&[Bytes::from_static(b"abc")]).unwrap(), 7);
    }

    #[test]
    fn rewind_closes_the_sequence_gap_of_refused_batches() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        // Sent: seq 0 (3 recs, lost connection -> resend), seq 3 (2 recs, refused),
        // seq 5 (4 recs, SequenceGap -> resend), seq 9 (1 rec, resend).
        let mut p = pipeline(
            10,
            vec![batch(&sem, 0, 3), batch(&sem, 5, 4), batch(&sem, 9, 1)],
            Some(3),
        );
        p.apply_rewind();
        let seqs: Vec<u64> = p.resend.iter().map(|b| b.seq).collect();
        assert_eq!(seqs, vec![0, 3, 7]);
        assert_eq!(p.next_seq, 8);
        // The re-sequenced bytes carry the new sequence and still verify.
        let h = chainlog_core::record::verify(&p.resend[1].bytes).unwrap();
        assert_eq!(h.producer_seq, 3);
        assert_eq!(h.record_count, 4);

        // A refusal with nothing left to resend hands its sequence to the next batch.
        let mut p = pipeline(10, vec![], Some(6));
        p.apply_rewind();
        assert_eq!(p.next_seq, 6);
    }

    #[tokio::test]
    async fn a_proven_refusal_frees_its_sequence() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let c = client(3);
        for code in [ErrorCode::StorageFull, ErrorCode::RecordTooLarge] {
            let mut p = pipeline(4, vec![], None);
            let (b, rx) = batch_rx(&sem, 3, 1);
            p.complete(&c.inner, in_flight(b, true), Err(server(code)));
            let e = rx.await.unwrap().unwrap_err();
            assert_eq!(e.code(), Some(code));
            assert_eq!((p.rewind, p.abandon), (Some(3), false));
            p.apply_rewind();
            assert_eq!((p.producer, p.next_seq), (P, 3));
        }
        // A request that never reached the server proves it too, whatever the error says.
        let mut p = pipeline(4, vec![], None);
        let (mut b, rx) = batch_rx(&sem, 3, 1);
        b.attempts = 3;
        p.complete(&c.inner, in_flight(b, false), Err(lost()));
        assert!(matches!(
            rx.await.unwrap(),
            Err(Error::ConnectionLost { .. })
        ));
        assert_eq!((p.rewind, p.abandon), (Some(3), false));
    }

    #[tokio::test]
    async fn a_batch_that_may_be_stored_is_in_doubt_and_retires_the_producer() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let c = client(3);
        // Codes that do not prove non-storage, and a lost connection with no retries left.
        for (e, attempts) in [
            (server(ErrorCode::Internal), 0),
            (server(ErrorCode::StorageError), 0),
            (server(ErrorCode::Unavailable), 3),
            (server(ErrorCode::RetryPending), 3),
            (lost(), 3),
        ] {
            let mut p = pipeline(4, vec![], None);
            let (mut b, rx) = batch_rx(&sem, 3, 1);
            b.attempts = attempts;
            p.complete(&c.inner, in_flight(b, true), Err(e.clone()));
            let got = rx.await.unwrap().unwrap_err();
            assert_eq!(got, Error::InDoubt { cause: Box::new(e) });
            assert!(got.to_string().contains("may or may not have been stored"));
            assert!(!got.is_retriable());
            assert_eq!((p.rewind, p.abandon), (None, true));
        }
        // A proving refusal does not clear an earlier attempt that may have stored it.
        let mut p = pipeline(4, vec![], None);
        let (b, rx) = batch_rx(&sem, 3, 1);
        p.complete(&c.inner, in_flight(b, true), Err(lost()));
        let Some(mut b) = p.resend.pop_front() else {
            panic!("a lost connection is retried")
        };
        assert!(b.maybe_stored);
        b.attempts = 3;
        p.complete(
            &c.inner,
            in_flight(b, true),
            Err(server(ErrorCode::StorageFull)),
        );
        assert!(matches!(rx.await.unwrap(), Err(Error::InDoubt { .. })));
        assert_eq!((p.rewind, p.abandon), (None, true));
    }

    #[tokio::test]
    async fn after_a_batch_in_doubt_the_rest_move_to_a_fresh_producer() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let c = client(3);
        let mut p = pipeline(10, vec![], None);
        // In flight: seq 3 (in doubt), seq 4 (refused for the gap: never stored), seq 6 (lost
        // connection: may be stored), seq 8 (refused for the gap, its retries spent).
        let (b3, rx3) = batch_rx(&sem, 3, 1);
        let (b4, _) = batch_rx(&sem, 4, 2);
        let (b6, _) = batch_rx(&sem, 6, 2);
        let (mut b8, _) = batch_rx(&sem, 8, 2);
        b8.attempts = 3;
        p.complete(
            &c.inner,
            in_flight(b3, true),
            Err(server(ErrorCode::Internal)),
        );
        assert!(matches!(rx3.await.unwrap(), Err(Error::InDoubt { .. })));
        let gap = || Err(server(ErrorCode::SequenceGap));
        p.complete(&c.inner, in_flight(b4, true), gap());
        p.complete(&c.inner, in_flight(b6, true), Err(lost()));
        p.complete(&c.inner, in_flight(b8, true), gap());
        assert!(p.recovering());
        p.apply_rewind();
        p.switch_producer(ProducerId(9));
        let ids: Vec<(ProducerId, u64)> = p.resend.iter().map(|b| (b.producer, b.seq)).collect();
        // The never-stored ones are new batches of the fresh id, in order; the one the server
        // may hold keeps its identity so dedup can still answer it.
        assert_eq!(ids, vec![(ProducerId(9), 0), (P, 6), (ProducerId(9), 2)]);
        assert_eq!((p.producer, p.next_seq), (ProducerId(9), 4));
        assert!(!p.abandon && p.rewind.is_none());
        for b in &p.resend {
            let h = chainlog_core::record::verify(&b.bytes).unwrap();
            assert_eq!((h.producer_id, h.producer_seq), (b.producer, b.seq));
        }

        // The kept batch then meets the hole again: retrying cannot fill it, so it is in doubt.
        let Some(mut b6) = p.resend.remove(1) else {
            panic!("the kept batch")
        };
        b6.attempts = 1;
        let (tx6, rx6) = oneshot::channel();
        b6.groups[0].tx = tx6;
        p.complete(&c.inner, in_flight(b6, true), gap());
        assert!(matches!(rx6.await.unwrap(), Err(Error::InDoubt { .. })));
        // It was not the fresh producer's: that one stays in use.
        assert!(!p.abandon);
    }

    /// A gap refusal with nothing in doubt or refused before it: a later batch of this
    /// producer reached another node that took it as the producer's first (the server takes an
    /// unknown producer at any sequence). Rewinding to the refused sequence refused every batch
    /// after it for good; the refused batch (stored nowhere) instead goes again as the first
    /// batch of a fresh producer id, and its caller is not failed.
    #[tokio::test]
    async fn an_unexplained_gap_moves_to_a_fresh_producer_instead_of_rewinding() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let c = client(3);
        let mut p = pipeline(4, vec![], None);
        let (b, mut rx) = batch_rx(&sem, 0, 2);
        assert!(!p.recovering());
        p.complete(
            &c.inner,
            in_flight(b, true),
            Err(server(ErrorCode::SequenceGap)),
        );
        assert!(rx.try_recv().is_err(), "the caller still waits");
        assert_eq!((p.rewind, p.abandon), (None, true));
        p.apply_rewind();
        p.switch_producer(ProducerId(9));
        let ids: Vec<(ProducerId, u64)> = p.resend.iter().map(|b| (b.producer, b.seq)).collect();
        assert_eq!(ids, vec![(ProducerId(9), 0)]);
        assert_eq!(p.next_seq, 2);
        // Its retries spent, it fails as refused (it was stored nowhere).
        let Some(mut b) = p.resend.pop_front() else {
            panic!("resent")
        };
        b.attempts = 3;
        p.complete(
            &c.inner,
            in_flight(b, true),
            Err(server(ErrorCode::SequenceGap)),
        );
        let e = rx.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::SequenceGap));
    }

    #[tokio::test]
    async fn without_a_producer_id_nothing_is_retired() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let c = client(3);
        let mut p = pipeline(4, vec![], None);
        p.producer = ProducerId(0);
        let (mut b, rx) = batch_rx(&sem, 3, 1);
        b.producer = ProducerId(0);
        p.complete(
            &c.inner,
            in_flight(b, true),
            Err(server(ErrorCode::Internal)),
        );
        assert!(matches!(rx.await.unwrap(), Err(Error::InDoubt { .. })));
        assert!(!p.abandon);
    }

    /// b0 was refused with proof it was stored nowhere (`UnknownLog`: the log was still being
    /// created) and b1, sent after it, was stored (it arrived once the log existed); b1's
    /// acknowledgement came after the rewind to b0's sequence was set. The rewind gave
    /// sequence 1 to new records, and the server's dedup answered them with b1's offsets: an
    /// acknowledged append lost. The log moves to a fresh producer id instead.
    #[tokio::test]
    async fn a_refusal_before_a_stored_batch_moves_to_a_fresh_producer_instead_of_rewinding() {
        let sem = Arc::new(Semaphore::new(1 << 20));
        let c = client(3);
        let mut p = pipeline(2, vec![], None);
        let (b0, rx0) = batch_rx(&sem, 0, 1);
        let (b1, rx1) = batch_rx(&sem, 1, 1);
        p.complete(
            &c.inner,
            in_flight(b0, true),
            Err(server(ErrorCode::UnknownLog)),
        );
        let e = rx0.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnknownLog));
        let ok = ClientReply::AppendOk {
            base_offset: Offset(0),
            record_count: 1,
        };
        p.complete(&c.inner, in_flight(b1, true), Ok(ok));
        assert_eq!(rx1.await.unwrap().unwrap(), (Offset(0), 1));
        p.apply_rewind();
        assert!(
            p.producer != P || p.next_seq >= 2,
            "new records of {P} would reuse stored sequences from {}",
            p.next_seq
        );
        assert!(p.abandon);
        p.switch_producer(ProducerId(9));
        assert_eq!((p.producer, p.next_seq), (ProducerId(9), 0));

        // A later batch that may be stored (its connection was lost) keeps its identity, so
        // dedup can answer its resend; it is not restamped down into the refused sequence.
        let mut p = pipeline(2, vec![], None);
        let (b0, _) = batch_rx(&sem, 0, 1);
        let (b1, _) = batch_rx(&sem, 1, 1);
        p.complete(
            &c.inner,
            in_flight(b0, true),
            Err(server(ErrorCode::StorageFull)),
        );
        p.complete(&c.inner, in_flight(b1, true), Err(lost()));
        p.apply_rewind();
        assert!(p.abandon);
        p.switch_producer(ProducerId(9));
        let ids: Vec<(ProducerId, u64)> = p.resend.iter().map(|b| (b.producer, b.seq)).collect();
        assert_eq!(ids, vec![(P, 1)]);
        assert_eq!((p.producer, p.next_seq), (ProducerId(9), 0));
    }
}
