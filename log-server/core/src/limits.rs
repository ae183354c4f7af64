//! Every bound in one place; buffer pools and queues are sized from these, never grown on demand.

/// Largest single record payload. Larger appends get `ErrorCode::RecordTooLarge`.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Most records in one batch.
pub const BATCH_RECORDS_MAX: u32 = 16 * 1024;
/// Largest batch (header + length prefixes + payloads). A batch is written and forwarded whole,
/// so this bounds every buffer that holds one.
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// Largest frame body: one batch plus the largest replication/read envelope around it.
pub const FRAME_BODY_BYTES_MAX: usize = BATCH_BYTES_MAX + 64 * 1024;
/// Largest log name.
pub const LOG_NAME_BYTES_MAX: usize = 200;
/// Most logs one node hosts.
pub const LOGS_MAX: usize = 4096;
/// Largest read reply (bytes of batches). A read returns whole batches, so a single batch larger
/// than this is still returned alone.
pub const READ_BYTES_MAX: usize = BATCH_BYTES_MAX;
/// Default un-acknowledged bytes a node keeps in flight to its successor, per log, before the
/// head stops admitting appends (backpressure).
pub const PIPELINE_BYTES_DEFAULT: usize = 32 << 20;
/// Most requests one client connection may have in flight; further frames are not read until
/// replies drain (TCP backpressure).
pub const CONNECTION_REQUESTS_MAX: usize = 4096;
/// Send and receive buffer every TCP connection asks for (client and peer, both ends): room
/// for the largest frame, so a forwarded batch goes out in one piece instead of in
/// window-sized parts sent later from the receiver's acknowledgements. Fixed sizes turn off
/// the kernel's autotuning, which starts connections at 16 KiB send / 128 KiB receive; the
/// kernel caps the request at `net.core.{w,r}mem_max`. On the dev chain at 128 in flight a
/// forwarded batch's `writev` took 26-29 µs instead of 37-52 and the chain won 5 of 6
/// interleaved pairs.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Most client connections a node accepts at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Disk alignment used for O_DIRECT segment files (logical block size we require).
pub const DISK_ALIGN_BYTES: usize = 4096;
/// Most batches one producer may have sent and not yet had answered, per log. Every replica
/// remembers that many recent batches per producer, so a retry of any of them (after a lost
/// connection, say) is answered from dedup; a window wider than the memory made a resend of the
/// oldest look like a gap (the client had 8 in flight, the replicas kept 5).
pub const PRODUCER_BATCHES_IN_FLIGHT_MAX: usize = 16;
