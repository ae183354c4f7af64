//! `log-server` binary entry point.
fn main() {}
