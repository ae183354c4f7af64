//! `chainlog-bench`: durable-append workloads measured against floors taken in the same run.
fn main() {}
