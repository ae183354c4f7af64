//! One TCP connection to one node: handshake, a writer task doing vectored writes, a reader task
//! routing replies by request id, a bounded in-flight window and per-request deadlines.

use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use chainlog_core::wire::{
    ClientReply, ClientRequest, Encoded, FrameHeader, Hello, HelloOk, Kind, Role,
    CONNECTION_REQUEST_ID, FRAME_HEADER_LEN, PROTOCOL_VERSION,
};
use chainlog_core::{ClusterId, Epoch, ErrorCode};
use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Most buffers handed to one `writev` (Linux IOV_MAX is 1024).
const WRITE_SLICES_MAX: usize = 512;
/// Frames coalesced into one write burst stop being gathered past this many bytes, so one
/// burst cannot hold an unbounded amount of memory.
const WRITE_BURST_BYTES_MAX: usize = 4 << 20;
/// Read buffer growth step; frames larger than this get exactly the room they need.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Pushed frames buffered per subscription before the reader waits for the consumer (which
/// stops reading the socket: TCP backpressure reaches the server).
pub(crate) const STREAM_FRAMES_MAX: usize = 16;

/// Settings one connection needs.
#[derive(Clone, Debug)]
pub(crate) struct ConnOptions {
    pub cluster_id: ClusterId,
    pub connect_timeout: Duration,
    pub in_flight_max: usize,
}

enum Route {
    Once {
        tx: oneshot::Sender<Result<ClientReply>>,
        _permit: OwnedSemaphorePermit,
    },
    Stream {
        tx: mpsc::Sender<Result<ClientReply>>,
    },
}

struct State {
    /// Set once, when the connection fails; every later request fails with it.
    closed: Option<Error>,
    routes: HashMap<u64, Route>,
}

struct Shared {
    addr: String,
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters (each operation is one insert/remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every waiting request and refuses new ones.
    fn close(&self, err: Error) {
        let routes = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(err.clone());
            }
            std::mem::take(&mut st.routes)
        };
        for (_, r) in routes {
            match r {
                Route::Once { tx, .. } => {
                    let _ = tx.send(Err(err.clone()));
                }
                // A full stream channel just loses this error; the consumer then sees the
                // channel end, which it treats as a lost connection too.
                Route::Stream { tx } => {
                    let _ = tx.try_send(Err(err.clone()));
                }
            }
        }
    }

    fn remove(&self, id: u64) {
        self.lock().routes.remove(&id);
    }
}

/// An open connection. Dropping it stops both tasks and fails whatever was still waiting.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    frames: mpsc::Sender<Encoded>,
    hello: HelloOk,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.shared.close(Error::ConnectionLost {
            addr: self.shared.addr.clone(),
            reason: "connection dropped by the client".into(),
        });
    }
}

/// A request on the wire whose reply has not been taken yet.
pub(crate) struct PendingReply {
    shared: Arc<Shared>,
    id: u64,
    rx: oneshot::Receiver<Result<ClientReply>>,
    deadline: Instant,
    timeout: Duration,
    what: &'static str,
}

impl PendingReply {
    /// Waits for the reply; cancel-safe (the receiver stays in `self`). Server `Error` frames
    /// become `Error::Server`.
    pub(crate) async fn wait(&mut self) -> Result<ClientReply> {
        match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Err(_) => {
                self.shared.remove(self.id);
                Err(Error::Timeout {
                    what: self.what,
                    after_ms: self.timeout.as_millis() as u64,
                })
            }
            Ok(Err(_)) => Err(Error::ConnectionLost {
                addr: self.shared.addr.clone(),
                reason: "reply channel closed".into(),
            }),
            Ok(Ok(r)) => server_error(r),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        // A caller that stops waiting (its future dropped inside its own timeout, say) gives
        // the in-flight slot back now: the route holds its permit, and a late reply finds no
        // route and is dropped. After a reply or a timeout the route is already gone.
        self.shared.remove(self.id);
    }
}

fn server_error(r: Result<ClientReply>) -> Result<ClientReply> {
    match r? {
        ClientReply::Error { code, message } => Err(Error::Server { code, message }),
        other => Ok(other),
    }
}

impl Conn {
    /// Connects and does the `Hello` handshake. `opts.cluster_id` 0 accepts any cluster.
    pub(crate) async fn connect(addr: &str, opts: &ConnOptions) -> Result<Conn> {
        let deadline = Instant::now() + opts.connect_timeout;
        let timeout = || Error::Timeout {
            what: "connect",
            after_ms: opts.connect_timeout.as_millis() as u64,
        };
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| timeout())?
            .map_err(|e| Error::io(addr, &e))?;
        stream.set_nodelay(true).map_err(|e| Error::io(addr, &e))?;
        // Room for a whole batch each way (see `limits::SOCKET_BUFFER_BYTES`); only speed
        // depends on it, so a refusal is not an error.
        let sock = socket2::SockRef::from(&stream);
        let _ = sock
            .set_send_buffer_size(chainlog_core::limits::SOCKET_BUFFER_BYTES)
            .and_then(|()| sock.set_recv_buffer_size(chainlog_core::limits::SOCKET_BUFFER_BYTES));
        let (rd, mut wr) = stream.into_split();
        let mut reader = FrameReader::new(rd);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            cluster_id: opts.cluster_id,
            role: Role::Client,
            epoch: Epoch(0),
        };
        let handshake = async {
            let mut q: VecDeque<Bytes> = VecDeque::new();
            push_frame(&mut q, hello.encode(0));
            write_all_vectored(&mut wr, &mut q)
                .await
                .map_err(|e| Error::io(addr, &e))?;
            let (h, body) = match reader.next().await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(Error::ConnectionLost {
                        addr: addr.to_string(),
                        reason: "closed during handshake".into(),
                    })
                }
                Err(e) => return Err(e.into_error(addr)),
            };
            decode_hello_reply(addr, opts.cluster_id, h, body)
        };
        let hello_ok = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| timeout())??;

        assert!(opts.in_flight_max > 0);
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            state: Mutex::new(State {
                closed: None,
                routes: HashMap::new(),
            }),
            permits: Arc::new(Semaphore::new(opts.in_flight_max)),
            // 0 is the handshake's id.
            next_id: AtomicU64::new(1),
        });
        // Every queued frame holds an in-flight permit (or is a subscription), so this bound
        // is never the one that blocks.
        let (frames, frames_rx) = mpsc::channel(opts.in_flight_max + STREAM_FRAMES_MAX);
        let reader = tokio::spawn(read_loop(shared.clone(), reader));
        let writer = tokio::spawn(write_loop(shared.clone(), wr, frames_rx));
        Ok(Conn {
            shared,
            frames,
            hello: hello_ok,
            reader,
            writer,
        })
    }

    pub(crate) fn addr(&self) -> &str {
        &self.shared.addr
    }

    pub(crate) fn hello(&self) -> HelloOk {
        self.hello
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Puts a request on the wire (in call order) and returns the handle to its reply.
    /// Waits for an in-flight slot first; that wait counts against `timeout`.
    pub(crate) async fn submit(
        &self,
        req: &ClientRequest,
        timeout: Duration,
        what: &'static str,
    ) -> Result<PendingReply> {
        let deadline = Instant::now() + timeout;
        let timed_out = || Error::Timeout {
            what,
            after_ms: timeout.as_millis() as u64,
        };
        let permit = tokio::time::timeout_at(deadline, self.shared.permits.clone().acquire_owned())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| Error::Closed)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.register(
            id,
            Route::Once {
                tx,
                _permit: permit,
            },
        )?;
        // Made before the frame is queued, so a caller dropped while it waits for room there
        // also releases the route (`PendingReply`'s drop).
        let pending = PendingReply {
            shared: self.shared.clone(),
            id,
            rx,
            deadline,
            timeout,
            what,
        };
        self.enqueue(id, req.encode(id), deadline, timed_out)
            .await?;
        Ok(pending)
    }

    /// Sends a request and waits for its reply.
    pub(crate) async fn call(
        &self,
        req: &ClientRequest,
        timeout: Duration,
        what: &'static str,
    ) -> Result<ClientReply> {
        self.submit(req, timeout, what).await?.wait().await
    }

    /// Sends a request whose replies are pushed (Subscribe). Each frame arrives on the
    /// returned channel; an `Error` frame arrives as `Err(Error::Server)` and ends the stream.
    pub(crate) async fn open_stream(
        &self,
        req: &ClientRequest,
        timeout: Duration,
    ) -> Result<mpsc::Receiver<Result<ClientReply>>> {
        let deadline = Instant::now() + timeout;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_FRAMES_MAX);
        self.register(id, Route::Stream { tx })?;
        self.enqueue(id, req.encode(id), deadline, || Error::Timeout {
            what: "subscribe",
            after_ms: timeout.as_millis() as u64,
        })
        .await?;
        Ok(rx)
    }

    fn register(&self, id: u64, route: Route) -> Result<()> {
        let mut st = self.shared.lock();
        if let Some(e) = &st.closed {
            return Err(e.clone());
        }
        st.routes.insert(id, route);
        Ok(())
    }

    async fn enqueue(
        &self,
        id: u64,
        frame: Encoded,
        deadline: Instant,
        timed_out: impl Fn() -> Error,
    ) -> Result<()> {
        let r = match tokio::time::timeout_at(deadline, self.frames.send(frame)).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_)) => Err(Error::ConnectionLost {
                addr: self.shared.addr.clone(),
                reason: "writer stopped".into(),
            }),
            Ok(Ok(())) => Ok(()),
        };
        if r.is_err() {
            self.shared.remove(id);
        }
        r
    }
}

fn decode_hello_reply(
    addr: &str,
    expected: ClusterId,
    h: FrameHeader,
    body: Bytes,
) -> Result<HelloOk> {
    match Kind::from_u16(h.kind) {
        Some(Kind::HelloOk) => {
            let ok = HelloOk::decode(body).map_err(|e| Error::protocol(addr, e.to_string()))?;
            if ok.version != PROTOCOL_VERSION {
                return Err(Error::protocol(
                    addr,
                    format!(
                        "server speaks protocol {}, client {PROTOCOL_VERSION}",
                        ok.version
                    ),
                ));
            }
            if expected.0 != 0 && ok.cluster_id != expected {
                return Err(Error::WrongCluster {
                    addr: addr.to_string(),
                    expected,
                    got: ok.cluster_id,
                });
            }
            Ok(ok)
        }
        Some(Kind::Error) => match ClientReply::decode(h.kind, body) {
            Ok(ClientReply::Error {
                code: ErrorCode::WrongCluster,
                message,
            }) => Err(Error::Server {
                code: ErrorCode::WrongCluster,
                message: format!("{addr} refused cluster {expected}: {message}"),
            }),
            Ok(ClientReply::Error { code, message }) => Err(Error::Server { code, message }),
            Ok(_) => Err(Error::protocol(addr, "bad handshake error frame")),
            Err(e) => Err(Error::protocol(addr, e.to_string())),
        },
        _ => Err(Error::protocol(
            addr,
            format!("expected HelloOk, got frame kind {}", h.kind),
        )),
    }
}

/// Why a frame could not be read.
pub(crate) enum ReadError {
    Io(std::io::Error),
    Frame(chainlog_core::Error),
}

impl ReadError {
    fn into_error(self, addr: &str) -> Error {
        match self {
            ReadError::Io(e) => Error::io(addr, &e),
            ReadError::Frame(e) => Error::protocol(addr, e.to_string()),
        }
    }
}

/// Splits a byte stream into frames; bodies are zero-copy slices of the read buffer.
pub(crate) struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
        }
    }

    /// The next frame, or `None` at a clean end of stream (between frames).
    pub(crate) async fn next(
        &mut self,
    ) -> std::result::Result<Option<(FrameHeader, Bytes)>, ReadError> {
        loop {
            if self.buf.len() >= FRAME_HEADER_LEN {
                let mut hb = [0u8; FRAME_HEADER_LEN];
                hb.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
                // Refuses an oversized length before reserving room for it.
                let h = FrameHeader::decode(&hb).map_err(ReadError::Frame)?;
                let total = FRAME_HEADER_LEN + h.body_len as usize;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let body = frame.split_off(FRAME_HEADER_LEN).freeze();
                    return Ok(Some((h, body)));
                }
                self.buf
                    .reserve((total - self.buf.len()).max(READ_CHUNK_BYTES));
            } else if self.buf.capacity() - self.buf.len() < FRAME_HEADER_LEN {
                self.buf.reserve(READ_CHUNK_BYTES);
            }
            let n = self
                .rd
                .read_buf(&mut self.buf)
                .await
                .map_err(ReadError::Io)?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(ReadError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                )));
            }
        }
    }
}

async fn read_loop(shared: Arc<Shared>, mut reader: FrameReader<OwnedReadHalf>) {
    // What the server said of the whole connection (an `Error` for request id 0, which no
    // request uses) before it closed it: an oversized or malformed frame, a missed Hello, a
    // reader too slow for its replies.
    let mut server_said: Option<String> = None;
    let lost = |reason: String, said: &Option<String>| Error::ConnectionLost {
        addr: shared.addr.clone(),
        reason: match said {
            Some(s) => format!("the server closed it: {s}"),
            None => reason,
        },
    };
    let err = loop {
        let (h, body) = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break lost("closed by the server".into(), &server_said),
            Err(ReadError::Io(e)) => break lost(e.to_string(), &server_said),
            Err(ReadError::Frame(e)) => break Error::protocol(&shared.addr, e.to_string()),
        };
        // A body that does not decode is that request's error; framing is still intact.
        let reply = ClientReply::decode(h.kind, body)
            .map_err(|e| Error::protocol(&shared.addr, e.to_string()));
        if h.request_id == CONNECTION_REQUEST_ID {
            // Not any request's answer: requests in flight stay as they are (those that were
            // stored must not read as refused) and fail as a lost connection, with the reason.
            let said = match &reply {
                Ok(ClientReply::Error { code, message }) => format!("{code:?}: {message}"),
                Ok(_) => "a reply that is not an error, for no request".into(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(addr = %shared.addr, "server: {said}");
            server_said = Some(said);
            continue;
        }
        let stream_tx = {
            let mut st = shared.lock();
            match st.routes.get(&h.request_id) {
                None => {
                    // The caller timed out and left; the late reply has nobody to go to.
                    tracing::debug!(addr = %shared.addr, id = h.request_id, "reply without a waiter");
                    continue;
                }
                Some(Route::Stream { tx }) => {
                    let ends = !matches!(reply, Ok(ClientReply::Records { .. }));
                    let tx = tx.clone();
                    if ends {
                        st.routes.remove(&h.request_id);
                    }
                    tx
                }
                Some(Route::Once { .. }) => {
                    if let Some(Route::Once { tx, .. }) = st.routes.remove(&h.request_id) {
                        let _ = tx.send(reply);
                    }
                    continue;
                }
            }
        };
        // Waiting here (outside the lock) is the backpressure for a slow subscriber.
        if stream_tx
            .send(reply.and_then(|r| server_error(Ok(r))))
            .await
            .is_err()
        {
            shared.remove(h.request_id);
        }
    };
    tracing::debug!(addr = %shared.addr, error = %err, "connection closed");
    shared.close(err);
}

fn push_frame(q: &mut VecDeque<Bytes>, f: Encoded) -> usize {
    let n = f.len();
    if !f.head.is_empty() {
        q.push_back(f.head);
    }
    q.extend(f.chunks.into_iter().filter(|c| !c.is_empty()));
    n
}

async fn write_loop(shared: Arc<Shared>, mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Encoded>) {
    let mut q: VecDeque<Bytes> = VecDeque::new();
    while let Some(f) = rx.recv().await {
        // Gather whatever else is already queued so one writev carries many frames.
        let mut bytes = push_frame(&mut q, f);
        while bytes < WRITE_BURST_BYTES_MAX && q.len() < WRITE_SLICES_MAX {
            match rx.try_recv() {
                Ok(f) => bytes += push_frame(&mut q, f),
                Err(_) => break,
            }
        }
        if let Err(e) = write_all_vectored(&mut wr, &mut q).await {
            shared.close(Error::ConnectionLost {
                addr: shared.addr.clone(),
                reason: e.to_string(),
            });
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes every buffer in `q` with `writev`, handling short writes.
pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    q: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !q.is_empty() {
        let n = {
            let slices: Vec<IoSlice<'_>> = q
                .iter()
                .take(WRITE_SLICES_MAX)
                .map(|b| IoSlice::new(b))
                .collect();
            wr.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let Some(front) = q.front_mut() else { break };
            if front.len() <= left {
                left -= front.len();
                q.pop_front();
            } else {
                let _ = front.split_to(left);
                left = 0;
            }
        }
    }
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vectored_writes_survive_short_writes() {
        // A duplex pipe with a tiny buffer forces many partial writev calls.
        let (mut a, mut b) = tokio::io::duplex(7);
        let parts: Vec<Bytes> = (0..50u8)
            .map(|i| Bytes::from(vec![i; i as usize % 13]))
            .collect();
        let want: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut q: VecDeque<Bytes> = parts.into_iter().collect();
        let n = want.len();
        let w = tokio::spawn(async move {
            write_all_vectored(&mut a, &mut q).await.unwrap();
        });
        let mut got = vec![0u8; n];
        b.read_exact(&mut got).await.unwrap();
        w.await.unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn frame_reader_splits_frames_across_reads() {
        let (mut a, b) = tokio::io::duplex(5);
        let frames: Vec<Encoded> = (0..20u64)
            .map(|i| {
                ClientReply::TrimOk {
                    start: chainlog_core::Offset(i),
                }
                .encode(i)
            })
            .collect();
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        tokio::spawn(async move {
            a.write_all(&bytes).await.unwrap();
        });
        let mut r = FrameReader::new(b);
        for i in 0..20u64 {
            let (h, body) = r.next().await.ok().flatten().unwrap();
            assert_eq!(h.request_id, i);
            assert_eq!(
                ClientReply::decode(h.kind, body).unwrap(),
                ClientReply::TrimOk {
                    start: chainlog_core::Offset(i)
                }
            );
        }
        assert!(matches!(r.next().await, Ok(None)));
    }
}
