//! chainlog-server: the thin runtime around `chainlog-core` — storage, networking, config.
