//! The loopback floor: a tokio TCP ping-pong of one small frame on 127.0.0.1 between two event
//! loops on different threads (as a chain hop runs between two processes), the cost of one hop
//! of the chain with nothing else in it.

use crate::hist::{LatencyHist, LatencySummary};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest frame the ping-pong sends (its buffers are allocated up front).
pub const FRAME_BYTES_MAX: usize = 1 << 20;

/// Result of one loopback measurement.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LoopbackResult {
    pub frame_bytes: usize,
    pub round_trips: u64,
    pub rtt: LatencySummary,
}

/// Ping-pongs a `frame_bytes` frame over one loopback TCP connection for `duration` (after a
/// short warm-up) and returns the round-trip distribution.
pub async fn loopback_rtt(
    frame_bytes: usize,
    duration: Duration,
) -> anyhow::Result<LoopbackResult> {
    anyhow::ensure!(
        (1..=FRAME_BYTES_MAX).contains(&frame_bytes),
        "frame bytes must be 1..={FRAME_BYTES_MAX}"
    );
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    // The echo side runs its own event loop on its own thread: each round trip then includes
    // the wake-up of a sleeping peer, as every real hop does (same-runtime ping-pong does not).
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener)?;
            let (mut s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            let mut buf = vec![0u8; frame_bytes];
            loop {
                match s.read_exact(&mut buf).await {
                    Ok(_) => s.write_all(&buf).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })
    });
    let mut c = TcpStream::connect(addr)
        .await
        .context("connecting loopback")?;
    c.set_nodelay(true)?;
    let out = vec![0x5au8; frame_bytes];
    let mut back = vec![0u8; frame_bytes];
    // Warm-up: first round trips pay for page faults and the scheduler's first wake-ups.
    let warm_until = Instant::now() + duration / 10;
    while Instant::now() < warm_until {
        c.write_all(&out).await?;
        c.read_exact(&mut back).await?;
    }
    let mut h = LatencyHist::new();
    let end = Instant::now() + duration;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        c.write_all(&out).await?;
        c.read_exact(&mut back).await?;
        h.record(t0.elapsed());
    }
    drop(c);
    tokio::task::spawn_blocking(move || echo.join())
        .await
        .context("joining the echo thread")?
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
        .context("echo thread i/o")?;
    Ok(LoopbackResult {
        frame_bytes,
        round_trips: h.count(),
        rtt: h.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ping_pong_measures_round_trips() {
        let r = loopback_rtt(64, Duration::from_millis(50)).await.unwrap();
        assert!(r.round_trips > 0);
        assert!(r.rtt.p50_us > 0.0 && r.rtt.p50_us <= r.rtt.max_us);
        assert!(loopback_rtt(0, Duration::from_millis(1)).await.is_err());
    }
}
