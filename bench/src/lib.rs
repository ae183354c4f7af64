//! chainlog-bench: durable-append workloads through the real client, and the floors (disk
//! fdatasync, loopback round trip) they are reported against, measured in the same run.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cpu;
pub mod floor;
pub mod hist;
pub mod loopback;
pub mod report;
pub mod server;
pub mod service;
pub mod storage_stats;
pub mod suite;
pub mod workload;
