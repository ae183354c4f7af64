//! The batch: chainlog's unit on disk and on the wire, written and forwarded byte for byte.
//!
//! Layout (little-endian), `HEADER_LEN` = 80 bytes, then `record_count` records of
//! `u32 length` + payload:
//!
//! | off | field        | type | notes                                               |
//! |-----|--------------|------|-----------------------------------------------------|
//! | 0   | magic        | u32  | `BATCH_MAGIC`                                        |
//! | 4   | version      | u16  | `BATCH_VERSION`                                      |
//! | 6   | flags        | u16  | reserved, 0                                          |
//! | 8   | body_len     | u32  | bytes after the header                               |
//! | 12  | record_count | u32  | >= 1                                                 |
//! | 16  | cluster_id   | u64  |                                                      |
//! | 24  | log_id       | u64  |                                                      |
//! | 32  | epoch        | u64  | stamped by the head                                  |
//! | 40  | base_offset  | u64  | stamped by the head                                  |
//! | 48  | producer_id  | u64  | 0 = not idempotent                                   |
//! | 56  | producer_seq | u64  | sequence of the first record; record i has seq + i   |
//! | 64  | timestamp_us | u64  | producer's wall clock at batch creation              |
//! | 72  | body_crc     | u32  | CRC32C of the body                                   |
//! | 76  | header_crc   | u32  | CRC32C of bytes 0..76                                |
//!
//! The head only rewrites `epoch`, `base_offset` (and `cluster_id`) and the header CRC, so a
//! producer's body checksum travels unchanged from client to every replica's disk.

use crate::error::{Error, Result};
use crate::limits::{BATCH_BYTES_MAX, BATCH_RECORDS_MAX, RECORD_BYTES_MAX};
use crate::types::{ClusterId, Epoch, LogId, Offset, ProducerId};
use bytes::{BufMut, Bytes, BytesMut};

/// CRC32C (Castagnoli): the checksum of every batch header and body, and of storage's own
/// structures. One function, so the algorithm behind it can only change in one place (the
/// on-disk and wire formats depend on it; a test pins it to the `crc32c` crate's results).
pub fn checksum(b: &[u8]) -> u32 {
    // CRC-32/ISCSI is CRC32C; the 64-bit return carries a 32-bit value.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32
}

pub const BATCH_MAGIC: u32 = 0x3142_4c43; // "CLB1"
pub const BATCH_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 80;
/// Bytes a record adds besides its payload (its length prefix).
pub const RECORD_OVERHEAD: usize = 4;

const BODY_CRC_AT: usize = 72;
const HEADER_CRC_AT: usize = 76;

/// Decoded batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub flags: u16,
    pub body_len: u32,
    pub record_count: u32,
    pub cluster_id: ClusterId,
    pub log_id: LogId,
    pub epoch: Epoch,
    pub base_offset: Offset,
    pub producer_id: ProducerId,
    pub producer_seq: u64,
    pub timestamp_us: u64,
    pub body_crc: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl BatchHeader {
    /// Total length of the batch this header describes.
    pub fn batch_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// One past the last offset of the batch.
    pub fn end_offset(&self) -> Offset {
        self.base_offset.plus(u64::from(self.record_count))
    }

    /// Writes the header, computing the header CRC, into `out[..HEADER_LEN]`.
    pub fn encode_into(&self, out: &mut [u8]) {
        assert!(out.len() >= HEADER_LEN);
        out[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&BATCH_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.record_count.to_le_bytes());
        out[16..24].copy_from_slice(&self.cluster_id.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.log_id.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[40..48].copy_from_slice(&self.base_offset.0.to_le_bytes());
        out[48..56].copy_from_slice(&self.producer_id.0.to_le_bytes());
        out[56..64].copy_from_slice(&self.producer_seq.to_le_bytes());
        out[64..72].copy_from_slice(&self.timestamp_us.to_le_bytes());
        out[72..76].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = checksum(&out[..HEADER_CRC_AT]);
        out[76..80].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a header: magic, version, header CRC, and the limits. Does not look
    /// at the body.
    pub fn decode(b: &[u8]) -> Result<BatchHeader> {
        if b.len() < HEADER_LEN {
            return Err(Error::Malformed(format!(
                "batch header needs {HEADER_LEN} bytes, got {}",
                b.len()
            )));
        }
        if u32_at(b, 0) != BATCH_MAGIC {
            return Err(Error::Corruption("batch magic mismatch".into()));
        }
        let stored = u32_at(b, HEADER_CRC_AT);
        if checksum(&b[..HEADER_CRC_AT]) != stored {
            return Err(Error::Corruption("batch header checksum mismatch".into()));
        }
        let version = u16_at(b, 4);
        if version != BATCH_VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        let h = BatchHeader {
            flags: u16_at(b, 6),
            body_len: u32_at(b, 8),
            record_count: u32_at(b, 12),
            cluster_id: ClusterId(u64_at(b, 16)),
            log_id: LogId(u64_at(b, 24)),
            epoch: Epoch(u64_at(b, 32)),
            base_offset: Offset(u64_at(b, 40)),
            producer_id: ProducerId(u64_at(b, 48)),
            producer_seq: u64_at(b, 56),
            timestamp_us: u64_at(b, 64),
            body_crc: u32_at(b, BODY_CRC_AT),
        };
        if h.record_count == 0 || h.record_count > BATCH_RECORDS_MAX {
            return Err(Error::Malformed(format!(
                "record count {} out of range",
                h.record_count
            )));
        }
        if h.batch_len() > BATCH_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "batch",
                size: h.batch_len(),
                limit: BATCH_BYTES_MAX,
            });
        }
        if h.base_offset
            .0
            .checked_add(u64::from(h.record_count))
            .is_none()
        {
            // Only a hostile or corrupt header gets here; `end_offset` may then be computed
            // without a check.
            return Err(Error::Malformed("batch offsets overflow".into()));
        }
        if (h.body_len as usize) < h.record_count as usize * RECORD_OVERHEAD {
            return Err(Error::Malformed(
                "body shorter than its length prefixes".into(),
            ));
        }
        Ok(h)
    }
}

/// Bytes of a batch header that hold its length (magic, version, flags, body_len).
pub const LEN_KNOWN_AT: usize = 12;

/// The whole batch length (header included) that a header's first [`LEN_KNOWN_AT`] bytes
/// claim; `None` if `b` is shorter. Unverified: the header CRC covers it only once the header
/// is whole, so a reader may use it only to size a buffer it has already bounded.
pub fn claimed_batch_len(b: &[u8]) -> Option<usize> {
    (b.len() >= LEN_KNOWN_AT).then(|| HEADER_LEN + u32_at(b, 8) as usize)
}

/// Fully verifies one batch: header, body CRC, and that the record lengths tile the body exactly.
/// `b` must hold at least the whole batch; bytes after it are ignored (padding, next batch).
pub fn verify(b: &[u8]) -> Result<BatchHeader> {
    let h = BatchHeader::decode(b)?;
    let len = h.batch_len();
    if b.len() < len {
        return Err(Error::Malformed(format!(
            "batch needs {len} bytes, got {}",
            b.len()
        )));
    }
    let body = &b[HEADER_LEN..len];
    if checksum(body) != h.body_crc {
        return Err(Error::Corruption("batch body checksum mismatch".into()));
    }
    let mut at = 0usize;
    for _ in 0..h.record_count {
        if at + RECORD_OVERHEAD > body.len() {
            return Err(Error::Malformed(
                "record length prefix past body end".into(),
            ));
        }
        let n = u32_at(body, at) as usize;
        if n > RECORD_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "record",
                size: n,
                limit: RECORD_BYTES_MAX,
            });
        }
        at += RECORD_OVERHEAD;
        if at + n > body.len() {
            return Err(Error::Malformed("record payload past body end".into()));
        }
        at += n;
    }
    if at != body.len() {
        return Err(Error::Malformed(
            "trailing bytes after the last record".into(),
        ));
    }
    Ok(h)
}

/// Re-stamps a producer's batch at the head: epoch, base offset and cluster id, then the header
/// CRC. The body (and its CRC) is untouched: no payload byte moves.
pub fn restamp(b: &mut [u8], cluster_id: ClusterId, epoch: Epoch, base_offset: Offset) {
    assert!(b.len() >= HEADER_LEN);
    b[16..24].copy_from_slice(&cluster_id.0.to_le_bytes());
    b[32..40].copy_from_slice(&epoch.0.to_le_bytes());
    b[40..48].copy_from_slice(&base_offset.0.to_le_bytes());
    let crc = checksum(&b[..HEADER_CRC_AT]);
    b[76..80].copy_from_slice(&crc.to_le_bytes());
}

/// Iterates the records of a verified batch as (offset, payload) with zero-copy `Bytes` slices.
pub fn records(batch: &Bytes) -> Result<RecordIter> {
    let h = verify(batch)?;
    Ok(RecordIter {
        batch: batch.clone(),
        at: HEADER_LEN,
        end: h.batch_len(),
        next: h.base_offset,
        left: h.record_count,
    })
}

/// Iterator returned by [`records`].
pub struct RecordIter {
    batch: Bytes,
    at: usize,
    end: usize,
    next: Offset,
    left: u32,
}

impl Iterator for RecordIter {
    type Item = (Offset, Bytes);
    fn next(&mut self) -> Option<(Offset, Bytes)> {
        if self.left == 0 {
            return None;
        }
        // The batch was verified in `records`, so the prefixes tile the body.
        let n = u32_at(&self.batch, self.at) as usize;
        let start = self.at + RECORD_OVERHEAD;
        let item = (self.next, self.batch.slice(start..start + n));
        assert!(start + n <= self.end);
        self.at = start + n;
        self.next = self.next.plus(1);
        self.left -= 1;
        Some(item)
    }
}

/// Builds a batch on the producer side. The head fills in epoch and base offset.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    count: u32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        Self::with_capacity(4096)
    }

    pub fn with_capacity(bytes: usize) -> BatchBuilder {
        let mut buf = BytesMut::with_capacity(bytes.max(HEADER_LEN));
        buf.put_bytes(0, HEADER_LEN);
        BatchBuilder { buf, count: 0 }
    }

    /// Bytes the batch would have with one more record of `payload_len` bytes.
    pub fn len_with(&self, payload_len: usize) -> usize {
        self.buf.len() + RECORD_OVERHEAD + payload_len
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn record_count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether one more record of `payload_len` bytes fits the batch limits.
    pub fn fits(&self, payload_len: usize) -> bool {
        self.count < BATCH_RECORDS_MAX && self.len_with(payload_len) <= BATCH_BYTES_MAX
    }

    /// Appends a record. Fails if the record or the batch would exceed the limits.
    pub fn push(&mut self, payload: &[u8]) -> Result<()> {
        if payload.len() > RECORD_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "record",
                size: payload.len(),
                limit: RECORD_BYTES_MAX,
            });
        }
        if !self.fits(payload.len()) {
            return Err(Error::TooLarge {
                what: "batch",
                size: self.len_with(payload.len()),
                limit: BATCH_BYTES_MAX,
            });
        }
        self.buf.put_u32_le(payload.len() as u32);
        self.buf.put_slice(payload);
        self.count += 1;
        Ok(())
    }

    /// Seals the batch. `base_offset` and `epoch` are placeholders the head overwrites.
    pub fn finish(
        mut self,
        cluster_id: ClusterId,
        log_id: LogId,
        producer_id: ProducerId,
        producer_seq: u64,
        timestamp_us: u64,
    ) -> Bytes {
        assert!(self.count > 0, "empty batch");
        let body_crc = checksum(&self.buf[HEADER_LEN..]);
        let h = BatchHeader {
            flags: 0,
            body_len: (self.buf.len() - HEADER_LEN) as u32,
            record_count: self.count,
            cluster_id,
            log_id,
            epoch: Epoch(0),
            base_offset: Offset(0),
            producer_id,
            producer_seq,
            timestamp_us,
            body_crc,
        };
        h.encode_into(&mut self.buf[..HEADER_LEN]);
        self.buf.freeze()
    }
}

/// Builds a batch from payloads in one call (tests, tools).
pub fn build(
    log_id: LogId,
    base_offset: Offset,
    epoch: Epoch,
    payloads: &[&[u8]],
) -> Result<Bytes> {
    let mut b = BatchBuilder::new();
    for p in payloads {
        b.push(p)?;
    }
    let bytes = b.finish(ClusterId(0), log_id, ProducerId(0), 0, 0);
    let mut m = BytesMut::from(&bytes[..]);
    restamp(&mut m, ClusterId(0), epoch, base_offset);
    Ok(m.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Bytes {
        build(
            LogId(7),
            Offset(100),
            Epoch(3),
            &[b"alpha", b"", b"gamma-gamma"],
        )
        .expect("build")
    }

    /// The formats are defined by CRC32C: the check value from the CRC catalogue, and the same
    /// results as the `crc32c` crate (which wrote every byte before) at every length around
    /// the SIMD implementation's block sizes, at every alignment.
    #[test]
    fn checksum_is_crc32c() {
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(b""), 0);
        let data: Vec<u8> = (0..140_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut lens: Vec<usize> = (0..600).collect();
        lens.extend([1023, 1024, 1025, 4095, 4096, 4097, 65_536, 135_168, 139_000]);
        for len in lens {
            for start in [0usize, 1, 7, 63] {
                let b = &data[start..start + len];
                assert_eq!(checksum(b), crc32c::crc32c(b), "len {len} at {start}");
            }
        }
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let h = verify(&b).expect("verify");
        assert_eq!(h.base_offset, Offset(100));
        assert_eq!(h.epoch, Epoch(3));
        assert_eq!(h.record_count, 3);
        assert_eq!(h.end_offset(), Offset(103));
        assert_eq!(h.batch_len(), b.len());
        let recs: Vec<_> = records(&b).expect("records").collect();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0], (Offset(100), Bytes::from_static(b"alpha")));
        assert_eq!(recs[1], (Offset(101), Bytes::new()));
        assert_eq!(recs[2], (Offset(102), Bytes::from_static(b"gamma-gamma")));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let b = sample();
        for byte in 0..b.len() {
            for bit in 0..8 {
                let mut m = b.to_vec();
                m[byte] ^= 1 << bit;
                assert!(
                    verify(&m).is_err(),
                    "flip of byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn restamp_keeps_body() {
        let b = sample();
        let mut m = b.to_vec();
        restamp(&mut m, ClusterId(9), Epoch(4), Offset(5));
        let h = verify(&m).expect("verify");
        assert_eq!(
            (h.cluster_id, h.epoch, h.base_offset),
            (ClusterId(9), Epoch(4), Offset(5))
        );
        assert_eq!(&m[HEADER_LEN..], &b[HEADER_LEN..]);
    }

    #[test]
    fn overflowing_offsets_are_malformed_not_a_panic() {
        let b = build(LogId(7), Offset(u64::MAX - 1), Epoch(1), &[b"a", b"b"]).expect("build");
        assert!(matches!(verify(&b), Err(Error::Malformed(_))));
    }

    #[test]
    fn limits_enforced() {
        let mut bb = BatchBuilder::new();
        assert!(bb.push(&vec![0u8; RECORD_BYTES_MAX + 1]).is_err());
        assert!(bb.push(&vec![0u8; RECORD_BYTES_MAX]).is_ok());
    }

    #[test]
    fn truncated_batch_is_rejected() {
        let b = sample();
        for cut in 0..b.len() {
            assert!(verify(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn prop_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20), base in 0u64..1<<40) {
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            let b = build(LogId(1), Offset(base), Epoch(1), &refs).expect("build");
            let got: Vec<_> = records(&b).expect("records").collect();
            prop_assert_eq!(got.len(), payloads.len());
            for (i, (off, p)) in got.iter().enumerate() {
                prop_assert_eq!(off.0, base + i as u64);
                prop_assert_eq!(&p[..], &payloads[i][..]);
            }
        }
    }
}
