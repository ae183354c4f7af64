//! chainlog-client: async and blocking client for chainlog.
