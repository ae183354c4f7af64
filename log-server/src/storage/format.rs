//! On-disk formats of the storage directory: segment header, sealed-segment index file, log
//! meta file, committed-hint file, and the file names. Every structure carries a magic, a
//! version and a CRC32C, so a torn or foreign file is recognised and never trusted.
//!
//! Layout of a data dir:
//! ```text
//! <dir>/logs/<log id as 16 hex digits>/meta                      name and id of the log
//! <dir>/logs/<id>/committed                                      committed-end hint (2 slots)
//! <dir>/logs/<id>/trim                                           trim point (replaced whole)
//! <dir>/logs/<id>/00000000000000000000.seg                       segment: 4 KiB header, batches
//! <dir>/logs/<id>/00000000000000000000.idx                       index of a sealed segment
//! <dir>/spare/                                                   pre-zeroed spare segments
//! <dir>/LOCK                                                     flock held while open
//! ```

use chainlog_core::effects::ProducerBatch;
use chainlog_core::record::checksum;
use chainlog_core::{LogId, Offset, ProducerId};

/// Bytes before the first batch of a segment: one page, so O_DIRECT batches stay aligned.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
const SEGMENT_MAGIC: u32 = 0x4753_4c43; // "CLSG"
const SEGMENT_VERSION: u16 = 1;
const SEGMENT_HEADER_CRC_AT: usize = 60;

const INDEX_MAGIC: u32 = 0x5849_4c43; // "CLIX"
const INDEX_VERSION: u16 = 1;
const META_MAGIC: u32 = 0x544d_4c43; // "CLMT"
const META_VERSION: u16 = 1;
const HINT_MAGIC: u32 = 0x5448_4c43; // "CLHT"
const TRIM_MAGIC: u32 = 0x5054_4c43; // "CLTP"
const TRIM_VERSION: u16 = 1;
pub const TRIM_FILE_BYTES: usize = 20;
/// Each hint slot is one 512-byte sector, so a torn write damages at most the slot written.
pub const HINT_SLOT_BYTES: u64 = 512;
pub const HINT_FILE_BYTES: u64 = 2 * HINT_SLOT_BYTES;

pub const SEGMENT_SUFFIX: &str = ".seg";
pub const INDEX_SUFFIX: &str = ".idx";
pub const META_FILE: &str = "meta";
pub const HINT_FILE: &str = "committed";
pub const TRIM_FILE: &str = "trim";
pub const LOGS_DIR: &str = "logs";
pub const LOCK_FILE: &str = "LOCK";
pub const SPARE_DIR: &str = "spare";
pub const TMP_PREFIX: &str = ".tmp-";

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

pub fn segment_name(base: Offset) -> String {
    format!("{:020}{SEGMENT_SUFFIX}", base.0)
}

pub fn index_name(base: Offset) -> String {
    format!("{:020}{INDEX_SUFFIX}", base.0)
}

pub fn log_dir_name(log: LogId) -> String {
    format!("{:016x}", log.0)
}

/// Parses `<20 digits><suffix>` into the base offset.
pub fn parse_base(name: &str, suffix: &str) -> Option<Offset> {
    let stem = name.strip_suffix(suffix)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok().map(Offset)
}

/// The fixed header at the start of every segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub base: Offset,
    pub log: LogId,
    /// 1: batches packed back to back (buffered mode); 4096: each batch padded to a page
    /// (O_DIRECT mode).
    pub align: u32,
}

/// Why a segment header could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    /// All zero: created but never written (crash during a roll).
    Blank,
    Corrupt(String),
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES as usize];
        b[0..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.base.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.log.0.to_le_bytes());
        b[24..28].copy_from_slice(&self.align.to_le_bytes());
        let crc = checksum(&b[..SEGMENT_HEADER_CRC_AT]);
        b[SEGMENT_HEADER_CRC_AT..SEGMENT_HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderProblem> {
        if b.len() < SEGMENT_HEADER_CRC_AT + 4 {
            return Err(HeaderProblem::Corrupt(
                "segment shorter than its header".into(),
            ));
        }
        if b[..SEGMENT_HEADER_CRC_AT + 4].iter().all(|&x| x == 0) {
            return Err(HeaderProblem::Blank);
        }
        if u32_at(b, 0) != SEGMENT_MAGIC {
            return Err(HeaderProblem::Corrupt("segment magic mismatch".into()));
        }
        if checksum(&b[..SEGMENT_HEADER_CRC_AT]) != u32_at(b, SEGMENT_HEADER_CRC_AT) {
            return Err(HeaderProblem::Corrupt(
                "segment header checksum mismatch".into(),
            ));
        }
        let v = u16_at(b, 4);
        if v != SEGMENT_VERSION {
            return Err(HeaderProblem::Corrupt(format!(
                "segment version {v} unsupported"
            )));
        }
        let align = u32_at(b, 24);
        if align != 1 && align != hw_page() {
            return Err(HeaderProblem::Corrupt(format!(
                "segment alignment {align} unsupported"
            )));
        }
        Ok(SegmentHeader {
            base: Offset(u64_at(b, 8)),
            log: LogId(u64_at(b, 16)),
            align,
        })
    }
}

fn hw_page() -> u32 {
    chainlog_hw::buf::PAGE_BYTES as u32
}

/// Bytes a batch of `len` occupies in a segment of alignment `align`.
pub fn stride(len: usize, align: u32) -> u64 {
    let a = u64::from(align.max(1));
    (len as u64).div_ceil(a) * a
}

/// The persisted index of a sealed segment, with the producer table as of its end (so recovery
/// only scans the active segment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentIndex {
    pub base: Offset,
    pub end: Offset,
    pub end_pos: u64,
    pub align: u32,
    /// (first offset of a batch, its byte position), ascending.
    pub entries: Vec<(Offset, u64)>,
    pub producers: Vec<ProducerBatch>,
}

const INDEX_FIXED_BYTES: usize = 48;
const INDEX_ENTRY_BYTES: usize = 16;
const INDEX_PRODUCER_BYTES: usize = 32;

impl SegmentIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            INDEX_FIXED_BYTES
                + self.entries.len() * INDEX_ENTRY_BYTES
                + self.producers.len() * INDEX_PRODUCER_BYTES
                + 4,
        );
        b.extend_from_slice(&INDEX_MAGIC.to_le_bytes());
        b.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&self.base.0.to_le_bytes());
        b.extend_from_slice(&self.end.0.to_le_bytes());
        b.extend_from_slice(&self.end_pos.to_le_bytes());
        b.extend_from_slice(&self.align.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (o, p) in &self.entries {
            b.extend_from_slice(&o.0.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
        }
        for p in &self.producers {
            b.extend_from_slice(&p.producer.0.to_le_bytes());
            b.extend_from_slice(&p.seq.to_le_bytes());
            b.extend_from_slice(&p.record_count.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&p.base_offset.0.to_le_bytes());
        }
        let crc = checksum(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` for anything but a complete, checksummed index (a missing or bad index only
    /// costs a scan).
    pub fn decode(b: &[u8]) -> Option<SegmentIndex> {
        if b.len() < INDEX_FIXED_BYTES + 4 {
            return None;
        }
        let body = &b[..b.len() - 4];
        if checksum(body) != u32_at(b, b.len() - 4) {
            return None;
        }
        if u32_at(b, 0) != INDEX_MAGIC || u16_at(b, 4) != INDEX_VERSION {
            return None;
        }
        let n_entries = u32_at(b, 36) as usize;
        let n_producers = u32_at(b, 40) as usize;
        let want = INDEX_FIXED_BYTES
            .checked_add(n_entries.checked_mul(INDEX_ENTRY_BYTES)?)?
            .checked_add(n_producers.checked_mul(INDEX_PRODUCER_BYTES)?)?;
        if want != body.len() {
            return None;
        }
        let mut at = INDEX_FIXED_BYTES;
        let mut entries = Vec::with_capacity(n_entries);
        for _ in 0..n_entries {
            entries.push((Offset(u64_at(b, at)), u64_at(b, at + 8)));
            at += INDEX_ENTRY_BYTES;
        }
        let mut producers = Vec::with_capacity(n_producers);
        for _ in 0..n_producers {
            producers.push(ProducerBatch {
                producer: ProducerId(u64_at(b, at)),
                seq: u64_at(b, at + 8),
                record_count: u32_at(b, at + 16),
                base_offset: Offset(u64_at(b, at + 24)),
            });
            at += INDEX_PRODUCER_BYTES;
        }
        Some(SegmentIndex {
            base: Offset(u64_at(b, 8)),
            end: Offset(u64_at(b, 16)),
            end_pos: u64_at(b, 24),
            align: u32_at(b, 32),
            entries,
            producers,
        })
    }
}

/// The `meta` file of a log directory: its name (the id is derived from it).
pub fn encode_meta(log: LogId, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + name.len());
    b.extend_from_slice(&META_MAGIC.to_le_bytes());
    b.extend_from_slice(&META_VERSION.to_le_bytes());
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(&log.0.to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    let crc = checksum(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_meta(b: &[u8]) -> Option<(LogId, String)> {
    if b.len() < 20 {
        return None;
    }
    let body = &b[..b.len() - 4];
    if checksum(body) != u32_at(b, b.len() - 4) {
        return None;
    }
    if u32_at(b, 0) != META_MAGIC || u16_at(b, 4) != META_VERSION {
        return None;
    }
    let n = u16_at(b, 6) as usize;
    if 16 + n != body.len() {
        return None;
    }
    let name = std::str::from_utf8(&b[16..16 + n]).ok()?.to_string();
    Some((LogId(u64_at(b, 8)), name))
}

/// One slot of the committed-hint file: (write sequence, committed end).
pub fn encode_hint(seq: u64, end: Offset) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..4].copy_from_slice(&HINT_MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..20].copy_from_slice(&end.0.to_le_bytes());
    let crc = checksum(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The newest valid slot of a hint file as (seq, end).
pub fn decode_hint(file: &[u8]) -> Option<(u64, Offset)> {
    let mut best: Option<(u64, Offset)> = None;
    for slot in 0..2 {
        let at = (slot * HINT_SLOT_BYTES) as usize;
        let Some(b) = file.get(at..at + 24) else {
            continue;
        };
        if u32_at(b, 0) != HINT_MAGIC || checksum(&b[..20]) != u32_at(b, 20) {
            continue;
        }
        let (seq, end) = (u64_at(b, 4), Offset(u64_at(b, 12)));
        if best.is_none_or(|(s, _)| seq > s) {
            best = Some((seq, end));
        }
    }
    best
}

/// The trim file: the highest trim point asked of the log. Written to a temporary name and
/// renamed over the old one, so a crash leaves the old point or the new one, never a mix.
pub fn encode_trim(point: Offset) -> [u8; TRIM_FILE_BYTES] {
    let mut b = [0u8; TRIM_FILE_BYTES];
    b[0..4].copy_from_slice(&TRIM_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&TRIM_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&point.0.to_le_bytes());
    let crc = checksum(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_trim(b: &[u8]) -> Option<Offset> {
    if b.len() != TRIM_FILE_BYTES
        || u32_at(b, 0) != TRIM_MAGIC
        || u16_at(b, 4) != TRIM_VERSION
        || checksum(&b[..16]) != u32_at(b, 16)
    {
        return None;
    }
    Some(Offset(u64_at(b, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(Offset(42)), "00000000000000000042.seg");
        assert_eq!(
            parse_base("00000000000000000042.seg", SEGMENT_SUFFIX),
            Some(Offset(42))
        );
        assert_eq!(parse_base("42.seg", SEGMENT_SUFFIX), None);
        assert_eq!(parse_base("0000000000000000004x.seg", SEGMENT_SUFFIX), None);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = SegmentHeader {
            base: Offset(7),
            log: LogId(9),
            align: 4096,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        assert_eq!(
            SegmentHeader::decode(&[0u8; 4096]),
            Err(HeaderProblem::Blank)
        );
        let mut d = b;
        d[9] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&d),
            Err(HeaderProblem::Corrupt(_))
        ));
    }

    #[test]
    fn index_round_trip_and_damage() {
        let i = SegmentIndex {
            base: Offset(10),
            end: Offset(20),
            end_pos: 9000,
            align: 1,
            entries: vec![(Offset(10), 4096), (Offset(15), 6000)],
            producers: vec![ProducerBatch {
                producer: ProducerId(3),
                seq: 5,
                record_count: 2,
                base_offset: Offset(12),
            }],
        };
        let b = i.encode();
        assert_eq!(SegmentIndex::decode(&b), Some(i));
        for cut in 0..b.len() {
            assert_eq!(SegmentIndex::decode(&b[..cut]), None);
        }
        let mut d = b.clone();
        d[50] ^= 4;
        assert_eq!(SegmentIndex::decode(&d), None);
    }

    #[test]
    fn meta_and_hint() {
        let m = encode_meta(LogId(5), "orders");
        assert_eq!(decode_meta(&m), Some((LogId(5), "orders".to_string())));
        assert_eq!(decode_meta(&m[..m.len() - 1]), None);
        let mut f = vec![0u8; HINT_FILE_BYTES as usize];
        assert_eq!(decode_hint(&f), None);
        f[..24].copy_from_slice(&encode_hint(1, Offset(100)));
        f[512..536].copy_from_slice(&encode_hint(2, Offset(200)));
        assert_eq!(decode_hint(&f), Some((2, Offset(200))));
        f[520] ^= 1;
        assert_eq!(decode_hint(&f), Some((1, Offset(100))));
        let t = encode_trim(Offset(77));
        assert_eq!(decode_trim(&t), Some(Offset(77)));
        assert_eq!(decode_trim(&t[..19]), None);
        for byte in 0..t.len() {
            let mut bad = t;
            bad[byte] ^= 4;
            assert_eq!(decode_trim(&bad), None, "flip in byte {byte}");
        }
    }
}
