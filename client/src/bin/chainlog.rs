//! `chainlog` CLI.
fn main() {}
