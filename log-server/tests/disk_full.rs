//! A real server on a small tmpfs fills it: appends then fail with the typed `StorageFull`
//! code, everything acknowledged still reads back (also after SIGKILL and restart, dense from 0),
//! and the server keeps answering reads and status while full; once space is freed, the same
//! process takes appends again without a restart.

mod common;

use chainlog_client::{Client, ClientConfig, Error, ErrorCode};
use common::Server;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Concurrent appenders, so the client also merges appends into multi-record batches.
const WRITERS: usize = 4;
/// Upper bound on append attempts per writer: 24 MiB of tmpfs holds far fewer 64 KiB records.
const ATTEMPTS_MAX: u64 = 2000;
const PAYLOAD_BYTES: usize = 64 << 10;

/// A tmpfs mounted on a fresh temp dir; unmounted (then the dir removed) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `Err(reason)` when mounting is not possible here (not root, no mount permission).
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file open; detach so the mount never outlives the test.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

fn payload(writer: usize, i: u64) -> Vec<u8> {
    let mut p = format!("w{writer}-{i:06}-").into_bytes();
    let fill = b'a' + ((writer as u64 * 7 + i) % 26) as u8;
    p.resize(PAYLOAD_BYTES, fill);
    p
}

fn client_config(addr: SocketAddr) -> ClientConfig {
    let mut c = ClientConfig::new([addr.to_string()]);
    c.request_timeout_ms = 5000;
    c.retries_max = 0;
    c
}

/// Appends from `WRITERS` tasks until each sees an error; returns acked (offset → payload) and
/// every error seen.
async fn fill(addr: SocketAddr) -> (BTreeMap<u64, Vec<u8>>, Vec<Error>) {
    let client = Client::connect(client_config(addr)).await.expect("connect");
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = vec![];
    for w in 0..WRITERS {
        let client = client.clone();
        let acked = acked.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..ATTEMPTS_MAX {
                let p = payload(w, i);
                match client.append("default", p.clone()).await {
                    Ok(off) => {
                        let prev = acked.lock().expect("lock").insert(off.0, p);
                        assert!(prev.is_none(), "offset {off} acknowledged twice");
                    }
                    Err(e) => {
                        errors.lock().expect("lock").push(e);
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("writers stop")
            .expect("join");
    }
    let a = acked.lock().expect("lock").clone();
    let e = errors.lock().expect("lock").clone();
    (a, e)
}

/// Every acknowledged record is stored identical, and the stored log is dense from 0.
fn check_log(log: &[(u64, Vec<u8>)], acked: &BTreeMap<u64, Vec<u8>>, when: &str) {
    for (i, (o, _)) in log.iter().enumerate() {
        assert_eq!(*o, i as u64, "{when}: offsets are dense from 0");
    }
    let stored: BTreeMap<u64, &Vec<u8>> = log.iter().map(|(o, p)| (*o, p)).collect();
    for (o, p) in acked {
        assert!(
            stored.get(o) == Some(&p),
            "{when}: acknowledged offset {o} lost or changed"
        );
    }
}

fn write_config(path: &Path, data: &Path, addr: SocketAddr) {
    let toml = format!(
        "listen = \"{addr}\"\ndir = \"{}\"\n[storage]\nsegment_bytes = 1048576\nio_mode = \"buffered\"\n",
        data.display()
    );
    std::fs::write(path, toml).expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gives_storage_full_and_loses_nothing_acknowledged() {
    // Config and server log live outside the tmpfs: only the data directory fills up.
    let outside = tempfile::tempdir().expect("tempdir");
    let fs = match Tmpfs::mount("24m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED full_disk test: {why}");
            return;
        }
    };
    let data: PathBuf = fs.path().join("n1");
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let cfg = outside.path().join("node.toml");
    write_config(&cfg, &data, addr);
    let started = Instant::now();
    let mut server = Server::start(
        addr,
        vec!["run".into(), "--config".into(), cfg.display().to_string()],
        outside.path().join("n1.log"),
    );

    let (acked, errors) = fill(addr).await;
    eprintln!(
        "full after {} acknowledged records ({} KiB); errors seen: {errors:?}",
        acked.len(),
        acked.len() * PAYLOAD_BYTES / 1024
    );
    assert!(!acked.is_empty(), "nothing was acknowledged");
    assert!(
        !errors.is_empty(),
        "the disk never filled within {ATTEMPTS_MAX} appends per writer"
    );
    let log = server.server_log();
    for e in &errors {
        assert_eq!(
            e.code(),
            Some(ErrorCode::StorageFull),
            "a full disk must give the typed StorageFull error, got {e:?}\nserver log:\n{log}"
        );
    }

    // While full: the server still answers reads of everything acknowledged, status, and a
    // fresh append gets the same typed error instead of hanging.
    let client = Client::connect(client_config(addr))
        .await
        .expect("connect while full");
    check_log(
        &common::read_everything(&client).await,
        &acked,
        "while full",
    );
    let status = client.status().await.expect("status while full");
    assert!(status.is_object(), "status: {status}");
    let again = client
        .append("default", payload(99, 0))
        .await
        .expect_err("append on a full disk");
    eprintln!("append while full: {again:?}");
    assert_eq!(again.code(), Some(ErrorCode::StorageFull), "{again:?}");
    drop(client);

    // SIGKILL and restart on the same (still full) directory: nothing acknowledged is lost.
    // (Blocking is fine here: the test body is not on a runtime worker thread.)
    server.restart();
    let client = Client::connect(client_config(addr))
        .await
        .expect("connect after restart");
    let mut acked = acked;
    let after = common::read_everything(&client).await;
    check_log(&after, &acked, "after SIGKILL + restart");

    // The restarted server still refuses with the typed error when out of room; should the
    // recovered tail segment have room left, the append must then be durable like any other.
    let p = payload(98, 0);
    match client.append("default", p.clone()).await {
        Ok(off) => {
            eprintln!("append after restart acknowledged at {off}");
            acked.insert(off.0, p);
            check_log(
                &common::read_everything(&client).await,
                &acked,
                "after restart",
            );
        }
        Err(e) => {
            eprintln!("append after restart: {e:?}");
            assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e:?}");
        }
    }
    eprintln!(
        "after restart: {} stored, {} acknowledged; test took {:?}",
        after.len(),
        acked.len(),
        started.elapsed()
    );
    drop(client);
    // The server must be gone before the tmpfs is unmounted.
    server.kill9();
    drop(server);
    drop(fs);
}

/// A 24 MiB tmpfs with a filler file of `bytes` in it (deleting the filler is "the operator
/// frees space"), or None with a printed reason when it cannot be mounted here.
fn filled_tmpfs(bytes: usize, test: &str) -> Option<(Tmpfs, PathBuf)> {
    let fs = match Tmpfs::mount("24m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED full_disk {test} test: {why}");
            return None;
        }
    };
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0x5au8; bytes]).expect("write filler");
    Some((fs, filler))
}

/// Bytes of the filler file that takes most of the tmpfs before the server starts; deleting
/// it is "the operator frees space".
const FILLER_BYTES: usize = 12 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_failed_full_takes_appends_again_once_space_is_freed() {
    let outside = tempfile::tempdir().expect("tempdir");
    let Some((fs, filler)) = filled_tmpfs(FILLER_BYTES, "reopen") else {
        return;
    };
    let data: PathBuf = fs.path().join("n1");
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let cfg = outside.path().join("node.toml");
    write_config(&cfg, &data, addr);
    let mut server = Server::start(
        addr,
        vec!["run".into(), "--config".into(), cfg.display().to_string()],
        outside.path().join("n1.log"),
    );

    let (mut acked, errors) = fill(addr).await;
    assert!(!acked.is_empty(), "nothing was acknowledged");
    assert!(!errors.is_empty(), "the disk never filled");
    for e in &errors {
        assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e:?}");
    }
    let client = Client::connect(client_config(addr))
        .await
        .expect("connect while full");
    let again = client
        .append("default", payload(97, 0))
        .await
        .expect_err("append on a full disk");
    assert_eq!(again.code(), Some(ErrorCode::StorageFull), "{again:?}");

    // The operator frees space; the same server process takes appends again on its own.
    std::fs::remove_file(&filler).expect("remove filler");
    let freed = Instant::now();
    let mut attempts = 0u64;
    let first = loop {
        attempts += 1;
        let p = payload(97, attempts);
        match client.append("default", p.clone()).await {
            Ok(off) => break (off.0, p),
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e:?}");
                assert!(
                    freed.elapsed() < Duration::from_secs(60),
                    "still full a minute after space was freed\nserver log:\n{}",
                    server.server_log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!(
        "appends resumed {:?} after space was freed ({attempts} attempts)",
        freed.elapsed()
    );
    let prev = acked.insert(first.0, first.1);
    assert!(prev.is_none(), "offset {} acknowledged twice", first.0);
    for i in 0..8 {
        let p = payload(96, i);
        let off = client
            .append("default", p.clone())
            .await
            .expect("append after reopen");
        assert!(
            acked.insert(off.0, p).is_none(),
            "offset {off} acknowledged twice"
        );
    }
    check_log(
        &common::read_everything(&client).await,
        &acked,
        "after space was freed",
    );
    let log = server.server_log();
    assert!(log.contains("reopened"), "server log:\n{log}");
    drop(client);

    // And the log is the same after a restart.
    server.restart();
    let client = Client::connect(client_config(addr))
        .await
        .expect("connect after restart");
    check_log(
        &common::read_everything(&client).await,
        &acked,
        "after reopen + SIGKILL + restart",
    );
    drop(client);
    server.kill9();
    drop(server);
    drop(fs);
}

/// A chain of two whose head's disk fills: the head fails the log, the tail may hold batches
/// the head forwarded but could not store; once space is freed the head reopens, adopts what
/// the tail kept, and the chain takes appends again with both replicas identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_head_of_a_chain_resumes_once_space_is_freed() {
    let outside = tempfile::tempdir().expect("tempdir");
    // Leaves a few MiB: this chain fills them one append at a time.
    let Some((fs, filler)) = filled_tmpfs(18 << 20, "chain") else {
        return;
    };
    let addrs: Vec<SocketAddr> = (0..2)
        .map(|_| {
            format!("127.0.0.1:{}", common::free_port())
                .parse()
                .expect("addr")
        })
        .collect();
    let nodes: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ id = {}, addr = \"{a}\" }}", i + 1))
        .collect();
    // The head's data on the small tmpfs, the tail's outside it.
    let dirs = [fs.path().join("n1"), outside.path().join("n2")];
    let mut servers = vec![];
    for i in (0..2).rev() {
        let cfg = format!(
            "cluster_id = 0x5eed\nnode_id = {}\nlisten = \"{}\"\ndir = \"{}\"\n[chain]\nepoch = 1\n\
             nodes = [{}]\n[storage]\nsegment_bytes = 1048576\nio_mode = \"buffered\"\n",
            i + 1,
            addrs[i],
            dirs[i].display(),
            nodes.join(", ")
        );
        let path = outside.path().join(format!("node-{}.toml", i + 1));
        std::fs::write(&path, cfg).expect("config");
        servers.push(Server::start(
            addrs[i],
            vec!["run".into(), "--config".into(), path.display().to_string()],
            outside.path().join(format!("node-{}.log", i + 1)),
        ));
    }
    servers.reverse();
    let mut cc = ClientConfig::new(addrs.iter().map(|a| a.to_string()));
    cc.request_timeout_ms = 2000;
    cc.retries_max = 0;
    let client = Client::connect(cc).await.expect("connect");

    let mut acked = BTreeMap::new();
    let mut full = None;
    for i in 0..ATTEMPTS_MAX * WRITERS as u64 {
        let p = payload(0, i);
        match client.append("default", p.clone()).await {
            Ok(off) => assert!(acked.insert(off.0, p).is_none(), "{off} acked twice"),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    // The append whose write hit the full disk was already forwarded: the tail may keep it,
    // so the head neither commits nor refuses it until it rejoins (the client times out and,
    // its retries spent, says the outcome is unknown). Later appends are refused outright.
    let e = full.expect("the head's disk never filled");
    eprintln!("first error: {e:?}");
    let in_doubt_after_timeout =
        matches!(&e, Error::InDoubt { cause } if matches!(**cause, Error::Timeout { .. }));
    assert!(
        in_doubt_after_timeout || e.code() == Some(ErrorCode::StorageFull),
        "{e:?}\nhead log:\n{}",
        servers[0].server_log()
    );

    std::fs::remove_file(&filler).expect("remove filler");
    let freed = Instant::now();
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let p = payload(1, attempts);
        match client.append("default", p.clone()).await {
            Ok(off) => {
                assert!(acked.insert(off.0, p).is_none(), "{off} acked twice");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e:?}");
                assert!(
                    freed.elapsed() < Duration::from_secs(60),
                    "still full a minute after space was freed\nhead log:\n{}",
                    servers[0].server_log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!(
        "chain resumed {:?} after space was freed ({attempts} attempts)",
        freed.elapsed()
    );
    for i in 0..8 {
        let p = payload(2, i);
        let off = client
            .append("default", p.clone())
            .await
            .expect("append after reopen");
        assert!(acked.insert(off.0, p).is_none(), "{off} acked twice");
    }
    let head = common::read_everything_from(&client, Some(0)).await;
    let tail = common::read_everything_from(&client, Some(1)).await;
    check_log(&head, &acked, "head after space was freed");
    check_log(&tail, &acked, "tail after space was freed");
    let n = head.len().min(tail.len());
    assert_eq!(head[..n], tail[..n], "replicas differ");
    drop(client);
    for s in &mut servers {
        s.kill9();
    }
    drop(servers);
    drop(fs);
}
