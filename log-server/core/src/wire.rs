//! Frames on a connection (client↔node and node↔node): a fixed header, then a typed body.
//!
//! Frame header, `FRAME_HEADER_LEN` = 16 bytes, little-endian:
//! `body_len u32 | kind u16 | flags u16 | request_id u64`. Requests carry a client-chosen
//! `request_id`; the reply (or, for `Subscribe`, every pushed `Records`) echoes it, so one
//! connection pipelines many requests. Batches inside bodies are carried as separate `Bytes`
//! so a sender can `writev` them straight from the buffer they were received or stored in.

use crate::error::{Error, ErrorCode, Result};
use crate::limits::{FRAME_BODY_BYTES_MAX, LOG_NAME_BYTES_MAX};
use crate::record::{self, BatchHeader};
use crate::types::{ClusterId, Epoch, LogId, NodeId, Offset};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const FRAME_HEADER_LEN: usize = 16;
/// Version of this frame protocol; a handshake with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Frame kinds. Stable on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Error = 3,
    CreateLog = 10,
    CreateLogOk = 11,
    Append = 12,
    AppendOk = 13,
    Read = 14,
    ReadOk = 15,
    Subscribe = 16,
    Records = 17,
    Status = 18,
    StatusOk = 19,
    Trim = 20,
    TrimOk = 21,
    /// Node-to-node protocol messages; the body is decoded by `PeerMessage`.
    Peer = 100,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloOk,
            3 => Error,
            10 => CreateLog,
            11 => CreateLogOk,
            12 => Append,
            13 => AppendOk,
            14 => Read,
            15 => ReadOk,
            16 => Subscribe,
            17 => Records,
            18 => Status,
            19 => StatusOk,
            20 => Trim,
            21 => TrimOk,
            100 => Peer,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_len: u32,
    pub kind: u16,
    pub flags: u16,
    pub request_id: u64,
}

impl FrameHeader {
    /// Decodes and bounds-checks a frame header. A body longer than the limit is refused before
    /// any of it is read, so a hostile length cannot make the reader allocate.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader> {
        let mut r = &b[..];
        let h = FrameHeader {
            body_len: r.get_u32_le(),
            kind: r.get_u16_le(),
            flags: r.get_u16_le(),
            request_id: r.get_u64_le(),
        };
        if h.body_len as usize > FRAME_BODY_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "frame",
                size: h.body_len as usize,
                limit: FRAME_BODY_BYTES_MAX,
            });
        }
        Ok(h)
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32_le(self.body_len);
        out.put_u16_le(self.kind);
        out.put_u16_le(self.flags);
        out.put_u64_le(self.request_id);
    }
}

/// Request id of an `Error` frame about the whole connection rather than one request (sent
/// before the server closes it: a frame it cannot read, no Hello, a reader too slow for its
/// replies). Clients number their requests from 1.
pub const CONNECTION_REQUEST_ID: u64 = 0;

/// A frame ready to send: `head` (frame header + fixed fields) followed by zero or more
/// payload chunks (whole batches) that are sent without copying.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub head: Bytes,
    pub chunks: Vec<Bytes>,
}

impl Encoded {
    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Flattens into one buffer (tests and small control frames only: it copies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        for c in &self.chunks {
            v.extend_from_slice(c);
        }
        v
    }
}

/// Builds an `Encoded` frame: `fixed` writes the fixed body fields after the header.
pub fn encode_frame(
    kind: Kind,
    request_id: u64,
    chunks: Vec<Bytes>,
    fixed: impl FnOnce(&mut BytesMut),
) -> Encoded {
    let mut head = BytesMut::with_capacity(FRAME_HEADER_LEN + 64);
    head.put_bytes(0, FRAME_HEADER_LEN);
    fixed(&mut head);
    let body_len = head.len() - FRAME_HEADER_LEN + chunks.iter().map(Bytes::len).sum::<usize>();
    let fh = FrameHeader {
        body_len: body_len as u32,
        kind: kind as u16,
        flags: 0,
        request_id,
    };
    let mut h = BytesMut::with_capacity(FRAME_HEADER_LEN);
    fh.encode(&mut h);
    head[..FRAME_HEADER_LEN].copy_from_slice(&h);
    Encoded {
        head: head.freeze(),
        chunks,
    }
}

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    /// Another node of the cluster; `node` is its id.
    Peer {
        node: NodeId,
    },
}

/// First frame on every connection, in both directions (`Hello` then `HelloOk`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub cluster_id: ClusterId,
    pub role: Role,
    pub epoch: Epoch,
}

/// What a node answers to a `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloOk {
    pub version: u16,
    pub cluster_id: ClusterId,
    pub node: NodeId,
    pub epoch: Epoch,
}

/// Requests a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRequest {
    CreateLog {
        name: String,
    },
    /// The body is one producer-built batch (see `record`); its header names the log, the
    /// producer id and the sequence of its first record.
    Append {
        batch: Bytes,
    },
    Read {
        log: LogId,
        from: Offset,
        max_records: u32,
        max_bytes: u32,
        /// How long the node may wait for `from` to be committed before answering with no
        /// batches (long poll); 0 answers at once.
        wait_ms: u32,
    },
    /// Push every committed batch from `from` on, as `Records` frames with this request id.
    Subscribe {
        log: LogId,
        from: Offset,
    },
    Status,
    /// Deletes whole segments entirely below `before` (retention).
    Trim {
        log: LogId,
        before: Offset,
    },
}

/// Replies a node sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientReply {
    CreateLogOk {
        log: LogId,
    },
    AppendOk {
        base_offset: Offset,
        record_count: u32,
    },
    /// Whole committed batches; the first may start before the requested offset (the reader
    /// skips records below it). `committed_end` is what this node knew when it answered.
    ReadOk {
        committed_end: Offset,
        batches: Vec<Bytes>,
    },
    /// A push for a `Subscribe`.
    Records {
        committed_end: Offset,
        batches: Vec<Bytes>,
    },
    /// JSON document describing the node, its chain and its logs.
    StatusOk {
        json: Bytes,
    },
    TrimOk {
        start: Offset,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

fn need(b: &Bytes, n: usize, what: &str) -> Result<()> {
    if b.remaining() < n {
        return Err(Error::Malformed(format!("{what}: body too short")));
    }
    Ok(())
}

/// Splits a concatenation of whole batches into zero-copy slices, verifying each fully.
pub fn split_batches(mut body: Bytes) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let h = record::verify(&body)?;
        out.push(body.split_to(h.batch_len()));
    }
    Ok(out)
}

fn batches_len(batches: &[Bytes]) -> usize {
    batches.iter().map(Bytes::len).sum()
}

impl Hello {
    pub fn encode(&self, request_id: u64) -> Encoded {
        encode_frame(Kind::Hello, request_id, vec![], |b| {
            b.put_u16_le(self.version);
            match self.role {
                Role::Client => {
                    b.put_u16_le(0);
                    b.put_u32_le(0);
                }
                Role::Peer { node } => {
                    b.put_u16_le(1);
                    b.put_u32_le(node.0);
                }
            }
            b.put_u64_le(self.cluster_id.0);
            b.put_u64_le(self.epoch.0);
        })
    }

    pub fn decode(mut body: Bytes) -> Result<Hello> {
        need(&body, 24, "hello")?;
        let version = body.get_u16_le();
        let role = body.get_u16_le();
        let node = body.get_u32_le();
        let cluster_id = ClusterId(body.get_u64_le());
        let epoch = Epoch(body.get_u64_le());
        let role = match role {
            0 => Role::Client,
            1 => Role::Peer { node: NodeId(node) },
            r => return Err(Error::Malformed(format!("hello: unknown role {r}"))),
        };
        Ok(Hello {
            version,
            cluster_id,
            role,
            epoch,
        })
    }
}

impl HelloOk {
    pub fn encode(&self, request_id: u64) -> Encoded {
        encode_frame(Kind::HelloOk, request_id, vec![], |b| {
            b.put_u16_le(self.version);
            b.put_u16_le(0);
            b.put_u32_le(self.node.0);
            b.put_u64_le(self.cluster_id.0);
            b.put_u64_le(self.epoch.0);
        })
    }

    pub fn decode(mut body: Bytes) -> Result<HelloOk> {
        need(&body, 24, "hello-ok")?;
        let version = body.get_u16_le();
        let _ = body.get_u16_le();
        let node = NodeId(body.get_u32_le());
        let cluster_id = ClusterId(body.get_u64_le());
        let epoch = Epoch(body.get_u64_le());
        Ok(HelloOk {
            version,
            cluster_id,
            node,
            epoch,
        })
    }
}

impl ClientRequest {
    pub fn encode(&self, request_id: u64) -> Encoded {
        match self {
            ClientRequest::CreateLog { name } => {
                encode_frame(Kind::CreateLog, request_id, vec![], |b| {
                    b.put_u16_le(name.len() as u16);
                    b.put_slice(name.as_bytes());
                })
            }
            ClientRequest::Append { batch } => {
                encode_frame(Kind::Append, request_id, vec![batch.clone()], |_| {})
            }
            ClientRequest::Read {
                log,
                from,
                max_records,
                max_bytes,
                wait_ms,
            } => encode_frame(Kind::Read, request_id, vec![], |b| {
                b.put_u64_le(log.0);
                b.put_u64_le(from.0);
                b.put_u32_le(*max_records);
                b.put_u32_le(*max_bytes);
                b.put_u32_le(*wait_ms);
            }),
            ClientRequest::Subscribe { log, from } => {
                encode_frame(Kind::Subscribe, request_id, vec![], |b| {
                    b.put_u64_le(log.0);
                    b.put_u64_le(from.0);
                })
            }
            ClientRequest::Status => encode_frame(Kind::Status, request_id, vec![], |_| {}),
            ClientRequest::Trim { log, before } => {
                encode_frame(Kind::Trim, request_id, vec![], |b| {
                    b.put_u64_le(log.0);
                    b.put_u64_le(before.0);
                })
            }
        }
    }

    /// Decodes a request body. An `Append` batch is fully verified (checksums, limits) here,
    /// before it reaches the replica.
    pub fn decode(kind: u16, mut body: Bytes) -> Result<ClientRequest> {
        let kind = Kind::from_u16(kind)
            .ok_or_else(|| Error::Malformed(format!("unknown frame kind {kind}")))?;
        Ok(match kind {
            Kind::CreateLog => {
                need(&body, 2, "create-log")?;
                let n = body.get_u16_le() as usize;
                if n > LOG_NAME_BYTES_MAX {
                    return Err(Error::TooLarge {
                        what: "log name",
                        size: n,
                        limit: LOG_NAME_BYTES_MAX,
                    });
                }
                need(&body, n, "create-log")?;
                let name = String::from_utf8(body.split_to(n).to_vec())
                    .map_err(|_| Error::Malformed("log name is not UTF-8".into()))?;
                no_trailing(&body, "create-log")?;
                ClientRequest::CreateLog { name }
            }
            Kind::Append => {
                let h = record::verify(&body)?;
                // The runtime may read the batch into a page-aligned buffer zero-padded to a
                // page (for O_DIRECT); anything else after the batch is a malformed request.
                let tail = &body[h.batch_len()..];
                if tail.len() >= crate::limits::DISK_ALIGN_BYTES || tail.iter().any(|&b| b != 0) {
                    return Err(Error::Malformed(
                        "append body holds more than one batch".into(),
                    ));
                }
                ClientRequest::Append { batch: body }
            }
            Kind::Read => {
                need(&body, 28, "read")?;
                let r = ClientRequest::Read {
                    log: LogId(body.get_u64_le()),
                    from: Offset(body.get_u64_le()),
                    max_records: body.get_u32_le(),
                    max_bytes: body.get_u32_le(),
                    wait_ms: body.get_u32_le(),
                };
                no_trailing(&body, "read")?;
                r
            }
            Kind::Subscribe => {
                need(&body, 16, "subscribe")?;
                let r = ClientRequest::Subscribe {
                    log: LogId(body.get_u64_le()),
                    from: Offset(body.get_u64_le()),
                };
                no_trailing(&body, "subscribe")?;
                r
            }
            Kind::Status => {
                no_trailing(&body, "status")?;
                ClientRequest::Status
            }
            Kind::Trim => {
                need(&body, 16, "trim")?;
                let r = ClientRequest::Trim {
                    log: LogId(body.get_u64_le()),
                    before: Offset(body.get_u64_le()),
                };
                no_trailing(&body, "trim")?;
                r
            }
            k => return Err(Error::Malformed(format!("{k:?} is not a client request"))),
        })
    }
}

impl ClientReply {
    pub fn encode(&self, request_id: u64) -> Encoded {
        match self {
            ClientReply::CreateLogOk { log } => {
                encode_frame(Kind::CreateLogOk, request_id, vec![], |b| {
                    b.put_u64_le(log.0)
                })
            }
            ClientReply::AppendOk {
                base_offset,
                record_count,
            } => encode_frame(Kind::AppendOk, request_id, vec![], |b| {
                b.put_u64_le(base_offset.0);
                b.put_u32_le(*record_count);
            }),
            ClientReply::ReadOk {
                committed_end,
                batches,
            } => encode_frame(Kind::ReadOk, request_id, batches.clone(), |b| {
                b.put_u64_le(committed_end.0)
            }),
            ClientReply::Records {
                committed_end,
                batches,
            } => encode_frame(Kind::Records, request_id, batches.clone(), |b| {
                b.put_u64_le(committed_end.0)
            }),
            ClientReply::StatusOk { json } => {
                encode_frame(Kind::StatusOk, request_id, vec![json.clone()], |_| {})
            }
            ClientReply::TrimOk { start } => {
                encode_frame(Kind::TrimOk, request_id, vec![], |b| b.put_u64_le(start.0))
            }
            ClientReply::Error { code, message } => {
                let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
                encode_frame(Kind::Error, request_id, vec![], |b| {
                    b.put_u16_le(*code as u16);
                    b.put_u16_le(msg.len() as u16);
                    b.put_slice(msg);
                })
            }
        }
    }

    pub fn decode(kind: u16, mut body: Bytes) -> Result<ClientReply> {
        let kind = Kind::from_u16(kind)
            .ok_or_else(|| Error::Malformed(format!("unknown frame kind {kind}")))?;
        Ok(match kind {
            Kind::CreateLogOk => {
                need(&body, 8, "create-log-ok")?;
                ClientReply::CreateLogOk {
                    log: LogId(body.get_u64_le()),
                }
            }
            Kind::AppendOk => {
                need(&body, 12, "append-ok")?;
                let (base_offset, record_count) = (Offset(body.get_u64_le()), body.get_u32_le());
                // Callers compute the offsets of every record from these: a range past the
                // last offset is a lie, not something to overflow on.
                if record_count == 0 || base_offset.0.checked_add(u64::from(record_count)).is_none()
                {
                    return Err(Error::Malformed(format!(
                        "append-ok for {record_count} records at {}",
                        base_offset.0
                    )));
                }
                no_trailing(&body, "append-ok")?;
                ClientReply::AppendOk {
                    base_offset,
                    record_count,
                }
            }
            Kind::ReadOk | Kind::Records => {
                need(&body, 8, "records")?;
                let committed_end = Offset(body.get_u64_le());
                let batches = split_batches(body)?;
                if kind == Kind::ReadOk {
                    ClientReply::ReadOk {
                        committed_end,
                        batches,
                    }
                } else {
                    ClientReply::Records {
                        committed_end,
                        batches,
                    }
                }
            }
            Kind::StatusOk => ClientReply::StatusOk { json: body },
            Kind::TrimOk => {
                need(&body, 8, "trim-ok")?;
                ClientReply::TrimOk {
                    start: Offset(body.get_u64_le()),
                }
            }
            Kind::Error => {
                need(&body, 4, "error")?;
                let code = body.get_u16_le();
                let n = body.get_u16_le() as usize;
                need(&body, n, "error")?;
                let message = String::from_utf8_lossy(&body.split_to(n)).into_owned();
                ClientReply::Error {
                    code: ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal),
                    message,
                }
            }
            k => return Err(Error::Malformed(format!("{k:?} is not a reply"))),
        })
    }
}

/// Convenience for tests and tools: the header of the first batch in a reply.
pub fn first_header(batches: &[Bytes]) -> Option<BatchHeader> {
    batches.first().and_then(|b| BatchHeader::decode(b).ok())
}

/// Total payload bytes of a set of batches (for accounting).
pub fn total_len(batches: &[Bytes]) -> usize {
    batches_len(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::build;

    fn round_trip_req(r: ClientRequest) {
        let e = r.encode(42).to_vec();
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&e[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&hb).expect("header");
        assert_eq!(h.request_id, 42);
        assert_eq!(h.body_len as usize, e.len() - FRAME_HEADER_LEN);
        let got = ClientRequest::decode(h.kind, Bytes::copy_from_slice(&e[FRAME_HEADER_LEN..]))
            .expect("decode");
        assert_eq!(got, r);
    }

    fn round_trip_reply(r: ClientReply) {
        let e = r.encode(7).to_vec();
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&e[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&hb).expect("header");
        let got = ClientReply::decode(h.kind, Bytes::copy_from_slice(&e[FRAME_HEADER_LEN..]))
            .expect("decode");
        assert_eq!(got, r);
    }

    #[test]
    fn requests_round_trip() {
        let batch = build(LogId(3), Offset(0), Epoch(0), &[b"x", b"yy"]).expect("build");
        round_trip_req(ClientRequest::CreateLog {
            name: "orders".into(),
        });
        round_trip_req(ClientRequest::Append { batch });
        round_trip_req(ClientRequest::Read {
            log: LogId(3),
            from: Offset(9),
            max_records: 10,
            max_bytes: 1000,
            wait_ms: 5,
        });
        round_trip_req(ClientRequest::Subscribe {
            log: LogId(3),
            from: Offset(1),
        });
        round_trip_req(ClientRequest::Status);
        round_trip_req(ClientRequest::Trim {
            log: LogId(3),
            before: Offset(100),
        });
    }

    #[test]
    fn replies_round_trip() {
        let b1 = build(LogId(3), Offset(0), Epoch(1), &[b"x", b"yy"]).expect("build");
        let b2 = build(LogId(3), Offset(2), Epoch(1), &[b"z"]).expect("build");
        round_trip_reply(ClientReply::CreateLogOk { log: LogId(5) });
        round_trip_reply(ClientReply::AppendOk {
            base_offset: Offset(5),
            record_count: 3,
        });
        round_trip_reply(ClientReply::ReadOk {
            committed_end: Offset(3),
            batches: vec![b1.clone(), b2.clone()],
        });
        round_trip_reply(ClientReply::Records {
            committed_end: Offset(3),
            batches: vec![b2],
        });
        round_trip_reply(ClientReply::StatusOk {
            json: Bytes::from_static(b"{}"),
        });
        round_trip_reply(ClientReply::TrimOk { start: Offset(0) });
        round_trip_reply(ClientReply::Error {
            code: ErrorCode::UnknownLog,
            message: "no log x".into(),
        });
        round_trip_reply(ClientReply::ReadOk {
            committed_end: Offset(3),
            batches: vec![b1],
        });
    }

    #[test]
    fn oversized_frame_refused_before_reading() {
        let mut b = BytesMut::new();
        FrameHeader {
            body_len: u32::MAX,
            kind: 12,
            flags: 0,
            request_id: 1,
        }
        .encode(&mut b);
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&b);
        assert!(matches!(
            FrameHeader::decode(&hb),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        for kind in 0..120u16 {
            for len in 0..40usize {
                let body = Bytes::from(vec![0xA5u8; len]);
                let _ = ClientRequest::decode(kind, body.clone());
                let _ = ClientReply::decode(kind, body.clone());
                let _ = Hello::decode(body);
            }
        }
    }

    /// The kind and body of an encoded frame.
    fn split_frame(e: &Encoded) -> (u16, Bytes) {
        let v = e.to_vec();
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&v[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&hb).expect("header");
        (h.kind, Bytes::copy_from_slice(&v[FRAME_HEADER_LEN..]))
    }

    /// Every fixed-layout request is exactly its fields: a byte more is a malformed request,
    /// not something to ignore (a `CreateLog` whose name prefix is short named a shorter log).
    #[test]
    fn requests_with_trailing_bytes_are_malformed() {
        let reqs = [
            ClientRequest::CreateLog { name: "abc".into() },
            ClientRequest::Read {
                log: LogId(1),
                from: Offset(2),
                max_records: 3,
                max_bytes: 4,
                wait_ms: 5,
            },
            ClientRequest::Subscribe {
                log: LogId(1),
                from: Offset(2),
            },
            ClientRequest::Status,
            ClientRequest::Trim {
                log: LogId(1),
                before: Offset(2),
            },
        ];
        for r in reqs {
            let (kind, body) = split_frame(&r.encode(1));
            assert_eq!(ClientRequest::decode(kind, body.clone()).expect("exact"), r);
            let mut longer = body.to_vec();
            longer.push(0);
            let got = ClientRequest::decode(kind, Bytes::from(longer));
            assert!(matches!(got, Err(Error::Malformed(_))), "{r:?}: {got:?}");
        }
    }

    /// A client computes every record's offset from an `AppendOk`: one whose range runs past
    /// the last offset (or holds no record) is refused at decoding, so no caller overflows.
    #[test]
    fn append_ok_past_the_last_offset_is_malformed() {
        let ok = |base_offset, record_count| {
            ClientReply::AppendOk {
                base_offset: Offset(base_offset),
                record_count,
            }
            .encode(1)
        };
        let decode = |e: &Encoded| {
            let (kind, body) = split_frame(e);
            ClientReply::decode(kind, body)
        };
        assert!(decode(&ok(u64::MAX - 3, 3)).is_ok());
        for (base, n) in [(u64::MAX - 2, 3), (u64::MAX, 1), (5, 0)] {
            assert!(
                matches!(decode(&ok(base, n)), Err(Error::Malformed(_))),
                "{base} {n}"
            );
        }
    }
}

/// Node-to-node protocol messages (carried in `Kind::Peer` frames, request id 0).
///
/// Every message names the chain `epoch` (others are dropped) and the link `session` chosen by
/// the predecessor side of the link when the link came up (older sessions are dropped), so a
/// message from before a reconnect can never be taken for a current one.
///
/// Body: `sub_kind u8 | epoch u64 | session u64 | log u64 | fields...`; batches, when present,
/// come last as whole batches (zero-copy chunks), preceded by their count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMessage {
    /// Predecessor → successor: batches stored at `base..` (empty: a probe asking for an
    /// `Ack`), plus the committed end the sender knows.
    Append {
        epoch: Epoch,
        session: u64,
        log: LogId,
        base: Offset,
        committed_end: Offset,
        batches: Vec<Bytes>,
    },
    /// Predecessor → successor: the committed end, when no batch is going to carry it.
    Commit {
        epoch: Epoch,
        session: u64,
        log: LogId,
        committed_end: Offset,
    },
    /// Successor → predecessor. `ack_end`: durable here and on every node after this one;
    /// `written_end`: what this node has received in order; `chain_end`: the longest log from
    /// here to the tail (a restarted head adopts up to it before sequencing). `resend`: this
    /// node saw a gap and wants everything from `written_end`. `committed_end`: what this node
    /// knows committed (a predecessor re-sends a lost `Commit`). `trim_point`: this node's
    /// durable trim point (a predecessor re-sends a lost `Trim`). `seq` orders acks of one
    /// sender.
    Ack {
        epoch: Epoch,
        session: u64,
        log: LogId,
        seq: u64,
        written_end: Offset,
        ack_end: Offset,
        chain_end: Offset,
        committed_end: Offset,
        resend: bool,
        trim_point: Offset,
    },
    /// Predecessor → successor: create this log (idempotent).
    CreateLog {
        epoch: Epoch,
        session: u64,
        log: LogId,
        name: String,
    },
    /// Successor → predecessor: the log does not exist here; send `CreateLog`.
    NoLog {
        epoch: Epoch,
        session: u64,
        log: LogId,
    },
    /// Predecessor → successor: send me what you hold from `from` (repair of a node whose
    /// log is shorter than its successor's).
    Fetch {
        epoch: Epoch,
        session: u64,
        log: LogId,
        from: Offset,
        max_bytes: u32,
    },
    /// Successor → predecessor: answer to `Fetch` (empty: nothing there yet).
    FetchReply {
        epoch: Epoch,
        session: u64,
        log: LogId,
        base: Offset,
        batches: Vec<Bytes>,
    },
    /// Predecessor → successor: the predecessor's log durably starts at `before` (a trim it
    /// made durable, or its answer to a successor that lacks offsets it no longer holds),
    /// and it serves nothing below `point`, its durable trim point. Everything below either
    /// is committed. The successor drops what it holds below `before` (if that is all it
    /// holds, its log restarts empty at `before`) and stops serving below `point`.
    Trim {
        epoch: Epoch,
        session: u64,
        log: LogId,
        before: Offset,
        point: Offset,
    },
}

const PEER_APPEND: u8 = 1;
const PEER_COMMIT: u8 = 2;
const PEER_ACK: u8 = 3;
const PEER_CREATE_LOG: u8 = 4;
const PEER_NO_LOG: u8 = 5;
const PEER_FETCH: u8 = 6;
const PEER_FETCH_REPLY: u8 = 7;
const PEER_TRIM: u8 = 8;

/// Bytes of the common prefix: sub kind, epoch, session, log.
const PEER_PREFIX_LEN: usize = 1 + 8 + 8 + 8;

/// Splits `count` whole batches off `body`, verifying each and that they are the dense run of
/// `log` starting at `base`.
/// For a peer message that carries batches, the length of the fixed part before them, read off
/// the body's first byte; `None` for messages without batches. Lets a transport read each batch
/// into a buffer of its own (page-aligned for O_DIRECT) instead of slicing one body.
pub fn peer_fixed_len(sub: u8) -> Option<usize> {
    match sub {
        PEER_APPEND => Some(PEER_PREFIX_LEN + 20),
        PEER_FETCH_REPLY => Some(PEER_PREFIX_LEN + 12),
        _ => None,
    }
}

/// The smallest fixed part of a batch-carrying peer message.
pub const PEER_FIXED_LEN_MIN: usize = PEER_PREFIX_LEN + 12;

fn peer_batches(body: Bytes, count: u32, log: LogId, base: Offset) -> Result<Vec<Bytes>> {
    let batches = split_batches(body)?;
    check_peer_batches(batches, count, log, base)
}

/// Checks batches read into their own buffers: each verifies, any bytes after it are zero
/// padding shorter than a page, and together they are `count` dense batches of `log` at `base`.
fn peer_split_batches(
    batches: Vec<Bytes>,
    count: u32,
    log: LogId,
    base: Offset,
) -> Result<Vec<Bytes>> {
    for b in &batches {
        let h = record::verify(b)?;
        let tail = &b[h.batch_len()..];
        if tail.len() >= crate::limits::DISK_ALIGN_BYTES || tail.iter().any(|&x| x != 0) {
            return Err(Error::Malformed(
                "bytes after a batch that are not padding".into(),
            ));
        }
    }
    check_peer_batches(batches, count, log, base)
}

fn check_peer_batches(
    batches: Vec<Bytes>,
    count: u32,
    log: LogId,
    base: Offset,
) -> Result<Vec<Bytes>> {
    if batches.len() != count as usize {
        return Err(Error::Malformed(format!(
            "peer message announces {count} batches, carries {}",
            batches.len()
        )));
    }
    let mut next = base;
    for b in &batches {
        let h = BatchHeader::decode(b)?;
        if h.log_id != log {
            return Err(Error::Malformed(format!(
                "batch of log {} in a message for log {}",
                h.log_id, log
            )));
        }
        if h.base_offset != next {
            return Err(Error::Malformed(format!(
                "batch at {} where {} was expected",
                h.base_offset, next
            )));
        }
        next = Offset(
            next.0
                .checked_add(u64::from(h.record_count))
                .ok_or_else(|| Error::Malformed("offset overflow".into()))?,
        );
    }
    Ok(batches)
}

fn no_trailing(body: &Bytes, what: &str) -> Result<()> {
    if body.has_remaining() {
        return Err(Error::Malformed(format!("{what}: trailing bytes")));
    }
    Ok(())
}

impl PeerMessage {
    pub fn epoch(&self) -> Epoch {
        match self {
            PeerMessage::Append { epoch, .. }
            | PeerMessage::Commit { epoch, .. }
            | PeerMessage::Ack { epoch, .. }
            | PeerMessage::CreateLog { epoch, .. }
            | PeerMessage::NoLog { epoch, .. }
            | PeerMessage::Fetch { epoch, .. }
            | PeerMessage::FetchReply { epoch, .. }
            | PeerMessage::Trim { epoch, .. } => *epoch,
        }
    }

    pub fn session(&self) -> u64 {
        match self {
            PeerMessage::Append { session, .. }
            | PeerMessage::Commit { session, .. }
            | PeerMessage::Ack { session, .. }
            | PeerMessage::CreateLog { session, .. }
            | PeerMessage::NoLog { session, .. }
            | PeerMessage::Fetch { session, .. }
            | PeerMessage::FetchReply { session, .. }
            | PeerMessage::Trim { session, .. } => *session,
        }
    }

    pub fn log(&self) -> LogId {
        match self {
            PeerMessage::Append { log, .. }
            | PeerMessage::Commit { log, .. }
            | PeerMessage::Ack { log, .. }
            | PeerMessage::CreateLog { log, .. }
            | PeerMessage::NoLog { log, .. }
            | PeerMessage::Fetch { log, .. }
            | PeerMessage::FetchReply { log, .. }
            | PeerMessage::Trim { log, .. } => *log,
        }
    }

    /// Bytes of batch data carried (for accounting and bounds).
    pub fn batch_bytes(&self) -> usize {
        match self {
            PeerMessage::Append { batches, .. } | PeerMessage::FetchReply { batches, .. } => {
                batches_len(batches)
            }
            _ => 0,
        }
    }

    /// The whole frame (`Kind::Peer`, request id 0); batches are chunks, sent without copying.
    /// Batches must already be cut to their `batch_len` (no padding).
    pub fn encode(&self) -> Encoded {
        let prefix = |b: &mut BytesMut, sub: u8| {
            b.put_u8(sub);
            b.put_u64_le(self.epoch().0);
            b.put_u64_le(self.session());
            b.put_u64_le(self.log().0);
        };
        match self {
            PeerMessage::Append {
                base,
                committed_end,
                batches,
                ..
            } => encode_frame(Kind::Peer, 0, batches.clone(), |b| {
                prefix(b, PEER_APPEND);
                b.put_u64_le(base.0);
                b.put_u64_le(committed_end.0);
                b.put_u32_le(batches.len() as u32);
            }),
            PeerMessage::Commit { committed_end, .. } => encode_frame(Kind::Peer, 0, vec![], |b| {
                prefix(b, PEER_COMMIT);
                b.put_u64_le(committed_end.0);
            }),
            PeerMessage::Ack {
                seq,
                written_end,
                ack_end,
                chain_end,
                committed_end,
                resend,
                trim_point,
                ..
            } => encode_frame(Kind::Peer, 0, vec![], |b| {
                prefix(b, PEER_ACK);
                b.put_u64_le(*seq);
                b.put_u64_le(written_end.0);
                b.put_u64_le(ack_end.0);
                b.put_u64_le(chain_end.0);
                b.put_u64_le(committed_end.0);
                b.put_u8(u8::from(*resend));
                b.put_u64_le(trim_point.0);
            }),
            PeerMessage::CreateLog { name, .. } => encode_frame(Kind::Peer, 0, vec![], |b| {
                prefix(b, PEER_CREATE_LOG);
                b.put_u16_le(name.len() as u16);
                b.put_slice(name.as_bytes());
            }),
            PeerMessage::NoLog { .. } => {
                encode_frame(Kind::Peer, 0, vec![], |b| prefix(b, PEER_NO_LOG))
            }
            PeerMessage::Fetch {
                from, max_bytes, ..
            } => encode_frame(Kind::Peer, 0, vec![], |b| {
                prefix(b, PEER_FETCH);
                b.put_u64_le(from.0);
                b.put_u32_le(*max_bytes);
            }),
            PeerMessage::FetchReply { base, batches, .. } => {
                encode_frame(Kind::Peer, 0, batches.clone(), |b| {
                    prefix(b, PEER_FETCH_REPLY);
                    b.put_u64_le(base.0);
                    b.put_u32_le(batches.len() as u32);
                })
            }
            PeerMessage::Trim { before, point, .. } => encode_frame(Kind::Peer, 0, vec![], |b| {
                prefix(b, PEER_TRIM);
                b.put_u64_le(before.0);
                b.put_u64_le(point.0);
            }),
        }
    }

    /// Decodes a batch-carrying peer message whose batches a transport read into buffers of
    /// their own (`fixed` is the body up to the first batch; see [`peer_fixed_len`]). Each
    /// batch may carry zero padding after it. Verifies exactly as [`PeerMessage::decode`].
    pub fn decode_split(fixed: Bytes, batches: Vec<Bytes>) -> Result<PeerMessage> {
        Self::decode_with(fixed, |count, log, base| {
            peer_split_batches(batches, count, log, base)
        })
    }

    /// The fixed part of a batch-carrying message; `batches` checks and returns its batches.
    fn decode_with(
        mut fixed: Bytes,
        batches: impl FnOnce(u32, LogId, Offset) -> Result<Vec<Bytes>>,
    ) -> Result<PeerMessage> {
        need(&fixed, PEER_PREFIX_LEN, "peer")?;
        let sub = fixed.get_u8();
        let epoch = Epoch(fixed.get_u64_le());
        let session = fixed.get_u64_le();
        let log = LogId(fixed.get_u64_le());
        match sub {
            PEER_APPEND => {
                need(&fixed, 20, "peer append")?;
                let base = Offset(fixed.get_u64_le());
                let committed_end = Offset(fixed.get_u64_le());
                let count = fixed.get_u32_le();
                no_trailing(&fixed, "peer append")?;
                Ok(PeerMessage::Append {
                    epoch,
                    session,
                    log,
                    base,
                    committed_end,
                    batches: batches(count, log, base)?,
                })
            }
            PEER_FETCH_REPLY => {
                need(&fixed, 12, "peer fetch reply")?;
                let base = Offset(fixed.get_u64_le());
                let count = fixed.get_u32_le();
                no_trailing(&fixed, "peer fetch reply")?;
                Ok(PeerMessage::FetchReply {
                    epoch,
                    session,
                    log,
                    base,
                    batches: batches(count, log, base)?,
                })
            }
            s => Err(Error::Malformed(format!(
                "peer sub-kind {s} carries no batches"
            ))),
        }
    }

    /// Decodes the body of a `Kind::Peer` frame, verifying every batch fully (checksums,
    /// limits, log id, dense offsets). Any malformed input is a typed error, never a panic.
    pub fn decode(mut body: Bytes) -> Result<PeerMessage> {
        if let Some(n) = body.first().and_then(|&sub| peer_fixed_len(sub)) {
            need(&body, n, "peer")?;
            let fixed = body.split_to(n);
            return Self::decode_with(fixed, |count, log, base| {
                peer_batches(body, count, log, base)
            });
        }
        need(&body, PEER_PREFIX_LEN, "peer")?;
        let sub = body.get_u8();
        let epoch = Epoch(body.get_u64_le());
        let session = body.get_u64_le();
        let log = LogId(body.get_u64_le());
        let msg = match sub {
            PEER_COMMIT => {
                need(&body, 8, "peer commit")?;
                PeerMessage::Commit {
                    epoch,
                    session,
                    log,
                    committed_end: Offset(body.get_u64_le()),
                }
            }
            PEER_ACK => {
                need(&body, 41, "peer ack")?;
                let seq = body.get_u64_le();
                let written_end = Offset(body.get_u64_le());
                let ack_end = Offset(body.get_u64_le());
                let chain_end = Offset(body.get_u64_le());
                let committed_end = Offset(body.get_u64_le());
                let resend = match body.get_u8() {
                    0 => false,
                    1 => true,
                    v => return Err(Error::Malformed(format!("peer ack: resend flag {v}"))),
                };
                // A node of the first layout reports no trim point.
                let trim_point = if body.is_empty() {
                    Offset::ZERO
                } else {
                    need(&body, 8, "peer ack trim point")?;
                    Offset(body.get_u64_le())
                };
                PeerMessage::Ack {
                    epoch,
                    session,
                    log,
                    seq,
                    written_end,
                    ack_end,
                    chain_end,
                    committed_end,
                    resend,
                    trim_point,
                }
            }
            PEER_CREATE_LOG => {
                need(&body, 2, "peer create-log")?;
                let n = body.get_u16_le() as usize;
                if n > LOG_NAME_BYTES_MAX {
                    return Err(Error::TooLarge {
                        what: "log name",
                        size: n,
                        limit: LOG_NAME_BYTES_MAX,
                    });
                }
                need(&body, n, "peer create-log")?;
                let name = String::from_utf8(body.split_to(n).to_vec())
                    .map_err(|_| Error::Malformed("log name is not UTF-8".into()))?;
                if !crate::types::log_name_valid(&name) || LogId::from_name(&name) != log {
                    return Err(Error::Malformed(format!(
                        "peer create-log: bad name {name:?}"
                    )));
                }
                PeerMessage::CreateLog {
                    epoch,
                    session,
                    log,
                    name,
                }
            }
            PEER_NO_LOG => PeerMessage::NoLog {
                epoch,
                session,
                log,
            },
            PEER_FETCH => {
                need(&body, 12, "peer fetch")?;
                PeerMessage::Fetch {
                    epoch,
                    session,
                    log,
                    from: Offset(body.get_u64_le()),
                    max_bytes: body.get_u32_le(),
                }
            }
            PEER_TRIM => {
                need(&body, 8, "peer trim")?;
                let before = Offset(body.get_u64_le());
                // A node of the first layout sends no trim point: it serves from `before`.
                let point = if body.is_empty() {
                    before
                } else {
                    need(&body, 8, "peer trim point")?;
                    Offset(body.get_u64_le())
                };
                PeerMessage::Trim {
                    epoch,
                    session,
                    log,
                    before,
                    point,
                }
            }
            s => return Err(Error::Malformed(format!("unknown peer message {s}"))),
        };
        no_trailing(&body, "peer")?;
        Ok(msg)
    }
}

#[cfg(test)]
mod peer_tests {
    use super::*;
    use crate::record::build;

    fn round_trip(m: PeerMessage) {
        let e = m.encode().to_vec();
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&e[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&hb).expect("header");
        assert_eq!(h.kind, Kind::Peer as u16);
        assert_eq!(h.request_id, 0);
        assert_eq!(h.body_len as usize, e.len() - FRAME_HEADER_LEN);
        let body = Bytes::copy_from_slice(&e[FRAME_HEADER_LEN..]);
        assert_eq!(PeerMessage::decode(body).expect("decode"), m);
    }

    fn samples() -> Vec<PeerMessage> {
        let log = LogId::from_name("orders");
        let b1 = build(log, Offset(10), Epoch(2), &[b"a", b"bb"]).expect("build");
        let b2 = build(log, Offset(12), Epoch(2), &[b"c"]).expect("build");
        let (epoch, session) = (Epoch(2), 77);
        vec![
            PeerMessage::Append {
                epoch,
                session,
                log,
                base: Offset(10),
                committed_end: Offset(4),
                batches: vec![b1.clone(), b2],
            },
            PeerMessage::Append {
                epoch,
                session,
                log,
                base: Offset(13),
                committed_end: Offset(4),
                batches: vec![],
            },
            PeerMessage::Commit {
                epoch,
                session,
                log,
                committed_end: Offset(9),
            },
            PeerMessage::Ack {
                epoch,
                session,
                log,
                seq: 3,
                written_end: Offset(13),
                ack_end: Offset(12),
                chain_end: Offset(13),
                committed_end: Offset(9),
                resend: true,
                trim_point: Offset(4),
            },
            PeerMessage::CreateLog {
                epoch,
                session,
                log,
                name: "orders".into(),
            },
            PeerMessage::NoLog {
                epoch,
                session,
                log,
            },
            PeerMessage::Fetch {
                epoch,
                session,
                log,
                from: Offset(10),
                max_bytes: 1 << 20,
            },
            PeerMessage::FetchReply {
                epoch,
                session,
                log,
                base: Offset(10),
                batches: vec![b1],
            },
            PeerMessage::Trim {
                epoch,
                session,
                log,
                before: Offset(3),
                point: Offset(7),
            },
        ]
    }

    #[test]
    fn an_ack_of_the_first_layout_reports_no_trim_point() {
        let m = PeerMessage::Ack {
            epoch: Epoch(2),
            session: 9,
            log: LogId(4),
            seq: 3,
            written_end: Offset(10),
            ack_end: Offset(9),
            chain_end: Offset(10),
            committed_end: Offset(8),
            resend: false,
            trim_point: Offset(7),
        };
        let e = m.encode().to_vec();
        let body = &e[FRAME_HEADER_LEN..e.len() - 8];
        match PeerMessage::decode(Bytes::copy_from_slice(body)) {
            Ok(PeerMessage::Ack {
                ack_end,
                trim_point,
                ..
            }) => assert_eq!((ack_end, trim_point), (Offset(9), Offset(0))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_trim_of_the_first_layout_has_its_start_for_point() {
        let m = PeerMessage::Trim {
            epoch: Epoch(2),
            session: 9,
            log: LogId(4),
            before: Offset(3),
            point: Offset(7),
        };
        let e = m.encode().to_vec();
        let body = &e[FRAME_HEADER_LEN..e.len() - 8];
        match PeerMessage::decode(Bytes::copy_from_slice(body)) {
            Ok(PeerMessage::Trim { before, point, .. }) => {
                assert_eq!((before, point), (Offset(3), Offset(3)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn peer_messages_round_trip() {
        for m in samples() {
            round_trip(m);
        }
    }

    #[test]
    fn peer_batches_must_be_dense_and_of_the_log() {
        let log = LogId::from_name("orders");
        let b1 = build(log, Offset(10), Epoch(2), &[b"a"]).expect("build");
        let b3 = build(log, Offset(12), Epoch(2), &[b"c"]).expect("build");
        let other = build(LogId(1), Offset(11), Epoch(2), &[b"c"]).expect("build");
        for batches in [vec![b1.clone(), b3], vec![b1.clone(), other]] {
            let m = PeerMessage::Append {
                epoch: Epoch(2),
                session: 1,
                log,
                base: Offset(10),
                committed_end: Offset(0),
                batches,
            };
            let e = m.encode().to_vec();
            assert!(PeerMessage::decode(Bytes::copy_from_slice(&e[FRAME_HEADER_LEN..])).is_err());
        }
    }

    #[test]
    fn peer_garbage_is_an_error_not_a_panic() {
        for m in samples() {
            let e = m.encode().to_vec();
            let body = &e[FRAME_HEADER_LEN..];
            for cut in 0..body.len() {
                let _ = PeerMessage::decode(Bytes::copy_from_slice(&body[..cut]));
            }
            // Flip every byte of small messages (and the fixed part of large ones).
            for at in 0..body.len().min(200) {
                let mut v = body.to_vec();
                v[at] ^= 0x5A;
                let _ = PeerMessage::decode(Bytes::from(v));
            }
            let mut v = body.to_vec();
            v.push(0);
            assert!(PeerMessage::decode(Bytes::from(v)).is_err(), "{m:?}");
        }
        for len in 0..64usize {
            for fill in [0u8, 1, 3, 0xFF] {
                let _ = PeerMessage::decode(Bytes::from(vec![fill; len]));
            }
        }
    }
}
