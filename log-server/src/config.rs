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
    /// Cluster id, the same on every node of the chain: an integer, or a string of hex digits
    /// (`"f7e0fa29a20d868d"`, as `log-server` prints ids: TOML integers stop at 2^63 - 1).
    /// 0 (default) = read `DIR/cluster.id`, creating it on first start; only a single-node
    /// chain may create one (nodes that each made their own could never link). A data
    /// directory keeps the cluster id and node id it was first started with, and refuses to
    /// start as another.
    #[serde(deserialize_with = "cluster_id_from_toml")]
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

/// Most bytes per segment file (16 GiB): a segment is pre-allocated and pre-zeroed whole, so a
/// mistyped size would fill the disk before the first append.
pub const SEGMENT_BYTES_MAX: u64 = 16 << 30;
/// Most un-acknowledged bytes per log a link may hold (1 GiB): the head keeps them in memory
/// and every link's queue bound is derived from them.
pub const PIPELINE_BYTES_MAX: usize = 1 << 30;
/// Most client connections a node may be configured to accept (each takes a file descriptor
/// and a reader and a writer task).
pub const CONNECTIONS_MAX_LIMIT: usize = 1 << 16;

/// `cluster_id` as a TOML integer or a string of hex digits (optionally `0x`-prefixed).
fn cluster_id_from_toml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Hex(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(v) => Ok(v),
        Raw::Hex(s) => parse_hex_id(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "cluster_id {s:?}: expected up to 16 hex digits (an integer also works below 2^63)"
            ))
        }),
    }
}

/// Up to 16 hex digits, optionally `0x`-prefixed.
fn parse_hex_id(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Checks a chain address has the `host:port` shape (`[v6]:port` for IPv6) with a port that
/// is not 0; host names are resolved only when dialled.
fn check_chain_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("expected host:port".into());
    };
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err("expected host:port ([addr]:port for IPv6)".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("bad port {port:?}")),
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
        for n in &self.chain.nodes {
            check_chain_addr(&n.addr).map_err(|e| {
                ConfigError(format!("chain node {} address {:?}: {e}", n.id, n.addr))
            })?;
        }
        let mut addrs: Vec<&str> = self.chain.nodes.iter().map(|n| n.addr.as_str()).collect();
        addrs.sort_unstable();
        if let Some(w) = addrs.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError(format!(
                "chain.nodes lists address {:?} twice (a node would link to itself)",
                w[0]
            )));
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
        let seg = self.storage.segment_bytes;
        if !((1 << 20)..=SEGMENT_BYTES_MAX).contains(&seg)
            || !seg.is_multiple_of(chainlog_core::limits::DISK_ALIGN_BYTES as u64)
        {
            return Err(ConfigError(format!(
                "storage.segment_bytes {seg}: must be 1 MiB to {} GiB, a multiple of {}",
                SEGMENT_BYTES_MAX >> 30,
                chainlog_core::limits::DISK_ALIGN_BYTES
            )));
        }
        if !(1..=16).contains(&self.storage.flushes_in_flight_max) {
            return Err(ConfigError(
                "storage.flushes_in_flight_max must be in 1..=16".into(),
            ));
        }
        if !(chainlog_core::limits::BATCH_BYTES_MAX..=PIPELINE_BYTES_MAX)
            .contains(&self.replication.pipeline_bytes_max)
        {
            return Err(ConfigError(format!(
                "replication.pipeline_bytes_max must be {} (one maximal batch) to {} (1 GiB)",
                chainlog_core::limits::BATCH_BYTES_MAX,
                PIPELINE_BYTES_MAX
            )));
        }
        if !(1..=RESEND_TIMEOUT_MS_MAX).contains(&self.replication.resend_timeout_ms) {
            return Err(ConfigError(format!(
                "replication.resend_timeout_ms must be in 1..={RESEND_TIMEOUT_MS_MAX}"
            )));
        }
        if !(1..=CONNECTIONS_MAX_LIMIT).contains(&self.connections_max) {
            return Err(ConfigError(format!(
                "connections_max must be in 1..={CONNECTIONS_MAX_LIMIT}"
            )));
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
    match read_id_file(dir, CLUSTER_ID_FILE)? {
        Some(id) => Ok(ClusterId(id)),
        None => {
            let id = fresh_id();
            write_id_file(dir, CLUSTER_ID_FILE, id)?;
            Ok(ClusterId(id))
        }
    }
}

/// Where a data directory keeps the cluster it belongs to, and the node it is.
const CLUSTER_ID_FILE: &str = "cluster.id";
const NODE_ID_FILE: &str = "node.id";

/// Claims `dir` for node `node_id` of cluster `cluster_id` (0: the one the directory already
/// belongs to, or, for a single-node chain only, a fresh one), and returns the cluster id.
/// The first start records both ids in the directory (synced); every later start must match
/// them, so a node cannot come up on another node's or another cluster's data and serve it
/// as its own.
pub fn claim_data_dir(
    dir: &std::path::Path,
    cluster_id: u64,
    node_id: u32,
    chain_nodes: usize,
) -> Result<ClusterId, ConfigError> {
    let foreign = |what, found: u64, want: u64| {
        ConfigError(format!(
            "data directory {} belongs to {what} {found:x}, this configuration says {want:x}: \
             point `dir` at this node's own directory",
            dir.display()
        ))
    };
    let io = |e: std::io::Error| ConfigError(format!("data directory {}: {e}", dir.display()));
    let cluster = match (read_id_file(dir, CLUSTER_ID_FILE).map_err(io)?, cluster_id) {
        (Some(found), want) if want != 0 && found != want => {
            return Err(foreign("cluster", found, want))
        }
        (Some(found), _) => found,
        (None, 0) if chain_nodes > 1 => {
            return Err(ConfigError(format!(
                "a chain of {chain_nodes} nodes needs `cluster_id` set, the same on every node \
                 (nodes that each made their own could never link): e.g. cluster_id = \"{:016x}\"",
                fresh_id()
            )))
        }
        (None, want) => {
            let id = if want == 0 { fresh_id() } else { want };
            write_id_file(dir, CLUSTER_ID_FILE, id).map_err(io)?;
            id
        }
    };
    match read_id_file(dir, NODE_ID_FILE).map_err(io)? {
        Some(found) if found != u64::from(node_id) => {
            return Err(foreign("node", found, u64::from(node_id)))
        }
        Some(_) => {}
        None => write_id_file(dir, NODE_ID_FILE, u64::from(node_id)).map_err(io)?,
    }
    Ok(ClusterId(cluster))
}

/// A hex id file in `dir`, if there is one; a file that holds no id, or 0 (which means
/// "unset" everywhere), is an error rather than a reason to make a new id.
fn read_id_file(dir: &std::path::Path, name: &str) -> std::io::Result<Option<u64>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => match parse_hex_id(&s) {
            Some(v) if v != 0 => Ok(Some(v)),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: {:?} is not a non-zero hex id (a damaged file: restore it)",
                    path.display(),
                    s.trim()
                ),
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("reading {}: {e}", path.display()),
        )),
    }
}

/// Writes an id file durably: aside, synced, renamed, directory synced.
fn write_id_file(dir: &std::path::Path, name: &str, id: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, format!("{id:016x}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A non-zero id from the OS's randomness (hash seeds), without pulling in a RNG crate; below
/// 2^63, so it can be written as a TOML integer too.
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
    (h.finish() >> 1) | 1
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
    fn cluster_id_is_an_integer_or_hex_digits() {
        let id = |text: &str| NodeConfig::from_toml(text).map(|c| c.cluster_id);
        assert_eq!(id("cluster_id = 0x5eed").expect("int"), 0x5eed);
        // Past i64::MAX, as `log-server` may print an id: only the string form can say it.
        assert_eq!(
            id("cluster_id = \"f7e0fa29a20d868d\"").expect("hex"),
            0xf7e0_fa29_a20d_868d
        );
        assert_eq!(id("cluster_id = \"0x5EED\"").expect("0x hex"), 0x5eed);
        for bad in ["\"\"", "\"xyz\"", "\"1ffffffffffffffff\"", "\"0x\"", "-1"] {
            assert!(id(&format!("cluster_id = {bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_addresses_and_limits_are_checked() {
        let chain = |addrs: &[&str]| {
            let mut c = NodeConfig::default();
            c.chain.nodes = addrs
                .iter()
                .enumerate()
                .map(|(i, a)| ChainNode {
                    id: i as u32 + 1,
                    addr: a.to_string(),
                })
                .collect();
            c.validate()
        };
        chain(&["127.0.0.1:7400", "node-b.example:7400", "[::1]:7401"]).expect("good addrs");
        for bad in [
            &["127.0.0.1:7400", "not an address"][..],
            &["127.0.0.1:7400", "127.0.0.1:0"],
            &["127.0.0.1:7400", "node-b"],
            &["127.0.0.1:7400", ":7401"],
            &["127.0.0.1:7400", "::1:7401"],
            &["127.0.0.1:7400", "127.0.0.1:7400"],
        ] {
            let e = chain(bad).expect_err(&format!("{bad:?}"));
            assert!(e.0.contains("address"), "{bad:?}: {e}");
        }
        let mut c = NodeConfig {
            connections_max: CONNECTIONS_MAX_LIMIT + 1,
            ..NodeConfig::default()
        };
        assert!(c.validate().is_err(), "connections_max past the limit");
        c.connections_max = usize::MAX;
        assert!(c.validate().is_err(), "a semaphore this large panics");
        for bad in [SEGMENT_BYTES_MAX + 4096, 1 << 50, (1 << 20) + 1] {
            let mut c = NodeConfig::default();
            c.storage.segment_bytes = bad;
            assert!(c.validate().is_err(), "segment_bytes {bad}");
        }
        let mut c = NodeConfig::default();
        c.replication.pipeline_bytes_max = PIPELINE_BYTES_MAX + 1;
        assert!(c.validate().is_err(), "pipeline_bytes_max past the limit");
    }

    /// A data directory stays the node and the cluster it was first started as.
    #[test]
    fn a_data_dir_refuses_another_cluster_or_node() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path();
        assert_eq!(
            claim_data_dir(dir, 0x5eed, 2, 3).expect("first start").0,
            0x5eed
        );
        assert_eq!(
            claim_data_dir(dir, 0x5eed, 2, 3).expect("restart").0,
            0x5eed
        );
        // 0 takes the directory's own id.
        assert_eq!(claim_data_dir(dir, 0, 2, 3).expect("unset id").0, 0x5eed);
        let e = claim_data_dir(dir, 0x6eed, 2, 3).expect_err("another cluster");
        assert!(e.0.contains("belongs to cluster 5eed"), "{e}");
        let e = claim_data_dir(dir, 0x5eed, 7, 3).expect_err("another node");
        assert!(e.0.contains("belongs to node 2"), "{e}");

        // A chain of several nodes cannot make up its id on each node.
        let fresh = tempfile::tempdir().expect("tempdir");
        let e = claim_data_dir(fresh.path(), 0, 1, 3).expect_err("no cluster id");
        let suggested = e.0.rsplit('"').nth(1).expect("a suggested id");
        let id = NodeConfig::from_toml(&format!("cluster_id = \"{suggested}\""))
            .expect("the suggestion is a valid config line")
            .cluster_id;
        assert!(id != 0 && id < 1 << 63, "{e}");
        assert!(!fresh.path().join("cluster.id").exists());
        // A single node may.
        let single = claim_data_dir(fresh.path(), 0, 1, 1).expect("single node");
        assert!(single.0 != 0 && single.0 < 1 << 63);

        // A damaged id file is an error, never a reason to make a new id.
        std::fs::write(dir.join("cluster.id"), "0\n").expect("write");
        let e = claim_data_dir(dir, 0, 2, 3).expect_err("zero id");
        assert!(e.0.contains("cluster.id"), "{e}");
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
