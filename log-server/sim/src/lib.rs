//! chainlog-sim: deterministic simulation of chains of real replica cores (work in progress).
