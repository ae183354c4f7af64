//! Real `log-server` processes for the suite: a single node (`run`) or a local chain (`dev`),
//! on free loopback ports, with their own data directory; killed when dropped.

use anyhow::{bail, Context};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Attempts to find free consecutive ports before giving up.
const PORT_ATTEMPTS_MAX: usize = 64;
/// How long a server gets to start listening on every port.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of a server's log shown when it fails.
const LOG_TAIL_BYTES: usize = 4000;

/// Where the `log-server` binary is: `explicit`, else next to this executable (cargo puts every
/// workspace binary in the same target directory).
pub fn find_server_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "--server-bin {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("locating this executable")?;
    let dir = me.parent().context("executable has no directory")?;
    let p = dir.join("log-server");
    anyhow::ensure!(
        p.is_file(),
        "no log-server next to {} — build it with `cargo build --release -p chainlog-server` \
         (same CARGO_TARGET_DIR) or pass --server-bin",
        me.display()
    );
    Ok(p)
}

/// `n` consecutive free loopback ports. Another process may take one between this check and
/// the server binding it; the server then fails to start and says so.
pub fn free_ports(n: u16) -> anyhow::Result<u16> {
    for _ in 0..PORT_ATTEMPTS_MAX {
        let first = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if u32::from(first) + u32::from(n) > u32::from(u16::MAX) {
            continue;
        }
        let all_free = (1..n).all(|i| TcpListener::bind(("127.0.0.1", first + i)).is_ok());
        if all_free {
            return Ok(first);
        }
    }
    bail!("no {n} consecutive free loopback ports after {PORT_ATTEMPTS_MAX} tries")
}

/// A running server process (one node, or a whole dev chain in one process).
#[derive(Debug)]
pub struct ServerProc {
    child: Child,
    /// Client addresses, head first.
    pub addrs: Vec<String>,
    log_path: PathBuf,
}

impl ServerProc {
    /// `log-server run` on a free port, data in `dir/data`, output in `dir/server.log`.
    /// `cpus`: the server's `--cpus` (its threads' CPU list), if any.
    pub fn single(
        bin: &Path,
        dir: &Path,
        io_mode: &str,
        cpus: Option<&str>,
    ) -> anyhow::Result<ServerProc> {
        let port = free_ports(1)?;
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--dir")
            .arg(dir.join("data"))
            .arg("--listen")
            .arg(&addr)
            .arg("--io-mode")
            .arg(io_mode);
        Self::spawn(cmd, cpus, dir, vec![addr])
    }

    /// `log-server dev --nodes N` on N free consecutive ports, with `extra` arguments (and
    /// `--cpus` if `cpus` is set).
    pub fn chain(
        bin: &Path,
        dir: &Path,
        nodes: u16,
        io_mode: &str,
        cpus: Option<&str>,
        extra: &[String],
    ) -> anyhow::Result<ServerProc> {
        let port = free_ports(nodes)?;
        let addrs = (0..nodes)
            .map(|i| format!("127.0.0.1:{}", port + i))
            .collect();
        let mut cmd = Command::new(bin);
        cmd.arg("dev")
            .arg("--nodes")
            .arg(nodes.to_string())
            .arg("--dir")
            .arg(dir.join("data"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--io-mode")
            .arg(io_mode)
            .args(extra);
        Self::spawn(cmd, cpus, dir, addrs)
    }

    fn spawn(
        mut cmd: Command,
        cpus: Option<&str>,
        dir: &Path,
        addrs: Vec<String>,
    ) -> anyhow::Result<ServerProc> {
        if let Some(c) = cpus {
            cmd.arg("--cpus").arg(c);
        }
        std::fs::create_dir_all(dir)?;
        let log_path = dir.join("server.log");
        let log = File::create(&log_path)?;
        // Per-request logging would be part of what we measure; warnings still reach the log.
        let level = std::env::var("CHAINLOG_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into());
        let child = cmd
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(ServerProc {
            child,
            addrs,
            log_path,
        })
    }

    /// Waits until every node accepts TCP connections, or fails with the server's log.
    pub async fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for addr in self.addrs.clone() {
            loop {
                if let Some(st) = self.child.try_wait()? {
                    bail!(
                        "log-server exited ({st}) while starting:\n{}",
                        self.log_tail()
                    );
                }
                if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{addr} not listening after {timeout:?}:\n{}",
                        self.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// The server process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the log) if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("log-server exited ({st}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The last few KB of the server's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log_path).unwrap_or_default();
        let from = text.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&text[from..]).into_owned()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // The data directory is thrown away, so there is nothing a clean shutdown would save.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ports_are_free() {
        let p = free_ports(3).unwrap();
        for i in 0..3 {
            TcpListener::bind(("127.0.0.1", p + i)).unwrap();
        }
    }

    #[test]
    fn missing_binary_is_explained() {
        let e = find_server_bin(Some(Path::new("/nonexistent/log-server"))).unwrap_err();
        assert!(e.to_string().contains("does not exist"));
    }
}
