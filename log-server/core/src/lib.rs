//! chainlog-core: the chain protocol with no I/O — formats, limits and the replica state machine.
//!
//! Nothing in this crate reads a clock, spawns a thread, touches a socket or a file, or uses
//! `unsafe`. Time comes in as [`types::Instant`]; I/O goes out as effects. Iteration order is
//! deterministic (`BTreeMap`, `Vec`, never `HashMap`) so the simulator replays a seed exactly.
#![forbid(unsafe_code)]

pub mod chain;
pub mod effects;
pub mod error;
pub mod limits;
pub mod record;
pub mod replica;
pub mod session;
pub mod types;
pub mod wire;

pub use chain::{ChainConfig, Role};
pub use error::{Error, ErrorCode};
pub use replica::{LogStatus, Replica, ReplicaConfig, ReplicaStatus};
pub use types::{ClusterId, Epoch, Instant, LogId, NodeId, Offset, ProducerId};
