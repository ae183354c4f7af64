//! Subscriptions: a background task that keeps a `Subscribe` open on its own connection,
//! resumes after the last delivered record when the connection fails, and hands records over
//! through a bounded channel (a slow consumer slows the socket, not the client's memory).

use crate::client::{another_replica_may_answer, decode_records, Inner};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::Record;
use chainlog_core::wire::{ClientReply, ClientRequest};
use chainlog_core::{LogId, Offset};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;

/// Pushed frames' worth of records buffered between the task and the consumer.
const DELIVERIES_QUEUED_MAX: usize = 8;

type Delivery = Result<Vec<Record>>;

/// A stream of committed records, in offset order, from the offset given to
/// [`Client::subscribe`](crate::Client::subscribe). Ends (`None`) after yielding an error.
///
/// Also a [`futures_core::Stream`], so stream combinators work on it.
///
/// ```no_run
/// # async fn demo(client: chainlog_client::Client) -> chainlog_client::Result<()> {
/// use chainlog_client::Offset;
/// let mut sub = client.subscribe("default", Offset(0)).await?;
/// while let Some(record) = sub.next().await {
///     let record = record?;
///     println!("{}: {}", record.offset, String::from_utf8_lossy(&record.payload));
/// }
/// # Ok(())
/// # }
/// ```
pub struct Subscription {
    rx: mpsc::Receiver<Delivery>,
    buffered: VecDeque<Record>,
    task: JoinHandle<()>,
    ended: bool,
    /// This subscription's place under `subscriptions_max`, given back on drop.
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("buffered", &self.buffered.len())
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    pub(crate) async fn start(inner: Arc<Inner>, log: LogId, from: Offset) -> Result<Subscription> {
        let slot = inner
            .subscriptions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::LimitExceeded {
                what: "subscriptions open (subscriptions_max)",
                max: inner.cfg.subscriptions_max,
            })?;
        // The first subscribe happens here so a bad address fails the call.
        let (conn, stream) = open(&inner, log, from).await?;
        let (tx, rx) = mpsc::channel(DELIVERIES_QUEUED_MAX);
        let task = tokio::spawn(follow(inner, log, from, conn, stream, tx));
        Ok(Subscription {
            rx,
            buffered: VecDeque::new(),
            task,
            ended: false,
            _slot: slot,
        })
    }

    /// The next record; `None` once the subscription has ended (after an error).
    pub async fn next(&mut self) -> Option<Result<Record>> {
        std::future::poll_fn(|cx| self.poll_next_record(cx)).await
    }

    fn poll_next_record(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Record>>> {
        loop {
            if let Some(r) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(recs))) => self.buffered.extend(recs),
            }
        }
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<Record>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_next_record(cx)
    }
}

/// Opens the subscription at the pinned replica, else at the next in round-robin order and,
/// while that fails in a way another may not, at each of the others once.
async fn open(
    inner: &Inner,
    log: LogId,
    from: Offset,
) -> Result<(Conn, mpsc::Receiver<Result<ClientReply>>)> {
    let mut last = Error::Closed;
    for (_, slot) in inner.nodes.read_order(inner.cfg.read_from)? {
        let opened = async {
            let conn = inner.open(&slot.addr).await?;
            let stream = conn
                .open_stream(
                    &ClientRequest::Subscribe { log, from },
                    inner.cfg.request_timeout(),
                )
                .await?;
            Ok((conn, stream))
        };
        match opened.await {
            Ok(c) => return Ok(c),
            Err(e) if another_replica_may_answer(&e) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

async fn follow(
    inner: Arc<Inner>,
    log: LogId,
    mut next: Offset,
    conn: Conn,
    stream: mpsc::Receiver<Result<ClientReply>>,
    tx: mpsc::Sender<Delivery>,
) {
    let mut current = Some((conn, stream));
    let mut failures = 0u32;
    loop {
        let (conn, mut stream) = match current.take() {
            Some(c) => c,
            None => match open(&inner, log, next).await {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    let retriable = e.is_retriable() || another_replica_may_answer(&e);
                    if !retriable || failures > inner.cfg.retries_max {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    tokio::time::sleep(inner.cfg.backoff(failures)).await;
                    continue;
                }
            },
        };
        let lost = loop {
            match stream.recv().await {
                None => {
                    break Error::ConnectionLost {
                        addr: conn.addr().to_string(),
                        reason: "subscription stream ended".into(),
                    }
                }
                Some(Ok(ClientReply::Records {
                    committed_end,
                    batches,
                })) => {
                    inner.learn_committed(log, committed_end);
                    let recs = match decode_records(conn.addr(), log, next, usize::MAX, &batches) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    failures = 0;
                    if let Some(last) = recs.last() {
                        next = last.offset.plus(1);
                        if tx.send(Ok(recs)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(other)) => {
                    let _ = tx
                        .send(Err(crate::client::unexpected(
                            conn.addr(),
                            "Records",
                            &other,
                        )))
                        .await;
                    return;
                }
                // A node going away or out of room for subscribers: resume at the next one.
                Some(Err(e)) if e.is_retriable() || another_replica_may_answer(&e) => break e,
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        };
        drop(conn);
        failures += 1;
        tracing::debug!(error = %lost, next = next.0, "subscription connection lost; resuming");
        if failures > inner.cfg.retries_max {
            let _ = tx.send(Err(lost)).await;
            return;
        }
        tokio::time::sleep(inner.cfg.backoff(failures)).await;
    }
}
