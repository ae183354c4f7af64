//! chainlog-client: async (tokio) and blocking clients for a chainlog cluster.
//!
//! A [`Client`] is a cheap-to-clone handle. It keeps one pipelined TCP connection per node
//! (reopened after a failure), sends appends to the chain's head (following `NotHead`
//! redirects), spreads reads over the replicas (or pins one), and merges concurrent appends to
//! the same log into one batch (see [`Producer`]). Appends are idempotent: every batch carries
//! this client's producer id and a per-log sequence, and a retry re-sends the same bytes, so
//! the server stores it once.
//!
//! ```no_run
//! use chainlog_client::{Client, ClientConfig, Offset};
//!
//! # async fn demo() -> chainlog_client::Result<()> {
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7400"])).await?;
//! client.create_log("orders").await.ok(); // may already exist
//! let at: Offset = client.append("orders", "first order").await?;
//! let (base, count) = client.append_batch("orders", &["a", "b", "c"]).await?;
//! assert_eq!(count, 3);
//! for r in client.read("orders", at, 100).await? {
//!     println!("{} {:?}", r.offset, r.payload);
//! }
//! let mut sub = client.subscribe("orders", base).await?;
//! while let Some(r) = sub.next().await {
//!     let r = r?;
//!     println!("{}: {} bytes", r.offset, r.payload.len());
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
// Tests may unwrap (common rules); library code may not.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod blocking;
mod client;
mod conn;
mod error;
mod producer;
mod routing;
mod subscribe;

pub use blocking::{BlockingClient, BlockingSubscription};
pub use client::{Client, ReadOptions, ReadResult};
pub use error::{Error, Result};
pub use producer::{AppendTicket, Producer};
pub use subscribe::Subscription;

pub use bytes::Bytes;
pub use chainlog_core::{ClusterId, ErrorCode, LogId, Offset, ProducerId};

use chainlog_core::limits::{
    BATCH_BYTES_MAX, CONNECTIONS_MAX, CONNECTION_REQUESTS_MAX, PRODUCER_BATCHES_IN_FLIGHT_MAX,
};

/// Most subscriptions a client may be configured to hold (one connection each): a node's
/// default connection limit.
const SUBSCRIPTIONS_MAX: usize = CONNECTIONS_MAX;
use chainlog_core::record::{HEADER_LEN, RECORD_OVERHEAD};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Address the CLI and [`ClientConfig::default`] use.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7400";

/// One record read back from a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: Offset,
    /// A zero-copy slice of the reply that carried it.
    pub payload: Bytes,
    /// The producer's wall clock when it built the batch, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

/// Client settings. Every field has a default; [`ClientConfig::validate`] checks the minimums.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// Nodes' client addresses (`host:port`). Appends start at the first and follow `NotHead`
    /// redirects; reads go round-robin over all. Default `["127.0.0.1:7400"]`; 1..=64 entries.
    pub addrs: Vec<String>,
    /// Cluster to talk to; 0 (default) accepts the first node's and then requires the same
    /// from every other node.
    pub cluster_id: ClusterId,
    /// Pin reads (and subscriptions, status) to `addrs[i]`. Default `None`: round-robin.
    pub read_from: Option<usize>,
    /// Per-request deadline, including waiting for an in-flight slot. Default 10 000; min 1.
    pub request_timeout_ms: u64,
    /// TCP connect plus handshake deadline. Default 5 000; min 1.
    pub connect_timeout_ms: u64,
    /// Requests in flight per connection. Default 1024; 1..=4096 (the server's limit).
    pub in_flight_max: usize,
    /// How long a batch waits for more appends once it has one. Default 0: a batch is sent as
    /// soon as there is room in the in-flight window (after letting tasks that are already
    /// runnable add theirs: one scheduler yield, no timer), so batches grow only under load.
    pub linger_us: u64,
    /// Target batch size; appends merge until it is reached. A single `append_batch` larger
    /// than this is still sent whole. Default 1 MiB; 84..=4 MiB.
    pub batch_bytes_max: usize,
    /// Batches in flight per log. Default 8; 1..=16 (`PRODUCER_BATCHES_IN_FLIGHT_MAX`: the
    /// replicas deduplicate a retry of any batch in that window).
    pub batches_in_flight_max: usize,
    /// Payload bytes accepted but not yet acknowledged, over all logs; `append` waits for room.
    /// Default 64 MiB; min 4 MiB (one largest batch).
    pub buffer_bytes_max: usize,
    /// Attach a producer id and sequences so retries are deduplicated. Default true.
    pub idempotent: bool,
    /// Attempts after the first for a retriable failure. Default 10.
    pub retries_max: u32,
    /// First retry delay, doubled per attempt up to 1 s. Default 10; min 1.
    pub retry_backoff_ms: u64,
    /// Bytes of batches asked for per read request. Default 1 MiB; min 1.
    pub read_bytes_max: u32,
    /// Subscriptions open at once; each holds a connection of its own, so past this
    /// `subscribe` fails with `LimitExceeded` instead of taking every slot a node has.
    /// Default 64; 1..=1024 (a node's default connection limit).
    pub subscriptions_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addrs: vec![DEFAULT_ADDR.to_string()],
            cluster_id: ClusterId(0),
            read_from: None,
            request_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            in_flight_max: 1024,
            linger_us: 0,
            batch_bytes_max: 1 << 20,
            batches_in_flight_max: 8,
            buffer_bytes_max: 64 << 20,
            idempotent: true,
            retries_max: 10,
            retry_backoff_ms: 10,
            read_bytes_max: 1 << 20,
            subscriptions_max: 64,
        }
    }
}

impl ClientConfig {
    /// Defaults with the given node addresses.
    pub fn new<I, S>(addrs: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            addrs: addrs.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.addrs.is_empty() || self.addrs.len() > routing::NODES_MAX {
            return bad(format!("need 1..={} addresses", routing::NODES_MAX));
        }
        if let Some(a) = self.addrs.iter().find(|a| !a.contains(':')) {
            return bad(format!("address {a:?} is not host:port"));
        }
        if let Some(i) = self.read_from {
            if i >= self.addrs.len() {
                return bad(format!(
                    "read_from {i} but only {} addresses",
                    self.addrs.len()
                ));
            }
        }
        if !(1..=SUBSCRIPTIONS_MAX).contains(&self.subscriptions_max) {
            return bad(format!("subscriptions_max must be 1..={SUBSCRIPTIONS_MAX}"));
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return bad("timeouts must be at least 1 ms".into());
        }
        if self.in_flight_max == 0 || self.in_flight_max > CONNECTION_REQUESTS_MAX {
            return bad(format!(
                "in_flight_max must be 1..={CONNECTION_REQUESTS_MAX}"
            ));
        }
        let batch_min = HEADER_LEN + RECORD_OVERHEAD;
        if self.batch_bytes_max < batch_min || self.batch_bytes_max > BATCH_BYTES_MAX {
            return bad(format!(
                "batch_bytes_max must be {batch_min}..={BATCH_BYTES_MAX}"
            ));
        }
        if self.batches_in_flight_max == 0
            || self.batches_in_flight_max > PRODUCER_BATCHES_IN_FLIGHT_MAX
        {
            return bad(format!(
                "batches_in_flight_max must be 1..={PRODUCER_BATCHES_IN_FLIGHT_MAX} (the batches \
                 per producer every replica remembers for deduplicating retries)"
            ));
        }
        if self.buffer_bytes_max < BATCH_BYTES_MAX || self.buffer_bytes_max > u32::MAX as usize {
            return bad(format!(
                "buffer_bytes_max must be {BATCH_BYTES_MAX}..=4 GiB"
            ));
        }
        if self.retry_backoff_ms == 0 || self.read_bytes_max == 0 {
            return bad("retry_backoff_ms and read_bytes_max must be at least 1".into());
        }
        Ok(())
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Delay before retry number `attempt` (1-based).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let ms = self
            .retry_backoff_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
            .min(1000);
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_checked() {
        ClientConfig::default().validate().unwrap();
        let mut c = ClientConfig::new(["a:1", "b:2"]);
        c.validate().unwrap();
        c.read_from = Some(2);
        assert!(c.validate().is_err());
        let mut c = ClientConfig::new(["nohost"]);
        assert!(c.validate().is_err());
        c.addrs = vec![];
        assert!(c.validate().is_err());
        let c = ClientConfig {
            batch_bytes_max: 10,
            ..ClientConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ClientConfig {
            in_flight_max: 0,
            ..ClientConfig::default()
        };
        assert!(c.validate().is_err());
        // A window wider than the replicas' dedup memory would turn retries into gaps.
        let c = ClientConfig {
            batches_in_flight_max: PRODUCER_BATCHES_IN_FLIGHT_MAX + 1,
            ..ClientConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = ClientConfig::default();
        assert_eq!(c.backoff(1), Duration::from_millis(10));
        assert_eq!(c.backoff(2), Duration::from_millis(20));
        assert_eq!(c.backoff(40), Duration::from_millis(1000));
    }

    #[test]
    fn config_from_partial_json() {
        let c: ClientConfig = serde_json::from_str(r#"{"addrs":["h:1"],"linger_us":500}"#).unwrap();
        assert_eq!(c.linger_us, 500);
        assert_eq!(c.request_timeout_ms, 10_000);
        c.validate().unwrap();
    }
}
