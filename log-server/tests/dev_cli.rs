//! The README's first command and the CLI, end to end: `log-server dev` starts a 3-node chain,
//! `chainlog` appends, reads from the head and the tail, tails and reports status, and Ctrl-C
//! stops every node cleanly.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `chainlog` CLI is built by another package; it sits next to `log-server`.
fn chainlog_bin() -> Option<PathBuf> {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_log-server"));
    let p = server.with_file_name("chainlog");
    p.exists().then_some(p)
}

fn cli(bin: &PathBuf, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chainlog");
    {
        let mut i = c.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    let out = c.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `read` from a replica other than the head, right after an append the head acknowledged:
/// a replica serves what it knows committed, and learns the commit within a hop's delay (the
/// head's idle `Commit`), so until then it may print a prefix of `want` (on a loaded machine
/// the CLI can start and read before that). Retries while it does, for a bounded time.
fn read_replica(bin: &PathBuf, args: &[&str], want: &str) -> (i32, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (rc, out, err) = cli(bin, args, None);
        if rc != 0 || out == want || !want.starts_with(out.as_str()) {
            return (rc, format!("{out}{err}"));
        }
        if std::time::Instant::now() >= deadline {
            return (rc, out);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `log-server dev`, killed when dropped: a failing assertion must not leave the
/// chain running (CI found one still up minutes after the test that started it failed).
struct DevChain(std::process::Child);

impl std::ops::Deref for DevChain {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for DevChain {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for DevChain {
    fn drop(&mut self) {
        // Already exited (the test stopped it) or not: either way it is gone after this.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `log-server dev` with `nodes` nodes on free ports, data under `dir`, and `extra` flags;
/// returns once every node listens, with the head's port.
fn start_dev(dir: &std::path::Path, nodes: u16, extra: &[&str]) -> (DevChain, u16) {
    let port = common::free_port_run();
    let mut dev = DevChain(
        Command::new(env!("CARGO_BIN_EXE_log-server"))
            .args([
                "dev",
                "--nodes",
                &nodes.to_string(),
                "--port",
                &port.to_string(),
            ])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn log-server dev"),
    );
    for i in 0..nodes {
        let a: SocketAddr = format!("127.0.0.1:{}", port + i).parse().expect("addr");
        common::wait_listening(a, Duration::from_secs(30), Some(&mut dev));
    }
    (dev, port)
}

#[test]
fn dev_chain_and_cli() {
    let Some(bin) = chainlog_bin() else {
        eprintln!("skipping: the chainlog binary is not built (scripts/test.sh builds it)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut dev, port) = start_dev(&tmp.path().join("data"), 3, &[]);
    let head = format!("127.0.0.1:{port}");
    let tail = format!("127.0.0.1:{}", port + 2);

    let (rc, out, err) = cli(
        &bin,
        &["--addr", &head, "append"],
        Some("alpha\nbeta\ngamma\n"),
    );
    assert_eq!(rc, 0, "append failed: {out} {err}");
    assert!(
        out.contains("3 records") && out.contains("0..=2"),
        "append said: {out}"
    );

    let (rc, out, err) = cli(&bin, &["--addr", &head, "read", "--from", "0"], None);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, "alpha\nbeta\ngamma\n");

    // The tail replica serves the same committed records.
    let args = ["--addr", &tail, "read", "--from", "1", "--count", "2"];
    let want = "beta\ngamma\n";
    assert_eq!(read_replica(&bin, &args, want), (0, want.to_string()));

    // Appending through the tail follows the redirect to the head.
    let (rc, out, err) = cli(&bin, &["--addr", &tail, "append"], Some("delta\n"));
    assert_eq!(rc, 0, "append via tail: {out} {err}");

    let (rc, out, err) = cli(&bin, &["--addr", &head, "tail", "-n", "2"], None);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, "gamma\ndelta\n");

    // `tail -f` follows: a record appended after it started shows up on its output.
    {
        use std::io::{BufRead, BufReader};
        let mut follow = Command::new(&bin)
            .args(["--addr", &tail, "tail", "-n", "1", "-f"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tail -f");
        // Watchdog: a follower that never prints must fail the test, not hang it.
        let pid = follow.id().to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            let _ = Command::new("kill").args(["-9", &pid]).status();
        });
        let mut lines = BufReader::new(follow.stdout.take().expect("stdout")).lines();
        assert_eq!(lines.next().expect("a line").expect("utf-8"), "delta");
        let (rc, _, err) = cli(&bin, &["--addr", &head, "append"], Some("epsilon\n"));
        assert_eq!(rc, 0, "{err}");
        assert_eq!(
            lines.next().expect("a followed line").expect("utf-8"),
            "epsilon"
        );
        let _ = follow.kill();
        let _ = follow.wait();
    }

    let (rc, out, err) = cli(&bin, &["--addr", &head, "create-log", "orders"], None);
    assert_eq!(rc, 0, "create-log: {out} {err}");
    let (rc, _, err) = cli(
        &bin,
        &["--addr", &head, "append", "--log", "orders"],
        Some("o1\n"),
    );
    assert_eq!(rc, 0, "{err}");
    let args = ["--addr", &tail, "read", "--log", "orders", "--from", "0"];
    assert_eq!(read_replica(&bin, &args, "o1\n"), (0, "o1\n".to_string()));

    let (rc, out, err) = cli(&bin, &["--addr", &head, "status", "--json"], None);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status is JSON");
    let doc = if v.is_array() { v[0].clone() } else { v };
    assert_eq!(doc["chain"].as_array().map(|a| a.len()), Some(3));
    let logs = doc["replica"]["logs"].as_array().expect("logs");
    let default = logs
        .iter()
        .find(|l| l["name"] == "default")
        .expect("default log");
    assert_eq!(default["committed_end"], 5);
    // Per-stage histograms: the head timed its appends, its successor's acknowledgements and
    // its own turnaround (request read → forwarded, → handed to storage).
    let stages = &doc["latency_us"];
    for stage in [
        "append",
        "local_durable",
        "successor_ack",
        "received_to_forward",
        "received_to_write",
    ] {
        assert!(
            stages[stage]["count"].as_u64() >= Some(1),
            "{stage}: {stages}"
        );
    }
    assert_eq!(stages["replica_ack"]["count"], 0, "{stages}");
    // Each of these small appends was forwarded and handed to storage in the turn it arrived.
    assert_eq!(
        stages["received_to_forward"]["count"], stages["received_to_write"]["count"],
        "{stages}"
    );
    // The tail timed its turnaround and has no successor to time.
    let (rc, out, err) = cli(&bin, &["--addr", &tail, "status", "--json"], None);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status is JSON");
    let tail_doc = if v.is_array() { v[0].clone() } else { v };
    let stages = &tail_doc["latency_us"];
    assert!(
        stages["replica_ack"]["count"].as_u64() >= Some(1),
        "{stages}"
    );
    assert!(
        stages["received_to_write"]["count"].as_u64() >= Some(1),
        "{stages}"
    );
    assert_eq!(stages["successor_ack"]["count"], 0, "{stages}");
    assert_eq!(stages["received_to_forward"]["count"], 0, "{stages}");
    assert_eq!(stages["append"]["count"], 0, "{stages}");

    // Ctrl-C: every node stops cleanly.
    let pid = dev.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = dev.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "log-server dev did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "dev exited with {status}");
}

/// `dev --cpus` pins every node's threads (core loop, storage, spare preparer, blocking pool)
/// to the list, the chain still serves appends, and a bad list is refused before anything
/// starts.
#[test]
fn dev_cpus_pins_every_node_thread() {
    let allowed = chainlog_hw::cpu::current_thread_cpus().expect("affinity");
    let cpu = allowed[allowed.len() - 1].to_string();
    let tmp = tempfile::tempdir().expect("tempdir");

    let bad = Command::new(env!("CARGO_BIN_EXE_log-server"))
        .args(["dev", "--cpus", "1-x", "--dir"])
        .arg(tmp.path().join("bad"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run log-server dev");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--cpus") && err.contains("\"x\""), "{err}");
    assert!(
        !tmp.path().join("bad").join("node-1").exists(),
        "started anyway"
    );

    let (mut dev, port) = start_dev(&tmp.path().join("data"), 2, &["--cpus", &cpu]);
    if let Some(bin) = chainlog_bin() {
        let head = format!("127.0.0.1:{port}");
        let (rc, out, err) = cli(&bin, &["--addr", &head, "append"], Some("pinned\n"));
        assert_eq!(rc, 0, "append failed: {out} {err}");
    }
    // Every thread but the main one (which only waits for Ctrl-C) runs on the list.
    let mut node_threads = 0;
    let tasks = std::fs::read_dir(format!("/proc/{}/task", dev.id())).expect("task dir");
    for t in tasks {
        let t = t.expect("task").path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        else {
            continue; // the thread ended meanwhile
        };
        if comm.trim() == "log-server" {
            continue;
        }
        node_threads += usize::from(comm.starts_with("node-"));
        assert_eq!(list.trim(), cpu, "thread {} runs on {list}", comm.trim());
    }
    assert_eq!(node_threads, 2);
    let _ = dev.kill();
    let _ = dev.wait();
}
