//! Client MECHANICS tests against a scripted in-test TCP responder that speaks the wire
//! protocol: pipelining, out-of-order replies, timeouts, reconnects, redirects, retries with
//! identical bytes, batching, subscription resume. The responder is NOT a chainlog server and
//! checks nothing about replication; end-to-end tests against the real server live elsewhere.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use chainlog_client::{
    Client, ClientConfig, ClusterId, Error, ErrorCode, Offset, ProducerId, ReadOptions,
};
use chainlog_core::record;
use chainlog_core::session::{Dedup, ProducerTable};
use chainlog_core::wire::{
    ClientReply, ClientRequest, Encoded, FrameHeader, Hello, HelloOk, Kind, CONNECTION_REQUEST_ID,
    FRAME_HEADER_LEN, PROTOCOL_VERSION,
};
use chainlog_core::{Epoch, LogId, NodeId};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER: ClusterId = ClusterId(77);

struct Peer {
    s: TcpStream,
}

impl Peer {
    /// Accepts one connection and answers its `Hello`.
    async fn accept(l: &TcpListener) -> Peer {
        let (s, _) = l.accept().await.unwrap();
        let mut p = Peer { s };
        let (kind, id, body) = p.read().await.unwrap();
        assert_eq!(kind, Kind::Hello as u16);
        assert_eq!(id, 0);
        let h = Hello::decode(body).unwrap();
        assert_eq!(h.version, PROTOCOL_VERSION);
        p.write(
            HelloOk {
                version: PROTOCOL_VERSION,
                cluster_id: CLUSTER,
                node: NodeId(1),
                epoch: Epoch(1),
            }
            .encode(0),
        )
        .await;
        p
    }

    async fn read(&mut self) -> Option<(u16, u64, Bytes)> {
        let mut hb = [0u8; FRAME_HEADER_LEN];
        self.s.read_exact(&mut hb).await.ok()?;
        let h = FrameHeader::decode(&hb).unwrap();
        let mut body = BytesMut::zeroed(h.body_len as usize);
        self.s.read_exact(&mut body).await.ok()?;
        Some((h.kind, h.request_id, body.freeze()))
    }

    async fn request(&mut self) -> Option<(u64, ClientRequest)> {
        let (kind, id, body) = self.read().await?;
        Some((id, ClientRequest::decode(kind, body).unwrap()))
    }

    async fn write(&mut self, e: Encoded) {
        self.s.write_all(&e.to_vec()).await.unwrap();
    }

    async fn reply(&mut self, id: u64, r: ClientReply) {
        self.write(r.encode(id)).await;
    }
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

/// Serves every connection to `l` (each on a task of its own), answering each request with
/// the frames `answer` gives (none: the request stays unanswered).
fn serve_with<F>(l: TcpListener, answer: F)
where
    F: Fn(ClientRequest) -> Vec<ClientReply> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let mut p = Peer::accept(&l).await;
            let answer = answer.clone();
            tokio::spawn(async move {
                while let Some((id, req)) = p.request().await {
                    for r in answer(req) {
                        p.reply(id, r).await;
                    }
                }
            });
        }
    });
}

fn not_head(head: &str) -> ClientReply {
    ClientReply::Error {
        code: ErrorCode::NotHead,
        message: format!("not head; head is node 1 at {head}"),
    }
}

fn cfg(addrs: &[&str]) -> ClientConfig {
    ClientConfig {
        request_timeout_ms: 2_000,
        retry_backoff_ms: 1,
        ..ClientConfig::new(addrs.iter().copied())
    }
}

#[tokio::test]
async fn pipelined_requests_get_out_of_order_replies_routed_by_id() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        // Every request arrives before any reply is sent: they are pipelined.
        let mut ids = Vec::new();
        for _ in 0..16 {
            let (id, req) = p.request().await.unwrap();
            assert_eq!(req, ClientRequest::Status);
            ids.push(id);
        }
        for id in ids.iter().rev() {
            let json = format!("{{\"id\":{id}}}");
            p.reply(*id, ClientReply::StatusOk { json: json.into() })
                .await;
        }
        // Only one connection was used.
        tokio::time::timeout(Duration::from_millis(100), l.accept())
            .await
            .is_err()
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    assert_eq!(c.cluster_id(), CLUSTER);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.status_raw_of(0).await })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for call in calls {
        let raw = call.await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert!(seen.insert(v["id"].as_u64().unwrap()));
    }
    assert_eq!(seen.len(), 16);
    assert!(server.await.unwrap(), "client opened a second connection");
}

#[tokio::test]
async fn timeout_is_typed_and_the_connection_stays_usable() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (_ignored, _) = p.request().await.unwrap();
        let (id, _) = p.request().await.unwrap();
        p.reply(id, ClientReply::StatusOk { json: "{}".into() })
            .await;
        p.read().await // keep the socket open until the client is done
    });
    let mut cfg = cfg(&[&addr]);
    cfg.request_timeout_ms = 150;
    let c = Client::connect(cfg).await.unwrap();
    let e = c.status().await.unwrap_err();
    assert!(matches!(e, Error::Timeout { what: "status", .. }), "{e:?}");
    assert!(e.is_retriable());
    assert_eq!(c.status().await.unwrap(), serde_json::json!({}));
    drop(c);
    let _ = server.await;
}

#[tokio::test]
async fn lost_connection_fails_in_flight_and_next_request_reconnects() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        {
            let mut p = Peer::accept(&l).await;
            let _ = p.request().await.unwrap();
            // Dropped without a reply.
        }
        let mut p = Peer::accept(&l).await;
        let (id, _) = p.request().await.unwrap();
        p.reply(id, ClientReply::StatusOk { json: "[1]".into() })
            .await;
        p.read().await
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let e = c.status().await.unwrap_err();
    assert!(matches!(e, Error::ConnectionLost { .. }), "{e:?}");
    assert_eq!(c.status().await.unwrap(), serde_json::json!([1]));
    drop(c);
    let _ = server.await;
}

/// What a server says of the whole connection before it closes it (an `Error` for no request)
/// is the reason the requests in flight then fail with: still a lost connection (an append
/// among them may be stored), not a refusal of any of them.
#[tokio::test]
async fn the_servers_reason_for_closing_reaches_the_requests_in_flight() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let _ = p.request().await.unwrap();
        let why = ClientReply::Error {
            code: ErrorCode::RecordTooLarge,
            message: "frame of 9999999 bytes over the limit".into(),
        };
        p.reply(CONNECTION_REQUEST_ID, why).await;
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let e = c.status().await.unwrap_err();
    match &e {
        Error::ConnectionLost { reason, .. } => {
            assert!(reason.contains("RecordTooLarge"), "{reason}");
            assert!(reason.contains("9999999 bytes over the limit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn wrong_cluster_is_refused() {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        let _p = Peer::accept(&l).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let mut cfg = cfg(&[&addr]);
    cfg.cluster_id = ClusterId(5);
    let e = Client::connect(cfg).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::WrongCluster {
                expected: ClusterId(5),
                got: CLUSTER,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn append_retry_resends_identical_bytes_after_a_lost_reply() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let first = {
            let mut p = Peer::accept(&l).await;
            let (_, req) = p.request().await.unwrap();
            req
        }; // connection dropped: the reply is lost
        let mut p = Peer::accept(&l).await;
        let (id, retry) = p.request().await.unwrap();
        assert_eq!(retry, first, "retry must carry the same batch bytes");
        let ClientRequest::Append { batch } = retry else {
            panic!("not an append")
        };
        let h = record::verify(&batch).unwrap();
        p.reply(
            id,
            ClientReply::AppendOk {
                base_offset: Offset(40),
                record_count: h.record_count,
            },
        )
        .await;
        p.read().await;
        h
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let (base, n) = c.append_batch("orders", &["a", "bb", "ccc"]).await.unwrap();
    assert_eq!((base, n), (Offset(40), 3));
    let producer = c.producer_id();
    drop(c);
    let h = server.await.unwrap();
    assert_eq!(h.log_id, LogId::from_name("orders"));
    assert_eq!(h.producer_id, producer);
    assert_ne!(producer.0, 0);
    assert_eq!(h.producer_seq, 0);
    assert_eq!(h.cluster_id, CLUSTER);
}

#[tokio::test]
async fn not_head_redirect_is_followed() {
    let (la, a) = listener().await;
    let (lb, b) = listener().await;
    let b2 = b.clone();
    tokio::spawn(async move {
        let mut p = Peer::accept(&la).await;
        while let Some((id, _)) = p.request().await {
            let message = format!("not head; head is node 2 at {b2}");
            p.reply(
                id,
                ClientReply::Error {
                    code: ErrorCode::NotHead,
                    message,
                },
            )
            .await;
        }
    });
    let head = tokio::spawn(async move {
        let mut p = Peer::accept(&lb).await;
        let (id, req) = p.request().await.unwrap();
        assert!(matches!(req, ClientRequest::Append { .. }));
        p.reply(
            id,
            ClientReply::AppendOk {
                base_offset: Offset(7),
                record_count: 1,
            },
        )
        .await;
        p.read().await;
    });
    let c = Client::connect(cfg(&[&a])).await.unwrap();
    assert_eq!(c.append("default", "x").await.unwrap(), Offset(7));
    assert_eq!(c.nodes(), vec![a, b]);
    drop(c);
    head.await.unwrap();
}

#[tokio::test]
async fn refused_append_is_a_typed_error_and_the_next_reuses_its_sequence() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (id, _) = p.request().await.unwrap();
        p.reply(
            id,
            ClientReply::Error {
                code: ErrorCode::UnknownLog,
                message: "no log nolog".into(),
            },
        )
        .await;
        let (id, req) = p.request().await.unwrap();
        let ClientRequest::Append { batch } = req else {
            panic!()
        };
        let h = record::verify(&batch).unwrap();
        p.reply(
            id,
            ClientReply::AppendOk {
                base_offset: Offset(0),
                record_count: 1,
            },
        )
        .await;
        p.read().await;
        h.producer_seq
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let e = c.append("nolog", "x").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownLog));
    assert!(!e.is_retriable());
    assert_eq!(c.append("nolog", "y").await.unwrap(), Offset(0));
    drop(c);
    // The refused batch was never stored, so its sequence is not skipped.
    assert_eq!(server.await.unwrap(), 0);
}

/// On a multi-thread runtime a woken flusher runs before the tasks woken with it (tokio's LIFO
/// slot): unless it lets them run first, a closed loop of appends turns into one-record
/// batches. 64 tasks appending in lock step must still share batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn closed_loop_appends_share_batches_on_a_multi_thread_runtime() {
    const TASKS: usize = 64;
    const ROUNDS: usize = 20;
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let (mut next, mut batches) = (0u64, 0usize);
        while next < (TASKS * ROUNDS) as u64 {
            let (id, req) = p.request().await.unwrap();
            let ClientRequest::Append { batch } = req else {
                panic!()
            };
            let h = record::verify(&batch).unwrap();
            p.reply(
                id,
                ClientReply::AppendOk {
                    base_offset: Offset(next),
                    record_count: h.record_count,
                },
            )
            .await;
            next += u64::from(h.record_count);
            batches += 1;
        }
        batches
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                c.append("default", format!("t{t}r{r}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let batches = server.await.unwrap();
    let per_batch = (TASKS * ROUNDS) as f64 / batches as f64;
    assert!(
        per_batch >= 8.0,
        "{batches} batches for {} appends: {per_batch:.1} records per batch",
        TASKS * ROUNDS
    );
}

#[tokio::test]
async fn concurrent_appends_merge_into_batches_and_get_their_own_offsets() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let mut next = 0u64;
        let mut batches = 0usize;
        let mut payloads = Vec::new();
        let mut seqs = Vec::new();
        while next < 100 {
            let (id, req) = p.request().await.unwrap();
            let ClientRequest::Append { batch } = req else {
                panic!()
            };
            let h = record::verify(&batch).unwrap();
            seqs.push(h.producer_seq);
            for (_, pl) in record::records(&batch).unwrap() {
                payloads.push(String::from_utf8(pl.to_vec()).unwrap());
            }
            // Slow durable write: appends queue up behind this batch.
            tokio::time::sleep(Duration::from_millis(50)).await;
            p.reply(
                id,
                ClientReply::AppendOk {
                    base_offset: Offset(next),
                    record_count: h.record_count,
                },
            )
            .await;
            next += u64::from(h.record_count);
            batches += 1;
        }
        p.read().await;
        (batches, payloads, seqs)
    });
    let mut cfg = cfg(&[&addr]);
    cfg.batches_in_flight_max = 1;
    let c = Client::connect(cfg).await.unwrap();
    let producer = c.producer("default").unwrap();
    let mut tickets = Vec::new();
    for i in 0..100 {
        tickets.push(producer.send(format!("r{i}")).await.unwrap());
    }
    let mut offsets = Vec::new();
    for t in tickets {
        let (o, n) = t.await.unwrap();
        assert_eq!(n, 1);
        offsets.push(o.0);
    }
    // Call order is offset order.
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    drop((c, producer));
    let (batches, payloads, seqs) = server.await.unwrap();
    assert!(batches <= 2, "{batches} batches for 100 queued appends");
    assert_eq!(
        payloads,
        (0..100).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
    // Sequences are record-indexed: each batch starts where the previous ended.
    assert_eq!(seqs[0], 0);
}

#[tokio::test]
async fn read_skips_records_before_from() {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        while let Some((id, req)) = p.request().await {
            let ClientRequest::Read { log, from, .. } = req else {
                panic!()
            };
            assert_eq!(from, Offset(6));
            let b1 = record::build(log, Offset(5), Epoch(1), &[b"five", b"six"]).unwrap();
            let b2 = record::build(log, Offset(7), Epoch(1), &[b"seven"]).unwrap();
            p.reply(
                id,
                ClientReply::ReadOk {
                    committed_end: Offset(8),
                    batches: vec![b1, b2],
                },
            )
            .await;
        }
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let recs = c.read("default", Offset(6), 100).await.unwrap();
    let got: Vec<(u64, &[u8])> = recs.iter().map(|r| (r.offset.0, &r.payload[..])).collect();
    assert_eq!(got, vec![(6, &b"six"[..]), (7, &b"seven"[..])]);
}

#[tokio::test]
async fn subscription_resumes_after_the_last_record_on_reconnect() {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        let log = LogId::from_name("default");
        {
            let mut p = Peer::accept(&l).await;
            let (id, req) = p.request().await.unwrap();
            assert_eq!(
                req,
                ClientRequest::Subscribe {
                    log,
                    from: Offset(1)
                }
            );
            let b = record::build(log, Offset(0), Epoch(1), &[b"0", b"1", b"2"]).unwrap();
            p.reply(
                id,
                ClientReply::Records {
                    committed_end: Offset(3),
                    batches: vec![b],
                },
            )
            .await;
        } // connection drops
        let mut p = Peer::accept(&l).await;
        let (id, req) = p.request().await.unwrap();
        assert_eq!(
            req,
            ClientRequest::Subscribe {
                log,
                from: Offset(3)
            }
        );
        let b = record::build(log, Offset(3), Epoch(1), &[b"3"]).unwrap();
        p.reply(
            id,
            ClientReply::Records {
                committed_end: Offset(4),
                batches: vec![b],
            },
        )
        .await;
        p.reply(
            id,
            ClientReply::Error {
                code: ErrorCode::OffsetTrimmed,
                message: "gone".into(),
            },
        )
        .await;
        p.read().await;
    });
    // Lazy client: the subscription's own connection is the first the responder sees.
    let c = Client::new(cfg(&[&addr])).unwrap();
    let mut sub = c.subscribe("default", Offset(1)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sub.next().await.unwrap().unwrap().offset.0);
    }
    assert_eq!(got, vec![1, 2, 3]);
    let e = sub.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OffsetTrimmed));
    assert!(sub.next().await.is_none());
}

/// An in-memory log for the scripted responder: appends get offsets from 0, reads return
/// the stored batches (restamped like a head would).
#[derive(Default)]
struct MemLog {
    stored: Vec<Bytes>,
    end: u64,
}

/// Serves appends and reads on one connection until the client closes it.
async fn serve_log(mut p: Peer, log: &mut MemLog) {
    while let Some((id, req)) = p.request().await {
        match req {
            ClientRequest::Append { batch } => {
                let h = record::verify(&batch).unwrap();
                let mut m = BytesMut::from(&batch[..]);
                record::restamp(&mut m, CLUSTER, Epoch(1), Offset(log.end));
                log.stored.push(m.freeze());
                let base_offset = Offset(log.end);
                log.end += u64::from(h.record_count);
                p.reply(
                    id,
                    ClientReply::AppendOk {
                        base_offset,
                        record_count: h.record_count,
                    },
                )
                .await;
            }
            ClientRequest::Read { from, .. } => {
                let batches = log
                    .stored
                    .iter()
                    .filter(|b| record::verify(b).unwrap().end_offset() > from)
                    .cloned()
                    .collect();
                let committed_end = Offset(log.end);
                p.reply(
                    id,
                    ClientReply::ReadOk {
                        committed_end,
                        batches,
                    },
                )
                .await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn blocking_client_appends_and_reads() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (l, addr) = rt.block_on(listener());
    rt.spawn(async move { serve_log(Peer::accept(&l).await, &mut MemLog::default()).await });
    let c = chainlog_client::BlockingClient::connect(cfg(&[&addr])).unwrap();
    assert_eq!(c.append("default", "zero").unwrap(), Offset(0));
    assert_eq!(
        c.append_batch("default", &["one", "two"]).unwrap(),
        (Offset(1), 2)
    );
    let recs = c.read("default", Offset(1), 10).unwrap();
    let got: Vec<&[u8]> = recs.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(got, vec![&b"one"[..], &b"two"[..]]);
    assert_eq!(c.committed_end("default").unwrap(), Offset(3));
}

#[test]
fn cli_append_then_read_round_trips_lines() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (l, addr) = rt.block_on(listener());
    // Each CLI run is one connection; both see the same log.
    rt.spawn(async move {
        let mut log = MemLog::default();
        loop {
            let p = Peer::accept(&l).await;
            serve_log(p, &mut log).await;
        }
    });
    let exe = env!("CARGO_BIN_EXE_chainlog");
    let mut child = std::process::Command::new(exe)
        .args(["--addr", &addr, "append", "--log", "lines"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"alpha\n\ngamma\r\ndelta")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "appended 4 records to 'lines' at offsets 0..=3\n"
    );
    let out = std::process::Command::new(exe)
        .args(["--addr", &addr, "read", "--log", "lines", "--from", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"\ngamma\ndelta\n");
}

#[tokio::test]
async fn pipelined_batches_are_resent_in_order_with_identical_bytes() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut first = Vec::new();
        {
            let mut p = Peer::accept(&l).await;
            let mut records = 0;
            while records < 3 {
                let (_, req) = p.request().await.unwrap();
                let ClientRequest::Append { batch } = req else {
                    panic!()
                };
                records += record::verify(&batch).unwrap().record_count;
                first.push(batch);
            }
        } // lost with every batch in flight
        let mut p = Peer::accept(&l).await;
        let mut end = 0u64;
        for want in &first {
            let (id, req) = p.request().await.unwrap();
            assert_eq!(
                req,
                ClientRequest::Append {
                    batch: want.clone()
                }
            );
            let n = record::verify(want).unwrap().record_count;
            p.reply(
                id,
                ClientReply::AppendOk {
                    base_offset: Offset(end),
                    record_count: n,
                },
            )
            .await;
            end += u64::from(n);
        }
        p.read().await;
        first.len()
    });
    let mut cfg = cfg(&[&addr]);
    cfg.batches_in_flight_max = 4;
    let c = Client::connect(cfg).await.unwrap();
    let producer = c.producer("default").unwrap();
    let mut tickets = Vec::new();
    for i in 0..3 {
        tickets.push(producer.send(format!("r{i}")).await.unwrap());
        // Let the flusher put each on the wire separately (it yields once to let other
        // runnable tasks join a batch before it seals it).
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    let mut offsets = Vec::new();
    for t in tickets {
        offsets.push(t.await.unwrap().0 .0);
    }
    assert_eq!(offsets, vec![0, 1, 2]);
    drop((c, producer));
    assert_eq!(server.await.unwrap(), 3, "expected three batches in flight");
}

/// What the dedup head below stored: (producer id, sequence, payloads) per batch, in order.
type Stored = Vec<(ProducerId, u64, Vec<Bytes>)>;

/// A head with the server's own dedup (`ProducerTable`: producer id + sequence): a retry of a
/// stored batch is answered with its offsets, an out-of-order one with `SequenceGap`. The
/// first `refusals` appends are answered with `code`; the first of them is stored before
/// that when `store_first` (a head whose reply does not prove the batch stored nowhere).
async fn dedup_head(l: TcpListener, refusals: usize, code: ErrorCode, store_first: bool) -> Stored {
    let mut p = Peer::accept(&l).await;
    let mut table = ProducerTable::new(16);
    let mut stored: Stored = Vec::new();
    let mut end = 0u64;
    let mut appends = 0usize;
    while let Some((id, req)) = p.request().await {
        let ClientRequest::Append { batch } = req else {
            panic!("unexpected {req:?}")
        };
        let h = record::verify(&batch).unwrap();
        let (producer, seq, count) = (h.producer_id, h.producer_seq, h.record_count);
        // Stores the batch; returns its base offset.
        let mut store = |table: &mut ProducerTable| {
            let base = Offset(end);
            table.record(producer, seq, count, base);
            let payloads = record::records(&batch).unwrap().map(|(_, b)| b).collect();
            stored.push((producer, seq, payloads));
            end += u64::from(count);
            base
        };
        appends += 1;
        if appends <= refusals {
            if appends == 1 && store_first {
                let _ = store(&mut table);
            }
            let message = "scripted refusal".into();
            p.reply(id, ClientReply::Error { code, message }).await;
            continue;
        }
        let reply = match table.check(producer, seq, count) {
            Dedup::Duplicate {
                base_offset,
                record_count,
            } => ClientReply::AppendOk {
                base_offset,
                record_count,
            },
            Dedup::Gap { expected } => ClientReply::Error {
                code: ErrorCode::SequenceGap,
                message: format!("expected {expected}"),
            },
            Dedup::New => ClientReply::AppendOk {
                base_offset: store(&mut table),
                record_count: count,
            },
        };
        p.reply(id, reply).await;
    }
    stored
}

fn payloads(stored: &Stored) -> Vec<&[u8]> {
    stored
        .iter()
        .flat_map(|(_, _, ps)| ps.iter().map(|p| &p[..]))
        .collect()
}

/// The head stored the batch and then answered `Internal`, which proves nothing. Reusing the
/// batch's sequence for "b" would get "a"'s offset back from dedup and lose "b" silently.
#[tokio::test]
async fn a_batch_stored_then_refused_with_internal_is_in_doubt_and_its_sequence_not_reused() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(dedup_head(l, 1, ErrorCode::Internal, true));
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let e = c.append("default", "a").await.unwrap_err();
    let b = c.append("default", "b").await.unwrap();
    assert_eq!(
        b,
        Offset(1),
        "\"b\" was answered with \"a\"'s offset: it is lost"
    );
    let Error::InDoubt { cause } = &e else {
        panic!("expected InDoubt, got {e:?}")
    };
    assert_eq!(cause.code(), Some(ErrorCode::Internal));
    assert!(
        e.to_string().contains("may or may not have been stored"),
        "{e}"
    );
    assert!(!e.is_retriable());
    assert_eq!(c.append("default", "c").await.unwrap(), Offset(2));
    let first = c.producer_id();
    drop(c);
    let stored = server.await.unwrap();
    assert_eq!(payloads(&stored), vec![&b"a"[..], b"b", b"c"]);
    // "b" and "c" continued under a fresh producer id, from sequence 0.
    assert_eq!(stored[0].0, first);
    assert_ne!(stored[1].0, first);
    assert_eq!((stored[1].1, stored[2].0, stored[2].1), (0, stored[1].0, 1));
}

/// A retriable code that proves nothing (`RetryPending` answers a retry the log already holds)
/// until the retries run out: in doubt, like the non-retriable case.
#[tokio::test]
async fn a_stored_batch_whose_retries_run_out_is_in_doubt() {
    let (l, addr) = listener().await;
    let mut cfg = cfg(&[&addr]);
    cfg.retries_max = 2;
    // The first attempt and both retries are refused.
    let server = tokio::spawn(dedup_head(l, 3, ErrorCode::RetryPending, true));
    let c = Client::connect(cfg).await.unwrap();
    let e = c.append("default", "a").await.unwrap_err();
    let b = c.append("default", "b").await.unwrap();
    assert_eq!(
        b,
        Offset(1),
        "\"b\" was answered with \"a\"'s offset: it is lost"
    );
    assert!(matches!(e, Error::InDoubt { .. }), "{e:?}");
    drop(c);
    assert_eq!(payloads(&server.await.unwrap()), vec![&b"a"[..], b"b"]);
}

/// `StorageFull` proves the batch is stored nowhere: the error is the server's, and the next
/// records take the same producer id and sequence.
#[tokio::test]
async fn a_storage_full_refusal_still_frees_its_sequence() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(dedup_head(l, 1, ErrorCode::StorageFull, false));
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    let e = c.append("default", "a").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e:?}");
    assert_eq!(c.append("default", "b").await.unwrap(), Offset(0));
    let producer = c.producer_id();
    drop(c);
    let stored = server.await.unwrap();
    assert_eq!(payloads(&stored), vec![&b"b"[..]]);
    assert_eq!((stored[0].0, stored[0].1), (producer, 0));
}

/// Read-your-writes across replicas: a replica answers a read at its committed end with no
/// records (at once when the read does not wait), so an append acknowledged by the head and
/// then read from a replica that has not heard of the commit came back `Ok(vec![])`. The
/// client now remembers the acknowledged end: the read asks the replica to wait for it and,
/// the replica still behind, goes to the head.
#[tokio::test]
async fn a_read_below_an_acknowledged_append_waits_then_goes_to_the_head() {
    let (la, a) = listener().await;
    let (lb, b) = listener().await;
    let log = LogId::from_name("default");
    let stored = record::build(log, Offset(0), Epoch(1), &[b"mine"]).unwrap();
    serve_with(la, move |req| match req {
        ClientRequest::Append { .. } => vec![ClientReply::AppendOk {
            base_offset: Offset(0),
            record_count: 1,
        }],
        ClientRequest::Read {
            from: Offset(0), ..
        } => vec![ClientReply::ReadOk {
            committed_end: Offset(1),
            batches: vec![stored.clone()],
        }],
        other => panic!("head: unexpected {other:?}"),
    });
    // A replica that never learns the commit, whatever it is asked to wait.
    let waits = Arc::new(Mutex::new(Vec::new()));
    let seen = waits.clone();
    let head = a.clone();
    serve_with(lb, move |req| match req {
        ClientRequest::Append { .. } => vec![not_head(&head)],
        ClientRequest::Read { wait_ms, .. } => {
            seen.lock().unwrap().push(wait_ms);
            vec![ClientReply::ReadOk {
                committed_end: Offset(0),
                batches: vec![],
            }]
        }
        other => panic!("replica: unexpected {other:?}"),
    });
    let c = Client::connect(cfg(&[&b, &a])).await.unwrap();
    assert_eq!(c.append("default", "mine").await.unwrap(), Offset(0));
    // Round-robin sends the first read to addrs[0], the lagging replica.
    let recs = c.read("default", Offset(0), 10).await.unwrap();
    let got: Vec<&[u8]> = recs.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(got, vec![&b"mine"[..]]);
    assert!(waits.lock().unwrap()[0] >= 100, "{waits:?}");
    // At the acknowledged end there is nothing to wait for, and a pinned read stays where
    // it was pinned.
    let pinned = ReadOptions {
        node: Some(0),
        ..ReadOptions::default()
    };
    let r = c.read_with("default", Offset(1), &pinned).await.unwrap();
    assert!(r.records.is_empty());
    assert_eq!(waits.lock().unwrap()[1], 0);
    let r = c.read_with("default", Offset(0), &pinned).await.unwrap();
    assert!(r.records.is_empty(), "a pinned read is not sent elsewhere");
    assert_eq!(waits.lock().unwrap().len(), 3);
}

/// `committed_end` read from offset 0, which a replica answers with `OffsetTrimmed` once the
/// log's start has moved past it: `chainlog tail` failed on every trimmed log. The scripted
/// node refuses reads below the start as a replica does (`Replica::readable_log`).
#[tokio::test]
async fn committed_end_of_a_trimmed_log() {
    let (l, addr) = listener().await;
    serve_with(l, |req| match req {
        ClientRequest::Read { from, .. } if from < Offset(5) => vec![ClientReply::Error {
            code: ErrorCode::OffsetTrimmed,
            message: "log starts at 5".into(),
        }],
        ClientRequest::Read { .. } => vec![ClientReply::ReadOk {
            committed_end: Offset(9),
            batches: vec![],
        }],
        other => panic!("unexpected {other:?}"),
    });
    let c = Client::connect(cfg(&[&addr])).await.unwrap();
    assert_eq!(c.committed_end("default").await.unwrap(), Offset(9));
}

/// One record per batch, at `offset`, with payload "r{offset}".
fn rec(offset: u64) -> Bytes {
    let payload = format!("r{offset}");
    record::build(
        LogId::from_name("default"),
        Offset(offset),
        Epoch(1),
        &[payload.as_bytes()],
    )
    .unwrap()
}

/// A replica whose committed end is `knows`: reads get the records below it; a subscription
/// gets every record from where it asks up to 11 (one more commit arrives after `tail` starts).
fn replica_knowing(knows: u64) -> impl Fn(ClientRequest) -> Vec<ClientReply> {
    move |req| match req {
        ClientRequest::Read { from, .. } => vec![ClientReply::ReadOk {
            committed_end: Offset(knows),
            batches: (from.0..knows).map(rec).collect(),
        }],
        ClientRequest::Subscribe { from, .. } => (from.0..11)
            .map(|o| ClientReply::Records {
                committed_end: Offset(o + 1),
                batches: vec![rec(o)],
            })
            .collect(),
        other => panic!("unexpected {other:?}"),
    }
}

/// Runs the CLI with `args`; returns the first `lines` lines it prints (fewer if it exits or
/// 10 s pass), then kills it.
fn cli_lines(args: &[&str], lines: usize) -> Vec<String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chainlog"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            if tx.send(l.unwrap()).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < lines {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    got
}

/// `tail -n 5 -f` over two replicas: the committed end (10) came from one, the last five
/// records from the other, which knew only up to 7, and the subscription started at 10, so
/// records 7..10 were never printed. It now follows from where printing got to.
#[test]
fn tail_follow_over_replicas_prints_every_record_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (la, a) = rt.block_on(listener());
    let (lb, b) = rt.block_on(listener());
    rt.block_on(async {
        serve_with(la, replica_knowing(10));
        serve_with(lb, replica_knowing(7));
    });
    let addrs = format!("{a},{b}");
    let got = cli_lines(&["--addr", &addrs, "tail", "-n", "5", "-f"], 6);
    let want: Vec<String> = (5..11).map(|o| format!("r{o}")).collect();
    assert_eq!(got, want);
}

/// `tail -n` asking for more records than a trimmed log still holds prints from its start.
#[test]
fn tail_of_a_trimmed_log_prints_from_its_start() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (l, addr) = rt.block_on(listener());
    rt.block_on(async {
        serve_with(l, |req| match req {
            ClientRequest::Read { from, .. } if from < Offset(5) => vec![ClientReply::Error {
                code: ErrorCode::OffsetTrimmed,
                message: "log starts at 5".into(),
            }],
            other => replica_knowing(8)(other),
        })
    });
    let got = cli_lines(&["--addr", &addr, "tail", "-n", "10"], 10);
    assert_eq!(got, vec!["r5", "r6", "r7"]);
}

/// With one replica unreachable (it takes the connection but never answers the Hello: a
/// connect timeout), a subscription tried only the round-robin node and returned its error,
/// and a read moved on only after an i/o error or a lost connection. Both now try the other
/// replicas, each once.
#[tokio::test]
async fn reads_and_subscriptions_pass_over_an_unreachable_replica() {
    // Bound and never accepted: the kernel completes the TCP handshake, nobody answers.
    let (_silent, dead) = listener().await;
    let (l, live) = listener().await;
    serve_with(l, replica_knowing(3));
    let mut cfg = cfg(&[&dead, &live]);
    cfg.connect_timeout_ms = 200;
    let c = Client::new(cfg).unwrap();
    // Round-robin: the subscription, then the second read, go to addrs[0] first.
    let mut sub = c.subscribe("default", Offset(0)).await.unwrap();
    assert_eq!(sub.next().await.unwrap().unwrap().offset, Offset(0));
    for _ in 0..2 {
        let recs = c.read("default", Offset(1), 10).await.unwrap();
        assert_eq!(recs.len(), 2);
    }
    // A pinned read does not move.
    let pinned = ReadOptions {
        node: Some(0),
        ..ReadOptions::default()
    };
    let e = c
        .read_with("default", Offset(0), &pinned)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

/// A replica answering `ShuttingDown`, `Unavailable` or `LimitExceeded` (too many reads or
/// subscriptions in progress there) failed the read or the subscription; another replica
/// may well answer.
#[tokio::test]
async fn reads_and_subscriptions_pass_over_a_replica_that_refuses_for_itself() {
    let (lbusy, busy) = listener().await;
    let (l, live) = listener().await;
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    serve_with(lbusy, move |req| {
        let code = match req {
            ClientRequest::Subscribe { .. } => ErrorCode::LimitExceeded,
            _ => {
                let codes = [
                    ErrorCode::ShuttingDown,
                    ErrorCode::Unavailable,
                    ErrorCode::LimitExceeded,
                ];
                codes[n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % codes.len()]
            }
        };
        vec![ClientReply::Error {
            code,
            message: "scripted".into(),
        }]
    });
    serve_with(l, replica_knowing(3));
    let c = Client::new(cfg(&[&busy, &live])).unwrap();
    for _ in 0..6 {
        let recs = c.read("default", Offset(0), 10).await.unwrap();
        assert_eq!(recs.len(), 3);
    }
    // Round-robin: the subscription goes to the busy node first.
    let mut sub = c.subscribe("default", Offset(0)).await.unwrap();
    for want in 0..3 {
        assert_eq!(sub.next().await.unwrap().unwrap().offset, Offset(want));
    }
}

/// A request whose caller stops waiting (a `read_with` future dropped inside the caller's
/// own timeout) kept its route and its in-flight slot until the server replied: with one
/// slot, every later request on the connection waited for a reply that never came.
#[tokio::test]
async fn a_dropped_request_gives_its_in_flight_slot_back() {
    let (l, addr) = listener().await;
    serve_with(l, |req| match req {
        ClientRequest::Read { .. } => vec![], // never answered
        ClientRequest::Status => vec![ClientReply::StatusOk { json: "{}".into() }],
        other => panic!("unexpected {other:?}"),
    });
    let mut cfg = cfg(&[&addr]);
    cfg.in_flight_max = 1;
    let c = Client::connect(cfg).await.unwrap();
    let read = c.read("default", Offset(0), 1);
    assert!(tokio::time::timeout(Duration::from_millis(100), read)
        .await
        .is_err());
    let status = c.status_raw_of(0).await;
    assert_eq!(status.unwrap(), Bytes::from_static(b"{}"));
}

/// Each subscription holds a connection of its own: past `subscriptions_max` a subscribe is
/// refused with a typed error instead of taking every slot a node has, and a dropped
/// subscription gives its place back.
#[tokio::test]
async fn subscriptions_past_the_limit_are_refused_until_one_is_dropped() {
    let (l, addr) = listener().await;
    // Subscribes are left open with nothing to push.
    serve_with(l, |_| vec![]);
    let c = Client::new(ClientConfig {
        subscriptions_max: 2,
        ..cfg(&[&addr])
    })
    .unwrap();
    let a = c.subscribe("default", Offset(0)).await.unwrap();
    let _b = c.subscribe("default", Offset(0)).await.unwrap();
    let e = c.subscribe("default", Offset(0)).await.unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { max: 2, .. }), "{e:?}");
    assert!(!e.is_retriable());
    drop(a);
    let _c = c.subscribe("default", Offset(0)).await.unwrap();
    let bad = ClientConfig {
        subscriptions_max: 0,
        ..cfg(&[&addr])
    };
    assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))));
}

/// `chainlog read` over two replicas: the first reply showed the log committed up to 10, the
/// next came from a replica that knew only 4 and ended the read there (records 4..10 were
/// never printed, and the CLI exited 0). The read now goes on to the highest end any reply
/// showed.
#[test]
fn cli_read_over_replicas_goes_on_to_the_highest_committed_end_seen() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (la, a) = rt.block_on(listener());
    let (lb, b) = rt.block_on(listener());
    rt.block_on(async {
        // Two records per reply, so the read takes several requests.
        serve_with(la, |req| match req {
            ClientRequest::Read { from, .. } => vec![ClientReply::ReadOk {
                committed_end: Offset(10),
                batches: (from.0..(from.0 + 2).min(10)).map(rec).collect(),
            }],
            other => panic!("unexpected {other:?}"),
        });
        serve_with(lb, replica_knowing(4));
    });
    let addrs = format!("{a},{b}");
    let got = cli_lines(&["--addr", &addrs, "read", "--from", "0"], 10);
    let want: Vec<String> = (0..10).map(|o| format!("r{o}")).collect();
    assert_eq!(got, want);
}
