//! The service floor: the smallest durable append service that can exist on this machine — a
//! blocking thread that reads requests from a loopback TCP socket, group-commits them with one
//! io_uring durable write (`RWF_DSYNC` with O_DIRECT, else write + fdatasync), and acknowledges them — driven by a closed loop of the same
//! appends in flight. No protocol, no checks, no event loop: what is left is the disk, the
//! socket round trip and the wake-ups between them, which any implementation pays. For a
//! chain, such services stand in a line: each forwards what it read before its own write, and
//! acknowledges once it is durable and its successor has acknowledged.
//!
//! The disk floor leaves the round trip out, so at many appends in flight no service with a
//! network hop can reach it; this floor says how close one can come.

use crate::floor::single_record_batch_bytes;
use crate::hist::{LatencyHist, LatencySummary};
use anyhow::Context;
use chainlog_hw::buf::round_up_page;
use chainlog_hw::disk::SpareFiles;
use chainlog_hw::uring::{Op, Ring};
use chainlog_hw::AlignedBuf;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Scratch file size (the server's default segment size): in place, group commits wrap around
/// inside it; growing, a node moves on to a fresh file of this size when one is full.
#[cfg(not(test))]
const FILE_BYTES: u64 = 64 << 20;
/// Small in tests, so that a short run fills files and moves on.
#[cfg(test)]
const FILE_BYTES: u64 = 64 << 10;
/// Most bytes one group commit takes (larger requests are refused).
const GROUP_BYTES_MAX: usize = 4 << 20;
/// Longest chain measured.
const NODES_MAX: usize = 8;
/// Bytes of a request's length prefix and of an acknowledgement.
const PREFIX_BYTES: usize = 4;

fn one() -> usize {
    1
}

/// Where a node's durable writes go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// Around and around one pre-zeroed file: every write overwrites written extents (what a
    /// log under retention does once it recycles its segments, and what the disk floor does).
    #[default]
    InPlace,
    /// As a growing log: a node fills a pre-zeroed file and moves on to the next, which a
    /// background thread zeroed meanwhile — the server's own spare preparer
    /// ([`SpareFiles`]), so the zeroing is paid exactly as the server pays it.
    Prezeroed,
    /// As a growing log that does not zero: each next file is only `fallocate`d, so every
    /// durable write lands in unwritten extents and also commits their conversion.
    Unwritten,
}

impl Space {
    /// The files grow (writes go to space no earlier write used).
    pub fn growing(self) -> bool {
        self != Space::InPlace
    }
}

/// One service-floor measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceFloor {
    pub inflight: usize,
    /// Requests the closed loop keeps outstanding (the appends in flight split evenly).
    pub requests: usize,
    /// Minimal services in the chain (1 = a single node).
    #[serde(default = "one")]
    pub nodes: usize,
    pub record_bytes: usize,
    #[serde(default)]
    pub space: Space,
    pub records_per_s: f64,
    /// Requests per group commit, on average (the service's natural batching).
    pub requests_per_sync: f64,
    /// Times the head moved on to a fresh file (growing files only).
    #[serde(default)]
    pub rolls: u64,
    /// Request sent → acknowledged.
    pub latency: LatencySummary,
}

/// Measures the service floor for `inflight` appends of `record_bytes`, sent as `requests`
/// equal requests (each its records' batch bytes, packed), for about `duration` after a short
/// warm-up, on a chain of `nodes` minimal services (1 = a single node). Blocking: call from a
/// blocking thread. The scratch files live in `dir` (one per node, or one directory per node
/// when the files grow: the chain shares the disk, as a local chainlog chain does); `space`
/// says where the writes go.
pub fn service_floor(
    dir: &Path,
    record_bytes: usize,
    inflight: usize,
    requests: usize,
    nodes: usize,
    space: Space,
    duration: Duration,
) -> anyhow::Result<ServiceFloor> {
    anyhow::ensure!(
        requests >= 1 && inflight >= requests && inflight.is_multiple_of(requests),
        "the {inflight} appends in flight must split evenly into 1..={inflight} requests, not {requests}"
    );
    anyhow::ensure!((1..=NODES_MAX).contains(&nodes), "1..={NODES_MAX} nodes");
    let caps = chainlog_hw::probe::probe(dir);
    if let Some(why) = caps.uring_unavailable() {
        anyhow::bail!("io_uring unavailable: {why}");
    }
    let per_request = inflight / requests;
    let request_bytes = single_record_batch_bytes(record_bytes) * per_request;
    anyhow::ensure!(
        request_bytes * requests <= GROUP_BYTES_MAX,
        "{inflight} appends of {record_bytes} bytes exceed one group commit"
    );
    let direct = caps.direct_ok;
    let mut paths = Vec::new();
    let mut threads = Vec::new();
    // Tail first, so every node knows its successor's address.
    let mut succ = None;
    for i in (0..nodes).rev() {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
        let addr = listener.local_addr()?;
        let path = dir.join(format!(
            ".chainlog-service-floor-{}-{i}",
            std::process::id()
        ));
        chainlog_hw::disk::create_prezeroed(&path, FILE_BYTES, direct)?;
        paths.push(path.clone());
        let files = match space {
            Space::InPlace => Files::InPlace,
            Space::Prezeroed => {
                let d = path.with_extension("spares");
                paths.push(d.clone());
                let s =
                    SpareFiles::start(d, FILE_BYTES, direct, 1, Arc::default(), Arc::default())?;
                // As the suite measures a fresh server: once its start-up spare is ready.
                s.wait_ready()?;
                Files::Prezeroed(s)
            }
            Space::Unwritten => {
                let d = path.with_extension("grown");
                std::fs::create_dir_all(&d).context("creating the service's directory")?;
                paths.push(d.clone());
                Files::Unwritten { dir: d, next: 0 }
            }
        };
        let next = succ;
        threads.push(
            std::thread::Builder::new()
                .name(format!("service-floor-{i}"))
                .spawn(move || serve(listener, &path, direct, files, next))
                .context("spawning a service thread")?,
        );
        succ = Some(addr);
    }
    let Some(head) = succ else {
        anyhow::bail!("no nodes");
    };
    let client = drive(head, requests, request_bytes, per_request, duration);
    // The head's thread is the last spawned; its counts are the ones reported.
    let mut served = Ok(Counts::default());
    for t in threads {
        served = t
            .join()
            .map_err(|_| anyhow::anyhow!("service thread panicked"))?;
    }
    for p in &paths {
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
    }
    let (records, secs, hist) = client?;
    let Counts {
        served: served_requests,
        syncs,
        rolls,
    } = served?;
    Ok(ServiceFloor {
        inflight,
        requests,
        nodes,
        record_bytes,
        space,
        records_per_s: records as f64 / secs,
        requests_per_sync: served_requests as f64 / syncs.max(1) as f64,
        rolls,
        latency: hist.summary(),
    })
}

/// The client: keeps `requests` requests outstanding, sending a new one the moment one is
/// acknowledged. Returns records acknowledged in the measured window, its length, latencies.
fn drive(
    addr: std::net::SocketAddr,
    requests: usize,
    request_bytes: usize,
    per_request: usize,
    duration: Duration,
) -> anyhow::Result<(u64, f64, LatencyHist)> {
    let mut s = TcpStream::connect(addr).context("connecting to the service floor")?;
    chainlog_hw::net::tcp::tune(&s);
    let mut msg = vec![0x5au8; PREFIX_BYTES + request_bytes];
    msg[..PREFIX_BYTES].copy_from_slice(&(request_bytes as u32).to_le_bytes());
    let warmup = duration.min(Duration::from_millis(500)) / 2;
    let mut sent = std::collections::VecDeque::with_capacity(requests);
    for _ in 0..requests {
        s.write_all(&msg)?;
        sent.push_back(Instant::now());
    }
    let mut hist = LatencyHist::new();
    let start = Instant::now();
    let (mut measuring, mut t0, mut records) = (false, start, 0u64);
    let mut ack = [0u8; PREFIX_BYTES];
    loop {
        s.read_exact(&mut ack)
            .context("reading an acknowledgement")?;
        let now = Instant::now();
        let Some(at) = sent.pop_front() else {
            anyhow::bail!("acknowledgement for nothing");
        };
        if !measuring && now - start >= warmup {
            (measuring, t0) = (true, now);
        } else if measuring {
            hist.record(now - at);
            records += per_request as u64;
            if now - t0 >= duration {
                let secs = (now - t0).as_secs_f64();
                // Closing the socket ends the service loop.
                drop(s);
                return Ok((records, secs, hist));
            }
        }
        s.write_all(&msg)?;
        sent.push_back(Instant::now());
    }
}

/// What one node did.
#[derive(Default)]
struct Counts {
    /// Requests made durable and acknowledged.
    served: u64,
    /// Group commits (durable writes).
    syncs: u64,
    /// Moves to a fresh file.
    rolls: u64,
}

/// Where one node's next file comes from once the one it writes is full.
enum Files {
    InPlace,
    Prezeroed(SpareFiles),
    Unwritten { dir: std::path::PathBuf, next: u64 },
}

impl Files {
    /// The file to write once the current one is full (`None`: wrap around in it).
    fn next(&mut self, direct: bool) -> anyhow::Result<Option<std::fs::File>> {
        match self {
            Files::InPlace => Ok(None),
            Files::Prezeroed(spares) => {
                // Zeroed and synced whole; not renamed into place (the service keeps no
                // directory of its own), so moving on costs an open.
                let p = spares.take()?;
                let f = chainlog_hw::disk::open_rw(&p, direct)?;
                spares.replenish();
                Ok(Some(f))
            }
            Files::Unwritten { dir, next } => {
                *next += 1;
                let p = dir.join(format!("{next:08}"));
                // Metadata only; the first durable write into it commits the new size.
                Ok(Some(chainlog_hw::disk::create_allocated(
                    &p, FILE_BYTES, direct,
                )?))
            }
        }
    }
}

/// The service: read what has arrived, forward it to the successor (if any) at once, make
/// every complete request in it durable as one group (one write), wait for the successor's
/// acknowledgements of them, acknowledge them, repeat; when a file is full, go on in `files`'
/// next one. Returns what it did.
fn serve(
    listener: TcpListener,
    path: &Path,
    direct: bool,
    mut files: Files,
    succ: Option<std::net::SocketAddr>,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    match serve_loop(listener, path, direct, &mut files, succ, &mut counts) {
        // The client hangs up with acknowledgements in flight: that ends the run.
        Err(e)
            if e.downcast_ref::<std::io::Error>().is_some_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            }) =>
        {
            Ok(counts)
        }
        r => r.map(|()| counts),
    }
}

fn serve_loop(
    listener: TcpListener,
    path: &Path,
    direct: bool,
    files: &mut Files,
    succ: Option<std::net::SocketAddr>,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let mut down = match succ {
        Some(a) => {
            let d = TcpStream::connect(a).context("connecting to the successor")?;
            chainlog_hw::net::tcp::tune(&d);
            Some(d)
        }
        None => None,
    };
    let (mut s, _) = listener.accept()?;
    chainlog_hw::net::tcp::tune(&s);
    let mut acks = vec![0u8; PREFIX_BYTES * ACKS_MAX];
    let mut file = Arc::new(chainlog_hw::disk::open_rw(path, direct)?);
    let mut ring = Ring::new(8)?;
    // Requests are read straight into the aligned buffer the write uses, back to back; two
    // buffers take turns (the next group's first bytes go to the other while one is written).
    let mut cur = AlignedBuf::new_unpooled(GROUP_BYTES_MAX + PREFIX_BYTES);
    let mut spare = Some(AlignedBuf::new_unpooled(GROUP_BYTES_MAX + PREFIX_BYTES));
    let (mut filled, mut pos) = (0usize, 0u64);
    let mut done = Vec::new();
    loop {
        // Wait for at least one complete request; take whatever else already arrived.
        let (n, used) = loop {
            let (n, used) = complete_requests(&cur.as_mut_slice()[..filled]);
            if n > 0 {
                break (n, used);
            }
            let room = &mut cur.as_mut_slice()[filled..];
            anyhow::ensure!(!room.is_empty(), "request larger than a group");
            let got = s.read(room)?;
            if got == 0 {
                return Ok(());
            }
            filled += got;
        };
        if let Some(d) = &mut down {
            d.write_all(&cur.as_mut_slice()[..used])?;
        }
        let Some(mut next) = spare.take() else {
            anyhow::bail!("write buffer not returned");
        };
        let tail = filled - used;
        next.as_mut_slice()[..tail].copy_from_slice(&cur.as_mut_slice()[used..filled]);
        let padded = round_up_page(used);
        if pos + padded as u64 > FILE_BYTES {
            pos = 0;
            if let Some(f) = files.next(direct)? {
                file = Arc::new(f);
                counts.rolls += 1;
            }
        }
        cur.set_len(used);
        cur.zero_padding();
        cur.set_len(if direct { padded } else { used });
        let write = std::mem::replace(&mut cur, next);
        filled = tail;
        // With O_DIRECT one RWF_DSYNC write, as the server's storage does; else write +
        // fdatasync.
        let mut ops = vec![(
            0,
            Op::Write {
                file: file.clone(),
                offset: pos,
                buf: write,
                dsync: direct,
            },
        )];
        if !direct {
            ops.push((
                1,
                Op::Sync {
                    file: file.clone(),
                    datasync: true,
                },
            ));
        }
        let expected = ops.len();
        ring.push_chain(ops)?;
        ring.submit()?;
        let mut got = 0;
        while got < expected {
            ring.wait(None)?;
            done.clear();
            ring.complete(&mut done)?;
            for c in done.drain(..) {
                c.result
                    .map_err(|e| anyhow::anyhow!("service floor write/sync: {e}"))?;
                if let Op::Write { buf, .. } = c.op {
                    spare = Some(buf);
                }
                got += 1;
            }
        }
        pos += padded as u64;
        counts.syncs += 1;
        counts.served += n as u64;
        if let Some(d) = &mut down {
            let mut left = n;
            while left > 0 {
                let k = left.min(ACKS_MAX);
                d.read_exact(&mut acks[..PREFIX_BYTES * k])
                    .context("reading the successor's acknowledgements")?;
                left -= k;
            }
        }
        s.write_all(&ACKS[..PREFIX_BYTES * n.min(ACKS_MAX)])?;
        for _ in 0..n.saturating_sub(ACKS_MAX) {
            s.write_all(&ACKS[..PREFIX_BYTES])?;
        }
    }
}

/// Acknowledgements written with one call (more than this in one group are written singly).
const ACKS_MAX: usize = 256;
static ACKS: [u8; PREFIX_BYTES * ACKS_MAX] = [0; PREFIX_BYTES * ACKS_MAX];

/// How many whole length-prefixed requests `b` starts with, and their bytes.
fn complete_requests(b: &[u8]) -> (usize, usize) {
    let (mut n, mut at) = (0, 0);
    while let Some(p) = b.get(at..at + PREFIX_BYTES) {
        let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
        if b.len() < at + PREFIX_BYTES + len {
            break;
        }
        at += PREFIX_BYTES + len;
        n += 1;
    }
    (n, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_requests_stops_at_a_partial_one() {
        let mut b = Vec::new();
        for len in [3u32, 0, 5] {
            b.extend_from_slice(&len.to_le_bytes());
            b.extend(std::iter::repeat_n(7u8, len as usize));
        }
        let whole = b.len();
        assert_eq!(complete_requests(&b), (3, whole));
        assert_eq!(complete_requests(&b[..whole - 1]), (2, 4 + 3 + 4));
        assert_eq!(complete_requests(&b[..2]), (0, 0));
        assert_eq!(complete_requests(&[]), (0, 0));
    }

    /// A short real run: requests are acknowledged, grouped, timed, and the scratch file goes.
    #[test]
    fn tiny_service_floor_runs() {
        let dir = tempfile::tempdir().unwrap();
        if let Some(why) = chainlog_hw::probe::probe(dir.path()).uring_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let f = service_floor(
            dir.path(),
            1024,
            8,
            4,
            1,
            Space::InPlace,
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!((f.inflight, f.requests, f.nodes), (8, 4, 1));
        assert!(f.records_per_s > 0.0);
        // At most every outstanding request in one group commit, at least one.
        assert!((1.0..=4.0).contains(&f.requests_per_sync), "{f:?}");
        assert!(f.latency.count > 0 && f.latency.p50_us > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(service_floor(
            dir.path(),
            1024,
            2,
            3,
            1,
            Space::InPlace,
            Duration::from_millis(1)
        )
        .is_err());
        assert!(service_floor(
            dir.path(),
            1024,
            16,
            3,
            1,
            Space::InPlace,
            Duration::from_millis(1)
        )
        .is_err());
        // A chain of three: the same loop through three nodes, every file removed after.
        let c = service_floor(
            dir.path(),
            1024,
            8,
            2,
            3,
            Space::InPlace,
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!(c.nodes, 3);
        assert!(c.records_per_s > 0.0 && c.latency.count > 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Growing files: every node moves on to fresh files (pre-zeroed by the spare preparer,
    /// or only allocated) instead of wrapping, and nothing is left behind.
    #[test]
    fn growing_service_floor_moves_on_to_fresh_files() {
        let dir = tempfile::tempdir().unwrap();
        if let Some(why) = chainlog_hw::probe::probe(dir.path()).uring_unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        // 64 KiB files (in tests): 8 one-record requests fill one in a few rounds.
        let run = |nodes, space| {
            service_floor(
                dir.path(),
                1024,
                8,
                8,
                nodes,
                space,
                Duration::from_millis(200),
            )
            .unwrap()
        };
        for space in [Space::Prezeroed, Space::Unwritten] {
            for nodes in [1, 3] {
                let f = run(nodes, space);
                assert_eq!((f.space, f.nodes), (space, nodes));
                assert!(f.records_per_s > 0.0 && f.latency.count > 0, "{f:?}");
                assert!(f.rolls >= 2, "{space:?} x{nodes}: {f:?}");
                assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            }
        }
        let f = run(1, Space::InPlace);
        assert_eq!(f.rolls, 0, "in place wraps around: {f:?}");
    }
}
