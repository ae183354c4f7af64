//! The simulated world: real replica cores on simulated disks and links, clients, a fault
//! schedule, one event queue ordered by (time, sequence), and the checkers after every step.

use crate::checker::{Checker, Violation};
use crate::disk::SimDisk;
use crate::rng::Rng;
use bytes::Bytes;
use chainlog_core::effects::{ClientId, DiskEvent, Effect, PRODUCER_BATCHES_KEPT};
use chainlog_core::record::BatchBuilder;
use chainlog_core::replica::BUSY_TICK_US;
use chainlog_core::wire::{ClientReply, ClientRequest, PeerMessage, FRAME_HEADER_LEN};
use chainlog_core::{
    ChainConfig, ClusterId, Epoch, ErrorCode, Instant, LogId, NodeId, Offset, ProducerId, Replica,
    ReplicaConfig, ReplicaStatus,
};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

pub const CLUSTER: ClusterId = ClusterId(0xC1A1);
const SALT_PROFILE: u64 = 1;
const SALT_NET: u64 = 2;
const SALT_DISK: u64 = 3;
const SALT_CRASH: u64 = 4;
const SALT_WORK: u64 = 5;
/// Knobs added after the scenario tests were written draw from their own stream, so the
/// profile (and the scenarios built on particular seeds) stays as it was.
const SALT_PROFILE_2: u64 = 6;
/// Every trim decision (whether a seed trims, when, where): its own stream, so seeds that do
/// not trim run exactly as before trims existed.
const SALT_TRIM: u64 = 7;
/// Disk-full faults (whether a seed has them, when, where, how long): their own stream, so
/// seeds without them run exactly as before they existed.
const SALT_FULL: u64 = 8;
/// How often a node whose log failed full checks for free space (the real writer: once a
/// second, on its tick; scaled down like every other sim timing).
const FULL_CHECK_US: u64 = 5000;
const FAULT_TICK_US: u64 = 1000;
/// Client id used by the liveness verifier.
const VERIFIER: usize = 1000;

/// How a run is shaped. Fields left `None` are drawn from the seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Events processed in the safety phase (faults on).
    pub steps: u64,
    /// Events the liveness phase may take before the chain must have converged.
    pub liveness_steps_max: u64,
    pub nodes: Option<usize>,
    /// Inject faults in the safety phase.
    pub faults: bool,
    /// Deliberately wrong rule in every replica (checker test).
    pub bug_ack_before_successor: bool,
    /// Deliberately wrong rule: a successor never restarts its log at its predecessor's
    /// start (checker test: it must show as a stalled chain).
    pub bug_no_restart_at_pred_start: bool,
    /// How the workload trims; `None` draws it from the seed.
    pub trims: Option<TrimMode>,
}

/// How often, and how close to the acknowledged end, the workload trims its logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimMode {
    Never,
    /// Now and then, to a random point at or below what is safe to trim.
    Sometimes,
    /// Often and right up to the acknowledged end: a replica that restarts short soon finds
    /// its predecessor trimmed past it.
    Aggressive,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            steps: 3000,
            liveness_steps_max: 60_000,
            nodes: None,
            faults: true,
            bug_ack_before_successor: false,
            bug_no_restart_at_pred_start: false,
            trims: None,
        }
    }
}

/// Fault and timing knobs of one run, drawn from the seed.
#[derive(Clone, Debug)]
pub struct Params {
    pub drop_p: f64,
    pub dup_p: f64,
    pub fifo: bool,
    pub net_delay_us: (u64, u64),
    pub long_delay_p: f64,
    pub sync_delay_us: (u64, u64),
    pub io_delay_us: (u64, u64),
    pub crash_p: f64,
    pub restart_delay_us: (u64, u64),
    pub partition_p: f64,
    pub partition_us: (u64, u64),
    pub flip_p: f64,
    pub pad_reads: bool,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub steps: u64,
    pub sim_time_us: u64,
    pub trace_hash: u64,
    pub acked_appends: usize,
    pub crashes: u64,
    pub bit_flips: u64,
    pub partitions: u64,
    pub trims: u64,
    /// Disk-full windows injected.
    pub disk_fulls: u64,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub message: String,
    pub options: SimOptions,
}

impl Failure {
    /// The one-line command that replays this failure.
    pub fn repro(&self) -> String {
        let mut s = format!(
            "cargo run --release -p chainlog-sim -- --seed {} --steps {}",
            self.seed, self.options.steps
        );
        if let Some(n) = self.options.nodes {
            s.push_str(&format!(" --nodes {n}"));
        }
        if self.options.bug_ack_before_successor {
            s.push_str(" --bug-ack-before-successor");
        }
        if self.options.bug_no_restart_at_pred_start {
            s.push_str(" --bug-no-restart-at-pred-start");
        }
        if !self.options.faults {
            s.push_str(" --no-faults");
        }
        match self.options.trims {
            None => {}
            Some(TrimMode::Never) => s.push_str(" --trims never"),
            Some(TrimMode::Sometimes) => s.push_str(" --trims sometimes"),
            Some(TrimMode::Aggressive) => s.push_str(" --trims aggressive"),
        }
        s
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {}\n  repro: {}",
            self.seed,
            self.step,
            self.message,
            self.repro()
        )
    }
}

enum Ev {
    Tick {
        node: usize,
        inc: u64,
    },
    Peer {
        link: usize,
        gen: u64,
        from: usize,
        to: usize,
        body: Bytes,
    },
    Request {
        node: usize,
        inc: u64,
        client: usize,
        rid: u64,
        req: ClientRequest,
    },
    Reply {
        rid: u64,
        reply: ClientReply,
    },
    Disk {
        node: usize,
        inc: u64,
        ev: DiskEvent,
    },
    SyncDone {
        node: usize,
        inc: u64,
    },
    Restart {
        node: usize,
    },
    Heal {
        link: usize,
    },
    ClientWake {
        client: usize,
    },
    Fault,
}

impl Ev {
    fn code(&self) -> u64 {
        match self {
            Ev::Tick { .. } => 1,
            Ev::Peer { .. } => 2,
            Ev::Request { .. } => 3,
            Ev::Reply { .. } => 4,
            Ev::Disk { .. } => 5,
            Ev::SyncDone { .. } => 6,
            Ev::Restart { .. } => 7,
            Ev::Heal { .. } => 8,
            Ev::ClientWake { .. } => 9,
            Ev::Fault => 10,
        }
    }
}

struct Sched {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        // BinaryHeap is a max-heap: earliest first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub struct SimNode {
    pub id: NodeId,
    pub replica: Option<Replica>,
    pub inc: u64,
    pub disk: SimDisk,
    /// Holds committed data no longer (bit rot cut it at recovery) until repaired.
    pub damaged: bool,
    /// Durable ends it had when it was damaged: repaired once it holds them again.
    repair_to: BTreeMap<LogId, Offset>,
    cfg: ReplicaConfig,
    sync_delay_us: Option<(u64, u64)>,
    restart_scheduled: bool,
    /// When the replica last ticked, and when its next tick is scheduled: the runtime's rule,
    /// `Replica::next_tick` (the first one `BUSY_TICK_US` after a start). Ticks
    /// scheduled for another time are stale and skipped.
    last_tick: u64,
    tick_at: u64,
    /// The disk is full until then: every write fails with `StorageFull`.
    full_until: Option<u64>,
    /// Logs whose writes failed full and wait for space (the writer's free-space check).
    failed_full: std::collections::BTreeSet<LogId>,
    /// The highest trim point asked per log: the node serves nothing below it from then on
    /// (the disk may keep a segment that straddles it), across restarts too (the disk keeps
    /// the point).
    trim_asked: BTreeMap<LogId, Offset>,
    /// Logs whose writes failed: appends not at the durable end were issued before the core
    /// saw the failure and are dropped, as the real writer does.
    dropping: std::collections::BTreeSet<LogId>,
    full_check_at: u64,
    /// When the last `WriteFailed` of each log is delivered: the real writer reports in order,
    /// so a reopening it decides later is delivered after it (random disk delays would
    /// otherwise let `Reopened` overtake the failure and leave the log failed for good).
    write_failed_due: BTreeMap<LogId, u64>,
}

struct Link {
    a: usize,
    b: usize,
    partitioned: bool,
    up: bool,
    gen: u64,
    /// Last delivery time per direction (a→b, b→a), for FIFO links.
    last: [u64; 2],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Appends to `Cluster::logs[log_index]` once that log exists.
    Producer {
        producer: u64,
        window: usize,
        log_index: usize,
    },
    Reader,
    Subscriber,
    /// Creates the second log through the head.
    Admin,
    /// Trims the logs (only on seeds whose `TrimMode` is not `Never`).
    Trimmer,
}

struct PendingAppend {
    /// Position among this producer's batches (0, 1, 2, ...).
    batch_no: u64,
    seq: u64,
    batch: Bytes,
    rid: u64,
    sent_at: u64,
    retry_at: Option<u64>,
    /// Acknowledged end of its log when the batch was made: the head places it at or above
    /// (it sequences after this was committed), so trims below it never take it. A trim of
    /// a batch whose `AppendOk` the producer has not seen would let a retry after a head
    /// restart (dedup state is rebuilt from what the log still holds) append it again.
    floor: Offset,
}

struct SimClient {
    kind: Kind,
    next_seq: u64,
    next_batch_no: u64,
    pending: Vec<PendingAppend>,
    read: Option<(u64, u64)>,
    sub: Option<(usize, u64)>,
    sub_next: Offset,
    last_send: BTreeMap<usize, u64>,
}

enum ReqKind {
    Append { batch: Bytes, seq: u64 },
    Read { log: LogId, from: Offset },
    Subscribe { log: LogId, from: Offset },
    Create { log: LogId },
    Trim { log: LogId },
}

struct ReqInfo {
    client: usize,
    node: usize,
    kind: ReqKind,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Safety,
    Liveness,
}

pub struct Cluster {
    pub seed: u64,
    pub opts: SimOptions,
    pub params: Params,
    pub now: u64,
    pub steps: u64,
    queue: BinaryHeap<Sched>,
    seq: u64,
    pub nodes: Vec<SimNode>,
    chain: ChainConfig,
    links: Vec<Link>,
    net: Rng,
    disk_rng: Rng,
    crash_rng: Rng,
    work: Rng,
    phase: Phase,
    faults_on: bool,
    clients: Vec<SimClient>,
    requests: BTreeMap<u64, ReqInfo>,
    sub_expect: BTreeMap<u64, Offset>,
    next_rid: u64,
    pub checker: Checker,
    trace: u64,
    out: Vec<Effect>,
    failure: Option<String>,
    /// Replies delivered to the verifier (liveness phase), by request id.
    verifier_replies: BTreeMap<u64, ClientReply>,
    pub crashes: u64,
    pub bit_flips: u64,
    pub partitions: u64,
    log: LogId,
    /// Logs clients may use: "default", then "orders" once its creation was acknowledged.
    pub logs: Vec<LogId>,
    /// Print every event and effect (set `CHAINLOG_SIM_VERBOSE=1`).
    verbose: bool,
    trim_rng: Rng,
    pub trim_mode: TrimMode,
    /// Largest `before` any client asked a trim of, per log: no replica may start past it.
    pub trim_asked: BTreeMap<LogId, Offset>,
    pub trims_ok: u64,
    full_rng: Rng,
    /// Chance per fault tick that some node's disk fills up (0 on most seeds).
    full_p: f64,
    pub disk_fulls: u64,
}

fn mix(h: &mut u64, x: u64) {
    *h ^= x;
    *h = h.wrapping_mul(0x0000_0100_0000_01b3);
}

fn effect_digest(h: &mut u64, e: &Effect) {
    match e {
        Effect::Send { to, msg } => {
            mix(h, 1);
            mix(h, u64::from(to.0));
            mix(h, msg.log().0);
            mix(h, msg.session());
            mix(h, msg.batch_bytes() as u64);
            if let PeerMessage::Ack { ack_end, seq, .. } = msg {
                mix(h, ack_end.0);
                mix(h, *seq);
            }
        }
        Effect::Reply {
            client,
            request_id,
            reply,
        } => {
            mix(h, 2);
            mix(h, client.0);
            mix(h, *request_id);
            match reply {
                ClientReply::AppendOk { base_offset, .. } => mix(h, base_offset.0),
                ClientReply::ReadOk { batches, .. } | ClientReply::Records { batches, .. } => {
                    mix(h, batches.len() as u64)
                }
                ClientReply::Error { code, .. } => mix(h, *code as u64),
                _ => mix(h, 9),
            }
        }
        Effect::Append { log, base, batches } => {
            mix(h, 3);
            mix(h, log.0);
            mix(h, base.0);
            mix(h, batches.len() as u64);
        }
        Effect::Truncate { log, end } => {
            mix(h, 4);
            mix(h, log.0 ^ end.0);
        }
        Effect::CreateLog { log, .. } => {
            mix(h, 5);
            mix(h, log.0);
        }
        Effect::Read {
            token, from, end, ..
        } => {
            mix(h, 6);
            mix(h, token.0);
            mix(h, from.0);
            mix(h, end.0);
        }
        Effect::Trim { log, before, point } => {
            mix(h, 7);
            mix(h, log.0 ^ before.0);
            mix(h, point.0);
        }
        Effect::SaveCommitted { log, end } => {
            mix(h, 8);
            mix(h, log.0 ^ end.0);
        }
    }
}

fn brief(m: &PeerMessage) -> String {
    match m {
        PeerMessage::Append {
            session,
            base,
            committed_end,
            batches,
            ..
        } => format!(
            "Append s{session} @{base} x{} c{committed_end}",
            batches.len()
        ),
        PeerMessage::Ack {
            session,
            seq,
            written_end,
            ack_end,
            chain_end,
            resend,
            ..
        } => format!(
            "Ack s{session} #{seq} w{written_end} a{ack_end} ce{chain_end}{}",
            if *resend { " RESEND" } else { "" }
        ),
        PeerMessage::FetchReply {
            session,
            base,
            batches,
            ..
        } => format!("FetchReply s{session} @{base} x{}", batches.len()),
        other => format!("{other:?}"),
    }
}

fn brief_reply(r: &ClientReply) -> String {
    match r {
        ClientReply::ReadOk {
            committed_end,
            batches,
        } => format!("ReadOk c{committed_end} x{}", batches.len()),
        ClientReply::Records {
            committed_end,
            batches,
        } => format!("Records c{committed_end} x{}", batches.len()),
        other => format!("{other:?}"),
    }
}

fn retriable(code: ErrorCode) -> bool {
    code.is_retriable() || matches!(code, ErrorCode::SequenceGap | ErrorCode::LimitExceeded)
}

/// Retriable here, or a full disk on a run that fills disks (space comes back).
fn retriable_with(code: ErrorCode, disks_fill: bool) -> bool {
    retriable(code) || disks_fill && code == ErrorCode::StorageFull
}

impl Cluster {
    pub fn new(seed: u64, opts: SimOptions) -> Cluster {
        let mut profile = Rng::new(seed, SALT_PROFILE);
        let nodes_n = opts.nodes.unwrap_or_else(|| match profile.range(0, 99) {
            0..=14 => 1,
            15..=44 => 2,
            _ => 3,
        });
        let params = Params {
            drop_p: if profile.chance(0.6) {
                profile.range(0, 50) as f64 / 1000.0
            } else {
                0.0
            },
            dup_p: if profile.chance(0.5) {
                profile.range(0, 50) as f64 / 1000.0
            } else {
                0.0
            },
            fifo: profile.chance(0.5),
            net_delay_us: (20, profile.range(50, 400)),
            long_delay_p: profile.range(0, 30) as f64 / 1000.0,
            sync_delay_us: (30, profile.range(100, 3000)),
            io_delay_us: (5, profile.range(10, 300)),
            crash_p: profile.range(0, 20) as f64 / 1000.0,
            restart_delay_us: (500, profile.range(1000, 40_000)),
            partition_p: profile.range(0, 10) as f64 / 1000.0,
            partition_us: (500, profile.range(1000, 60_000)),
            flip_p: if profile.chance(0.5) { 0.5 } else { 0.0 },
            pad_reads: profile.chance(0.5),
        };
        let chain = ChainConfig {
            epoch: Epoch(1 + profile.range(0, 3)),
            nodes: (1..=nodes_n as u32).map(NodeId).collect(),
        };
        let resend_timeout_us = profile.range(5_000, 40_000);
        let forward_bytes_max = profile.range(128, 4096) as usize;
        let pipeline_bytes_max = profile.range(256, 16_384) as usize;
        let admission_queue_max = profile.range(2, 64) as usize;
        let writes_in_flight_max = Rng::new(seed, SALT_PROFILE_2).range(1, 6) as usize;
        let mut nodes = Vec::new();
        for i in 0..nodes_n {
            let mut cfg = ReplicaConfig::new(NodeId(i as u32 + 1), CLUSTER);
            cfg.resend_timeout_us = resend_timeout_us;
            cfg.forward_bytes_max = forward_bytes_max;
            cfg.pipeline_bytes_max = pipeline_bytes_max;
            cfg.admission_queue_max = admission_queue_max;
            cfg.writes_in_flight_max = writes_in_flight_max;
            cfg.bug_ack_before_successor = opts.bug_ack_before_successor;
            cfg.bug_no_restart_at_pred_start = opts.bug_no_restart_at_pred_start;
            let mut disk = SimDisk::default();
            // The runtime creates "default" on every node at first start.
            let _ = disk.create(LogId::from_name("default"), "default");
            nodes.push(SimNode {
                id: NodeId(i as u32 + 1),
                replica: None,
                inc: 0,
                disk,
                damaged: false,
                repair_to: BTreeMap::new(),
                cfg,
                sync_delay_us: None,
                restart_scheduled: false,
                last_tick: 0,
                tick_at: 0,
                full_until: None,
                failed_full: Default::default(),
                dropping: Default::default(),
                full_check_at: 0,
                write_failed_due: BTreeMap::new(),
                trim_asked: BTreeMap::new(),
            });
        }
        let links = (0..nodes_n.saturating_sub(1))
            .map(|i| Link {
                a: i,
                b: i + 1,
                partitioned: false,
                up: false,
                gen: 0,
                last: [0, 0],
            })
            .collect();
        let mut clients = Vec::new();
        let producers = profile.range(1, 3);
        for p in 0..producers {
            let producer = if p == 0 && profile.chance(0.3) {
                0
            } else {
                100 + p
            };
            clients.push(SimClient::new(Kind::Producer {
                producer,
                window: profile.range(1, 3) as usize,
                log_index: (p % 2) as usize,
            }));
        }
        clients.push(SimClient::new(Kind::Reader));
        clients.push(SimClient::new(Kind::Admin));
        if profile.chance(0.7) {
            clients.push(SimClient::new(Kind::Subscriber));
        }
        let mut trim_rng = Rng::new(seed, SALT_TRIM);
        let trim_mode = opts.trims.unwrap_or_else(|| match trim_rng.range(0, 99) {
            0..=29 => TrimMode::Never,
            30..=69 => TrimMode::Sometimes,
            _ => TrimMode::Aggressive,
        });
        let mut full_rng = Rng::new(seed, SALT_FULL);
        let full_p = if opts.faults && full_rng.chance(0.3) {
            full_rng.range(1, 8) as f64 / 1000.0
        } else {
            0.0
        };
        let mut c = Cluster {
            seed,
            faults_on: opts.faults,
            opts,
            params,
            now: 0,
            steps: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            nodes,
            chain,
            links,
            net: Rng::new(seed, SALT_NET),
            disk_rng: Rng::new(seed, SALT_DISK),
            crash_rng: Rng::new(seed, SALT_CRASH),
            work: Rng::new(seed, SALT_WORK),
            phase: Phase::Safety,
            clients,
            requests: BTreeMap::new(),
            sub_expect: BTreeMap::new(),
            next_rid: 0,
            checker: Checker::default(),
            trace: 0xcbf2_9ce4_8422_2325,
            out: Vec::new(),
            failure: None,
            verifier_replies: BTreeMap::new(),
            crashes: 0,
            bit_flips: 0,
            partitions: 0,
            log: LogId::from_name("default"),
            logs: vec![LogId::from_name("default")],
            verbose: std::env::var_os("CHAINLOG_SIM_VERBOSE").is_some(),
            trim_rng,
            trim_mode,
            trim_asked: BTreeMap::new(),
            trims_ok: 0,
            full_rng,
            full_p,
            disk_fulls: 0,
        };
        for n in 0..nodes_n {
            c.start_node(n);
        }
        for i in 0..c.clients.len() {
            let d = c.work_range(100, 1000);
            c.schedule(d, Ev::ClientWake { client: i });
        }
        if c.trim_mode != TrimMode::Never {
            // Scheduled from its own stream, after the others: the rest of the run is drawn
            // as it was before trims existed.
            c.clients.push(SimClient::new(Kind::Trimmer));
            let d = c.trim_rng.range(1000, 10_000);
            c.schedule(
                d,
                Ev::ClientWake {
                    client: c.clients.len() - 1,
                },
            );
        }
        c.schedule(FAULT_TICK_US, Ev::Fault);
        c
    }

    fn work_range(&mut self, lo: u64, hi: u64) -> u64 {
        self.work.range(lo, hi)
    }

    fn schedule(&mut self, after_us: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Sched {
            at: self.now + after_us,
            seq: self.seq,
            ev,
        });
    }

    fn fail(&mut self, v: Violation) {
        if self.failure.is_none() {
            self.failure = Some(v);
        }
    }

    fn failure(&self) -> Result<(), Failure> {
        match &self.failure {
            None => Ok(()),
            Some(m) => Err(Failure {
                seed: self.seed,
                step: self.steps,
                message: m.clone(),
                options: self.opts.clone(),
            }),
        }
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn status(&self, id: u32) -> Option<ReplicaStatus> {
        self.nodes[id as usize - 1]
            .replica
            .as_ref()
            .map(Replica::status)
    }

    // ------------------------------------------------------------ nodes

    fn start_node(&mut self, n: usize) {
        let (recovered, removed) = self.nodes[n].disk.recover();
        self.checker.on_removed(&removed, false);
        self.checker.on_restart(n);
        let now = Instant(self.now);
        let node = &mut self.nodes[n];
        node.inc += 1;
        node.restart_scheduled = false;
        node.replica = Some(Replica::new(
            node.cfg.clone(),
            self.chain.clone(),
            recovered,
            now,
        ));
        let inc = node.inc;
        node.last_tick = self.now;
        node.tick_at = self.now + BUSY_TICK_US;
        self.schedule(BUSY_TICK_US, Ev::Tick { node: n, inc });
        self.update_links();
    }

    fn crash_node(&mut self, n: usize, flip: bool) {
        if self.nodes[n].replica.is_none() {
            return;
        }
        if self.verbose {
            println!("{} n{} CRASH flip={flip}", self.now, n + 1);
        }
        self.crashes += 1;
        let node = &mut self.nodes[n];
        node.replica = None;
        node.inc += 1;
        let removed = node.disk.crash(&mut self.disk_rng);
        // The writer's failure state goes with the process; recovery scans the disk.
        node.failed_full.clear();
        node.dropping.clear();
        node.write_failed_due.clear();
        node.trim_asked = node
            .disk
            .logs
            .iter()
            .map(|(id, l)| (*id, l.trim_point))
            .collect();
        self.checker.on_removed(&removed, false);
        if flip {
            // Everything it held durably may have been vouched for (an ack still in flight
            // commits it later): it counts as damaged until it holds all of it again.
            let held: BTreeMap<LogId, Offset> = self.nodes[n]
                .disk
                .logs
                .iter()
                .map(|(id, l)| (*id, l.synced_end()))
                .collect();
            if let Some((_, _)) = self.nodes[n].disk.flip_bit(&mut self.disk_rng) {
                self.bit_flips += 1;
                self.nodes[n].damaged = true;
                self.nodes[n].repair_to = held;
            }
        }
        // Requests in flight to it and its subscriptions are gone with its connections; a
        // producer sees its connection drop and resends what is outstanding, in order (as
        // chainlog-client does), once it can reach the node again.
        let now = self.now;
        for c in &mut self.clients {
            if c.sub.is_some_and(|(node, _)| node == n) {
                c.sub = None;
            }
            if n == 0 {
                match c.kind {
                    // Outcome unknown and no dedup: give up rather than risk a duplicate.
                    Kind::Producer { producer: 0, .. } => c.pending.clear(),
                    _ => c.pending.iter_mut().for_each(|p| p.retry_at = Some(now)),
                }
            }
        }
        self.update_links();
    }

    /// Brings each link to the state its ends and partitions call for, telling both cores.
    fn update_links(&mut self) {
        for i in 0..self.links.len() {
            let (a, b) = (self.links[i].a, self.links[i].b);
            let want = !self.links[i].partitioned
                && self.nodes[a].replica.is_some()
                && self.nodes[b].replica.is_some();
            if want == self.links[i].up {
                continue;
            }
            self.links[i].up = want;
            if want {
                self.links[i].gen += 1;
            }
            let (ida, idb) = (self.nodes[a].id, self.nodes[b].id);
            for (n, peer) in [(a, idb), (b, ida)] {
                if self.nodes[n].replica.is_some() {
                    let now = Instant(self.now);
                    let mut out = std::mem::take(&mut self.out);
                    if let Some(r) = self.nodes[n].replica.as_mut() {
                        r.on_link(now, peer, want, &mut out);
                    }
                    self.apply(n, &mut out);
                    self.out = out;
                }
            }
        }
    }

    // ------------------------------------------------------------ stepping

    /// Processes one event. Returns false when nothing is left to do.
    pub fn step(&mut self) -> bool {
        let Some(s) = self.queue.pop() else {
            return false;
        };
        assert!(s.at >= self.now, "time went backwards");
        self.now = s.at;
        self.steps += 1;
        mix(&mut self.trace, s.at);
        mix(&mut self.trace, s.ev.code());
        if self.verbose {
            self.print_event(&s.ev);
        }
        let touched = self.handle(s.ev);
        if let Some(n) = touched {
            self.check_node(n);
        }
        true
    }

    fn print_event(&self, ev: &Ev) {
        let t = self.now;
        match ev {
            Ev::Tick { .. } | Ev::ClientWake { .. } | Ev::Fault => {}
            Ev::Peer { from, to, body, .. } => match PeerMessage::decode(body.clone()) {
                Ok(m) => println!("{t} n{}->n{}: {}", from + 1, to + 1, brief(&m)),
                Err(e) => println!("{t} bad peer message {e}"),
            },
            Ev::Request { node, rid, req, .. } => {
                let what = match req {
                    ClientRequest::Append { batch } => {
                        match chainlog_core::record::BatchHeader::decode(batch) {
                            Ok(h) => format!(
                                "Append p{} seq {} x{}",
                                h.producer_id, h.producer_seq, h.record_count
                            ),
                            Err(e) => format!("Append (bad: {e})"),
                        }
                    }
                    other => format!("{other:?}"),
                };
                println!("{t} n{} request {rid}: {what}", node + 1)
            }
            Ev::Reply { rid, .. } => println!("{t} client gets reply {rid}"),
            Ev::Disk { node, ev, .. } => match ev {
                DiskEvent::ReadDone { token, result } => println!(
                    "{t} n{} ReadDone {token:?} {:?}",
                    node + 1,
                    result.as_ref().map(Vec::len)
                ),
                other => println!("{t} n{} {other:?}", node + 1),
            },
            Ev::SyncDone { node, .. } => println!("{t} n{} sync done", node + 1),
            Ev::Restart { node } => println!("{t} n{} restart", node + 1),
            Ev::Heal { link } => println!("{t} heal link {link}"),
        }
    }

    fn check_node(&mut self, n: usize) {
        let Some(r) = self.nodes[n].replica.as_ref() else {
            return;
        };
        let status = r.status();
        let disks: Vec<&SimDisk> = self.nodes.iter().map(|x| &x.disk).collect();
        let damaged: Vec<bool> = self.nodes.iter().map(|x| x.damaged).collect();
        let r = self
            .checker
            .on_status(n, &status, &disks, &damaged)
            .and_then(|()| Checker::starts_in_chain_order(&disks));
        if let Err(v) = r {
            self.fail(v);
        }
        for i in 0..self.nodes.len() {
            // A crashed node's rot is only found (and cut) when it recovers.
            let node = &self.nodes[i];
            if node.damaged
                && node.replica.is_some()
                && self.checker.repaired(&node.disk)
                && node.repair_to.iter().all(|(log, end)| {
                    node.disk
                        .logs
                        .get(log)
                        .is_some_and(|l| l.synced_end() >= *end)
                })
            {
                self.nodes[i].damaged = false;
            }
        }
    }

    fn with_replica(
        &mut self,
        n: usize,
        f: impl FnOnce(&mut Replica, Instant, &mut Vec<Effect>),
    ) -> Option<usize> {
        let now = Instant(self.now);
        let mut out = std::mem::take(&mut self.out);
        let r = self.nodes[n].replica.as_mut()?;
        f(r, now, &mut out);
        self.apply(n, &mut out);
        self.out = out;
        self.plan_tick(n);
        Some(n)
    }

    /// Schedules node `n`'s next tick as the runtime does after every turn.
    fn plan_tick(&mut self, n: usize) {
        let node = &self.nodes[n];
        let Some(r) = node.replica.as_ref() else {
            return;
        };
        let want = r.next_tick(Instant(node.last_tick)).0.max(self.now);
        if want != node.tick_at {
            let inc = node.inc;
            self.nodes[n].tick_at = want;
            self.schedule(want - self.now, Ev::Tick { node: n, inc });
        }
    }

    fn alive_inc(&self, n: usize, inc: u64) -> bool {
        self.nodes[n].replica.is_some() && self.nodes[n].inc == inc
    }

    fn handle(&mut self, ev: Ev) -> Option<usize> {
        match ev {
            Ev::Tick { node, inc } => {
                if !self.alive_inc(node, inc) || self.nodes[node].tick_at != self.now {
                    return None;
                }
                self.nodes[node].last_tick = self.now;
                self.check_free_space(node, inc);
                self.with_replica(node, |r, now, out| r.on_tick(now, out))
            }
            Ev::Peer {
                link,
                gen,
                from,
                to,
                body,
            } => {
                let l = &self.links[link];
                if !l.up || l.gen != gen {
                    return None; // the connection it travelled on is gone
                }
                let msg = match PeerMessage::decode(body) {
                    Ok(m) => m,
                    Err(e) => {
                        self.fail(format!("a peer message failed to decode: {e}"));
                        return None;
                    }
                };
                let from_id = self.nodes[from].id;
                self.with_replica(to, |r, now, out| r.on_peer(now, from_id, msg, out))
            }
            Ev::Request {
                node,
                inc,
                client,
                rid,
                req,
            } => {
                if !self.alive_inc(node, inc) {
                    return None;
                }
                let cid = ClientId(client as u64 + 1);
                self.with_replica(node, |r, now, out| r.on_client(now, cid, rid, req, out))
            }
            Ev::Reply { rid, reply } => {
                self.client_reply(rid, reply);
                None
            }
            Ev::Disk { node, inc, ev } => {
                if !self.alive_inc(node, inc) {
                    return None;
                }
                self.with_replica(node, |r, now, out| r.on_disk(now, ev, out))
            }
            Ev::SyncDone { node, inc } => {
                if !self.alive_inc(node, inc) {
                    return None;
                }
                let (durable, again) = self.nodes[node].disk.sync_done();
                if again {
                    let d = self.sync_delay(node);
                    self.schedule(d, Ev::SyncDone { node, inc });
                }
                self.with_replica(node, |r, now, out| {
                    for (log, end) in durable {
                        r.on_disk(now, DiskEvent::Durable { log, end }, out);
                    }
                })
            }
            Ev::Restart { node } => {
                if self.nodes[node].replica.is_none() {
                    self.start_node(node);
                    return Some(node);
                }
                None
            }
            Ev::Heal { link } => {
                self.links[link].partitioned = false;
                self.update_links();
                None
            }
            Ev::ClientWake { client } => {
                self.client_wake(client);
                let d = if self.clients[client].kind == Kind::Trimmer {
                    match self.trim_mode {
                        TrimMode::Aggressive => self.trim_rng.range(500, 3000),
                        _ => self.trim_rng.range(2000, 20_000),
                    }
                } else {
                    self.work_range(200, 1500)
                };
                self.schedule(d, Ev::ClientWake { client });
                None
            }
            Ev::Fault => {
                self.fault_tick();
                self.schedule(FAULT_TICK_US, Ev::Fault);
                None
            }
        }
    }

    /// The writer's free-space check: once space is back, every log that failed full is
    /// reopened at its durable end.
    fn check_free_space(&mut self, n: usize, inc: u64) {
        let now = self.now;
        let node = &mut self.nodes[n];
        if node.failed_full.is_empty() || now < node.full_check_at {
            return;
        }
        node.full_check_at = now + FULL_CHECK_US;
        if node.full_until.is_some_and(|t| now < t) {
            return;
        }
        let logs = std::mem::take(&mut node.failed_full);
        for log in logs {
            let Some(l) = self.nodes[n].disk.logs.get(&log) else {
                continue;
            };
            let end = l.synced_end();
            let after_failure = self.nodes[n]
                .write_failed_due
                .remove(&log)
                .map_or(0, |due| due + 1);
            self.disk_done_after(n, inc, DiskEvent::Reopened { log, end }, after_failure);
        }
    }

    fn sync_delay(&mut self, n: usize) -> u64 {
        let (lo, hi) = self.nodes[n]
            .sync_delay_us
            .unwrap_or(self.params.sync_delay_us);
        self.disk_rng.range(lo, hi)
    }

    fn io_delay(&mut self) -> u64 {
        let (lo, hi) = self.params.io_delay_us;
        self.disk_rng.range(lo, hi)
    }

    /// Delivers `ev` to node `n` (incarnation `inc`) after a random disk delay.
    fn disk_done(&mut self, n: usize, inc: u64, ev: DiskEvent) -> u64 {
        self.disk_done_after(n, inc, ev, 0)
    }

    /// [`Cluster::disk_done`], delivered no earlier than time `not_before`; returns when.
    fn disk_done_after(&mut self, n: usize, inc: u64, ev: DiskEvent, not_before: u64) -> u64 {
        let at = (self.now + self.io_delay()).max(not_before);
        self.schedule(at - self.now, Ev::Disk { node: n, inc, ev });
        at
    }

    /// Carries out a node's effects on the simulated disk, network and clients.
    fn apply(&mut self, n: usize, out: &mut Vec<Effect>) {
        let inc = self.nodes[n].inc;
        for e in out.drain(..) {
            effect_digest(&mut self.trace, &e);
            if self.verbose {
                match &e {
                    Effect::Append { log, base, batches } => {
                        println!("  n{} Append {log} @{base} x{}", n + 1, batches.len())
                    }
                    Effect::Read { .. } | Effect::SaveCommitted { .. } => {
                        println!("  n{} {e:?}", n + 1)
                    }
                    Effect::Send { to, msg } => println!("  n{} -> n{to}: {}", n + 1, brief(msg)),
                    Effect::Reply {
                        request_id, reply, ..
                    } => println!("  n{} reply {request_id}: {}", n + 1, brief_reply(reply)),
                    _ => println!("  n{} {e:?}", n + 1),
                }
            }
            match e {
                Effect::Send { to, msg } => self.send_peer(n, to, msg),
                Effect::Reply {
                    client,
                    request_id,
                    reply,
                } => self.node_reply(n, client, request_id, reply),
                Effect::Append { log, base, batches } => {
                    let node = &mut self.nodes[n];
                    if node.dropping.contains(&log) {
                        let end = node.disk.logs.get(&log).map_or(Offset::ZERO, |l| l.end());
                        if base != end {
                            continue; // issued before the core saw the failure
                        }
                        node.dropping.remove(&log);
                    }
                    if node.full_until.is_some_and(|t| self.now < t) {
                        let (at, removed) = node.disk.fail_writes(log);
                        node.dropping.insert(log);
                        node.failed_full.insert(log);
                        self.checker.on_removed(&removed, false);
                        let code = ErrorCode::StorageFull;
                        let due = self.disk_done(n, inc, DiskEvent::WriteFailed { log, at, code });
                        self.nodes[n].write_failed_due.insert(log, due);
                        continue;
                    }
                    let stored = match self.nodes[n].disk.append(log, base, &batches) {
                        Ok(s) => s,
                        Err(v) => {
                            self.fail(format!("node {}: {v}", n + 1));
                            continue;
                        }
                    };
                    if let Err(v) = self.checker.on_write(n, log, &stored) {
                        self.fail(v);
                    }
                    if self.nodes[n].disk.want_sync() {
                        let d = self.sync_delay(n);
                        self.schedule(d, Ev::SyncDone { node: n, inc });
                    }
                }
                Effect::Truncate { log, end } => {
                    if end < self.checker.acked_end(log) {
                        self.fail(format!(
                            "node {} truncates {log} to {end}, below acknowledged data",
                            n + 1
                        ));
                    }
                    let removed = self.nodes[n].disk.truncate(log, end);
                    self.checker.on_removed(&removed, false);
                    self.disk_done(n, inc, DiskEvent::Truncated { log, end });
                }
                Effect::CreateLog { log, name } => {
                    let result = self.nodes[n].disk.create(log, &name);
                    self.disk_done(n, inc, DiskEvent::Created { log, result });
                }
                Effect::Read {
                    token,
                    log,
                    from,
                    end,
                    max_bytes,
                } => {
                    let pad = self.params.pad_reads;
                    let result = self.nodes[n].disk.read(log, from, end, max_bytes, pad);
                    self.disk_done(n, inc, DiskEvent::ReadDone { token, result });
                }
                Effect::Trim { log, before, point } => {
                    let committed = self.checker.max_committed.get(&log).copied();
                    if committed.unwrap_or(Offset::ZERO) < before.max(point) {
                        self.fail(format!(
                            "node {} trims {log} below {before} (point {point}), past anything \
                             known committed ({committed:?})",
                            n + 1
                        ));
                    }
                    let asked = self.nodes[n].trim_asked.entry(log).or_default();
                    *asked = (*asked).max(before).max(point);
                    let (start, point, removed) = self.nodes[n].disk.trim(log, before, point);
                    self.checker.on_removed(&removed, true);
                    self.disk_done(n, inc, DiskEvent::Trimmed { log, start, point });
                }
                Effect::SaveCommitted { log, end } => {
                    self.nodes[n].disk.save_committed(log, end);
                }
            }
        }
    }

    fn send_peer(&mut self, from: usize, to: NodeId, msg: PeerMessage) {
        let to = to.0 as usize - 1;
        let Some(li) = self
            .links
            .iter()
            .position(|l| (l.a == from && l.b == to) || (l.b == from && l.a == to))
        else {
            self.fail(format!(
                "node {} sent to non-neighbour {}",
                from + 1,
                to + 1
            ));
            return;
        };
        if !self.links[li].up {
            return; // lost with the connection
        }
        let frame = msg.encode().to_vec();
        let body = Bytes::from(frame).slice(FRAME_HEADER_LEN..);
        let copies = if self.faults_on && self.net.chance(self.params.dup_p) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.faults_on && self.net.chance(self.params.drop_p) {
                continue;
            }
            let (lo, hi) = self.params.net_delay_us;
            let mut d = self.net.range(lo, hi);
            if self.faults_on && self.net.chance(self.params.long_delay_p) {
                d += self.net.range(1000, 20_000);
            }
            let dir = usize::from(self.links[li].a != from);
            let mut at = self.now + d;
            if self.params.fifo {
                at = at.max(self.links[li].last[dir]);
                self.links[li].last[dir] = at;
            }
            let gen = self.links[li].gen;
            self.schedule(
                at - self.now,
                Ev::Peer {
                    link: li,
                    gen,
                    from,
                    to,
                    body: body.clone(),
                },
            );
        }
    }

    /// A reply left node `n`: check it, then deliver it to the client a little later.
    fn node_reply(&mut self, n: usize, client: ClientId, rid: u64, reply: ClientReply) {
        let push = matches!(reply, ClientReply::Records { .. });
        if let Err(v) = self.checker.on_reply(rid, push) {
            self.fail(v);
        }
        let Some(info) = self.requests.get(&rid) else {
            self.fail(format!("reply to unknown request {rid}"));
            return;
        };
        if info.node != n || client != ClientId(info.client as u64 + 1) {
            self.fail(format!(
                "reply to request {rid} from the wrong node or client"
            ));
            return;
        }
        let result = match (&info.kind, &reply) {
            (
                ReqKind::Append { batch, .. },
                ClientReply::AppendOk {
                    base_offset,
                    record_count,
                },
            ) => {
                let disks: Vec<&SimDisk> = self.nodes.iter().map(|x| &x.disk).collect();
                let damaged: Vec<bool> = self.nodes.iter().map(|x| x.damaged).collect();
                let log = chainlog_core::record::BatchHeader::decode(batch)
                    .map(|h| h.log_id)
                    .unwrap_or(self.log);
                self.checker
                    .on_append_ok(log, *base_offset, *record_count, batch, &disks, &damaged)
            }
            (
                ReqKind::Read { log, from },
                ClientReply::ReadOk {
                    committed_end,
                    batches,
                },
            ) => (if batches.is_empty() {
                // A wait that timed out serves nothing: no trim point applies.
                Ok(())
            } else {
                self.served_at_or_past_trim(n, *log, *from)
            })
            .and_then(|()| {
                self.checker
                    .check_served(n, *log, *from, *committed_end, batches)
                    .map(|_| ())
            }),
            (
                ReqKind::Subscribe { log, .. },
                ClientReply::Records {
                    committed_end,
                    batches,
                },
            ) => {
                let from = self.sub_expect.get(&rid).copied().unwrap_or(Offset::ZERO);
                match self.served_at_or_past_trim(n, *log, from).and_then(|()| {
                    self.checker
                        .check_served(n, *log, from, *committed_end, batches)
                }) {
                    Ok(Some(end)) => {
                        self.sub_expect.insert(rid, end);
                        Ok(())
                    }
                    Ok(None) => Err(format!("node {} pushed an empty Records", n + 1)),
                    Err(v) => Err(v),
                }
            }
            (ReqKind::Create { log }, ClientReply::CreateLogOk { log: got }) => {
                if log != got {
                    Err(format!("CreateLogOk for {got} answers a create of {log}"))
                } else {
                    match self
                        .nodes
                        .iter()
                        .position(|x| !x.disk.logs.contains_key(log))
                    {
                        Some(i) => Err(format!(
                            "CreateLogOk for {log} while node {} has not created it",
                            i + 1
                        )),
                        None => Ok(()),
                    }
                }
            }
            (ReqKind::Trim { log, .. }, ClientReply::TrimOk { start }) => {
                let asked = self.trim_asked.get(log).copied().unwrap_or(Offset::ZERO);
                // Reads start at the disk's start or its trim point, both durable.
                let held = self.nodes[n]
                    .disk
                    .logs
                    .get(log)
                    .map_or(Offset::ZERO, |l| l.start.max(l.trim_point));
                if *start > asked {
                    Err(format!(
                        "node {} trimmed {log} to {start}, past every trim asked ({asked})",
                        n + 1
                    ))
                } else if *start > held {
                    Err(format!(
                        "node {} answered TrimOk({start}) for {log} but its disk serves from {held}",
                        n + 1
                    ))
                } else {
                    Ok(())
                }
            }
            (
                ReqKind::Read { log, from } | ReqKind::Subscribe { log, from },
                ClientReply::Error {
                    code: ErrorCode::OffsetTrimmed,
                    ..
                },
            ) => {
                let start = self.nodes[n]
                    .disk
                    .logs
                    .get(log)
                    .map_or(Offset::ZERO, |l| l.start);
                let asked = self.nodes[n]
                    .trim_asked
                    .get(log)
                    .copied()
                    .unwrap_or(Offset::ZERO);
                if *from < start.max(asked) {
                    Ok(())
                } else {
                    Err(format!(
                        "node {} answered a read of {log}@{from} with OffsetTrimmed; it holds \
                         from {start} and was asked to trim below {asked}",
                        n + 1
                    ))
                }
            }
            (ReqKind::Append { batch, .. }, ClientReply::Error { code, .. })
                if code.proves_not_stored() =>
            {
                // A definite refusal (chainlog-client may give the sequence to other records):
                // the batch must be stored nowhere. Checks the core's classification of every
                // code it answers appends with.
                let disks: Vec<&SimDisk> = self.nodes.iter().map(|x| &x.disk).collect();
                Checker::refused_is_stored_nowhere(batch, *code, &disks)
            }
            (_, ClientReply::Error { .. }) => Ok(()),
            _ => Err(format!("reply {reply:?} does not fit request {rid}")),
        };
        if let Err(v) = result {
            self.fail(v);
        }
        let d = self.net.range(5, 100);
        self.schedule(d, Ev::Reply { rid, reply });
    }

    /// A read or push from `from` is refused once the node was asked to trim past it, even
    /// by a process that has restarted since (a client trimmed it: it must not come back).
    fn served_at_or_past_trim(&self, n: usize, log: LogId, from: Offset) -> Result<(), String> {
        let asked = self.nodes[n]
            .trim_asked
            .get(&log)
            .copied()
            .unwrap_or(Offset::ZERO);
        if from < asked {
            Err(format!(
                "node {} served {log} from {from}, below its trim point {asked}",
                n + 1
            ))
        } else {
            Ok(())
        }
    }

    fn send_request(
        &mut self,
        client: usize,
        node: usize,
        kind: ReqKind,
        req: ClientRequest,
    ) -> u64 {
        self.next_rid += 1;
        let rid = self.next_rid;
        if let ReqKind::Subscribe { .. } = kind {
            if let ClientRequest::Subscribe { from, .. } = &req {
                self.sub_expect.insert(rid, *from);
            }
        }
        self.requests.insert(rid, ReqInfo { client, node, kind });
        let inc = self.nodes[node].inc;
        if self.nodes[node].replica.is_none() {
            return rid; // nobody is listening: the client times out
        }
        // Requests on one connection arrive in order (TCP).
        let d = self.net.range(10, 120);
        let last = if client == VERIFIER {
            0
        } else {
            self.clients[client]
                .last_send
                .get(&node)
                .copied()
                .unwrap_or(0)
        };
        let at = (self.now + d).max(last);
        if client != VERIFIER {
            self.clients[client].last_send.insert(node, at);
        }
        self.schedule(
            at - self.now,
            Ev::Request {
                node,
                inc,
                client,
                rid,
                req,
            },
        );
        rid
    }

    // ------------------------------------------------------------ clients

    fn client_wake(&mut self, ci: usize) {
        let kind = self.clients[ci].kind;
        let now = self.now;
        match kind {
            Kind::Producer {
                producer,
                window,
                log_index,
            } => {
                let Some(&log) = self.logs.get(log_index) else {
                    return; // its log is not created yet
                };
                let timeout = 40_000;
                if producer == 0 {
                    // No dedup: a timed-out append may have been appended, so the client gives
                    // up on it; a refused one ("nothing written") is sent again.
                    self.clients[ci]
                        .pending
                        .retain(|p| p.retry_at.is_some() || now < p.sent_at + timeout);
                    for i in 0..self.clients[ci].pending.len() {
                        if self.clients[ci].pending[i]
                            .retry_at
                            .is_some_and(|t| now >= t)
                        {
                            self.resend(ci, i);
                        }
                    }
                } else {
                    // An idempotent producer resends everything outstanding, in sequence
                    // order, when anything times out or is refused (as chainlog-client does).
                    let c = &self.clients[ci];
                    let timed_out = c.pending.iter().any(|p| now >= p.sent_at + timeout);
                    let due = c
                        .pending
                        .iter()
                        .any(|p| p.retry_at.is_some_and(|t| now >= t));
                    if timed_out || due {
                        for i in 0..self.clients[ci].pending.len() {
                            self.resend(ci, i);
                        }
                    }
                    // Reconnecting: nothing new goes out before the outstanding batches.
                    if self.clients[ci]
                        .pending
                        .iter()
                        .any(|p| p.retry_at.is_some())
                    {
                        return;
                    }
                }
                // Like Kafka's in-flight bound: never run further ahead of the oldest
                // unanswered batch than the head remembers for deduplication.
                let c = &self.clients[ci];
                let span_ok = c
                    .pending
                    .first()
                    .is_none_or(|p| c.next_batch_no - p.batch_no < PRODUCER_BATCHES_KEPT as u64);
                if self.phase == Phase::Safety && self.clients[ci].pending.len() < window && span_ok
                {
                    let records = self.work.range(1, 3);
                    let mut b = BatchBuilder::new();
                    for r in 0..records {
                        let len = self.work.range(0, 40) as usize;
                        let fill = (self.work.next_u64() & 0xff) as u8;
                        let mut payload = vec![fill; len];
                        payload.extend_from_slice(&(ci as u64 * 1_000_000 + r).to_le_bytes());
                        if b.push(&payload).is_err() {
                            break;
                        }
                    }
                    let seq = self.clients[ci].next_seq;
                    let batch = b.finish(CLUSTER, log, ProducerId(producer), seq, now);
                    self.clients[ci].next_seq += records;
                    let batch_no = self.clients[ci].next_batch_no;
                    self.clients[ci].next_batch_no += 1;
                    let floor = self.checker.acked_end(log);
                    self.clients[ci].pending.push(PendingAppend {
                        batch_no,
                        seq,
                        batch,
                        rid: 0,
                        sent_at: now,
                        retry_at: None,
                        floor,
                    });
                    let last = self.clients[ci].pending.len() - 1;
                    self.resend(ci, last);
                }
            }
            Kind::Reader => {
                if self.clients[ci]
                    .read
                    .is_some_and(|(_, at)| now < at + 200_000)
                {
                    return;
                }
                let node = self.work.index(self.nodes.len());
                let log = self.logs[self.work.index(self.logs.len())];
                let hi = self.checker.acked_end(log).0 + 2;
                let from = Offset(self.work.range(0, hi));
                let wait_ms = [0u32, 1, 10][self.work.index(3)];
                let max_records = self.work.range(1, 50) as u32;
                let max_bytes = self.work.range(1, 4096) as u32;
                let rid = self.send_request(
                    ci,
                    node,
                    ReqKind::Read { log, from },
                    ClientRequest::Read {
                        log,
                        from,
                        max_records,
                        max_bytes,
                        wait_ms,
                    },
                );
                self.clients[ci].read = Some((rid, now));
            }
            Kind::Admin => {
                let done = self.logs.len() > 1;
                let busy = self.clients[ci]
                    .read
                    .is_some_and(|(_, at)| now < at + 50_000);
                if done || busy {
                    return;
                }
                let name = "orders".to_string();
                let log = LogId::from_name(&name);
                let rid = self.send_request(
                    ci,
                    0,
                    ReqKind::Create { log },
                    ClientRequest::CreateLog { name },
                );
                self.clients[ci].read = Some((rid, now));
            }
            Kind::Trimmer => self.trimmer_wake(ci),
            Kind::Subscriber => {
                if self.clients[ci].sub.is_some() {
                    return;
                }
                let node = self.work.index(self.nodes.len());
                if self.nodes[node].replica.is_none() {
                    return;
                }
                let log = self.log;
                let from = self.clients[ci].sub_next;
                let rid = self.send_request(
                    ci,
                    node,
                    ReqKind::Subscribe { log, from },
                    ClientRequest::Subscribe { log, from },
                );
                self.clients[ci].sub = Some((node, rid));
            }
        }
    }

    /// One trim, mostly through the head: up to what no producer may still retry (its
    /// outstanding batches lie above their `floor`), now and then past everything committed
    /// (the head must clamp) when nothing is outstanding.
    fn trimmer_wake(&mut self, ci: usize) {
        let now = self.now;
        if self.phase != Phase::Safety
            || self.clients[ci]
                .read
                .is_some_and(|(_, at)| now < at + 50_000)
        {
            return;
        }
        let li = self.trim_rng.index(self.logs.len());
        let log = self.logs[li];
        let acked = self.checker.acked_end(log);
        let outstanding = self
            .clients
            .iter()
            .filter(|c| matches!(c.kind, Kind::Producer { log_index, .. } if log_index == li))
            .flat_map(|c| c.pending.iter().map(|p| p.floor))
            .min();
        let floor = outstanding.map_or(acked, |f| f.min(acked));
        let before = if outstanding.is_none() && self.trim_rng.chance(0.15) {
            acked.plus(self.trim_rng.range(1, 500))
        } else if self.trim_mode == TrimMode::Aggressive || self.trim_rng.chance(0.3) {
            floor
        } else {
            Offset(self.trim_rng.range(0, floor.0))
        };
        if before == Offset::ZERO {
            return;
        }
        let node = if self.trim_rng.chance(0.05) {
            self.trim_rng.index(self.nodes.len())
        } else {
            0
        };
        let asked = self.trim_asked.entry(log).or_default();
        *asked = (*asked).max(before);
        let rid = self.send_request(
            ci,
            node,
            ReqKind::Trim { log },
            ClientRequest::Trim { log, before },
        );
        self.clients[ci].read = Some((rid, now));
    }

    fn resend(&mut self, ci: usize, i: usize) {
        let batch = self.clients[ci].pending[i].batch.clone();
        let seq = self.clients[ci].pending[i].seq;
        let rid = self.send_request(
            ci,
            0,
            ReqKind::Append {
                batch: batch.clone(),
                seq,
            },
            ClientRequest::Append { batch },
        );
        // A dead head refuses the connection: try again shortly.
        let refused = self.nodes[0].replica.is_none();
        let retry = self.now + 2000;
        let p = &mut self.clients[ci].pending[i];
        p.rid = rid;
        p.sent_at = self.now;
        p.retry_at = refused.then_some(retry);
    }

    fn client_reply(&mut self, rid: u64, reply: ClientReply) {
        let Some(info) = self.requests.get(&rid) else {
            return;
        };
        let ci = info.client;
        if ci == VERIFIER {
            self.verifier_replies.insert(rid, reply);
            return;
        }
        let now = self.now;
        let seq_of = match &info.kind {
            ReqKind::Append { seq, .. } => Some(*seq),
            _ => None,
        };
        let kind = self.clients[ci].kind;
        match (kind, reply) {
            (Kind::Producer { .. }, ClientReply::AppendOk { .. }) => {
                let Some(seq) = seq_of else { return };
                self.clients[ci].pending.retain(|p| p.seq != seq);
            }
            (Kind::Producer { producer, .. }, ClientReply::Error { code, message }) => {
                if !retriable_with(code, self.disk_fulls > 0) {
                    self.fail(format!("append got unexpected {code:?}: {message}"));
                    return;
                }
                if code == ErrorCode::StorageFull && producer == 0 {
                    // Forwarded before the head's write failed, it may still be committed
                    // from a successor's copy: without dedup, give up rather than duplicate.
                    self.clients[ci].pending.retain(|p| p.rid != rid);
                    return;
                }
                let backoff = self.work.range(500, 5000);
                if let Some(p) = self.clients[ci].pending.iter_mut().find(|p| p.rid == rid) {
                    p.retry_at = Some(now + backoff);
                }
            }
            (Kind::Reader, r) => {
                if self.clients[ci].read.is_some_and(|(x, _)| x == rid) {
                    self.clients[ci].read = None;
                }
                if let ClientReply::Error { code, message } = r {
                    // (OffsetTrimmed was checked against the node's start as it left it.)
                    if !retriable(code) && code != ErrorCode::OffsetTrimmed {
                        self.fail(format!("read got unexpected {code:?}: {message}"));
                    }
                }
            }
            (Kind::Admin, ClientReply::CreateLogOk { log }) => {
                self.clients[ci].read = None;
                if !self.logs.contains(&log) {
                    self.logs.push(log);
                }
            }
            (Kind::Admin, ClientReply::Error { code, message }) => {
                self.clients[ci].read = None;
                if !retriable(code) {
                    self.fail(format!("create-log got unexpected {code:?}: {message}"));
                }
            }
            (Kind::Subscriber, ClientReply::Records { batches, .. }) => {
                if let Some(h) = batches
                    .last()
                    .and_then(|b| chainlog_core::record::BatchHeader::decode(b).ok())
                {
                    let c = &mut self.clients[ci];
                    c.sub_next = c.sub_next.max(h.end_offset());
                }
            }
            (Kind::Subscriber, ClientReply::Error { code, message }) => {
                if code == ErrorCode::OffsetTrimmed {
                    // Like a consumer that fell behind retention: go on from where the node
                    // serves the log from (its trim point may lie past what its disk holds).
                    let start = self.log_start(info.node, self.log);
                    let c = &mut self.clients[ci];
                    c.sub_next = c.sub_next.max(start);
                } else if !retriable(code) {
                    self.fail(format!("subscribe got unexpected {code:?}: {message}"));
                }
                self.clients[ci].sub = None;
            }
            (Kind::Trimmer, ClientReply::TrimOk { .. }) => {
                self.clients[ci].read = None;
                self.trims_ok += 1;
            }
            (Kind::Trimmer, ClientReply::Error { code, message }) => {
                self.clients[ci].read = None;
                if !retriable(code) {
                    self.fail(format!("trim got unexpected {code:?}: {message}"));
                }
            }
            (_, r) => self.fail(format!("client {ci} got an unexpected {r:?}")),
        }
    }

    // ------------------------------------------------------------ faults

    fn fault_tick(&mut self) {
        if !self.faults_on {
            return;
        }
        let n = self.nodes.len();
        if self.crash_rng.chance(self.params.crash_p) {
            let victim = self.crash_rng.index(n);
            if self.nodes[victim].replica.is_some() {
                let may_flip = n >= 2 && !self.nodes.iter().any(|x| x.damaged);
                let flip = may_flip && self.crash_rng.chance(self.params.flip_p);
                self.crash_node(victim, flip);
                let (lo, hi) = self.params.restart_delay_us;
                let d = self.crash_rng.range(lo, hi);
                self.nodes[victim].restart_scheduled = true;
                self.schedule(d, Ev::Restart { node: victim });
            }
        }
        if !self.links.is_empty() && self.crash_rng.chance(self.params.partition_p) {
            let li = self.crash_rng.index(self.links.len());
            if !self.links[li].partitioned {
                if self.verbose {
                    println!("{} partition link {li}", self.now);
                }
                self.partitions += 1;
                self.links[li].partitioned = true;
                self.update_links();
                let (lo, hi) = self.params.partition_us;
                let d = self.crash_rng.range(lo, hi);
                self.schedule(d, Ev::Heal { link: li });
            }
        }
        if self.full_p > 0.0 && self.full_rng.chance(self.full_p) {
            let victim = self.full_rng.index(n);
            let d = self.full_rng.range(500, 30_000);
            self.fill_disk(victim, d);
        }
    }

    /// Node `n`'s disk is full for `us`: its writes fail with `StorageFull` until then.
    fn fill_disk(&mut self, n: usize, us: u64) {
        if self.verbose {
            println!("{} n{} DISK FULL for {us} us", self.now, n + 1);
        }
        self.disk_fulls += 1;
        let until = self.now + us;
        let node = &mut self.nodes[n];
        node.full_until = Some(node.full_until.map_or(until, |t| t.max(until)));
    }

    /// Stops every fault: heals partitions, frees disk space and restarts crashed nodes now.
    pub fn heal(&mut self) {
        self.faults_on = false;
        for n in &mut self.nodes {
            n.full_until = None;
        }
        for l in &mut self.links {
            l.partitioned = false;
        }
        for n in 0..self.nodes.len() {
            if self.nodes[n].replica.is_none() {
                self.start_node(n);
            }
        }
        self.update_links();
    }

    // ------------------------------------------------------------ phases

    /// Runs until `steps` events have been processed (or the queue empties / a check fails).
    pub fn run_steps(&mut self, steps: u64) -> Result<(), Failure> {
        let target = self.steps + steps;
        while self.steps < target && self.failure.is_none() {
            if !self.step() {
                break;
            }
        }
        self.failure()
    }

    /// Runs for `us` of simulated time.
    pub fn run_for(&mut self, us: u64) -> Result<(), Failure> {
        let until = self.now + us;
        while self.failure.is_none() {
            match self.queue.peek() {
                Some(s) if s.at <= until => {}
                _ => break,
            }
            self.step();
        }
        self.now = self.now.max(until);
        self.failure()
    }

    /// The verifier reads `log` at `from` on node `n` (`limits`: most records, most bytes,
    /// wait ms) and waits for the answer.
    fn verifier_read(
        &mut self,
        n: usize,
        (log, from): (LogId, Offset),
        (max_records, max_bytes, wait_ms): (u32, u32, u32),
        what: &str,
        budget: &mut u64,
    ) -> Result<Option<ClientReply>, Failure> {
        let rid = self.send_request(
            VERIFIER,
            n,
            ReqKind::Read { log, from },
            ClientRequest::Read {
                log,
                from,
                max_records,
                max_bytes,
                wait_ms,
            },
        );
        self.run_until(what, budget, |c| c.verifier_replies.contains_key(&rid))?;
        Ok(self.verifier_replies.remove(&rid))
    }

    fn run_until(
        &mut self,
        what: &str,
        budget: &mut u64,
        mut done: impl FnMut(&mut Cluster) -> bool,
    ) -> Result<(), Failure> {
        while !done(self) {
            self.failure()?;
            if *budget == 0 || !self.step() {
                if self.verbose {
                    for n in &self.nodes {
                        println!("{:?}", n.replica.as_ref().map(Replica::status));
                        for (id, l) in &n.disk.logs {
                            println!(
                                "  disk {id}: end {} synced {} hint {}",
                                l.end(),
                                l.synced_end(),
                                l.hint_saved
                            );
                        }
                    }
                }
                self.fail(format!(
                    "liveness: {what} did not happen in time (t={} us)",
                    self.now
                ));
                return self.failure();
            }
            *budget -= 1;
        }
        self.failure()
    }

    /// Heals everything, then requires the chain to accept an append, every producer's
    /// appends to resolve, every acknowledged append to be readable from every replica, and
    /// every disk to hold them.
    pub fn run_liveness(&mut self) -> Result<(), Failure> {
        self.phase = Phase::Liveness;
        self.heal();
        let mut budget = self.opts.liveness_steps_max;
        // A fresh append must commit.
        let mut b = BatchBuilder::new();
        b.push(b"liveness-probe")
            .map_err(|e| self.internal(e.to_string()))?;
        let probe = b.finish(CLUSTER, self.log, ProducerId(999_999), 0, self.now);
        let mut acked = false;
        while !acked {
            let rid = self.send_request(
                VERIFIER,
                0,
                ReqKind::Append {
                    batch: probe.clone(),
                    seq: 0,
                },
                ClientRequest::Append {
                    batch: probe.clone(),
                },
            );
            let wait_until = self.now + 50_000;
            self.run_until("an answer to the probe append", &mut budget, |c| {
                c.verifier_replies.contains_key(&rid) || c.now >= wait_until
            })?;
            match self.verifier_replies.remove(&rid) {
                Some(ClientReply::AppendOk { .. }) => acked = true,
                Some(ClientReply::Error { code, message })
                    if !retriable_with(code, self.disk_fulls > 0) =>
                {
                    self.fail(format!("probe append got {code:?}: {message}"));
                    return self.failure();
                }
                _ => {}
            }
        }
        self.run_until("every producer's appends to resolve", &mut budget, |c| {
            c.clients.iter().all(|x| x.pending.is_empty())
        })?;
        // Every acknowledged append, read back through every replica's own read path. The
        // first read of each node waits long for the commit: a replica that lags must wait,
        // not answer "nothing".
        for log in self.logs.clone() {
            let end = self.checker.acked_end(log);
            let asked = self.trim_asked.get(&log).copied().unwrap_or(Offset::ZERO);
            for n in 0..self.nodes.len() {
                // Each replica serves from its own start (a trim message may have been lost on
                // the way down, so starts differ), never past what a client asked to trim;
                // below it, a typed refusal.
                let start = self.log_start(n, log);
                if start > asked {
                    self.fail(format!(
                        "node {} starts {log} at {start}, past every trim asked ({asked})",
                        n + 1
                    ));
                    return self.failure();
                }
                if start > Offset::ZERO {
                    let from = Offset(start.0 - 1);
                    let reply = self.verifier_read(
                        n,
                        (log, from),
                        (10, 4096, 0),
                        "a verifier read below the start",
                        &mut budget,
                    )?;
                    match reply {
                        Some(ClientReply::Error {
                            code: ErrorCode::OffsetTrimmed,
                            ..
                        }) => {}
                        other => {
                            self.fail(format!(
                                "node {} answered a read of trimmed {log}@{from} with {other:?}",
                                n + 1
                            ));
                            return self.failure();
                        }
                    }
                }
                let mut from = start;
                let mut first = true;
                while from < end {
                    let reply = self.verifier_read(
                        n,
                        (log, from),
                        (10_000, 64 * 1024, if first { 1000 } else { 20 }),
                        "a verifier read",
                        &mut budget,
                    )?;
                    match reply {
                        Some(ClientReply::ReadOk { batches, .. }) => {
                            match batches
                                .last()
                                .and_then(|b| chainlog_core::record::BatchHeader::decode(b).ok())
                            {
                                Some(h) => from = h.end_offset(),
                                None if first => {
                                    self.fail(format!(
                                        "node {} answered a read of acknowledged {log}@{from} \
                                         with nothing after waiting",
                                        n + 1
                                    ));
                                    return self.failure();
                                }
                                None => {}
                            }
                        }
                        Some(ClientReply::Error {
                            code: ErrorCode::OffsetTrimmed,
                            ..
                        }) if self.log_start(n, log) > from => {
                            // A trim still travelling down the chain reached it meanwhile.
                            from = self.log_start(n, log);
                            if from > asked {
                                self.fail(format!(
                                    "node {} starts {log} at {from}, past every trim asked \
                                     ({asked})",
                                    n + 1
                                ));
                                return self.failure();
                            }
                            continue;
                        }
                        Some(ClientReply::Error { code, message }) if !retriable(code) => {
                            self.fail(format!("node {} read: {code:?} {message}", n + 1));
                            return self.failure();
                        }
                        _ => {}
                    }
                    first = false;
                }
            }
        }
        // A subscriber, once healed, receives everything acknowledged.
        let sub_end = self.checker.acked_end(self.log);
        if self.clients.iter().any(|c| c.kind == Kind::Subscriber) {
            self.run_until("the subscriber to catch up", &mut budget, |c| {
                c.clients
                    .iter()
                    .filter(|x| x.kind == Kind::Subscriber)
                    .all(|x| x.sub_next >= sub_end)
            })?;
        }
        // A client's trim holds on every replica once healed: each keeps (durably) a trim
        // point at least its predecessor's, though a `Trim` may have been lost on the way.
        self.run_until(
            "every replica to keep its predecessor's trim point",
            &mut budget,
            |c| {
                c.nodes.windows(2).all(|w| {
                    w[0].disk.logs.iter().all(|(id, pred)| {
                        w[1].disk
                            .logs
                            .get(id)
                            .is_some_and(|succ| succ.trim_point >= pred.trim_point)
                    })
                })
            },
        )?;
        let disks: Vec<&SimDisk> = self.nodes.iter().map(|x| &x.disk).collect();
        if let Err(v) = self.checker.check_final_disks(&disks, &self.trim_asked) {
            self.fail(v);
        }
        self.failure()
    }

    /// Where node `n`'s replica starts `log` now.
    fn log_start(&self, n: usize, log: LogId) -> Offset {
        self.status(n as u32 + 1)
            .and_then(|s| s.logs.into_iter().find(|l| l.log == log))
            .map_or(Offset::ZERO, |l| l.start)
    }

    fn internal(&self, m: String) -> Failure {
        Failure {
            seed: self.seed,
            step: self.steps,
            message: m,
            options: self.opts.clone(),
        }
    }

    pub fn report(&self) -> Report {
        Report {
            seed: self.seed,
            nodes: self.nodes.len(),
            steps: self.steps,
            sim_time_us: self.now,
            trace_hash: self.trace,
            acked_appends: self.checker.acked.values().map(BTreeMap::len).sum(),
            crashes: self.crashes,
            bit_flips: self.bit_flips,
            partitions: self.partitions,
            trims: self.trims_ok,
            disk_fulls: self.disk_fulls,
        }
    }

    // ------------------------------------------------------------ scenario controls

    /// A handle on node `id` (1-based, chain order) for scenario tests.
    pub fn node(&mut self, id: u32) -> NodeCtl<'_> {
        assert!(id >= 1 && id as usize <= self.nodes.len());
        NodeCtl {
            c: self,
            n: id as usize - 1,
        }
    }

    /// Stops the random fault schedule (scenario tests inject faults by hand).
    pub fn quiet(&mut self) {
        self.faults_on = false;
    }
}

/// Scenario controls of one node.
pub struct NodeCtl<'a> {
    c: &'a mut Cluster,
    n: usize,
}

impl NodeCtl<'_> {
    /// Power loss: unsynced writes are lost (maybe torn); it stays down until `restart`.
    pub fn crash(self) {
        self.c.crash_node(self.n, false);
    }

    /// Power loss plus bit rot in synced data, found by checksums at the next recovery.
    pub fn crash_with_bit_flip(self) {
        self.c.crash_node(self.n, true);
    }

    /// Restart in place: recover from its own disk, rejoin its neighbours.
    pub fn restart(self) {
        if self.c.nodes[self.n].replica.is_none() {
            self.c.start_node(self.n);
        }
    }

    /// Fills this node's disk for `us`: writes fail with `StorageFull`, then space returns.
    pub fn disk_full_for(self, us: u64) {
        self.c.fill_disk(self.n, us);
    }

    /// The core's view of the default log on this node.
    pub fn log_status(&self) -> Option<chainlog_core::LogStatus> {
        let log = self.c.log;
        self.c
            .status(self.n as u32 + 1)
            .and_then(|s| s.logs.into_iter().find(|l| l.log == log))
    }

    /// Makes this node's syncs take `lo..=hi` µs.
    pub fn sync_delay_us(self, lo: u64, hi: u64) {
        self.c.nodes[self.n].sync_delay_us = Some((lo, hi));
    }

    /// Written end of the default log on its disk.
    pub fn disk_end(&self) -> Offset {
        self.c.nodes[self.n]
            .disk
            .logs
            .get(&self.c.log)
            .map_or(Offset::ZERO, |l| l.end())
    }

    /// First offset of the default log on its disk.
    pub fn disk_start(&self) -> Offset {
        self.c.nodes[self.n]
            .disk
            .logs
            .get(&self.c.log)
            .map_or(Offset::ZERO, |l| l.start)
    }

    /// Durable end of the default log on its disk.
    pub fn disk_synced_end(&self) -> Offset {
        self.c.nodes[self.n]
            .disk
            .logs
            .get(&self.c.log)
            .map_or(Offset::ZERO, |l| l.synced_end())
    }

    pub fn is_damaged(&self) -> bool {
        self.c.nodes[self.n].damaged
    }
}

impl SimClient {
    fn new(kind: Kind) -> SimClient {
        SimClient {
            kind,
            next_seq: 0,
            next_batch_no: 0,
            pending: vec![],
            read: None,
            sub: None,
            sub_next: Offset::ZERO,
            last_send: BTreeMap::new(),
        }
    }
}

/// Runs one seed: safety phase with faults, then the liveness phase.
pub fn run_seed(seed: u64, opts: &SimOptions) -> Result<Report, Failure> {
    let mut c = Cluster::new(seed, opts.clone());
    c.run_steps(opts.steps)?;
    c.run_liveness()?;
    Ok(c.report())
}
