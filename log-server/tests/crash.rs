//! SIGKILL a real server mid-stream, restart it on the same directory: every append the client
//! saw acknowledged reads back identical, offsets are dense from the log's start, no partial
//! record shows; also with retention recycling segments under the stream.

mod common;

use chainlog_client::{Client, ClientConfig};
use common::Server;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WRITERS: usize = 16;

fn payload(writer: usize, i: u64, pad_max: usize) -> Vec<u8> {
    // Variable sizes so batches end at many different byte positions on disk.
    let pad = (writer * 131 + i as usize * 17) % pad_max;
    let mut p = format!("w{writer:02}-{i:08}-").into_bytes();
    p.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, pad));
    p
}

fn config(addr: std::net::SocketAddr) -> ClientConfig {
    let mut c = ClientConfig::new([addr.to_string()]);
    c.request_timeout_ms = 3000;
    c.retries_max = 0;
    c
}

/// Streams appends until `stop_after` acks or the server dies; returns acked (offset → payload)
/// and every payload ever attempted.
async fn stream(
    addr: std::net::SocketAddr,
    cycle: usize,
    kill_at: usize,
    pad_max: usize,
    server: Arc<Mutex<Server>>,
) -> (BTreeMap<u64, Vec<u8>>, BTreeSet<Vec<u8>>) {
    let client = Client::connect(config(addr)).await.expect("connect");
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = vec![];
    for w in 0..WRITERS {
        let client = client.clone();
        let acked = acked.clone();
        let attempted = attempted.clone();
        let killed = killed.clone();
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = (cycle as u64) << 32;
            loop {
                let p = payload(w, i, pad_max);
                attempted.lock().expect("lock").insert(p.clone());
                match client.append("default", p.clone()).await {
                    Ok(off) => {
                        let n = {
                            let mut a = acked.lock().expect("lock");
                            assert!(a.insert(off.0, p).is_none(), "offset {off} acked twice");
                            a.len()
                        };
                        if n >= kill_at && !killed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            server.lock().expect("lock").kill9();
                        }
                    }
                    Err(_) => {
                        if killed.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                    }
                }
                i += 1;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, t)
            .await
            .expect("writers stop after the kill")
            .expect("join");
    }
    let a = acked.lock().expect("lock").clone();
    let b = attempted.lock().expect("lock").clone();
    (a, b)
}

/// Three cycles of: stream until `kill_at` acks, SIGKILL, restart, check the log. Returns the
/// restarted server.
async fn kill_cycles(server: Server, kill_at: usize, pad_max: usize) -> Arc<Mutex<Server>> {
    let addr = server.addr;
    let server = Arc::new(Mutex::new(server));
    let mut all_acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut attempted: BTreeSet<Vec<u8>> = BTreeSet::new();
    for cycle in 0..3 {
        let (acked, tried) =
            stream(addr, cycle, kill_at + cycle * 700, pad_max, server.clone()).await;
        assert!(!acked.is_empty(), "cycle {cycle}: nothing was acknowledged");
        for (o, p) in acked {
            if let Some(prev) = all_acked.insert(o, p.clone()) {
                assert_eq!(
                    prev, p,
                    "offset {o} acknowledged with two different payloads"
                );
            }
        }
        attempted.extend(tried);
        tokio::task::spawn_blocking({
            let server = server.clone();
            move || server.lock().expect("lock").restart()
        })
        .await
        .expect("restart");

        let reader = Client::connect(config(addr)).await.expect("connect");
        let start = common::log_start(&reader).await;
        let log = common::read_everything_at(&reader, start).await;
        for (i, (o, p)) in log.iter().enumerate() {
            assert_eq!(*o, start + i as u64, "offsets are dense from the start");
            assert!(
                attempted.contains(p),
                "offset {o} holds a record nobody appended (partial or stale?)"
            );
        }
        let stored: BTreeMap<u64, &Vec<u8>> = log.iter().map(|(o, p)| (*o, p)).collect();
        for (o, p) in all_acked.range(start..) {
            assert_eq!(
                stored.get(o),
                Some(&p),
                "acknowledged offset {o} lost or changed after SIGKILL (cycle {cycle})"
            );
        }
        eprintln!(
            "cycle {cycle}: {} acknowledged so far, {} stored after restart from {start}",
            all_acked.len(),
            log.len()
        );
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    kill_cycles(Server::single(&dir.path().join("n1"), "auto"), 1500, 1500).await;
}

/// With 1 MiB segments and 3 MiB retention, every few hundred appends a roll takes a recycled
/// segment full of older batches: a kill lands in one, and recovery must keep exactly the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_recycled_segments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let cfg = dir.path().join("node.toml");
    let toml = format!(
        "listen = \"{addr}\"\ndir = \"{}\"\n[storage]\nsegment_bytes = 1048576\nretention_bytes = 3145728\n",
        dir.path().join("n1").display()
    );
    std::fs::write(&cfg, toml).expect("write config");
    let server = Server::start(
        addr,
        vec!["run".into(), "--config".into(), cfg.display().to_string()],
        dir.path().join("n1.log"),
    );
    let _server = kill_cycles(server, 4000, 4000).await;
    // Past the retention again after the last restart: the rolls take recycled segments.
    let client = Client::connect(config(addr)).await.expect("connect");
    let big = vec![7u8; 4000];
    let batch: Vec<&[u8]> = vec![&big; 16];
    for _ in 0..100 {
        client
            .append_batch("default", &batch)
            .await
            .expect("append");
    }
    let st = client.status().await.expect("status");
    let recycled = st["storage"]["segments_recycled"].as_u64().unwrap_or(0);
    let zeroed = st["storage"]["spares_zeroed"].as_u64().unwrap_or(0);
    assert!(recycled >= 2, "recycled {recycled}, zeroed {zeroed}");
    assert!(zeroed <= 2, "recycled {recycled}, zeroed {zeroed}");
    let log = std::fs::read_to_string(dir.path().join("n1.log")).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");
}
