//! chainlog-hw: the only crate with `unsafe` — aligned buffers, io_uring storage, transports, probes.
//!
//! Every unsafe block carries a `// SAFETY:` comment naming the check that makes it sound
//! (clippy's `undocumented_unsafe_blocks` is denied for this crate).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod buf;
pub mod cpu;
pub mod disk;
pub mod error;
pub mod floor;
pub mod net;
pub mod probe;
pub mod uring;

pub use buf::{AlignedBuf, BufPool, PoolConfig};
pub use error::HwError;
