//! The blocking client: the async client driven by a runtime it owns, for code without tokio.

use crate::client::{ReadOptions, ReadResult};
use crate::error::{Error, Result};
use crate::{Client, ClientConfig, Record, Subscription};
use bytes::Bytes;
use chainlog_core::{LogId, Offset};
use std::sync::Arc;

/// A blocking handle. Must not be used from inside an async runtime (it would block it).
///
/// ```no_run
/// use chainlog_client::{BlockingClient, ClientConfig, Offset};
///
/// let client = BlockingClient::connect(ClientConfig::default())?;
/// let offset = client.append("default", "hello")?;
/// for record in client.read("default", offset, 10)? {
///     println!("{}: {:?}", record.offset, record.payload);
/// }
/// # Ok::<(), chainlog_client::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BlockingClient {
    client: Client,
    rt: Arc<tokio::runtime::Runtime>,
}

impl BlockingClient {
    /// Starts a one-worker runtime and connects (see [`Client::connect`]).
    pub fn connect(cfg: ClientConfig) -> Result<BlockingClient> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chainlog-client")
            .enable_all()
            .build()
            .map_err(|e| Error::io("local runtime", &e))?;
        let client = rt.block_on(Client::connect(cfg))?;
        Ok(BlockingClient {
            client,
            rt: Arc::new(rt),
        })
    }

    /// The async client underneath (usable from async code running on any runtime's thread
    /// that is not this one's caller).
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn append(&self, log: &str, payload: impl Into<Bytes>) -> Result<Offset> {
        self.rt.block_on(self.client.append(log, payload))
    }

    pub fn append_batch<P: AsRef<[u8]>>(&self, log: &str, payloads: &[P]) -> Result<(Offset, u32)> {
        self.rt.block_on(self.client.append_batch(log, payloads))
    }

    pub fn read(&self, log: &str, from: Offset, max_records: u32) -> Result<Vec<Record>> {
        self.rt.block_on(self.client.read(log, from, max_records))
    }

    pub fn read_with(&self, log: &str, from: Offset, opts: &ReadOptions) -> Result<ReadResult> {
        self.rt.block_on(self.client.read_with(log, from, opts))
    }

    pub fn committed_end(&self, log: &str) -> Result<Offset> {
        self.rt.block_on(self.client.committed_end(log))
    }

    pub fn subscribe(&self, log: &str, from: Offset) -> Result<BlockingSubscription> {
        let sub = self.rt.block_on(self.client.subscribe(log, from))?;
        Ok(BlockingSubscription {
            sub,
            rt: self.rt.clone(),
        })
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        self.rt.block_on(self.client.status())
    }

    pub fn create_log(&self, name: &str) -> Result<LogId> {
        self.rt.block_on(self.client.create_log(name))
    }

    pub fn trim(&self, log: &str, before: Offset) -> Result<Offset> {
        self.rt.block_on(self.client.trim(log, before))
    }
}

/// A blocking iterator over a subscription's records.
#[derive(Debug)]
pub struct BlockingSubscription {
    sub: Subscription,
    rt: Arc<tokio::runtime::Runtime>,
}

impl Iterator for BlockingSubscription {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        self.rt.block_on(self.sub.next())
    }
}
