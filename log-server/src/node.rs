//! One node's runtime: the core loop that feeds the replica and carries out its effects, the
//! listener for clients and the predecessor, and the link to the successor.
//!
//! Threads: tokio tasks for sockets and the core loop; the storage thread(s) own io_uring. The
//! replica is touched only by the core loop, so it needs no locks; everything reaches it as an
//! `Event` over one channel, in arrival order.

use crate::config::{claim_data_dir, IoModeSetting, NodeConfig};
use crate::metrics::Metrics;
use crate::storage::{IoMode, Storage, StorageConfig};
use anyhow::Context;
use bytes::Bytes;
use chainlog_core::effects::{ClientId, DiskEvent, Effect, RecoveredLog};
use chainlog_core::replica::BUSY_TICK_US;
use chainlog_core::types::{ClusterId, Epoch, Instant, LogId, NodeId, Offset};
use chainlog_core::wire::{
    ClientReply, ClientRequest, Encoded, Hello, HelloOk, Kind, PeerMessage, Role,
    CONNECTION_REQUEST_ID, PROTOCOL_VERSION,
};
use chainlog_core::ErrorCode;
use chainlog_core::{ChainConfig, Replica, ReplicaConfig};
use chainlog_hw::net::tcp::{split, split_with, BodyPolicy, StreamReader, StreamWriter};
use chainlog_hw::net::{Frame, FrameRecv, FrameSend, NetError};
use chainlog_hw::uring::CompletionSignal;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

/// Connections accepted past `connections_max` while their Hello is awaited; only the
/// predecessor keeps one. A few, so that a predecessor reconnecting while old connections of its
/// linger (or other nodes dialing by mistake) still gets in.
const PEER_RESERVED_CONNECTIONS: usize = 4;
/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect back-off to the successor.
const RECONNECT_MIN: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_millis(500);
/// How long the successor may be unreachable before it is logged at warn level.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);
/// How often the same failure to reach the successor is logged again at warn level.
const FAILURE_REPEAT_LOG: Duration = Duration::from_secs(30);
/// Events the core loop takes before it carries out effects and polls again (fairness bound).
const EVENTS_PER_TURN_MAX: usize = 1024;
/// Frames a connection writer coalesces into one vectored write.
const FRAMES_PER_WRITE_MAX: usize = 256;

/// An outbound frame plus whether it completes a request (frees an in-flight slot).
struct Out {
    frame: Encoded,
    completes: bool,
}

type OutTx = mpsc::UnboundedSender<Out>;

/// Bytes of replies and pushes that may wait for one client's socket. A consumer slower than
/// that is disconnected (with a `LimitExceeded` error) rather than allowed to grow memory.
const CLIENT_QUEUE_BYTES_MAX: usize = 64 << 20;

/// A peer link as the core loop sees it: which link session it is, and its outbound queue.
struct PeerOut {
    gen: u64,
    out: OutQueue,
}

/// Bytes that may wait for one peer link's socket. An honest predecessor has at most its
/// window un-acknowledged in memory, as much again streamed from storage to a successor
/// catching up, and a window resent after a gap; a successor queues acks and answers to the
/// predecessor's rate-limited fetches. Three windows and two maximal batches cover all of it.
fn peer_queue_bytes_max(pipeline_bytes_max: usize) -> usize {
    pipeline_bytes_max
        .saturating_mul(3)
        .saturating_add(2 * chainlog_core::limits::BATCH_BYTES_MAX)
}

/// A connection's outbound queue (client or peer) and its size in bytes, which its writer
/// takes each frame off as it goes out; `kicked` tells the connection's reader that the core
/// dropped it (a peer or client not reading).
#[derive(Clone)]
struct OutQueue {
    tx: OutTx,
    queued_bytes: Arc<AtomicUsize>,
    kicked: Arc<tokio::sync::Notify>,
}

impl OutQueue {
    /// A queue and the receiver its writer drains.
    fn new() -> (OutQueue, mpsc::UnboundedReceiver<Out>) {
        let (tx, rx) = mpsc::unbounded_channel::<Out>();
        let q = OutQueue {
            tx,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            kicked: Arc::new(tokio::sync::Notify::new()),
        };
        (q, rx)
    }

    fn push(&self, frame: Encoded, completes: bool) {
        self.queued_bytes.fetch_add(frame.len(), Ordering::Relaxed);
        let _ = self.tx.send(Out { frame, completes });
    }

    /// Whether `len` bytes more would put over `limit` in wait.
    fn over(&self, len: usize, limit: usize) -> bool {
        self.queued_bytes.load(Ordering::Relaxed) + len > limit
    }
}

enum Event {
    ClientUp {
        id: ClientId,
        out: OutQueue,
    },
    Client {
        id: ClientId,
        request_id: u64,
        req: ClientRequest,
        /// When the reader had the whole frame (before decoding it).
        at: std::time::Instant,
    },
    ClientGone {
        id: ClientId,
    },
    LinkUp {
        peer: NodeId,
        link: PeerOut,
    },
    LinkDown {
        peer: NodeId,
        gen: u64,
    },
    Peer {
        from: NodeId,
        gen: u64,
        msg: PeerMessage,
        /// When the reader had the whole frame (before decoding it).
        at: std::time::Instant,
    },
    Disk(DiskEvent),
}

/// A running node; dropping it does not stop it: call `shutdown`.
pub struct NodeHandle {
    pub node: NodeId,
    pub listen: SocketAddr,
    pub cluster_id: ClusterId,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl NodeHandle {
    /// Stops accepting, finishes the core loop and drains storage (everything written so far is
    /// durable when this returns).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

struct Shared {
    cfg: NodeConfig,
    cluster_id: ClusterId,
    epoch: Epoch,
    node: NodeId,
    next_client: AtomicU64,
    next_link_gen: AtomicU64,
    connections: Arc<Semaphore>,
    /// Slots past `connections` that only the predecessor may keep (see `accept_loop`).
    peer_reserve: Arc<Semaphore>,
    /// Client appends are read into page-aligned, padded buffers when storage uses O_DIRECT.
    direct_io: bool,
}

fn now_us(start: std::time::Instant) -> Instant {
    Instant(start.elapsed().as_micros() as u64)
}

/// Starts a node: recovers storage, binds the listener, connects to the successor.
///
/// With `cfg.cpus` set it first pins the calling thread there, so the node's core loop (this
/// thread: `log-server` runs every node on a current-thread runtime) and every thread it starts
/// (storage, spare preparer, blocking pool) run on those CPUs.
pub async fn start(mut cfg: NodeConfig) -> anyhow::Result<NodeHandle> {
    cfg.validate()?;
    if let Some(list) = &cfg.cpus {
        let cpus = chainlog_hw::cpu::parse_cpu_list(list)?;
        chainlog_hw::cpu::pin_current_thread(&cpus)
            .with_context(|| format!("pinning node {} to CPUs {list}", cfg.node_id))?;
        tracing::info!(node = cfg.node_id, cpus = %list, "pinned to CPUs");
    }
    std::fs::create_dir_all(&cfg.dir)
        .with_context(|| format!("creating data directory {}", cfg.dir.display()))?;
    let cluster_id = claim_data_dir(&cfg.dir, cfg.cluster_id, cfg.node_id, cfg.chain.nodes.len())?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let listen = listener.local_addr()?;

    let (ev_tx, ev_rx) = mpsc::unbounded_channel::<Event>();
    let disk_tx = ev_tx.clone();
    let scfg = StorageConfig {
        dir: cfg.dir.join("logs"),
        segment_bytes: cfg.storage.segment_bytes,
        io_mode: match cfg.storage.io_mode {
            IoModeSetting::Auto => IoMode::Auto,
            IoModeSetting::Direct => IoMode::Direct,
            IoModeSetting::Buffered => IoMode::Buffered,
        },
        retention_bytes: cfg.storage.retention_bytes,
        retention_ms: cfg.storage.retention_ms,
        groups_in_flight_max: cfg.storage.flushes_in_flight_max,
        ..StorageConfig::default()
    };
    // Recovery reads and verifies segments: off the runtime's thread(s). The writer itself is
    // then driven by the core loop (see `CoreLoop::run`).
    let (storage, mut recovered, ring_fd) = tokio::task::spawn_blocking(move || {
        Storage::open_driven(
            scfg,
            Box::new(move |ev| {
                let _ = disk_tx.send(Event::Disk(ev));
            }),
        )
    })
    .await
    .context("storage recovery task")?
    .with_context(|| format!("opening storage in {}", cfg.dir.display()))?;
    let ring_fd =
        CompletionSignal::new(ring_fd).context("registering the storage ring's eventfd")?;
    let mut ev_rx = ev_rx;
    ensure_default_log(&storage, &mut recovered, &mut ev_rx).await?;

    let node = cfg.node();
    let epoch = cfg.epoch();
    let mut rcfg = ReplicaConfig::new(node, cluster_id);
    rcfg.pipeline_bytes_max = cfg.replication.pipeline_bytes_max;
    rcfg.resend_timeout_us = cfg.replication.resend_timeout_ms * 1000;
    rcfg.writes_in_flight_max = cfg.storage.flushes_in_flight_max;
    let chain = ChainConfig {
        epoch,
        nodes: cfg.chain_ids(),
    };
    let start = std::time::Instant::now();
    let replica = Replica::new(rcfg, chain, recovered, now_us(start));

    let shared = Arc::new(Shared {
        cluster_id,
        epoch,
        node,
        next_client: AtomicU64::new(1),
        next_link_gen: AtomicU64::new(1),
        connections: Arc::new(Semaphore::new(cfg.connections_max)),
        peer_reserve: Arc::new(Semaphore::new(PEER_RESERVED_CONNECTIONS)),
        direct_io: storage.is_direct(),
        cfg,
    });
    let (stop, stop_rx) = watch::channel(false);

    tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        ev_tx.clone(),
        stop_rx.clone(),
    ));
    if let Some(succ) = shared.cfg.successor().cloned() {
        tokio::spawn(successor_loop(
            shared.clone(),
            NodeId(succ.id),
            succ.addr,
            ev_tx.clone(),
            stop_rx.clone(),
        ));
    }
    let core = CoreLoop {
        shared: shared.clone(),
        replica,
        storage: Some(storage),
        ring_fd: Some(ring_fd),
        clients: BTreeMap::new(),
        links: BTreeMap::new(),
        peer_queue_bytes_max: peer_queue_bytes_max(shared.cfg.replication.pipeline_bytes_max),
        start,
        listen,
        metrics: Metrics::default(),
        append_started: BTreeMap::new(),
        turnaround: Vec::new(),
        gone: Vec::new(),
        links_dropped: Vec::new(),
        forwarded: false,
    };
    let done = tokio::spawn(core.run(ev_rx, stop_rx));
    tracing::info!(node = node.0, %listen, cluster = %format!("{:016x}", cluster_id.0), "node started");
    Ok(NodeHandle {
        node,
        listen,
        cluster_id,
        stop,
        done,
    })
}

/// Every node has a log named "default" so the CLI works with no set-up.
async fn ensure_default_log(
    storage: &Storage,
    recovered: &mut Vec<RecoveredLog>,
    ev_rx: &mut mpsc::UnboundedReceiver<Event>,
) -> anyhow::Result<()> {
    let id = LogId::from_name("default");
    if recovered.iter().any(|r| r.log == id) {
        return Ok(());
    }
    storage.create_log(id, "default");
    storage.drive();
    loop {
        match ev_rx.recv().await {
            Some(Event::Disk(DiskEvent::Created { log, result })) if log == id => {
                result.map_err(|c| anyhow::anyhow!("creating the default log: {c:?}"))?;
                break;
            }
            Some(_) => continue,
            None => anyhow::bail!("storage stopped while creating the default log"),
        }
    }
    recovered.push(RecoveredLog {
        log: id,
        name: "default".into(),
        start: Offset(0),
        end: Offset(0),
        producers: vec![],
        committed_hint: Offset(0),
        trim_point: Offset(0),
    });
    Ok(())
}

struct CoreLoop {
    shared: Arc<Shared>,
    replica: Replica,
    storage: Option<Storage>,
    /// Readable when the storage ring has posted completions: the loop then drives storage.
    ring_fd: Option<CompletionSignal>,
    clients: BTreeMap<ClientId, OutQueue>,
    links: BTreeMap<NodeId, PeerOut>,
    /// Bytes that may wait for one peer link's socket (`peer_queue_bytes_max`).
    peer_queue_bytes_max: usize,
    start: std::time::Instant,
    listen: SocketAddr,
    metrics: Metrics,
    /// Start times of appends in flight, for the head's append-latency histogram.
    append_started: BTreeMap<(ClientId, u64), std::time::Instant>,
    /// Effects of this turn made by a received frame (index into the turn's effects, when the
    /// frame was read): the node's own turnaround histograms.
    turnaround: Vec<(usize, std::time::Instant)>,
    /// Clients dropped while carrying out effects (slow consumers), told to the core next.
    gone: Vec<ClientId>,
    /// Peer links dropped while carrying out effects (peers not reading), told to the core next.
    links_dropped: Vec<NodeId>,
    /// This turn handed batches to the successor's link.
    forwarded: bool,
}

/// End offset of the last of `batches` (None if it does not decode: metrics only).
fn batches_end(batches: &[Bytes]) -> Option<Offset> {
    batches
        .last()
        .and_then(|b| chainlog_core::record::BatchHeader::decode(b).ok())
        .map(|h| h.end_offset())
}

impl CoreLoop {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        // The next tick: when the replica says (`Replica::next_tick`: 1 ms after the last one
        // while it has work in flight, far less often idle). Reset only when that moves: an
        // earlier deadline costs the timer driver a wake-up of its own.
        let mut last_tick = now_us(self.start);
        let mut tick_at = self.tick_instant(last_tick.plus_us(BUSY_TICK_US));
        let tick = tokio::time::sleep_until(tick_at);
        tokio::pin!(tick);
        let mut effects: Vec<Effect> = Vec::with_capacity(256);
        let Some(ring_fd) = self.ring_fd.take() else {
            tracing::error!("core loop started without its storage eventfd");
            return;
        };
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                // Completions are reaped by `drive` below.
                r = ring_fd.wait() => if let Err(e) = r {
                    tracing::error!("storage ring signal failed: {e}");
                    break;
                },
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    self.handle(ev, &mut effects);
                    let mut n = 1;
                    while n < EVENTS_PER_TURN_MAX {
                        match rx.try_recv() {
                            Ok(ev) => { self.handle(ev, &mut effects); n += 1; }
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut tick => {
                    let now = now_us(self.start);
                    last_tick = now;
                    self.replica.on_tick(now, &mut effects);
                }
            }
            self.carry_out(&mut effects);
            while let Some(id) = self.gone.pop() {
                let now = now_us(self.start);
                self.replica.on_client_gone(now, id, &mut effects);
                self.carry_out(&mut effects);
            }
            while let Some(peer) = self.links_dropped.pop() {
                let now = now_us(self.start);
                self.replica.on_link(now, peer, false, &mut effects);
                self.carry_out(&mut effects);
            }
            // The successor's copy is on the chain's critical path (the tail's fdatasync ends
            // it) and ours is not: let the link writers put this turn's batches on the wire
            // before the storage submit, which costs tens of µs on the loop thread. Measured
            // on the dev chain: the tail gets each batch 55-90 µs sooner at 128 in flight.
            if std::mem::take(&mut self.forwarded) {
                tokio::task::yield_now().await;
            }
            // Submit what this turn queued and reap what completed; the events it produces
            // are taken on the next turn.
            if let Some(s) = &self.storage {
                s.drive();
            }
            let want = self.tick_instant(self.replica.next_tick(last_tick));
            if want != tick_at {
                tick_at = want;
                tick.as_mut().reset(want);
            }
        }
        // Every client hears why before its connection closes (the writers send it while
        // storage drains); replies already queued go out first.
        for out in std::mem::take(&mut self.clients).into_values() {
            out.push(shutting_down(self.shared.node), false);
        }
        if let Some(s) = self.storage.take() {
            let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
        }
        tracing::info!(node = self.shared.node.0, "node stopped");
    }

    /// The runtime's instant of the core's `t` (microseconds since this node started).
    fn tick_instant(&self, t: Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start + Duration::from_micros(t.0))
    }

    fn handle(&mut self, ev: Event, out: &mut Vec<Effect>) {
        let now = now_us(self.start);
        match ev {
            Event::ClientUp { id, out } => {
                self.clients.insert(id, out);
            }
            Event::Client {
                id,
                request_id,
                req,
                at,
            } => match req {
                ClientRequest::Status => {
                    let reply = ClientReply::StatusOk {
                        json: self.status_json(),
                    };
                    self.reply(id, request_id, &reply);
                }
                req => {
                    let append = matches!(req, ClientRequest::Append { .. });
                    if append {
                        self.append_started.insert((id, request_id), at);
                    }
                    let before = out.len();
                    self.replica.on_client(now, id, request_id, req, out);
                    if append {
                        self.stamp_turnaround(out, before, at);
                    }
                }
            },
            Event::ClientGone { id } => {
                self.clients.remove(&id);
                self.replica.on_client_gone(now, id, out);
            }
            Event::LinkUp { peer, link } => {
                self.metrics.link_reset();
                if let Some(old) = self.links.insert(peer, link) {
                    drop(old);
                    self.replica.on_link(now, peer, false, out);
                }
                self.replica.on_link(now, peer, true, out);
            }
            Event::LinkDown { peer, gen } => {
                if self.links.get(&peer).map(|l| l.gen) == Some(gen) {
                    self.links.remove(&peer);
                    self.replica.on_link(now, peer, false, out);
                }
            }
            Event::Peer { from, gen, msg, at } => {
                // A message from a link that has since been replaced belongs to an old session.
                if self.links.get(&from).map(|l| l.gen) == Some(gen) {
                    self.note_received(&msg, at);
                    let append = matches!(msg, PeerMessage::Append { .. });
                    let before = out.len();
                    self.replica.on_peer(now, from, msg, out);
                    if append {
                        self.stamp_turnaround(out, before, at);
                    }
                }
            }
            Event::Disk(ev) => {
                match &ev {
                    DiskEvent::WriteFailed { log, at, code } => {
                        tracing::error!(log = log.0, at = at.0, ?code, "storage write failed");
                        self.metrics.write_failed(*log);
                    }
                    DiskEvent::Durable { log, end } => {
                        self.metrics.durable(*log, *end, std::time::Instant::now());
                    }
                    DiskEvent::Reopened { log, end } => {
                        tracing::warn!(
                            log = log.0,
                            end = end.0,
                            "storage has room again; log takes appends"
                        );
                        // Writes issued while failed were dropped, and the core opens a new
                        // successor session: none of the old ranges will complete as timed.
                        self.metrics.write_failed(*log);
                        self.metrics.link_reset();
                    }
                    _ => {}
                }
                self.replica.on_disk(now, ev, out);
            }
        }
    }

    /// Replication stages start when batches go to the successor and end when this node
    /// acknowledges upstream.
    fn note_sent(&mut self, msg: &PeerMessage) {
        let now = std::time::Instant::now();
        match msg {
            PeerMessage::Append { log, batches, .. } => {
                self.forwarded = true;
                if let Some(end) = batches_end(batches) {
                    self.metrics.forwarded(*log, end, now);
                }
            }
            PeerMessage::Ack { log, ack_end, .. } => {
                self.metrics.acked_upstream(*log, *ack_end, now)
            }
            _ => {}
        }
    }

    /// ... and start when batches arrive from the predecessor (`at`: read off the socket), end
    /// when the successor's acknowledgement arrives.
    fn note_received(&mut self, msg: &PeerMessage, at: std::time::Instant) {
        match msg {
            PeerMessage::Append { log, batches, .. } => {
                if let Some(end) = batches_end(batches) {
                    self.metrics.received(*log, end, at);
                }
            }
            PeerMessage::Ack { log, ack_end, .. } => {
                self.metrics.successor_acked(*log, *ack_end, at)
            }
            _ => {}
        }
    }

    /// The node's own turnaround: which of the effects a frame carrying batches produced (`out`
    /// from `before`) forward a batch or hand one to storage; `carry_out` times them from `at`,
    /// when the frame was read. Batches that wait (the head's queue behind a full window) are
    /// set moving by a later event and are not timed here: this is the node's share of a hop.
    fn stamp_turnaround(&mut self, out: &[Effect], before: usize, at: std::time::Instant) {
        for (i, e) in out.iter().enumerate().skip(before) {
            if matches!(
                e,
                Effect::Append { .. }
                    | Effect::Send {
                        msg: PeerMessage::Append { .. },
                        ..
                    }
            ) {
                self.turnaround.push((i, at));
            }
        }
    }

    /// Queues `frame` on the link to `to`. A peer whose link holds more than
    /// `peer_queue_bytes_max` unsent is not reading (an honest neighbour never has that much
    /// waiting: the pipeline window bounds what goes downstream, and what goes upstream is
    /// acks and answers to its own requests): the link is dropped, as a slow client is,
    /// rather than allowed to grow memory; the neighbour reconnects with a new session.
    fn send_peer(&mut self, to: NodeId, frame: Encoded) {
        let Some(link) = self.links.get(&to) else {
            return;
        };
        if link.out.over(frame.len(), self.peer_queue_bytes_max) {
            tracing::warn!(
                peer = to.0,
                limit = self.peer_queue_bytes_max,
                "peer link not reading: dropping it"
            );
            link.out.kicked.notify_one();
            self.links.remove(&to);
            self.links_dropped.push(to);
            return;
        }
        link.out.push(frame, false);
    }

    fn reply(&mut self, client: ClientId, request_id: u64, reply: &ClientReply) {
        let Some(c) = self.clients.get(&client) else {
            return;
        };
        let completes = !matches!(reply, ClientReply::Records { .. });
        let frame = reply.encode(request_id);
        if c.over(frame.len(), CLIENT_QUEUE_BYTES_MAX) {
            tracing::warn!(client = client.0, "slow consumer: disconnecting");
            let error = ClientReply::Error {
                code: ErrorCode::LimitExceeded,
                message: format!(
                    "slow consumer: over {CLIENT_QUEUE_BYTES_MAX} bytes wait for this connection"
                ),
            };
            c.push(error.encode(request_id), true);
            c.kicked.notify_one();
            self.clients.remove(&client);
            // The core forgets the client's subscriptions and reads on the next turn.
            self.gone.push(client);
            return;
        }
        c.push(frame, completes);
    }

    fn carry_out(&mut self, effects: &mut Vec<Effect>) {
        // `turnaround` is in effect order: one cursor walks it alongside.
        let mut next = 0;
        for (i, e) in effects.drain(..).enumerate() {
            let received = match self.turnaround.get(next) {
                Some(&(j, at)) if j == i => {
                    next += 1;
                    Some(at)
                }
                _ => None,
            };
            match e {
                Effect::Send { to, msg } => {
                    self.note_sent(&msg);
                    self.send_peer(to, msg.encode());
                    if let Some(at) = received {
                        self.metrics.received_to_forward(at.elapsed());
                    }
                }
                Effect::Reply {
                    client,
                    request_id,
                    reply,
                } => {
                    if let Some(t0) = self.append_started.remove(&(client, request_id)) {
                        if matches!(reply, ClientReply::AppendOk { .. }) {
                            self.metrics.record_append(t0.elapsed());
                        }
                    }
                    let reply = self.with_head_address(reply);
                    self.reply(client, request_id, &reply);
                }
                Effect::Append { log, base, batches } => {
                    let now = std::time::Instant::now();
                    if let Some(end) = batches_end(&batches) {
                        self.metrics.write_issued(log, end, now);
                    }
                    if let Some(at) = received {
                        self.metrics
                            .received_to_write(now.saturating_duration_since(at));
                    }
                    if let Some(s) = &self.storage {
                        s.append(log, base, batches);
                    }
                }
                Effect::Truncate { log, end } => {
                    if let Some(s) = &self.storage {
                        s.truncate(log, end);
                    }
                }
                Effect::CreateLog { log, name } => {
                    if let Some(s) = &self.storage {
                        s.create_log(log, &name);
                    }
                }
                Effect::Read {
                    token,
                    log,
                    from,
                    end,
                    max_bytes,
                } => {
                    if let Some(s) = &self.storage {
                        s.read(token, log, from, end, max_bytes);
                    }
                }
                Effect::Trim { log, before, point } => {
                    if let Some(s) = &self.storage {
                        s.trim(log, before, point);
                    }
                }
                Effect::SaveCommitted { log, end } => {
                    if let Some(s) = &self.storage {
                        s.save_committed(log, end);
                    }
                }
            }
        }
        self.turnaround.clear();
        // Drop start times of appends whose client went away (bounded by in-flight limits).
        if self.append_started.len() > 1 << 20 {
            self.append_started.clear();
        }
    }

    /// The core knows node ids, not addresses: a `NotHead` answer gets the head's client
    /// address appended so clients can follow the redirect ("... at HOST:PORT").
    fn with_head_address(&self, reply: ClientReply) -> ClientReply {
        match reply {
            ClientReply::Error {
                code: ErrorCode::NotHead,
                message,
            } => {
                let message = match self.shared.cfg.chain.nodes.first() {
                    Some(head) => format!("{message} at {}", head.addr),
                    None => message,
                };
                ClientReply::Error {
                    code: ErrorCode::NotHead,
                    message,
                }
            }
            other => other,
        }
    }

    fn status_json(&self) -> Bytes {
        let cfg = &self.shared.cfg;
        let chain: Vec<serde_json::Value> = cfg
            .chain
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let role = if cfg.chain.nodes.len() == 1 {
                    "head+tail"
                } else if i == 0 {
                    "head"
                } else if i + 1 == cfg.chain.nodes.len() {
                    "tail"
                } else {
                    "middle"
                };
                // Only neighbours have links; say so rather than report "down" for the rest.
                let neighbour = cfg.predecessor().map(|p| p.id) == Some(n.id)
                    || cfg.successor().map(|p| p.id) == Some(n.id);
                let link = if n.id == cfg.node_id {
                    "self"
                } else if !neighbour {
                    "-"
                } else if self.links.contains_key(&NodeId(n.id)) {
                    "up"
                } else {
                    "down"
                };
                serde_json::json!({ "id": n.id, "addr": n.addr, "role": role, "link": link })
            })
            .collect();
        let doc = serde_json::json!({
            "node": self.shared.node.0,
            "cluster_id": format!("{:016x}", self.shared.cluster_id.0),
            "epoch": self.shared.epoch.0,
            "listen": self.listen.to_string(),
            "chain": chain,
            "replica": self.replica.status(),
            "storage": self.storage.as_ref().map(|s| s.stats()),
            "net_copy_bytes": chainlog_hw::net::copy_bytes_total(),
            "latency_us": self.metrics.summaries(),
            "clients": self.clients.len(),
        });
        Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default())
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    ev_tx: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Who connects is known only from the Hello: with every client slot taken, a
                // connection may still come in on a reserved one, which it keeps only if it is
                // the predecessor (idle clients must not cut the chain's own link).
                let (permit, reserved) = match shared.connections.clone().try_acquire_owned() {
                    Ok(p) => (p, false),
                    Err(_) => match shared.peer_reserve.clone().try_acquire_owned() {
                        Ok(p) => (p, true),
                        Err(_) => {
                            tokio::spawn(refuse(
                                stream,
                                ErrorCode::LimitExceeded,
                                "too many connections",
                            ));
                            continue;
                        }
                    },
                };
                let shared = shared.clone();
                let ev_tx = ev_tx.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, reserved, shared, ev_tx, stop).await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn refuse(stream: TcpStream, code: ErrorCode, message: &str) {
    let (_, mut w) = split(stream);
    let _ = w
        .send(&[ClientReply::Error {
            code,
            message: message.into(),
        }
        .encode(CONNECTION_REQUEST_ID)])
        .await;
}

async fn send_error<W: tokio::io::AsyncWrite + Unpin + Send>(
    w: &mut StreamWriter<W>,
    request_id: u64,
    code: ErrorCode,
    message: String,
) {
    let _ = w
        .send(&[ClientReply::Error { code, message }.encode(request_id)])
        .await;
}

/// Handshake, then serve the connection as a client session or as the predecessor's link.
async fn serve_connection(
    stream: TcpStream,
    reserved: bool,
    shared: Arc<Shared>,
    ev_tx: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) -> Result<(), NetError> {
    // Until the Hello says otherwise this may be a client: read appends into buffers of their
    // own (unique, so the head restamps in place; aligned for O_DIRECT), never read ahead.
    let client_policy = BodyPolicy {
        dedicated_kind: Some(Kind::Append as u16),
        align: shared
            .direct_io
            .then_some(chainlog_core::limits::DISK_ALIGN_BYTES),
        split_peer_batches: false,
    };
    let (mut r, mut w) = split_with(stream, client_policy);
    let first = match tokio::time::timeout(HELLO_TIMEOUT, r.recv()).await {
        Ok(f) => f?,
        Err(_) => {
            send_error(
                &mut w,
                CONNECTION_REQUEST_ID,
                ErrorCode::Timeout,
                "no hello within 5 s".into(),
            )
            .await;
            return Ok(());
        }
    };
    let Some(first) = first else { return Ok(()) };
    if first.header.kind != Kind::Hello as u16 {
        send_error(
            &mut w,
            first.header.request_id,
            ErrorCode::BadRequest,
            "the first frame must be Hello".into(),
        )
        .await;
        return Ok(());
    }
    let hello = match Hello::decode(first.body) {
        Ok(h) => h,
        Err(e) => {
            send_error(&mut w, first.header.request_id, e.code(), e.to_string()).await;
            return Ok(());
        }
    };
    if hello.version != PROTOCOL_VERSION {
        send_error(
            &mut w,
            first.header.request_id,
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} not supported (this node speaks {PROTOCOL_VERSION})",
                hello.version
            ),
        )
        .await;
        return Ok(());
    }
    let cluster_ok = hello.cluster_id == shared.cluster_id
        || (hello.cluster_id.0 == 0 && hello.role == Role::Client);
    if !cluster_ok {
        send_error(
            &mut w,
            first.header.request_id,
            ErrorCode::WrongCluster,
            format!(
                "this node belongs to cluster {:016x}, not {:016x}",
                shared.cluster_id.0, hello.cluster_id.0
            ),
        )
        .await;
        return Ok(());
    }
    let ok = HelloOk {
        version: PROTOCOL_VERSION,
        cluster_id: shared.cluster_id,
        node: shared.node,
        epoch: shared.epoch,
    };
    match hello.role {
        Role::Client if reserved => {
            send_error(
                &mut w,
                first.header.request_id,
                ErrorCode::LimitExceeded,
                format!(
                    "too many connections: {} clients are connected",
                    shared.cfg.connections_max
                ),
            )
            .await;
            Ok(())
        }
        Role::Client => {
            w.send(&[ok.encode(first.header.request_id)]).await?;
            client_session(r, w, shared, ev_tx, stop).await
        }
        Role::Peer { node } => {
            let pred = shared.cfg.predecessor().map(|n| NodeId(n.id));
            if pred != Some(node) {
                send_error(
                    &mut w,
                    first.header.request_id,
                    ErrorCode::BadRequest,
                    format!(
                        "node {node} is not this node's predecessor in epoch {}",
                        shared.epoch
                    ),
                )
                .await;
                return Ok(());
            }
            if hello.epoch != shared.epoch {
                send_error(
                    &mut w,
                    first.header.request_id,
                    ErrorCode::WrongEpoch,
                    format!("epoch {} != this node's {}", hello.epoch, shared.epoch),
                )
                .await;
                return Ok(());
            }
            w.send(&[ok.encode(first.header.request_id)]).await?;
            r.set_policy(peer_policy(&shared));
            peer_session(node, r, w, shared, ev_tx, stop).await;
            Ok(())
        }
    }
}

async fn client_session(
    mut r: StreamReader<tokio::net::tcp::OwnedReadHalf>,
    w: StreamWriter<tokio::net::tcp::OwnedWriteHalf>,
    shared: Arc<Shared>,
    ev_tx: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NetError> {
    let id = ClientId(shared.next_client.fetch_add(1, Ordering::Relaxed));
    let (out, rx) = OutQueue::new();
    let inflight = Arc::new(Semaphore::new(
        chainlog_core::limits::CONNECTION_REQUESTS_MAX,
    ));
    let kicked = out.kicked.clone();
    let _ = ev_tx.send(Event::ClientUp {
        id,
        out: out.clone(),
    });
    let writer = tokio::spawn(writer_loop(
        w,
        rx,
        Some(inflight.clone()),
        Some(out.queued_bytes.clone()),
    ));
    // This task's own replies (errors for frames that do not decode) go through the same
    // queue, and count against the same bound, as the core's.
    let queue = |frame: Encoded, completes: bool| out.push(frame, completes);
    let idle = (shared.cfg.client_idle_timeout_ms > 0)
        .then(|| Duration::from_millis(shared.cfg.client_idle_timeout_ms));
    let result = loop {
        // Backpressure: stop reading when this connection has too many requests in flight.
        let permit = tokio::select! {
            _ = stop.changed() => break Ok(()),
            _ = kicked.notified() => break Ok(()),
            p = inflight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break Ok(()) },
        };
        let next = {
            // Pinned across the idle timer's checks: a frame half read when it fires (with
            // other requests in flight) must not be lost.
            let recv = r.recv();
            tokio::pin!(recv);
            loop {
                tokio::select! {
                    _ = stop.changed() => break Next::Stop,
                    _ = kicked.notified() => break Next::Stop,
                    f = &mut recv => break Next::Frame(f),
                    _ = tokio::time::sleep(idle.unwrap_or(Duration::MAX)), if idle.is_some() => {
                        // Only the permit for this frame is taken: nothing is in flight.
                        if inflight.available_permits() + 1
                            == chainlog_core::limits::CONNECTION_REQUESTS_MAX
                        {
                            break Next::Idle;
                        }
                    }
                }
            }
        };
        let frame = match next {
            Next::Frame(f) => f,
            Next::Stop => break Ok(()),
            Next::Idle => {
                let ms = shared.cfg.client_idle_timeout_ms;
                let error = ClientReply::Error {
                    code: ErrorCode::Timeout,
                    message: format!("idle for {ms} ms with nothing in flight: closing"),
                };
                queue(error.encode(CONNECTION_REQUEST_ID), false);
                break Ok(());
            }
        };
        let frame: Frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(NetError::BadFrame(e)) => {
                let error = ClientReply::Error {
                    code: e.code(),
                    message: e.to_string(),
                };
                queue(error.encode(CONNECTION_REQUEST_ID), false);
                break Err(NetError::BadFrame(e));
            }
            Err(e) => break Err(e),
        };
        let at = std::time::Instant::now();
        // The permit is given back by the writer when the reply goes out.
        permit.forget();
        let request_id = frame.header.request_id;
        match ClientRequest::decode(frame.header.kind, frame.body) {
            Ok(req) => {
                let _ = ev_tx.send(Event::Client {
                    id,
                    request_id,
                    req,
                    at,
                });
            }
            Err(e) => {
                let error = ClientReply::Error {
                    code: e.code(),
                    message: e.to_string(),
                };
                queue(error.encode(request_id), true);
            }
        }
    };
    let _ = ev_tx.send(Event::ClientGone { id });
    drop(out);
    let _ = writer.await;
    result
}

/// The connection-level error a client gets when the node stops: its requests in flight then
/// fail as a lost connection that says why (appends among them may be stored), and it knows
/// to go elsewhere rather than wait for this node.
fn shutting_down(node: NodeId) -> Encoded {
    ClientReply::Error {
        code: ErrorCode::ShuttingDown,
        message: format!("node {} is shutting down", node.0),
    }
    .encode(CONNECTION_REQUEST_ID)
}

/// What a client connection's reader waits for next.
enum Next {
    Frame(Result<Option<Frame>, NetError>),
    /// The node stops (the core loop says so), or dropped the client (slow consumer).
    Stop,
    /// Nothing sent and nothing in flight for `client_idle_timeout_ms`.
    Idle,
}

/// Writes queued frames, many per vectored write; frees in-flight slots as replies go out.
async fn writer_loop<W: tokio::io::AsyncWrite + Unpin + Send>(
    mut w: StreamWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    inflight: Option<Arc<Semaphore>>,
    queued_bytes: Option<Arc<AtomicUsize>>,
) {
    let mut frames: Vec<Encoded> = Vec::with_capacity(FRAMES_PER_WRITE_MAX);
    while let Some(first) = rx.recv().await {
        let mut completed = usize::from(first.completes);
        frames.push(first.frame);
        while frames.len() < FRAMES_PER_WRITE_MAX {
            match rx.try_recv() {
                Ok(o) => {
                    completed += usize::from(o.completes);
                    frames.push(o.frame);
                }
                Err(_) => break,
            }
        }
        let res = w.send(&frames).await;
        if let Some(q) = &queued_bytes {
            let sent: usize = frames.iter().map(Encoded::len).sum();
            q.fetch_sub(sent.min(q.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        frames.clear();
        if let Some(s) = &inflight {
            s.add_permits(completed);
        }
        if res.is_err() {
            break;
        }
    }
}

/// Our predecessor's link: we read its Appends/Commits and write our Acks.
async fn peer_session(
    peer: NodeId,
    mut r: StreamReader<tokio::net::tcp::OwnedReadHalf>,
    w: StreamWriter<tokio::net::tcp::OwnedWriteHalf>,
    shared: Arc<Shared>,
    ev_tx: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let gen = shared.next_link_gen.fetch_add(1, Ordering::Relaxed);
    let (out, rx) = OutQueue::new();
    let kicked = out.kicked.clone();
    let writer = tokio::spawn(writer_loop(w, rx, None, Some(out.queued_bytes.clone())));
    let _ = ev_tx.send(Event::LinkUp {
        peer,
        link: PeerOut { gen, out },
    });
    loop {
        let f = tokio::select! {
            _ = stop.changed() => break,
            _ = kicked.notified() => break,
            f = r.recv() => f,
        };
        match f {
            Ok(Some(f)) if f.header.kind == Kind::Peer as u16 => {
                let at = std::time::Instant::now();
                let decoded = if f.batches.is_empty() {
                    PeerMessage::decode(f.body)
                } else {
                    PeerMessage::decode_split(f.body, f.batches)
                };
                match decoded {
                    Ok(msg) => {
                        let _ = ev_tx.send(Event::Peer {
                            from: peer,
                            gen,
                            msg,
                            at,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(peer = peer.0, error = %e, "bad peer message; dropping link");
                        break;
                    }
                }
            }
            Ok(Some(f)) => {
                tracing::warn!(
                    peer = peer.0,
                    kind = f.header.kind,
                    "unexpected frame on peer link"
                );
                break;
            }
            Ok(None) => break,
            Err(e @ NetError::BadFrame(_)) => {
                // Bytes that fail their checksum or framing: a bug or a corrupting path, not
                // a peer going away.
                tracing::warn!(peer = peer.0, error = %e, "bad frame on peer link; dropping link");
                break;
            }
            Err(e) => {
                tracing::debug!(peer = peer.0, error = %e, "peer link read failed");
                break;
            }
        }
    }
    let _ = ev_tx.send(Event::LinkDown { peer, gen });
    writer.abort();
}

/// How a peer link reads frames: each batch into a buffer of its own (page-aligned and padded
/// when storage uses O_DIRECT), so the replica writes and forwards it as received. Slicing from
/// a shared receive buffer would need fewer reads but copies every frame that straddles the
/// buffer's end.
fn peer_policy(shared: &Shared) -> BodyPolicy {
    BodyPolicy {
        dedicated_kind: None,
        align: shared
            .direct_io
            .then_some(chainlog_core::limits::DISK_ALIGN_BYTES),
        split_peer_batches: true,
    }
}

/// Keeps a link to the successor up: connect, handshake, serve, reconnect with back-off.
async fn successor_loop(
    shared: Arc<Shared>,
    succ: NodeId,
    addr: String,
    ev_tx: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = RECONNECT_MIN;
    // Failures are told to the operator at warn level, not at every retry: a refusal (wrong
    // epoch, cluster or node: a configuration to fix) at once, an unreachable successor once
    // it has been so for `UNREACHABLE_GRACE` (nodes of a chain start in any order); the same
    // failure again every `FAILURE_REPEAT_LOG`.
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut logged: Option<(String, tokio::time::Instant)> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        match connect_peer(&shared, succ, &addr).await {
            Ok((r, w)) => {
                backoff = RECONNECT_MIN;
                (failing_since, logged) = (None, None);
                tracing::info!(node = shared.node.0, successor = succ.0, %addr, "link to successor up");
                peer_session(succ, r, w, shared.clone(), ev_tx.clone(), stop.clone()).await;
                tracing::info!(
                    node = shared.node.0,
                    successor = succ.0,
                    "link to successor down"
                );
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                let what = e.to_string();
                let repeat = logged
                    .as_ref()
                    .is_some_and(|(last, at)| *last == what && at.elapsed() < FAILURE_REPEAT_LOG);
                let early =
                    matches!(e, LinkFailure::Unreachable(_)) && since.elapsed() < UNREACHABLE_GRACE;
                if repeat || early {
                    tracing::debug!(successor = succ.0, %addr, error = %what, "connect to successor failed");
                } else {
                    tracing::warn!(successor = succ.0, %addr, error = %what, "connect to successor failed; retrying");
                    logged = Some((what, tokio::time::Instant::now()));
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Why a link to the successor could not be made.
#[derive(Debug)]
enum LinkFailure {
    /// No connection or no handshake: the successor is down, starting or unreachable.
    Unreachable(anyhow::Error),
    /// The successor answered and refused us, or is not the node the chain names: a
    /// configuration to fix, not a wait.
    Refused(String),
}

impl std::fmt::Display for LinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkFailure::Unreachable(e) => write!(f, "{e:#}"),
            LinkFailure::Refused(why) => f.write_str(why),
        }
    }
}

fn unreachable(e: impl Into<anyhow::Error>) -> LinkFailure {
    LinkFailure::Unreachable(e.into())
}

async fn connect_peer(
    shared: &Shared,
    succ: NodeId,
    addr: &str,
) -> Result<
    (
        StreamReader<tokio::net::tcp::OwnedReadHalf>,
        StreamWriter<tokio::net::tcp::OwnedWriteHalf>,
    ),
    LinkFailure,
> {
    let stream = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(unreachable)?
        .map_err(unreachable)?;
    let (mut r, mut w) = split_with(stream, peer_policy(shared));
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: shared.cluster_id,
        role: Role::Peer { node: shared.node },
        epoch: shared.epoch,
    };
    w.send(&[hello.encode(0)]).await.map_err(unreachable)?;
    let f = tokio::time::timeout(HELLO_TIMEOUT, r.recv())
        .await
        .map_err(unreachable)?
        .map_err(unreachable)?
        .ok_or_else(|| unreachable(anyhow::anyhow!("successor closed during handshake")))?;
    if f.header.kind != Kind::HelloOk as u16 {
        return Err(LinkFailure::Refused(
            match ClientReply::decode(f.header.kind, f.body) {
                Ok(ClientReply::Error { code, message }) => {
                    format!("successor refused the link: {code:?}: {message}")
                }
                Ok(_) => "successor answered the handshake with something else".into(),
                Err(e) => format!("successor's handshake answer does not decode: {e}"),
            },
        ));
    }
    let ok = HelloOk::decode(f.body)
        .map_err(|e| LinkFailure::Refused(format!("successor's HelloOk does not decode: {e}")))?;
    if ok.node != succ || ok.cluster_id != shared.cluster_id {
        return Err(LinkFailure::Refused(format!(
            "{addr} is node {} of cluster {:016x}, expected node {succ} of {:016x}",
            ok.node, ok.cluster_id.0, shared.cluster_id.0
        )));
    }
    Ok((r, w))
}
