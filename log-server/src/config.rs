//! Node configuration: a serde struct with documented defaults, validated before start.

use chainlog_core::types::{ClusterId, Epoch, NodeId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// One node of a static chain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainNode {
    /// Node id, unique in the cluster (>= 1).
    pub id: u32,
    /// Address clients and the predecessor connect to (`host:port`).
    pub addr: String,
}

/// The chain this node belongs to; nodes in chain order, head first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ChainSection {
    /// Configuration generation (default 1). Every message carries it.
    pub epoch: u64,
    pub nodes: Vec<ChainNode>,
}

impl Default for ChainSection {
    fn default() -> Self {
        ChainSection {
            epoch: 1,
            nodes: vec![],
        }
    }
}

/// How segment files are written.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoModeSetting {
    /// O_DIRECT when the start-up probe says the data directory supports it, else buffered.
    #[default]
    Auto,
    Direct,
    Buffered,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// Default `auto`.
    pub io_mode: IoModeSetting,
    /// Segment file size; default 64 MiB, minimum 1 MiB. Files are pre-allocated and pre-zeroed.
    pub segment_bytes: u64,
    /// Delete whole oldest segments while a log is larger than this (default: keep all).
    pub retention_bytes: Option<u64>,
    /// Delete whole segments whose newest record is older than this (default: keep all).
    pub retention_ms: Option<u64>,
    /// Write + fdatasync groups per log in flight at once (default 4, 1..=16): concurrent
    /// flushes keep the disk busy while replies and new requests cross the network.
    pub flushes_in_flight_max: usize,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            io_mode: IoModeSetting::Auto,
            segment_bytes: 64 << 20,
            retention_bytes: None,
            retention_ms: None,
            flushes_in_flight_max: 4,
        }
    }
}

/// Longest resend timeout a config may set (an hour): a link that shows no ack progress for
/// longer than that is not waiting for a slow ack, and the core counts in microseconds.
pub const RESEND_TIMEOUT_MS_MAX: u64 = 3_600_000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationSection {
    /// Un-acknowledged bytes per log in flight to the successor before the head pushes back;
    /// default 32 MiB, minimum 4 MiB (one maximal batch must fit).
    pub pipeline_bytes_max: usize,
    /// Resend un-acknowledged batches after this long without ack progress; default 200 ms,
    /// 1 ms to `RESEND_TIMEOUT_MS_MAX`.
    pub resend_timeout_ms: u64,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            pipeline_bytes_max: chainlog_core::limits::PIPELINE_BYTES_DEFAULT,
            resend_timeout_ms: 200,
        }
    }
}

/// Everything one node needs. `log-server run --config FILE` reads it from TOML.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Cluster id; 0 (default) = read `DIR/cluster.id`, creating it on first start.
    pub cluster_id: u64,
    /// This node's id; must appear in `chain.nodes` (default 1).
    pub node_id: u32,
    /// Listen address for clients and the predecessor (default 127.0.0.1:7400).
    pub listen: String,
    /// Data directory (default ./chainlog-data).
    pub dir: PathBuf,
    /// Client connections accepted at once (default 1024). The predecessor is never kept out
    /// by them: a few connections past this are accepted while their Hello is awaited, and
    /// only the predecessor keeps one.
    pub connections_max: usize,
    /// A client connection with no request in flight (a subscription counts) that sends
    /// nothing for this long is closed, with an error saying so (default 600 000: ten
    /// minutes; 0: never). Clients reconnect on their next request; idle ones cannot hold
    /// every slot for good.
    pub client_idle_timeout_ms: u64,
    /// CPUs this node's threads run on, as a CPU list (`"1"`, `"0,2-3"`); default: wherever the
    /// OS schedules them. On a small VM, where a wake-up across vCPUs is expensive, pinning a
    /// node next to the CPU that takes its disk's interrupts saves a cross-CPU wake-up on its
    /// disk completions (ARCHITECTURE.md, "Threads").
    pub cpus: Option<String>,
    pub chain: ChainSection,
    pub storage: StorageSection,
    pub replication: ReplicationSection,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            cluster_id: 0,
            node_id: 1,
            listen: "127.0.0.1:7400".into(),
            dir: PathBuf::from("chainlog-data"),
            connections_max: chainlog_core::limits::CONNECTIONS_MAX,
            client_idle_timeout_ms: 600_000,
            cpus: None,
            chain: ChainSection::default(),
            storage: StorageSection::default(),
            replication: ReplicationSection::default(),
        }
    }
}

/// A configuration mistake, said so the operator can fix it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl NodeConfig {
    pub fn from_toml(text: &str) -> Result<NodeConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    /// A single-node chain (the node is head and tail).
    pub fn single(dir: PathBuf, listen: String) -> NodeConfig {
        let mut c = NodeConfig {
            dir,
            listen: listen.clone(),
            ..NodeConfig::default()
        };
        c.chain.nodes = vec![ChainNode {
            id: 1,
            addr: listen,
        }];
        c
    }

    /// Checks the config and fills in derived defaults.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError("node_id must be >= 1".into()));
        }
        if let Some(c) = &self.cpus {
            chainlog_hw::cpu::parse_cpu_list(c).map_err(|e| ConfigError(format!("cpus: {e}")))?;
        }
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError(format!("listen address {:?}: {e}", self.listen)))?;
        if self.chain.nodes.is_empty() {
            self.chain.nodes = vec![ChainNode {
                id: self.node_id,
                addr: self.listen.clone(),
            }];
        }
        let mut ids: Vec<u32> = self.chain.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.chain.nodes.len() {
            return Err(ConfigError("chain.nodes has duplicate ids".into()));
        }
        if ids.contains(&0) {
            return Err(ConfigError("chain node ids must be >= 1".into()));
        }
        if !self.chain.nodes.iter().any(|n| n.id == self.node_id) {
            return Err(ConfigError(format!(
                "node_id {} is not in chain.nodes",
                self.node_id
            )));
        }
        if self.chain.epoch == 0 {
            return Err(ConfigError("chain.epoch must be >= 1".into()));
        }
        if self.storage.segment_bytes < (1 << 20) {
            return Err(ConfigError("storage.segment_bytes must be >= 1 MiB".into()));
        }
        if !(1..=16).contains(&self.storage.flushes_in_flight_max) {
            return Err(ConfigError(
                "storage.flushes_in_flight_max must be in 1..=16".into(),
            ));
        }
        if self.replication.pipeline_bytes_max < chainlog_core::limits::BATCH_BYTES_MAX {
            return Err(ConfigError(format!(
                "replication.pipeline_bytes_max must be >= {} (one maximal batch)",
                chainlog_core::limits::BATCH_BYTES_MAX
            )));
        }
        if !(1..=RESEND_TIMEOUT_MS_MAX).contains(&self.replication.resend_timeout_ms) {
            return Err(ConfigError(format!(
                "replication.resend_timeout_ms must be in 1..={RESEND_TIMEOUT_MS_MAX}"
            )));
        }
        if self.connections_max == 0 {
            return Err(ConfigError("connections_max must be >= 1".into()));
        }
        Ok(())
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.chain.epoch)
    }

    pub fn node(&self) -> NodeId {
        NodeId(self.node_id)
    }

    pub fn chain_ids(&self) -> Vec<NodeId> {
        self.chain.nodes.iter().map(|n| NodeId(n.id)).collect()
    }

    /// Position of this node in the chain.
    pub fn position(&self) -> usize {
        self.chain
            .nodes
            .iter()
            .position(|n| n.id == self.node_id)
            .unwrap_or(0)
    }

    pub fn addr_of(&self, id: NodeId) -> Option<&str> {
        self.chain
            .nodes
            .iter()
            .find(|n| n.id == id.0)
            .map(|n| n.addr.as_str())
    }

    pub fn successor(&self) -> Option<&ChainNode> {
        self.chain.nodes.get(self.position() + 1)
    }

    pub fn predecessor(&self) -> Option<&ChainNode> {
        let p = self.position();
        if p == 0 {
            None
        } else {
            self.chain.nodes.get(p - 1)
        }
    }
}

/// Reads `dir/cluster.id`, creating it with a fresh random id on first start.
pub fn load_or_create_cluster_id(dir: &std::path::Path) -> std::io::Result<ClusterId> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("cluster.id");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let v = u64::from_str_radix(s.trim(), 16).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            Ok(ClusterId(v))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = fresh_id();
            let tmp = dir.join("cluster.id.tmp");
            std::fs::write(&tmp, format!("{id:016x}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(ClusterId(id))
        }
        Err(e) => Err(e),
    }
}

/// A non-zero id from the OS's randomness (hash seeds), without pulling in a RNG crate.
fn fresh_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let mut c = NodeConfig::from_toml(
            r#"
            node_id = 2
            listen = "127.0.0.1:7401"
            dir = "/tmp/x"
            [chain]
            epoch = 3
            nodes = [ { id = 1, addr = "127.0.0.1:7400" }, { id = 2, addr = "127.0.0.1:7401" }, { id = 3, addr = "127.0.0.1:7402" } ]
            [storage]
            io_mode = "buffered"
            "#,
        )
        .expect("parse");
        c.validate().expect("valid");
        assert_eq!(c.position(), 1);
        assert_eq!(c.successor().map(|n| n.id), Some(3));
        assert_eq!(c.predecessor().map(|n| n.id), Some(1));
        assert_eq!(c.storage.io_mode, IoModeSetting::Buffered);
    }

    #[test]
    fn rejects_mistakes() {
        assert!(NodeConfig::from_toml("bogus = 1").is_err());
        let mut c = NodeConfig {
            node_id: 5,
            ..NodeConfig::default()
        };
        c.chain.nodes = vec![ChainNode {
            id: 1,
            addr: "127.0.0.1:1".into(),
        }];
        assert!(c.validate().is_err());
        let mut c = NodeConfig::default();
        c.storage.segment_bytes = 10;
        assert!(c.validate().is_err());
        for bad in [0, 17] {
            let mut c = NodeConfig::default();
            c.storage.flushes_in_flight_max = bad;
            assert!(c.validate().is_err(), "flushes_in_flight_max {bad}");
        }
        // 0 would panic in the core; 2^61 ms wrapped to 0 µs.
        for bad in [0, RESEND_TIMEOUT_MS_MAX + 1, 1 << 61] {
            let mut c = NodeConfig::default();
            c.replication.resend_timeout_ms = bad;
            assert!(c.validate().is_err(), "resend_timeout_ms {bad}");
        }
        let mut c = NodeConfig::from_toml("cpus = \"0,2-3\"").expect("cpus list");
        c.validate().expect("valid cpus");
        for bad in ["", "3-1", "x", "0,,1"] {
            c.cpus = Some(bad.into());
            assert!(c.validate().is_err(), "cpus {bad:?}");
        }
    }

    /// The example in the README is a config this version accepts.
    #[test]
    fn readme_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example") + 8;
        let len = readme[start..].find("```").expect("closed toml block");
        let mut c = NodeConfig::from_toml(&readme[start..start + len]).expect("README example");
        c.validate().expect("README example validates");
        assert_eq!((c.node_id, c.chain.nodes.len()), (2, 3));
        assert_eq!(c.storage.flushes_in_flight_max, 4);
    }

    #[test]
    fn cluster_id_persists() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_cluster_id(d.path()).expect("create");
        let b = load_or_create_cluster_id(d.path()).expect("read");
        assert_eq!(a, b);
        assert_ne!(a.0, 0);
    }
}
