//! Test harness: real `log-server` processes on loopback, and a minimal raw-wire client.
#![allow(dead_code)]

use bytes::Bytes;
use chainlog_core::types::ClusterId;
use chainlog_core::wire::{
    ClientReply, ClientRequest, FrameHeader, Hello, Kind, Role, FRAME_HEADER_LEN, PROTOCOL_VERSION,
};
use chainlog_core::Epoch;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Three consecutive free loopback ports (for `log-server dev --port P`).
pub fn free_port_run() -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base < 65000 && (1..3).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

/// A `log-server` child process; killed on drop.
pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl Server {
    /// Starts `log-server` with `args` and waits until `addr` accepts connections.
    pub fn start(addr: SocketAddr, args: Vec<String>, log: PathBuf) -> Server {
        let mut s = Server {
            child: None,
            addr,
            args,
            log,
        };
        s.spawn();
        s
    }

    pub fn single(dir: &Path, io_mode: &str) -> Server {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        Server::start(
            addr,
            vec![
                "run".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--io-mode".into(),
                io_mode.into(),
            ],
            dir.with_extension("log"),
        )
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_log-server"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn log-server");
        self.child = Some(child);
        wait_listening(self.addr, Duration::from_secs(30), self.child.as_mut());
    }

    /// SIGKILL: no shutdown path runs, unsynced page-cache data may or may not survive.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_listening(addr: SocketAddr, within: Duration, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Some(c) = child.as_deref_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("log-server exited early with {st}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "log-server did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A blocking raw-wire connection for tests that must send exactly the bytes they choose.
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Raw { s }
    }

    /// Connects and says Hello as a client of `cluster` (0 = any).
    pub fn client(addr: SocketAddr, cluster: u64) -> (Raw, Result<(), ClientReply>) {
        let mut r = Raw::connect(addr);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            cluster_id: ClusterId(cluster),
            role: Role::Client,
            epoch: Epoch(0),
        };
        r.send_bytes(&hello.encode(0).to_vec());
        let (h, body) = r.recv().expect("hello reply");
        if h.kind == Kind::HelloOk as u16 {
            (r, Ok(()))
        } else {
            let reply = ClientReply::decode(h.kind, body).expect("error frame");
            (r, Err(reply))
        }
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    pub fn request(&mut self, id: u64, req: &ClientRequest) -> ClientReply {
        self.send_bytes(&req.encode(id).to_vec());
        let (h, body) = self.recv().expect("reply");
        assert_eq!(h.request_id, id);
        ClientReply::decode(h.kind, body).expect("decode reply")
    }

    /// The next frame, or None on a clean close / reset.
    pub fn recv(&mut self) -> Option<(FrameHeader, Bytes)> {
        let mut hb = [0u8; FRAME_HEADER_LEN];
        self.s.read_exact(&mut hb).ok()?;
        let h = FrameHeader::decode(&hb).ok()?;
        let mut body = vec![0u8; h.body_len as usize];
        self.s.read_exact(&mut body).ok()?;
        Some((h, Bytes::from(body)))
    }
}

/// Every committed record of the log "default", read from offset 0 through `client` until a read
/// comes back empty exactly at the committed end.
pub async fn read_everything(client: &chainlog_client::Client) -> Vec<(u64, Vec<u8>)> {
    read_everything_from(client, None).await
}

/// The log "default"'s start on the node `client` talks to (its storage's first offset).
#[allow(dead_code)] // not every test binary trims
pub async fn log_start(client: &chainlog_client::Client) -> u64 {
    let st = client.status().await.expect("status");
    st["storage"]["logs"]
        .as_array()
        .and_then(|logs| logs.iter().find(|l| l["name"] == "default"))
        .and_then(|l| l["start"].as_u64())
        .expect("status names the log's start")
}

/// Every committed record of the log "default" from offset `from` (see [`read_everything`]).
#[allow(dead_code)] // not every test binary trims
pub async fn read_everything_at(
    client: &chainlog_client::Client,
    from: u64,
) -> Vec<(u64, Vec<u8>)> {
    read_range(client, None, from).await
}

/// [`read_everything`] as one node serves it (`Some(index)` into the client's node list; a
/// pinned read waits up to 5 s for that node to learn the commit).
#[allow(dead_code)] // not every test binary reads from a pinned node
pub async fn read_everything_from(
    client: &chainlog_client::Client,
    node: Option<usize>,
) -> Vec<(u64, Vec<u8>)> {
    read_range(client, node, 0).await
}

async fn read_range(
    client: &chainlog_client::Client,
    node: Option<usize>,
    from: u64,
) -> Vec<(u64, Vec<u8>)> {
    use chainlog_client::{Offset, ReadOptions};
    let mut out = vec![];
    let mut from = Offset(from);
    let opts = ReadOptions {
        max_records: 10_000,
        node,
        wait: match node {
            Some(_) => std::time::Duration::from_secs(5),
            None => std::time::Duration::ZERO,
        },
        ..ReadOptions::default()
    };
    loop {
        let r = client
            .read_with("default", from, &opts)
            .await
            .expect("read");
        if r.records.is_empty() {
            assert_eq!(
                from, r.committed_end,
                "read stopped before the committed end (node {node:?})"
            );
            return out;
        }
        for rec in r.records {
            out.push((rec.offset.0, rec.payload.to_vec()));
            from = rec.offset.plus(1);
        }
    }
}
