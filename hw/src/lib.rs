//! chainlog-hw: the only crate with `unsafe` — aligned buffers, io_uring storage, transports, probes.
pub mod net;
