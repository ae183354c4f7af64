//! Three real `log-server` processes over TCP on loopback: appends through the client, reads from
//! each replica, a middle node killed and restarted mid-stream, and all three data directories
//! holding identical committed logs.

mod common;

use chainlog_client::{Client, ClientConfig, Offset, ReadOptions};
use chainlog_core::effects::DiskEvent;
use chainlog_core::types::LogId;
use common::{free_port, Server};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Chain {
    servers: Vec<Server>,
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

fn start_chain() -> Chain {
    let tmp = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr"))
        .collect();
    let nodes: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ id = {}, addr = \"{a}\" }}", i + 1))
        .collect();
    let mut servers = vec![];
    let mut dirs = vec![];
    // Tail first, but order must not matter: links reconnect.
    for i in (0..3).rev() {
        let dir = tmp.path().join(format!("node-{}", i + 1));
        let cfg = format!(
            "cluster_id = 0x5eed\nnode_id = {}\nlisten = \"{}\"\ndir = \"{}\"\n[chain]\nepoch = 1\nnodes = [{}]\n",
            i + 1,
            addrs[i],
            dir.display(),
            nodes.join(", ")
        );
        let path = tmp.path().join(format!("node-{}.toml", i + 1));
        std::fs::write(&path, cfg).expect("config");
        servers.push(Server::start(
            addrs[i],
            vec!["run".into(), "--config".into(), path.display().to_string()],
            tmp.path().join(format!("node-{}.log", i + 1)),
        ));
        dirs.push(dir);
    }
    servers.reverse();
    dirs.reverse();
    Chain {
        servers,
        dirs,
        _tmp: tmp,
    }
}

fn client_cfg(chain: &Chain) -> ClientConfig {
    let mut c = ClientConfig::new(chain.servers.iter().map(|s| s.addr.to_string()));
    c.request_timeout_ms = 20_000;
    c
}

async fn read_all(client: &Client, node: usize, end: Offset) -> Vec<(u64, Vec<u8>)> {
    let mut out = vec![];
    let mut from = Offset(0);
    while from < end {
        let r = client
            .read_with(
                "default",
                from,
                &ReadOptions {
                    max_records: 10_000,
                    wait: Duration::from_secs(5),
                    node: Some(node),
                    ..ReadOptions::default()
                },
            )
            .await
            .expect("read");
        assert!(
            !r.records.is_empty(),
            "node {node} has nothing at {from} (< {end})"
        );
        for rec in r.records {
            if rec.offset >= end {
                break;
            }
            out.push((rec.offset.0, rec.payload.to_vec()));
            from = rec.offset.plus(1);
        }
    }
    out
}

/// Every batch of a log as stored in a node's data directory, through the real recovery path.
fn stored_batches(dir: &Path, log: LogId) -> Vec<bytes::Bytes> {
    use chainlog_server::storage::{Storage, StorageConfig};
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = StorageConfig {
        dir: dir.join("logs"),
        ..StorageConfig::default()
    };
    let (storage, recovered) = Storage::open(
        cfg,
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .expect("open storage");
    let r = recovered
        .iter()
        .find(|r| r.log == log)
        .expect("log recovered");
    let mut out = vec![];
    let mut from = r.start;
    let mut token = 0;
    while from < r.end {
        token += 1;
        storage.read(
            chainlog_core::effects::ReadToken(token),
            log,
            from,
            r.end,
            1 << 20,
        );
        let batches = loop {
            match rx.recv_timeout(Duration::from_secs(10)).expect("read done") {
                DiskEvent::ReadDone { result, .. } => break result.expect("read ok"),
                _ => continue,
            }
        };
        for b in batches {
            let h = chainlog_core::record::verify(&b).expect("stored batch verifies");
            from = h.end_offset();
            out.push(b.slice(..h.batch_len()));
        }
    }
    storage.shutdown();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_replicate_and_agree() {
    let mut chain = start_chain();
    let client = Client::connect(client_cfg(&chain)).await.expect("connect");

    // A subscriber on the tail replica sees every committed record, in order.
    let mut sub_cfg = client_cfg(&chain);
    sub_cfg.read_from = Some(2);
    let sub_client = Client::connect(sub_cfg).await.expect("connect subscriber");
    let mut sub = sub_client
        .subscribe("default", Offset(0))
        .await
        .expect("subscribe");
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(r) = sub.next().await {
            let Ok(r) = r else { break };
            if sub_tx.send((r.offset.0, r.payload.to_vec())).is_err() {
                break;
            }
        }
    });

    // Phase 1: concurrent appends through the head.
    let mut expected: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut tasks = vec![];
    for w in 0..8u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = vec![];
            for i in 0..150u32 {
                let p = format!("w{w}-r{i}-")
                    .repeat(1 + (i as usize % 7))
                    .into_bytes();
                let off = client.append("default", p.clone()).await.expect("append");
                got.push((off.0, p));
            }
            got
        }));
    }
    for t in tasks {
        for (o, p) in t.await.expect("join") {
            assert!(
                expected.insert(o, p).is_none(),
                "offset {o} acknowledged twice"
            );
        }
    }

    // Phase 2: kill the middle node mid-stream, restart it; the chain resumes and loses nothing.
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut got = vec![];
            for i in 0..400u32 {
                let p = format!("phase2-{i}").into_bytes();
                let off = client
                    .append("default", p.clone())
                    .await
                    .expect("append across middle restart");
                got.push((off.0, p));
            }
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    tokio::task::block_in_place(|| chain.servers[1].restart());
    for (o, p) in writer.await.expect("join") {
        assert!(
            expected.insert(o, p).is_none(),
            "offset {o} acknowledged twice"
        );
    }
    let end = Offset(expected.len() as u64);
    assert_eq!(
        *expected.keys().last().expect("some"),
        end.0 - 1,
        "offsets are dense"
    );

    // A client that only knows the tail is redirected to the head for appends.
    {
        let mut cfg = ClientConfig::new([chain.servers[2].addr.to_string()]);
        cfg.request_timeout_ms = 20_000;
        let tail_only = Client::connect(cfg).await.expect("connect to tail");
        let p = b"via-redirect".to_vec();
        let off = tail_only
            .append("default", p.clone())
            .await
            .expect("append follows NotHead");
        assert!(expected.insert(off.0, p).is_none());
    }

    let end = Offset(expected.len() as u64);
    assert_eq!(
        *expected.keys().last().expect("some"),
        end.0 - 1,
        "offsets are dense"
    );

    // Reads from each replica return the same committed log.
    for node in 0..3 {
        let log = read_all(&client, node, end).await;
        assert_eq!(log.len(), expected.len(), "node {node}");
        for (o, p) in &log {
            assert_eq!(expected.get(o), Some(p), "node {node} offset {o}");
        }
    }

    // The subscription delivered exactly the committed log (it survives the middle's restart:
    // it is attached to the tail).
    let mut seen = vec![];
    while seen.len() < expected.len() {
        let got = tokio::time::timeout(Duration::from_secs(20), sub_rx.recv())
            .await
            .expect("subscription keeps up")
            .expect("subscription open");
        seen.push(got);
    }
    for (i, (o, p)) in seen.iter().enumerate() {
        assert_eq!(*o, i as u64, "subscription offsets in order");
        assert_eq!(expected.get(o), Some(p), "subscription offset {o}");
    }

    // All three data directories hold identical committed logs, byte for byte.
    for s in &mut chain.servers {
        tokio::task::block_in_place(|| s.stop());
    }
    let logs: Vec<Vec<bytes::Bytes>> = chain
        .dirs
        .iter()
        .map(|d| stored_batches(d, LogId::from_name("default")))
        .collect();
    let committed = |v: &Vec<bytes::Bytes>| -> Vec<bytes::Bytes> {
        v.iter()
            .filter(|b| {
                chainlog_core::record::BatchHeader::decode(b)
                    .map(|h| h.end_offset() <= end)
                    .unwrap_or(false)
            })
            .cloned()
            .collect()
    };
    let head = committed(&logs[0]);
    assert!(!head.is_empty());
    assert_eq!(head, committed(&logs[1]), "head and middle differ");
    assert_eq!(head, committed(&logs[2]), "head and tail differ");
}

/// Reads `log` at `from` pinned to `node` until the answer is not a transient error (a node
/// restarting, a trim still travelling down the chain); returns the first offset read or the
/// error code.
async fn read_first(
    client: &Client,
    node: usize,
    from: Offset,
    until: impl Fn(&Result<Option<u64>, Option<chainlog_core::ErrorCode>>) -> bool,
) -> Result<Option<u64>, Option<chainlog_core::ErrorCode>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = client
            .read_with(
                "default",
                from,
                &ReadOptions {
                    max_records: 1,
                    node: Some(node),
                    ..ReadOptions::default()
                },
            )
            .await
            .map(|r| r.records.first().map(|x| x.offset.0))
            .map_err(|e| e.code());
        if until(&r) || std::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_holds_on_every_replica_and_across_restarts() {
    use chainlog_core::ErrorCode;
    let mut chain = start_chain();
    let client = Client::connect(client_cfg(&chain)).await.expect("connect");
    for i in 0..40u32 {
        client
            .append("default", format!("r{i}").into_bytes())
            .await
            .expect("append");
    }
    // Far inside the first segment: nothing is deleted, but reads start at 17 from now on.
    assert_eq!(
        client.trim("default", Offset(17)).await.expect("trim"),
        Offset(17)
    );
    let trimmed =
        |r: &Result<Option<u64>, Option<ErrorCode>>| *r == Err(Some(ErrorCode::OffsetTrimmed));
    let at_17 = |r: &Result<Option<u64>, Option<ErrorCode>>| *r == Ok(Some(17));
    for node in 0..3 {
        assert!(
            trimmed(&read_first(&client, node, Offset(3), trimmed).await),
            "node {node} still serves offset 3 after the trim"
        );
        assert!(at_17(&read_first(&client, node, Offset(17), at_17).await));
    }
    // Every node restarts (killed, not stopped): the trim point was durable before the trim
    // was answered or passed on.
    for s in &mut chain.servers {
        tokio::task::block_in_place(|| s.restart());
    }
    for node in 0..3 {
        let r = read_first(&client, node, Offset(3), |r| {
            trimmed(r) || matches!(r, Ok(Some(_)))
        })
        .await;
        assert!(
            trimmed(&r),
            "node {node} serves offset 3 again after a restart: {r:?}"
        );
        assert!(at_17(&read_first(&client, node, Offset(17), at_17).await));
    }
}
