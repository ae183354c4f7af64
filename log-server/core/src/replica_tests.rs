//! Unit tests of the replica as a chain of one (and of its refusals as a non-head).
#![allow(clippy::unwrap_used)]

use super::*;
use crate::effects::ProducerBatch;
use crate::record::BatchBuilder;
use crate::types::ProducerId;

const CLUSTER: ClusterId = ClusterId(42);

fn default_log() -> LogId {
    LogId::from_name("default")
}

fn recovered(end: u64, producers: Vec<ProducerBatch>, hint: u64) -> RecoveredLog {
    RecoveredLog {
        log: default_log(),
        name: "default".into(),
        start: Offset(0),
        end: Offset(end),
        producers,
        committed_hint: Offset(hint),
        trim_point: Offset(0),
    }
}

fn batch(payloads: &[&[u8]], producer: u64, seq: u64) -> Bytes {
    let mut b = BatchBuilder::new();
    for p in payloads {
        b.push(p).unwrap();
    }
    b.finish(CLUSTER, default_log(), ProducerId(producer), seq, 0)
}

struct H {
    r: Replica,
    now: Instant,
    out: Vec<Effect>,
}

impl H {
    fn single(cfg: impl FnOnce(&mut ReplicaConfig), logs: Vec<RecoveredLog>) -> H {
        let mut c = ReplicaConfig::new(NodeId(1), CLUSTER);
        cfg(&mut c);
        let chain = ChainConfig {
            epoch: Epoch(3),
            nodes: vec![NodeId(1)],
        };
        H {
            r: Replica::new(c, chain, logs, Instant(0)),
            now: Instant(0),
            out: vec![],
        }
    }

    fn client(&mut self, request_id: u64, req: ClientRequest) -> Vec<Effect> {
        self.r
            .on_client(self.now, ClientId(1), request_id, req, &mut self.out);
        std::mem::take(&mut self.out)
    }

    fn append(&mut self, request_id: u64, b: Bytes) -> Vec<Effect> {
        self.client(request_id, ClientRequest::Append { batch: b })
    }

    fn disk(&mut self, ev: DiskEvent) -> Vec<Effect> {
        self.r.on_disk(self.now, ev, &mut self.out);
        std::mem::take(&mut self.out)
    }

    fn durable(&mut self, end: u64) -> Vec<Effect> {
        self.disk(DiskEvent::Durable {
            log: default_log(),
            end: Offset(end),
        })
    }

    fn tick(&mut self, us: u64) -> Vec<Effect> {
        self.now = self.now.plus_us(us);
        self.r.on_tick(self.now, &mut self.out);
        std::mem::take(&mut self.out)
    }
}

fn appends(effects: &[Effect]) -> Vec<(Offset, Vec<Bytes>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Append { base, batches, .. } => Some((*base, batches.clone())),
            _ => None,
        })
        .collect()
}

fn replies(effects: &[Effect]) -> Vec<(u64, ClientReply)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reply {
                request_id, reply, ..
            } => Some((*request_id, reply.clone())),
            _ => None,
        })
        .collect()
}

fn reads(effects: &[Effect]) -> Vec<(ReadToken, Offset, Offset)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Read {
                token, from, end, ..
            } => Some((*token, *from, *end)),
            _ => None,
        })
        .collect()
}

fn ok(base: u64, n: u32) -> ClientReply {
    ClientReply::AppendOk {
        base_offset: Offset(base),
        record_count: n,
    }
}

fn code(r: &ClientReply) -> Option<ErrorCode> {
    match r {
        ClientReply::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn append_is_written_then_answered_when_durable() {
    let mut h = H::single(|_| {}, vec![recovered(0, vec![], 0)]);
    let e = h.append(7, batch(&[b"a", b"b"], 0, 0));
    let a = appends(&e);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, Offset(0));
    let hdr = record::verify(&a[0].1[0]).unwrap();
    assert_eq!(
        (hdr.base_offset, hdr.epoch, hdr.cluster_id),
        (Offset(0), Epoch(3), CLUSTER)
    );
    assert!(replies(&e).is_empty(), "no answer before durability");
    let e = h.durable(2);
    assert_eq!(replies(&e), vec![(7, ok(0, 2))]);
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::SaveCommitted { end, .. } if *end == Offset(2))));
    let s = h.r.status();
    assert_eq!(s.role, Role::Single);
    assert_eq!(s.logs[0].committed_end, Offset(2));
}

#[test]
fn appends_arriving_during_a_sync_form_one_group() {
    let mut h = H::single(
        |c| c.writes_in_flight_max = 1,
        vec![recovered(0, vec![], 0)],
    );
    assert_eq!(appends(&h.append(1, batch(&[b"a"], 0, 0))).len(), 1);
    assert!(appends(&h.append(2, batch(&[b"b"], 0, 0))).is_empty());
    assert!(appends(&h.append(3, batch(&[b"c", b"d"], 0, 0))).is_empty());
    let e = h.durable(1);
    assert_eq!(replies(&e), vec![(1, ok(0, 1))]);
    let a = appends(&e);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, Offset(1));
    assert_eq!(a[0].1.len(), 2, "both queued appends in one group");
    let e = h.durable(4);
    assert_eq!(replies(&e), vec![(2, ok(1, 1)), (3, ok(2, 2))]);
}

#[test]
fn groups_overlap_up_to_the_writes_in_flight_limit() {
    let mut h = H::single(
        |c| c.writes_in_flight_max = 2,
        vec![recovered(0, vec![], 0)],
    );
    assert_eq!(appends(&h.append(1, batch(&[b"a"], 0, 0))).len(), 1);
    // A second group goes out while the first one's sync is running.
    let a = appends(&h.append(2, batch(&[b"b"], 0, 0)));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, Offset(1));
    // At the limit: these wait, and then go out together.
    assert!(appends(&h.append(3, batch(&[b"c", b"d"], 0, 0))).is_empty());
    assert!(appends(&h.append(4, batch(&[b"e"], 0, 0))).is_empty());
    let e = h.durable(1);
    assert_eq!(replies(&e), vec![(1, ok(0, 1))]);
    let a = appends(&e);
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].0, a[0].1.len()),
        (Offset(2), 2),
        "queued appends in one group"
    );
    // One durable event past several groups answers all of them, in order.
    let e = h.durable(5);
    assert_eq!(
        replies(&e),
        vec![(2, ok(1, 1)), (3, ok(2, 2)), (4, ok(4, 1))]
    );
    assert!(appends(&e).is_empty());
}

#[test]
fn reads_serve_committed_and_wait_for_commits() {
    let mut h = H::single(|_| {}, vec![recovered(0, vec![], 0)]);
    h.append(1, batch(&[b"a"], 0, 0));
    h.durable(1);
    let log = default_log();
    let read = |from, wait_ms| ClientRequest::Read {
        log,
        from: Offset(from),
        max_records: 100,
        max_bytes: 1 << 20,
        wait_ms,
    };
    let e = h.client(10, read(0, 0));
    let r = reads(&e);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].1, r[0].2), (Offset(0), Offset(1)));
    let stored = build_stored(0, &[b"a"]);
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Ok(vec![stored.clone()]),
    });
    assert_eq!(
        replies(&e),
        vec![(
            10,
            ClientReply::ReadOk {
                committed_end: Offset(1),
                batches: vec![stored]
            }
        )]
    );
    // Past the committed end with no wait: an empty answer at once.
    let e = h.client(11, read(1, 0));
    assert!(matches!(&replies(&e)[0].1, ClientReply::ReadOk { batches, .. } if batches.is_empty()));
    // With a wait: nothing until the commit arrives, then a storage read.
    assert!(h.client(12, read(1, 50)).is_empty());
    assert!(h.client(13, read(5, 5)).is_empty());
    h.append(2, batch(&[b"b"], 0, 0));
    let e = h.durable(2);
    let r = reads(&e);
    assert_eq!(r.len(), 1, "only the read at 1 can be served");
    assert_eq!((r[0].1, r[0].2), (Offset(1), Offset(2)));
    // The read at 5 times out with an empty answer.
    let e = h.tick(6_000);
    assert_eq!(replies(&e).len(), 1);
    assert_eq!(replies(&e)[0].0, 13);
    // Below the log start: trimmed.
    let mut h2 = H::single(
        |_| {},
        vec![RecoveredLog {
            start: Offset(5),
            ..recovered(9, vec![], 9)
        }],
    );
    let e = h2.client(1, read(2, 0));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::OffsetTrimmed));
    // A trim point saved inside the oldest segment: nothing below it is served after a
    // restart either, and the refusal names it as the start.
    let mut h3 = H::single(
        |_| {},
        vec![RecoveredLog {
            start: Offset(2),
            trim_point: Offset(6),
            ..recovered(9, vec![], 9)
        }],
    );
    let e = h3.client(1, read(4, 0));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::OffsetTrimmed));
    assert!(
        matches!(&replies(&e)[0].1, ClientReply::Error { message, .. } if message.contains("starts at 6")),
        "{:?}",
        replies(&e)
    );
    let e = h3.client(2, read(6, 0));
    assert!(
        e.iter().any(|x| matches!(
            x,
            Effect::Read {
                from: Offset(6),
                ..
            }
        )),
        "a read at the trim point goes to storage: {e:?}"
    );
}

#[test]
fn an_idle_node_asks_for_few_ticks() {
    let mut h = H::single(
        |c| c.resend_timeout_us = 200_000,
        vec![recovered(0, vec![], 0)],
    );
    let idle = h.r.idle_tick_us();
    assert_eq!(idle, 50_000);
    assert_eq!(h.r.tick_deadline(Instant(10)), Some(Instant(10 + idle)));
    // An append in flight: the fast tick.
    h.append(1, batch(&[b"a"], 0, 0));
    assert_eq!(h.r.tick_deadline(Instant(10)), None);
    h.durable(1);
    assert_eq!(h.r.tick_deadline(Instant(10)), Some(Instant(10 + idle)));
    // A read waiting for a commit: its deadline, if sooner.
    let log = default_log();
    let read = ClientRequest::Read {
        log,
        from: Offset(1),
        max_records: 1,
        max_bytes: 1 << 10,
        wait_ms: 5,
    };
    assert!(h.client(2, read).is_empty());
    let deadline = h.now.plus_us(5_000);
    assert_eq!(h.r.tick_deadline(Instant(10)), Some(deadline));
    // A short resend timeout keeps idle ticks within a quarter of it.
    let h = H::single(
        |c| c.resend_timeout_us = 8_000,
        vec![recovered(0, vec![], 0)],
    );
    assert_eq!(h.r.idle_tick_us(), 2_000);
}

/// A middle that received a batch owes its predecessor an arrival ack (1 ms later, at a fast
/// tick) and its successor the batch: it is busy until both are settled.
#[test]
fn a_node_with_an_unreported_arrival_keeps_the_fast_tick() {
    let mut h = in_chain(2, vec![recovered(0, vec![], 0)], |_| {});
    let b = build_stored(0, &[b"x"]);
    h.peer(
        1,
        PeerMessage::Append {
            epoch: Epoch(3),
            session: 5,
            log: default_log(),
            base: Offset(0),
            committed_end: Offset(0),
            batches: vec![b],
        },
    );
    assert_eq!(h.r.tick_deadline(Instant(1)), None);
    h.durable(1);
    assert!(
        h.r.tick_deadline(Instant(1)).is_some(),
        "durable, acked, idle"
    );
}

fn build_stored(base: u64, payloads: &[&[u8]]) -> Bytes {
    record::build(default_log(), Offset(base), Epoch(3), payloads).unwrap()
}

#[test]
fn subscription_pushes_as_commits_advance() {
    let mut h = H::single(|_| {}, vec![recovered(0, vec![], 0)]);
    let log = default_log();
    let e = h.client(
        5,
        ClientRequest::Subscribe {
            log,
            from: Offset(0),
        },
    );
    assert!(e.is_empty());
    h.append(1, batch(&[b"a"], 0, 0));
    let e = h.durable(1);
    let r = reads(&e);
    assert_eq!(r.len(), 1);
    // A second commit while the first read is in flight issues no second read.
    h.append(2, batch(&[b"b"], 0, 0));
    let e = h.durable(2);
    assert!(reads(&e).is_empty());
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Ok(vec![build_stored(0, &[b"a"])]),
    });
    assert!(matches!(&replies(&e)[0], (5, ClientReply::Records { .. })));
    let r2 = reads(&e);
    assert_eq!(r2.len(), 1);
    assert_eq!(r2[0].1, Offset(1));
    // The client goes away: its pending push is dropped.
    h.r.on_client_gone(h.now, ClientId(1), &mut h.out);
    let e = h.disk(DiskEvent::ReadDone {
        token: r2[0].0,
        result: Ok(vec![build_stored(1, &[b"b"])]),
    });
    assert!(replies(&e).is_empty());
}

#[test]
fn a_subscriber_behind_a_trim_is_told_where_the_log_starts() {
    let log = default_log();
    let trim_25 = ClientRequest::Trim {
        log,
        before: Offset(25),
    };
    let subscribe = |from: u64| ClientRequest::Subscribe {
        log,
        from: Offset(from),
    };
    let starts_at_25 = |e: &[Effect], id: u64| match &replies(e)[..] {
        [.., (i, ClientReply::Error { code, message })] if *i == id => {
            assert_eq!(
                (*code, message.as_str()),
                (ErrorCode::OffsetTrimmed, "log starts at 25")
            );
        }
        other => panic!("{other:?}"),
    };
    // Its read came back with the records, but the log was trimmed past them meanwhile: they
    // are no longer served (storage may drop them any moment), as a read from there is not.
    let mut h = H::single(|_| {}, vec![recovered(40, vec![], 40)]);
    let e = h.client(5, subscribe(10));
    let r = reads(&e);
    assert_eq!(r[0].1, Offset(10));
    h.client(6, trim_25.clone());
    let payloads: Vec<&[u8]> = vec![b"x"; 12];
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Ok(vec![build_stored(10, &payloads)]),
    });
    assert_eq!(replies(&e).len(), 1, "no records pushed: {e:?}");
    assert!(reads(&e).is_empty(), "no further reads");
    starts_at_25(&e, 5);
    // The subscription is over: later commits push nothing to it.
    h.append(7, batch(&[b"a"], 0, 0));
    let e = h.durable(41);
    assert!(reads(&e).is_empty(), "{e:?}");
    // Its read lost its segment to the trim: the same answer.
    let mut h = H::single(|_| {}, vec![recovered(40, vec![], 40)]);
    let e = h.client(8, subscribe(0));
    let r = reads(&e);
    h.client(9, trim_25);
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Err(ErrorCode::OffsetTrimmed),
    });
    starts_at_25(&e, 8);
}

#[test]
fn producer_retries_are_deduplicated() {
    let mut h = H::single(
        |c| c.writes_in_flight_max = 1,
        vec![recovered(0, vec![], 0)],
    );
    h.append(1, batch(&[b"a", b"b"], 9, 0));
    assert_eq!(replies(&h.durable(2)), vec![(1, ok(0, 2))]);
    // Retry of a committed batch: original offsets, nothing written.
    let e = h.append(2, batch(&[b"a", b"b"], 9, 0));
    assert!(appends(&e).is_empty());
    assert_eq!(replies(&e), vec![(2, ok(0, 2))]);
    // Retry of an in-flight batch: answered once it commits, written once.
    assert_eq!(appends(&h.append(3, batch(&[b"c"], 9, 2))).len(), 1);
    let e = h.append(4, batch(&[b"c"], 9, 2));
    assert!(appends(&e).is_empty() && replies(&e).is_empty());
    assert_eq!(replies(&h.durable(3)), vec![(3, ok(2, 1)), (4, ok(2, 1))]);
    // Two copies queued behind a sync: the second is recognised when sequenced.
    h.append(5, batch(&[b"d"], 9, 3));
    h.append(6, batch(&[b"e"], 9, 4));
    h.append(7, batch(&[b"e"], 9, 4));
    h.append(8, batch(&[b"z"], 9, 40)); // a gap
    let e = h.durable(4);
    let a = appends(&e);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1.len(), 1, "the duplicate is not written twice");
    assert!(replies(&e)
        .iter()
        .any(|(id, r)| *id == 8 && code(r) == Some(ErrorCode::SequenceGap)));
    let e = h.durable(5);
    let mut rs = replies(&e);
    rs.sort_by_key(|r| r.0);
    assert_eq!(rs, vec![(6, ok(4, 1)), (7, ok(4, 1))]);
}

#[test]
fn dedup_survives_restart() {
    let producers = vec![ProducerBatch {
        producer: ProducerId(9),
        seq: 0,
        record_count: 2,
        base_offset: Offset(0),
    }];
    // Committed per the hint: answered at once.
    let mut h = H::single(|_| {}, vec![recovered(2, producers.clone(), 2)]);
    let e = h.append(1, batch(&[b"a", b"b"], 9, 0));
    assert_eq!(replies(&e), vec![(1, ok(0, 2))]);
    // Hint behind: a chain of one holds the only copy, so what it recovered durably is
    // committed at once whatever the (lagging) hint says; the retry is answered, not appended.
    let mut h = H::single(|_| {}, vec![recovered(2, producers, 0)]);
    let e = h.append(1, batch(&[b"a", b"b"], 9, 0));
    assert!(appends(&e).is_empty());
    assert_eq!(replies(&e), vec![(1, ok(0, 2))]);
}

#[test]
fn a_log_that_failed_full_reopens_at_its_durable_end_and_forgets_what_was_lost() {
    let mut h = H::single(
        |c| c.writes_in_flight_max = 1,
        vec![recovered(0, vec![], 0)],
    );
    h.append(1, batch(&[b"a"], 9, 0));
    assert_eq!(replies(&h.durable(1)), vec![(1, ok(0, 1))]);
    assert_eq!(appends(&h.append(2, batch(&[b"b", b"c"], 9, 1))).len(), 1);
    let full = |at| DiskEvent::WriteFailed {
        log: default_log(),
        at: Offset(at),
        code: ErrorCode::StorageFull,
    };
    let e = h.disk(full(1));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::StorageFull));
    // Refused while full, with the storage error (not a fence), and nothing written.
    let e = h.append(3, batch(&[b"d"], 9, 3));
    assert!(appends(&e).is_empty());
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::StorageFull));
    let msg = match &replies(&e)[0].1 {
        ClientReply::Error { message, .. } => message.clone(),
        other => panic!("{other:?}"),
    };
    assert!(msg.contains("without a restart"), "{msg}");
    // An EIO-failed log would not reopen; a full one does, at storage's durable end.
    h.disk(DiskEvent::Reopened {
        log: default_log(),
        end: Offset(1),
    });
    let st = h.r.status().logs[0].clone();
    assert_eq!(
        (st.written_end, st.durable_end, st.failed),
        (Offset(1), Offset(1), None)
    );
    // The producer continued past its failed batch: refused until it resends from it.
    let e = h.append(4, batch(&[b"d"], 9, 3));
    assert!(appends(&e).is_empty());
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::Unavailable));
    // The resent batch was lost with the failed write: appended anew at the durable end,
    // never answered with the offsets it had before the failure.
    let e = h.append(5, batch(&[b"b", b"c"], 9, 1));
    let a = appends(&e);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, Offset(1));
    assert_eq!(replies(&h.durable(3)), vec![(5, ok(1, 2))]);
}

#[test]
fn a_log_that_failed_with_an_io_error_does_not_reopen() {
    let mut h = H::single(|_| {}, vec![recovered(0, vec![], 0)]);
    h.append(1, batch(&[b"a"], 0, 0));
    h.disk(DiskEvent::WriteFailed {
        log: default_log(),
        at: Offset(0),
        code: ErrorCode::StorageError,
    });
    h.disk(DiskEvent::Reopened {
        log: default_log(),
        end: Offset(0),
    });
    assert_eq!(h.r.status().logs[0].failed, Some(ErrorCode::StorageError));
    let e = h.append(2, batch(&[b"b"], 0, 0));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::StorageError));
}

#[test]
fn admission_is_bounded() {
    let mut h = H::single(
        |c| {
            c.admission_queue_max = 2;
            c.writes_in_flight_max = 1;
        },
        vec![recovered(0, vec![], 0)],
    );
    assert_eq!(appends(&h.append(1, batch(&[b"a"], 0, 0))).len(), 1);
    assert!(h.append(2, batch(&[b"b"], 0, 0)).is_empty());
    assert!(h.append(3, batch(&[b"c"], 0, 0)).is_empty());
    let e = h.append(4, batch(&[b"d"], 0, 0));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::Unavailable));
    assert_eq!(h.r.status().logs[0].queued_appends, 2);
    h.durable(1);
    assert_eq!(h.r.status().logs[0].queued_appends, 0);
}

#[test]
fn refusals() {
    let mut h = H::single(|_| {}, vec![recovered(0, vec![], 0)]);
    let other = record::BatchBuilder::new();
    let mut other = other;
    other.push(b"x").unwrap();
    let b = other.finish(CLUSTER, LogId::from_name("nope"), ProducerId(0), 0, 0);
    let e = h.append(1, b);
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::UnknownLog));
    let e = h.client(2, ClientRequest::Status);
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::BadRequest));
    let e = h.client(3, ClientRequest::CreateLog { name: "a/b".into() });
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::BadRequest));

    // A non-head names the head.
    let chain = ChainConfig {
        epoch: Epoch(1),
        nodes: vec![NodeId(1), NodeId(2)],
    };
    let mut r = Replica::new(
        ReplicaConfig::new(NodeId(2), CLUSTER),
        chain,
        vec![recovered(0, vec![], 0)],
        Instant(0),
    );
    let mut out = vec![];
    r.on_client(
        Instant(0),
        ClientId(1),
        1,
        ClientRequest::Append {
            batch: batch(&[b"a"], 0, 0),
        },
        &mut out,
    );
    r.on_client(
        Instant(0),
        ClientId(1),
        2,
        ClientRequest::CreateLog { name: "x".into() },
        &mut out,
    );
    let rs = replies(&out);
    assert_eq!(rs.len(), 2);
    for (_, rep) in rs {
        match rep {
            ClientReply::Error { code, message } => {
                assert_eq!(code, ErrorCode::NotHead);
                assert!(message.contains("node 1"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn create_log_then_append() {
    let mut h = H::single(|_| {}, vec![]);
    let e = h.client(
        1,
        ClientRequest::CreateLog {
            name: "orders".into(),
        },
    );
    let id = LogId::from_name("orders");
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::CreateLog { log, .. } if *log == id)));
    // A second create while the first is in progress waits with it.
    assert!(h
        .client(
            2,
            ClientRequest::CreateLog {
                name: "orders".into()
            }
        )
        .is_empty());
    let e = h.disk(DiskEvent::Created {
        log: id,
        result: Ok(()),
    });
    let rs = replies(&e);
    assert_eq!(rs.len(), 2);
    assert!(rs
        .iter()
        .all(|(_, r)| *r == ClientReply::CreateLogOk { log: id }));
    let mut b = BatchBuilder::new();
    b.push(b"x").unwrap();
    let e = h.append(3, b.finish(CLUSTER, id, ProducerId(0), 0, 0));
    assert_eq!(appends(&e).len(), 1);
}

#[test]
fn padded_and_shared_buffers() {
    let mut h = H::single(|_| {}, vec![recovered(0, vec![], 0)]);
    let b = batch(&[b"abc"], 0, 0);
    let keep = b.clone(); // shared: the head must copy rather than mutate the caller's bytes
    let e = h.append(1, b);
    let a = appends(&e);
    assert_eq!(record::verify(&a[0].1[0]).unwrap().epoch, Epoch(3));
    assert_eq!(record::verify(&keep).unwrap().epoch, Epoch(0));
    // A padded read result is cut to the batch before it reaches the client.
    h.durable(1);
    let e = h.client(
        2,
        ClientRequest::Read {
            log: default_log(),
            from: Offset(0),
            max_records: 10,
            max_bytes: 4096,
            wait_ms: 0,
        },
    );
    let token = reads(&e)[0].0;
    let stored = build_stored(0, &[b"abc"]);
    let mut padded = stored.to_vec();
    padded.resize(4096, 0);
    let e = h.disk(DiskEvent::ReadDone {
        token,
        result: Ok(vec![Bytes::from(padded)]),
    });
    assert_eq!(
        replies(&e),
        vec![(
            2,
            ClientReply::ReadOk {
                committed_end: Offset(1),
                batches: vec![stored]
            }
        )]
    );
}

// ---------------------------------------------------------------- trim in a chain

fn recovered_from(start: u64, end: u64, hint: u64) -> RecoveredLog {
    RecoveredLog {
        start: Offset(start),
        ..recovered(end, vec![], hint)
    }
}

/// Node `node` of the chain [1, 2], its link to the other node up.
fn in_chain(node: u32, logs: Vec<RecoveredLog>, cfg: impl FnOnce(&mut ReplicaConfig)) -> H {
    let mut c = ReplicaConfig::new(NodeId(node), CLUSTER);
    cfg(&mut c);
    let chain = ChainConfig {
        epoch: Epoch(3),
        nodes: vec![NodeId(1), NodeId(2)],
    };
    let mut h = H {
        r: Replica::new(c, chain, logs, Instant(0)),
        now: Instant(1),
        out: vec![],
    };
    let other = NodeId(3 - node);
    h.r.on_link(h.now, other, true, &mut h.out);
    h.out.clear();
    h
}

impl H {
    fn peer(&mut self, from: u32, msg: PeerMessage) -> Vec<Effect> {
        self.r.on_peer(self.now, NodeId(from), msg, &mut self.out);
        std::mem::take(&mut self.out)
    }

    fn log_status(&self) -> LogStatus {
        self.r.status().logs.into_iter().next().unwrap()
    }
}

fn pred_trim(before: u64) -> PeerMessage {
    PeerMessage::Trim {
        epoch: Epoch(3),
        session: 5,
        log: default_log(),
        before: Offset(before),
        point: Offset(before),
    }
}

fn trims(effects: &[Effect]) -> Vec<Offset> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Trim { before, .. } => Some(*before),
            _ => None,
        })
        .collect()
}

fn sent_trim_points(effects: &[Effect]) -> Vec<(Offset, Offset)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                msg: PeerMessage::Trim { before, point, .. },
                ..
            } => Some((*before, *point)),
            _ => None,
        })
        .collect()
}

fn sent_trims(effects: &[Effect]) -> Vec<Offset> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                msg: PeerMessage::Trim { before, .. },
                ..
            } => Some(*before),
            _ => None,
        })
        .collect()
}

#[test]
fn a_successor_behind_its_predecessors_start_restarts_its_log_there() {
    // The tail holds 0..10 of a log committed to 20 (bit rot cut the rest); its predecessor
    // has since trimmed to 30, so nobody can send it 10..30.
    let mut h = in_chain(2, vec![recovered_from(0, 10, 20)], |_| {});
    let e = h.peer(1, pred_trim(30));
    assert_eq!(
        trims(&e),
        vec![Offset(30)],
        "storage restarts the log at 30"
    );
    let s = h.log_status();
    assert_eq!(
        (s.start, s.written_end, s.durable_end),
        (Offset(30), Offset(30), Offset(30))
    );
    assert!(
        s.committed_end >= Offset(30),
        "everything below a start is committed"
    );
    // It takes the stream from there.
    let b = build_stored(30, &[b"x"]);
    let e = h.peer(
        1,
        PeerMessage::Append {
            epoch: Epoch(3),
            session: 5,
            log: default_log(),
            base: Offset(30),
            committed_end: Offset(30),
            batches: vec![b],
        },
    );
    assert_eq!(appends(&e).first().map(|a| a.0), Some(Offset(30)));
    // Below the new start a read is refused, typed.
    let e = h.client(
        9,
        ClientRequest::Read {
            log: default_log(),
            from: Offset(5),
            max_records: 10,
            max_bytes: 1000,
            wait_ms: 0,
        },
    );
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::OffsetTrimmed));
    // Its own successor hears the new start once storage made it durable.
    let e = h.disk(DiskEvent::Trimmed {
        log: default_log(),
        start: Offset(30),
        point: Offset(30),
    });
    assert!(sent_trims(&e).is_empty(), "a tail has no successor");
    assert_eq!(h.log_status().start, Offset(30));
}

#[test]
fn a_trim_within_what_the_successor_holds_only_drops_its_front() {
    let mut h = in_chain(2, vec![recovered_from(0, 40, 40)], |_| {});
    let e = h.peer(1, pred_trim(25));
    assert_eq!(trims(&e), vec![Offset(25)]);
    assert_eq!(
        h.log_status().written_end,
        Offset(40),
        "nothing past 25 goes"
    );
    // An old or repeated trim is a no-op.
    h.disk(DiskEvent::Trimmed {
        log: default_log(),
        start: Offset(25),
        point: Offset(25),
    });
    assert!(trims(&h.peer(1, pred_trim(25))).is_empty());
    assert!(trims(&h.peer(1, pred_trim(10))).is_empty());
}

#[test]
fn without_the_restart_rule_the_successor_stays_behind() {
    let mut h = in_chain(2, vec![recovered_from(0, 10, 20)], |c| {
        c.bug_no_restart_at_pred_start = true;
    });
    let e = h.peer(1, pred_trim(30));
    assert!(trims(&e).iter().all(|b| *b <= Offset(10)));
    assert_eq!(h.log_status().written_end, Offset(10));
}

#[test]
fn a_predecessor_tells_a_successor_behind_its_start_where_it_starts() {
    let mut h = in_chain(1, vec![recovered_from(30, 40, 40)], |c| {
        c.resend_timeout_us = 10_000;
    });
    let ack = |seq: u64, session: u64| PeerMessage::Ack {
        epoch: Epoch(3),
        session,
        log: default_log(),
        seq,
        written_end: Offset(10),
        ack_end: Offset(10),
        chain_end: Offset(10),
        committed_end: Offset(20),
        resend: false,
        trim_point: Offset(0),
    };
    let session = h.r.succ_session;
    let e = h.peer(2, ack(1, session));
    assert_eq!(
        sent_trims(&e),
        vec![Offset(30)],
        "instead of offsets it no longer holds"
    );
    assert!(reads(&e).is_empty(), "nothing below 30 is read back");
    // Rate-limited while unanswered, then told again.
    assert!(sent_trims(&h.tick(1000)).is_empty());
    assert_eq!(sent_trims(&h.tick(10_000)), vec![Offset(30)]);
}

#[test]
fn a_trim_goes_downstream_only_once_durable_and_only_what_the_head_holds() {
    let read_22 = || ClientRequest::Read {
        log: default_log(),
        from: Offset(22),
        max_records: 10,
        max_bytes: 1 << 20,
        wait_ms: 0,
    };
    let refused_at_25 = |e: &[Effect], id: u64| match &replies(e)[..] {
        [(i, ClientReply::Error { code, message })] if *i == id => {
            assert_eq!(
                (*code, message.as_str()),
                (ErrorCode::OffsetTrimmed, "log starts at 25")
            );
        }
        other => panic!("{other:?}"),
    };
    // A head holding 0..40 with a read at 22 issued before a trim to 25, and the read's token.
    let read_then_trim_to_25 = |read_id: u64, trim_id: u64| {
        let mut h = in_chain(1, vec![recovered_from(0, 40, 40)], |_| {});
        let (token, _, _) = reads(&h.client(read_id, read_22()))[0];
        h.client(
            trim_id,
            ClientRequest::Trim {
                log: default_log(),
                before: Offset(25),
            },
        );
        (h, token)
    };
    let mut h = in_chain(1, vec![recovered_from(0, 40, 40)], |_| {});
    let e = h.client(
        3,
        ClientRequest::Trim {
            log: default_log(),
            before: Offset(25),
        },
    );
    assert_eq!(trims(&e), vec![Offset(25)]);
    assert!(sent_trims(&e).is_empty(), "not durable yet");
    // Storage may drop the segments under a read from here on: reads below 25 are refused
    // at once, saying where the log starts for clients.
    assert_eq!(h.log_status().start, Offset(25));
    let e = h.client(4, read_22());
    refused_at_25(&e, 4);
    // A read issued before the trim whose segments went under it says the same.
    let (mut h2, token) = read_then_trim_to_25(5, 6);
    let e2 = h2.disk(DiskEvent::ReadDone {
        token,
        result: Err(ErrorCode::OffsetTrimmed),
    });
    refused_at_25(&e2, 5);
    // So does one whose read storage answered before it dropped the segments: those bytes
    // may be on no replica by now (seed 973606).
    let (mut h3, token) = read_then_trim_to_25(7, 8);
    let stored: Vec<&[u8]> = vec![b"x"; 18];
    let e3 = h3.disk(DiskEvent::ReadDone {
        token,
        result: Ok(vec![build_stored(22, &stored)]),
    });
    refused_at_25(&e3, 7);
    // Storage trims whole segments (the log durably starts at 20) and made the point 25
    // durable: the trim answers 25, reads below it stay refused, and the successor is told
    // both: it may drop segments below 20 and must serve nothing below 25.
    let e = h.disk(DiskEvent::Trimmed {
        log: default_log(),
        start: Offset(20),
        point: Offset(25),
    });
    assert_eq!(
        replies(&e),
        vec![(3, ClientReply::TrimOk { start: Offset(25) })]
    );
    assert_eq!(h.log_status().start, Offset(25));
    assert_eq!(
        sent_trim_points(&e),
        vec![(Offset(20), Offset(25))],
        "segments go by the durable start, reads by the point"
    );
    // A successor told so drops segments below 20 only, and refuses reads below 25.
    let mut s = in_chain(2, vec![recovered_from(0, 40, 40)], |_| {});
    let e = s.peer(
        1,
        PeerMessage::Trim {
            epoch: Epoch(3),
            session: 5,
            log: default_log(),
            before: Offset(20),
            point: Offset(25),
        },
    );
    assert!(
        e.iter().any(|x| matches!(
            x,
            Effect::Trim {
                before: Offset(20),
                point: Offset(25),
                ..
            }
        )),
        "{e:?}"
    );
    refused_at_25(&s.client(9, read_22()), 9);
    // A later trim message that only repeats the point changes nothing.
    s.disk(DiskEvent::Trimmed {
        log: default_log(),
        start: Offset(20),
        point: Offset(25),
    });
    let again = PeerMessage::Trim {
        epoch: Epoch(3),
        session: 5,
        log: default_log(),
        before: Offset(20),
        point: Offset(25),
    };
    assert!(trims(&s.peer(1, again)).is_empty());
    // A head that restarted short (committed 40, holds 0..10 while it fetches the rest from
    // its successor) trims no further than it holds.
    let mut h = in_chain(1, vec![recovered_from(0, 10, 40)], |_| {});
    let e = h.client(
        4,
        ClientRequest::Trim {
            log: default_log(),
            before: Offset(35),
        },
    );
    assert_eq!(trims(&e), vec![Offset(10)]);
}

// ---------------------------------------------------------------- full disk in a chain

fn succ_ack(session: u64, seq: u64, written: u64, chain: u64) -> PeerMessage {
    succ_ack_trim(session, seq, written, chain, 0)
}

fn succ_ack_trim(session: u64, seq: u64, written: u64, chain: u64, trim: u64) -> PeerMessage {
    PeerMessage::Ack {
        epoch: Epoch(3),
        session,
        log: default_log(),
        seq,
        written_end: Offset(written),
        ack_end: Offset(written),
        chain_end: Offset(chain),
        committed_end: Offset(0),
        resend: false,
        trim_point: Offset(trim),
    }
}

/// A predecessor tells its successor its trim point until the successor's acks report it:
/// a `Trim` lost on the way (or with an old connection) must not leave a replica serving what
/// a client trimmed.
#[test]
fn a_trim_point_is_told_until_the_successor_reports_it() {
    let mut h = in_chain(
        1,
        vec![RecoveredLog {
            trim_point: Offset(25),
            ..recovered_from(20, 40, 40)
        }],
        |c| c.resend_timeout_us = 10_000,
    );
    h.tick(1);
    let session = h.r.succ_session;
    let ack = |seq: u64, trim: u64| succ_ack_trim(session, seq, 40, 40, trim);
    // The session's first ack says the successor keeps no point: told at once.
    let e = h.peer(2, ack(1, 0));
    assert_eq!(sent_trim_points(&e), vec![(Offset(20), Offset(25))]);
    // Not again before the resend timeout...
    assert!(sent_trim_points(&h.peer(2, ack(2, 0))).is_empty());
    assert!(sent_trim_points(&h.tick(5_000)).is_empty());
    // ...then again, as long as its acks report less.
    assert_eq!(
        sent_trim_points(&h.tick(11_000)),
        vec![(Offset(20), Offset(25))]
    );
    // Once an ack reports the point, never again.
    h.peer(2, ack(3, 25));
    assert!(sent_trim_points(&h.tick(30_000)).is_empty());
    // A new connection starts a new session: learned afresh from its first ack.
    h.r.on_link(h.now, NodeId(2), false, &mut h.out);
    h.r.on_link(h.now, NodeId(2), true, &mut h.out);
    h.out.clear();
    let session = h.r.succ_session;
    let e = h.peer(2, succ_ack_trim(session, 1, 40, 40, 25));
    assert!(sent_trim_points(&e).is_empty(), "it kept the point: {e:?}");
    // Without a trim point there is nothing to tell.
    let mut h = in_chain(1, vec![recovered_from(20, 40, 40)], |_| {});
    h.tick(1);
    let session = h.r.succ_session;
    assert!(sent_trim_points(&h.peer(2, succ_ack(session, 1, 40, 40))).is_empty());
}

/// A successor reports its durable trim point upstream once it has it, and answers a `Trim`
/// it already kept with an ack (the predecessor resent it because it had not heard).
#[test]
fn a_successor_reports_its_trim_point_upstream() {
    let mut h = in_chain(2, vec![recovered_from(0, 40, 40)], |_| {});
    let trim = PeerMessage::Trim {
        epoch: Epoch(3),
        session: 5,
        log: default_log(),
        before: Offset(0),
        point: Offset(25),
    };
    // The predecessor's session starts with the first message it sends.
    h.peer(1, trim.clone());
    let e = h.disk(DiskEvent::Trimmed {
        log: default_log(),
        start: Offset(0),
        point: Offset(25),
    });
    let reported = |e: &[Effect]| {
        e.iter()
            .filter_map(|x| match x {
                Effect::Send {
                    msg: PeerMessage::Ack { trim_point, .. },
                    ..
                } => Some(*trim_point),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(reported(&e), vec![Offset(25)], "{e:?}");
    assert_eq!(reported(&h.peer(1, trim)), vec![Offset(25)]);
}

/// A successor asked for offsets it does not hold answers with nothing and with an ack of
/// where it is: the fetch means the predecessor believes an older ack (say, one counting a
/// write that failed full and was rolled back since, its correction lost), and without a fresh
/// one it would fetch in vain for ever (the simulator's liveness check, seed 1816695).
#[test]
fn a_successor_that_has_nothing_to_fetch_says_where_it_is() {
    let mut h = in_chain(2, vec![recovered(0, vec![], 0)], |_| {});
    let fetch = PeerMessage::Fetch {
        epoch: Epoch(3),
        session: 5,
        log: default_log(),
        from: Offset(0),
        max_bytes: 4096,
    };
    let acks = |e: &[Effect]| acks_sent(e).into_iter().map(|a| a.0).collect::<Vec<_>>();
    let empty_replies = |e: &[Effect]| {
        e.iter()
            .filter(|x| {
                matches!(x, Effect::Send { msg: PeerMessage::FetchReply { batches, .. }, .. }
                    if batches.is_empty())
            })
            .count()
    };
    // The session's first message is answered with an ack anyway; every later fetch of
    // nothing is answered with one too.
    h.peer(1, fetch.clone());
    for _ in 0..2 {
        let e = h.peer(1, fetch.clone());
        assert_eq!(empty_replies(&e), 1, "{e:?}");
        assert_eq!(acks(&e), vec![Offset(0)], "{e:?}");
    }
}

fn sessions_sent(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { msg, .. } => Some(msg.session()),
            _ => None,
        })
        .collect()
}

/// The successor's answer to a `Fetch` from offset 0 of the default log.
fn fetch_reply(session: u64, batches: Vec<Bytes>) -> PeerMessage {
    PeerMessage::FetchReply {
        epoch: Epoch(3),
        session,
        log: default_log(),
        base: Offset(0),
        batches,
    }
}

/// A head whose write failed full after forwarding an append: the append is neither answered
/// nor refused; after the reopen the head learns (new session) what the successor kept, and
/// the append then commits if the successor kept it, or is refused if nobody did.
fn head_full_after_forwarding(successor_kept: bool) -> Vec<(u64, ClientReply)> {
    let mut h = in_chain(1, vec![recovered(0, vec![], 0)], |c| {
        c.writes_in_flight_max = 1
    });
    h.tick(1);
    h.peer(2, succ_ack(1, 1, 0, 0));
    let e = h.append(1, batch(&[b"a"], 9, 0));
    let stored = appends(&e)[0].1[0].clone();
    let e = h.disk(DiskEvent::WriteFailed {
        log: default_log(),
        at: Offset(0),
        code: ErrorCode::StorageFull,
    });
    assert!(
        replies(&e).is_empty(),
        "in doubt: the successor may keep it"
    );
    // A new batch is stored nowhere: refused outright.
    let e = h.append(2, batch(&[b"b"], 9, 1));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::StorageFull));
    let e = h.disk(DiskEvent::Reopened {
        log: default_log(),
        end: Offset(0),
    });
    let session = *sessions_sent(&e).last().expect("a probe in a new session");
    assert!(session > 1, "a new session fences the old one");
    assert!(
        !h.log_status().ready,
        "not before the successor answers afresh"
    );
    // A stale ack of the old session changes nothing.
    h.peer(2, succ_ack(1, 9, 0, 0));
    assert!(!h.log_status().ready);
    let kept = u64::from(successor_kept);
    let mut out = h.peer(2, succ_ack(session, 10, kept, kept));
    if successor_kept {
        assert!(
            !h.log_status().ready,
            "the head must adopt the successor's suffix first"
        );
        out = h.peer(2, fetch_reply(session, vec![stored]));
        assert_eq!(appends(&out).len(), 1, "adopted from the successor");
        out.extend(h.durable(1));
    }
    replies(&out)
}

#[test]
fn a_forwarded_append_of_a_full_head_commits_if_the_successor_kept_it() {
    assert_eq!(head_full_after_forwarding(true), vec![(1, ok(0, 1))]);
}

#[test]
fn a_forwarded_append_of_a_full_head_is_refused_once_nobody_holds_it() {
    let rs = head_full_after_forwarding(false);
    assert_eq!(rs.len(), 1);
    assert_eq!((rs[0].0, code(&rs[0].1)), (1, Some(ErrorCode::StorageFull)));
}

/// A batch that queued while the head's failed write was in doubt, and whose producer's
/// earlier batch is refused when the doubt is settled: it is refused too, or the producer's
/// sequence would have a hole before it that no resend could fill (the simulator found the
/// producer refused with `SequenceGap` for ever, seed 1046744).
#[test]
fn a_batch_queued_behind_an_in_doubt_one_is_refused_with_it() {
    let mut h = in_chain(1, vec![recovered(0, vec![], 0)], |c| {
        c.writes_in_flight_max = 1
    });
    h.tick(1);
    h.peer(2, succ_ack(1, 1, 0, 0));
    assert_eq!(appends(&h.append(1, batch(&[b"a"], 9, 0))).len(), 1);
    h.disk(DiskEvent::WriteFailed {
        log: default_log(),
        at: Offset(0),
        code: ErrorCode::StorageFull,
    });
    let e = h.append(2, batch(&[b"b"], 9, 1));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::StorageFull));
    let e = h.disk(DiskEvent::Reopened {
        log: default_log(),
        end: Offset(0),
    });
    let session = *sessions_sent(&e).last().expect("a probe in a new session");
    // The producer resends `b` (it was refused) while `a` is still in doubt: it queues.
    let e = h.append(3, batch(&[b"b"], 9, 1));
    assert!(appends(&e).is_empty() && replies(&e).is_empty(), "{e:?}");
    // The successor kept nothing: `a` is refused, and `b` must not be sequenced without it.
    let e = h.peer(2, succ_ack(session, 10, 0, 0));
    assert!(appends(&e).is_empty(), "b sequenced without a: {e:?}");
    let rs: Vec<(u64, Option<ErrorCode>)> =
        replies(&e).iter().map(|(id, r)| (*id, code(r))).collect();
    assert_eq!(
        rs,
        vec![
            (1, Some(ErrorCode::StorageFull)),
            (3, Some(ErrorCode::Unavailable))
        ]
    );
    // Resent in order, both are stored.
    let e = h.append(4, batch(&[b"a"], 9, 0));
    assert_eq!(appends(&e).len(), 1, "{e:?}");
    h.durable(1);
    let e = h.append(5, batch(&[b"b"], 9, 1));
    assert!(replies(&e).is_empty(), "{e:?}");
}

/// A retry that arrives while the head's write of a batch it adopted from its successor has
/// failed full is matched to that batch (dedup) and waits for its commit. If the reopened head
/// then learns that nobody holds the batch any more (the successor lost it too), the retry is
/// refused, not answered later with offsets that new appends filled (the simulator's checker
/// found an acknowledged append holding other records, seed 1493634).
#[test]
fn a_retry_waiting_on_a_batch_lost_while_the_head_was_full_is_refused() {
    // The batch as a head stores it: stamped at offset 0.
    let mut h0 = in_chain(1, vec![recovered(0, vec![], 0)], |_| {});
    h0.tick(1);
    h0.peer(2, succ_ack(1, 1, 0, 0));
    let stored = appends(&h0.append(1, batch(&[b"a"], 9, 0)))[0].1[0].clone();
    // A head that restarted short of its successor adopts the batch; its write fails full.
    let mut h = in_chain(1, vec![recovered(0, vec![], 0)], |c| {
        c.writes_in_flight_max = 1
    });
    h.tick(1);
    let session = h.r.succ_session;
    h.peer(2, succ_ack(session, 1, 1, 1));
    let e = h.peer(2, fetch_reply(session, vec![stored]));
    assert_eq!(appends(&e).len(), 1, "adopted: {e:?}");
    h.disk(DiskEvent::WriteFailed {
        log: default_log(),
        at: Offset(0),
        code: ErrorCode::StorageFull,
    });
    // The producer's retry matches the adopted batch: it waits with it.
    let e = h.append(2, batch(&[b"a"], 9, 0));
    assert!(replies(&e).is_empty(), "{e:?}");
    // Reopened; in the new session the successor reports it holds nothing (it lost the batch).
    let e = h.disk(DiskEvent::Reopened {
        log: default_log(),
        end: Offset(0),
    });
    let session = *sessions_sent(&e).last().expect("a probe in a new session");
    let e = h.peer(2, succ_ack(session, 10, 0, 0));
    let rs: Vec<(u64, Option<ErrorCode>)> =
        replies(&e).iter().map(|(id, r)| (*id, code(r))).collect();
    assert_eq!(rs, vec![(2, Some(ErrorCode::StorageFull))], "{e:?}");
    // Another producer's batch takes offset 0 and commits; only it is answered.
    let e = h.append(3, batch(&[b"x"], 7, 0));
    assert_eq!(appends(&e).len(), 1, "{e:?}");
    let mut e = h.durable(1);
    e.extend(h.peer(2, succ_ack(session, 11, 1, 1)));
    assert_eq!(replies(&e), vec![(3, ok(0, 1))]);
}

/// A client's retry that queued behind the copy it repeats, when the head's write of that copy
/// fails full after forwarding it: the copy is stored (the successor may keep it), so the retry
/// must not be refused "stored nowhere"; it waits with the copy. The simulator's checker found
/// the refusal while node 2 held the batch (seed 223916).
#[test]
fn a_queued_retry_of_a_forwarded_append_is_not_refused_when_the_head_fills() {
    // One write in flight, one batch per write: what arrives meanwhile queues.
    let mut h = in_chain(1, vec![recovered(0, vec![], 0)], |c| {
        c.writes_in_flight_max = 1;
        c.forward_bytes_max = 1;
    });
    h.tick(1);
    h.peer(2, succ_ack(1, 1, 0, 0));
    assert_eq!(appends(&h.append(1, batch(&[b"a"], 9, 0))).len(), 1);
    // The batch and then a retry of it queue behind `a`'s write.
    assert!(appends(&h.append(2, batch(&[b"b"], 9, 1))).is_empty());
    let e = h.append(3, batch(&[b"b"], 9, 1));
    assert!(appends(&e).is_empty() && replies(&e).is_empty(), "{e:?}");
    // `a` is durable: `b` is sequenced and forwarded; its retry stays queued.
    let e = h.durable(1);
    assert_eq!(appends(&e).len(), 1, "{e:?}");
    assert!(replies(&e).is_empty(), "{e:?}");
    let e = h.disk(DiskEvent::WriteFailed {
        log: default_log(),
        at: Offset(1),
        code: ErrorCode::StorageFull,
    });
    assert!(replies(&e).is_empty(), "in doubt, not refused: {e:?}");
    // A batch nobody holds is still refused outright.
    let e = h.append(4, batch(&[b"c"], 9, 2));
    assert_eq!(code(&replies(&e)[0].1), Some(ErrorCode::StorageFull));
}

// ---------------------------------------------------------------- resending from storage

/// Bases of the batch-carrying `Append`s sent to the successor.
fn sent_bases(effects: &[Effect]) -> Vec<Offset> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                msg: PeerMessage::Append { base, batches, .. },
                ..
            } if !batches.is_empty() => Some(*base),
            _ => None,
        })
        .collect()
}

/// A successor's ack that it holds everything (durably, as far as the chain) below `written`.
fn stream_ack(session: u64, seq: u64, written: u64, resend: bool) -> PeerMessage {
    PeerMessage::Ack {
        epoch: Epoch(3),
        session,
        log: default_log(),
        seq,
        written_end: Offset(written),
        ack_end: Offset(written),
        chain_end: Offset(written),
        committed_end: Offset(written),
        resend,
        trim_point: Offset(0),
    }
}

/// Found by the simulator with long safety phases (seeds 100533 and 105569 at 12 000 steps):
/// a successor asks for a resend from X while a storage read issued from a later offset is in
/// flight. That read's batches must not move the stream past X again, or the successor asks
/// again for ever (the head streams from storage one read at a time).
#[test]
fn a_resend_abandons_the_storage_read_in_flight() {
    let mut h = in_chain(1, vec![recovered_from(0, 40, 40)], |_| {});
    let session = h.r.succ_session;
    let ack = |seq: u64, written: u64, resend: bool| stream_ack(session, seq, written, resend);
    let stored = |base: u64| build_stored(base, &[b"a", b"b", b"c"]);
    // The successor holds 0..10: the head reads on from storage.
    let e = h.peer(2, ack(1, 10, false));
    let r = reads(&e);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, Offset(10));
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Ok(vec![stored(10)]),
    });
    assert_eq!(sent_bases(&e), vec![Offset(10)]);
    let r = reads(&e);
    assert_eq!(r[0].1, Offset(13), "streams on");
    let stale = r[0].0;
    // 10..13 was lost on the way: the successor asks again from 10 while the read from 13 is
    // out.
    let e = h.peer(2, ack(2, 10, true));
    let r = reads(&e);
    assert_eq!(r.len(), 1, "a new read from the resend point");
    assert_eq!(r[0].1, Offset(10));
    let fresh = r[0].0;
    let e = h.disk(DiskEvent::ReadDone {
        token: stale,
        result: Ok(vec![stored(13)]),
    });
    assert!(sent_bases(&e).is_empty(), "the stale read is dropped");
    let e = h.disk(DiskEvent::ReadDone {
        token: fresh,
        result: Ok(vec![stored(10)]),
    });
    assert_eq!(sent_bases(&e), vec![Offset(10)]);
    assert_eq!(reads(&e)[0].1, Offset(13));
}

/// A successor catching up from far behind is streamed to only as far as the pipeline window
/// ahead of what its acks show received: storage reads faster than the link carries them, and
/// without this the link's queue grew with the whole backlog. Its acks, and a silence of a
/// resend timeout, let the stream go on.
#[test]
fn catching_up_from_storage_keeps_at_most_a_window_unreceived() {
    let mut h = in_chain(1, vec![recovered_from(0, 40, 40)], |c| {
        c.pipeline_bytes_max = 1;
    });
    let session = h.r.succ_session;
    let timeout = h.r.cfg.resend_timeout_us;
    let ack = |seq: u64, written: u64| stream_ack(session, seq, written, false);
    let stored = |base: u64| build_stored(base, &[b"a", b"b", b"c"]);
    let e = h.peer(2, ack(1, 10));
    let r = reads(&e);
    assert_eq!(r[0].1, Offset(10));
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Ok(vec![stored(10)]),
    });
    assert_eq!(sent_bases(&e), vec![Offset(10)]);
    assert!(
        reads(&e).is_empty(),
        "a window's worth is out: no read until it arrives"
    );
    assert!(reads(&h.tick(1_000)).is_empty());
    // Received only in part: still waiting.
    assert!(reads(&h.peer(2, ack(2, 12))).is_empty());
    // All of it received: the next read goes.
    let r = reads(&h.peer(2, ack(3, 13)));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, Offset(13));
    let e = h.disk(DiskEvent::ReadDone {
        token: r[0].0,
        result: Ok(vec![stored(13)]),
    });
    assert_eq!(sent_bases(&e), vec![Offset(13)]);
    assert!(reads(&e).is_empty());
    // The successor falls silent: after a resend timeout the head probes, and streams on
    // instead of waiting for an ack that may never come.
    let e = h.tick(1_000 + 2 * timeout);
    assert!(!reads(&e).is_empty(), "{e:?}");
}

fn acks_sent(effects: &[Effect]) -> Vec<(Offset, Offset, Offset)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                msg:
                    PeerMessage::Ack {
                        written_end,
                        ack_end,
                        chain_end,
                        ..
                    },
                ..
            } => Some((*written_end, *ack_end, *chain_end)),
            _ => None,
        })
        .collect()
}

fn pred_append(base: u64) -> PeerMessage {
    PeerMessage::Append {
        epoch: Epoch(3),
        session: 5,
        log: default_log(),
        base: Offset(base),
        committed_end: Offset(0),
        batches: vec![build_stored(base, &[b"x"])],
    }
}

/// One ack per batch and hop, not two: a batch that only arrived is reported with the durable
/// ack that follows it, or at the next tick, whichever comes first; the first ack of a session
/// still goes at once (the predecessor waits for it to learn the chain).
#[test]
fn a_received_batch_is_acknowledged_once_durable_or_at_the_next_tick() {
    let mut h = in_chain(2, vec![recovered(0, vec![], 0)], |_| {});
    let e = h.peer(1, pred_append(0));
    assert_eq!(appends(&e).len(), 1);
    assert_eq!(
        acks_sent(&e),
        vec![(Offset(1), Offset(0), Offset(1))],
        "the session's first ack at once"
    );
    let e = h.peer(1, pred_append(1));
    assert_eq!(appends(&e).len(), 1);
    assert!(acks_sent(&e).is_empty(), "arrival alone waits");
    let e = h.durable(2);
    assert_eq!(acks_sent(&e), vec![(Offset(2), Offset(2), Offset(2))]);
    let e = h.peer(1, pred_append(2));
    assert!(acks_sent(&e).is_empty());
    // The runtime's timer is nearly always due when a batch arrives: a tick right after the
    // arrival must not report it (the flush about to finish will).
    assert!(
        acks_sent(&h.tick(1)).is_empty(),
        "a tick just after the arrival waits"
    );
    assert!(acks_sent(&h.tick(ARRIVAL_ACK_DELAY_US - 2)).is_empty());
    let e = h.tick(1);
    assert_eq!(
        acks_sent(&e),
        vec![(Offset(3), Offset(2), Offset(3))],
        "the first tick a delay after the arrival reports it"
    );
    assert!(acks_sent(&h.tick(1000)).is_empty(), "and only once");
    // The delay counts from the arrival not yet reported, not from the last ack.
    let e = h.peer(1, pred_append(3));
    assert!(acks_sent(&e).is_empty());
    assert!(acks_sent(&h.tick(ARRIVAL_ACK_DELAY_US - 1)).is_empty());
    assert_eq!(
        acks_sent(&h.tick(1)),
        vec![(Offset(4), Offset(2), Offset(4))]
    );
}
