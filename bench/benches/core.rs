//! Criterion benches of the CPU work on the append path: building, verifying and restamping a
//! batch of 1 KiB records (1, 16, 128 per batch), and encoding/decoding an Append frame.

use bytes::{Bytes, BytesMut};
use chainlog_core::record::{self, BatchBuilder};
use chainlog_core::wire::{ClientRequest, FrameHeader, FRAME_HEADER_LEN};
use chainlog_core::{ClusterId, Epoch, LogId, Offset, ProducerId};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const RECORD_BYTES: usize = 1024;
const COUNTS: [usize; 3] = [1, 16, 128];

fn payload() -> Vec<u8> {
    (0..RECORD_BYTES).map(|i| (i * 31 % 251) as u8).collect()
}

fn batch(count: usize) -> Bytes {
    let p = payload();
    let mut b = BatchBuilder::with_capacity(
        record::HEADER_LEN + count * (RECORD_BYTES + record::RECORD_OVERHEAD),
    );
    for _ in 0..count {
        b.push(&p).expect("within limits");
    }
    b.finish(ClusterId(1), LogId(7), ProducerId(3), 0, 0)
}

fn batches(c: &mut Criterion) {
    let p = payload();
    let mut g = c.benchmark_group("batch");
    for count in COUNTS {
        let bytes = (count * RECORD_BYTES) as u64;
        g.throughput(Throughput::Bytes(bytes));
        g.bench_with_input(BenchmarkId::new("encode", count), &count, |bch, &count| {
            bch.iter(|| {
                let mut b =
                    BatchBuilder::with_capacity(record::HEADER_LEN + count * (RECORD_BYTES + 4));
                for _ in 0..count {
                    b.push(black_box(&p)).expect("within limits");
                }
                b.finish(ClusterId(1), LogId(7), ProducerId(3), 0, 0)
            })
        });
        let built = batch(count);
        g.bench_with_input(BenchmarkId::new("verify", count), &built, |bch, built| {
            bch.iter(|| record::verify(black_box(built)).expect("valid"))
        });
        // Restamp touches only the header: its cost is per batch, so count records, not bytes.
        g.throughput(Throughput::Elements(count as u64));
        let mut m = built.to_vec();
        g.bench_with_input(BenchmarkId::new("restamp", count), &count, |bch, _| {
            let mut off = 0u64;
            bch.iter(|| {
                off += count as u64;
                record::restamp(black_box(&mut m), ClusterId(1), Epoch(2), Offset(off));
            })
        });
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for count in COUNTS {
        let built = batch(count);
        let req = ClientRequest::Append {
            batch: built.clone(),
        };
        // Encoding an Append copies no payload (the batch rides as a chunk): count records.
        g.throughput(Throughput::Elements(count as u64));
        g.bench_with_input(
            BenchmarkId::new("encode_append", count),
            &req,
            |bch, req| bch.iter(|| black_box(req.encode(black_box(42)))),
        );
        g.throughput(Throughput::Bytes(built.len() as u64));
        // Decode as the server does: header, then the body (which verifies the batch).
        let wire = Bytes::from(req.encode(42).to_vec());
        g.bench_with_input(
            BenchmarkId::new("decode_append", count),
            &wire,
            |bch, wire| {
                bch.iter(|| {
                    let mut hb = [0u8; FRAME_HEADER_LEN];
                    hb.copy_from_slice(&wire[..FRAME_HEADER_LEN]);
                    let h = FrameHeader::decode(&hb).expect("valid header");
                    let body = wire.slice(FRAME_HEADER_LEN..);
                    ClientRequest::decode(h.kind, black_box(body)).expect("valid body")
                })
            },
        );
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("header_encode", |bch| {
        let h = FrameHeader {
            body_len: 1108,
            kind: 12,
            flags: 0,
            request_id: 9,
        };
        let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN);
        bch.iter(|| {
            out.clear();
            black_box(&h).encode(&mut out);
        })
    });
    g.finish();
}

criterion_group!(benches, batches, frames);
criterion_main!(benches);
