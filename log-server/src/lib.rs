//! chainlog-server: the thin runtime around `chainlog-core` — storage, networking, config.
#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod node;
pub mod storage;
