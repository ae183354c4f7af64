//! Recovery of one log directory: load sealed segments from their index files (or scan them),
//! scan the active segment from its last index point verifying every batch, cut and zero a
//! torn tail, and rebuild the sparse index and the producer table. Never panics on disk bytes:
//! anything that does not verify ends the log there (the replica repairs from its peers).

use super::format::{
    self, HeaderProblem, SegmentHeader, SegmentIndex, HINT_FILE, META_FILE, SEGMENT_HEADER_BYTES,
    SEGMENT_SUFFIX,
};
use super::producers::ProducerTable;
use super::StorageError;
use chainlog_core::effects::ProducerBatch;
use chainlog_core::record::{self, BatchHeader, HEADER_LEN};
use chainlog_core::{LogId, Offset};
use chainlog_hw::disk;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Read size while scanning; a larger batch is read whole.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// One segment as the writer tracks it.
pub(crate) struct SegState {
    pub base: Offset,
    pub path: PathBuf,
    /// File length: batches must end at or before it.
    pub cap: u64,
    pub align: u32,
    /// One past the last record (durable, once recovered or completed).
    pub end: Offset,
    /// Byte position after the last batch.
    pub end_pos: u64,
    pub index: Vec<(Offset, u64)>,
    /// Position of the newest index entry (index spacing is measured from it).
    pub last_index_pos: Option<u64>,
    /// Buffered read-only descriptor shared with the reader.
    pub read_file: Arc<File>,
    /// Last write (file mtime at recovery): what age retention looks at.
    pub modified: SystemTime,
}

impl SegState {
    pub fn data_bytes(&self) -> u64 {
        self.end_pos - SEGMENT_HEADER_BYTES
    }

    /// Records an index entry for a batch at `pos` if it is far enough from the previous one.
    pub fn maybe_index(&mut self, off: Offset, pos: u64, interval: u32) {
        if self
            .last_index_pos
            .is_none_or(|p| pos - p >= u64::from(interval))
        {
            self.index.push((off, pos));
            self.last_index_pos = Some(pos);
        }
    }

    pub fn to_index(&self, producers: &ProducerTable) -> SegmentIndex {
        SegmentIndex {
            base: self.base,
            end: self.end,
            end_pos: self.end_pos,
            align: self.align,
            entries: self.index.clone(),
            producers: producers.to_vec(),
        }
    }
}

pub(crate) struct Recovered {
    pub log: LogId,
    pub name: String,
    pub dir: PathBuf,
    pub segs: Vec<SegState>,
    pub producers: ProducerTable,
    pub hint_seq: u64,
    pub committed_hint: Offset,
    /// The trim file's point (0 without one).
    pub trim_point: Offset,
    /// Where the log ends (and the next segment would start if there are none).
    pub end: Offset,
}

impl Recovered {
    pub fn start(&self) -> Offset {
        self.segs.first().map_or(self.end, |s| s.base)
    }
}

/// Reads `[pos, pos + len)` of a file through a large reusable buffer.
struct ChunkReader<'a> {
    file: &'a File,
    limit: u64,
    buf: Vec<u8>,
    at: u64,
}

impl<'a> ChunkReader<'a> {
    fn new(file: &'a File, limit: u64) -> Self {
        ChunkReader {
            file,
            limit,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// `None` if the range passes the limit.
    fn get(&mut self, pos: u64, len: usize) -> io::Result<Option<&[u8]>> {
        let end = pos + len as u64;
        if end > self.limit {
            return Ok(None);
        }
        let have = pos >= self.at && end <= self.at + self.buf.len() as u64;
        if !have {
            let n = (len.max(SCAN_CHUNK_BYTES) as u64).min(self.limit - pos) as usize;
            if self.buf.len() != n {
                // A fresh zeroed allocation (calloc) rather than a resize that fills byte by byte.
                self.buf = vec![0u8; n];
            }
            self.file.read_exact_at(&mut self.buf, pos)?;
            self.at = pos;
        }
        let from = (pos - self.at) as usize;
        Ok(Some(&self.buf[from..from + len]))
    }
}

pub(crate) struct ScanOut {
    pub end: Offset,
    pub end_pos: u64,
    pub entries: Vec<(Offset, u64)>,
    pub last_index_pos: Option<u64>,
    pub batches: Vec<ProducerBatch>,
}

/// Verifies batches from `pos` (where offset `off` starts) until the first one that does not
/// verify, does not continue the offsets or this log, or does not fit before `cap`.
pub(crate) fn scan(
    file: &File,
    log: LogId,
    align: u32,
    cap: u64,
    mut pos: u64,
    mut off: Offset,
    interval: u32,
) -> io::Result<ScanOut> {
    let mut last_index_pos: Option<u64> = None;
    let mut r = ChunkReader::new(file, cap);
    let mut entries = Vec::new();
    let mut batches = Vec::new();
    while let Some(hb) = r.get(pos, HEADER_LEN)? {
        let Ok(h) = BatchHeader::decode(hb) else {
            break;
        };
        // A recycled segment still holds another log's batches, or this log's older ones,
        // after the end: only a batch that continues this log counts.
        if h.base_offset != off || h.log_id != log {
            break;
        }
        let len = h.batch_len();
        let Some(b) = r.get(pos, len)? else {
            break;
        };
        if record::verify(b).is_err() {
            break;
        }
        if last_index_pos.is_none_or(|p| pos - p >= u64::from(interval)) {
            entries.push((off, pos));
            last_index_pos = Some(pos);
        }
        if h.producer_id.0 != 0 {
            batches.push(ProducerBatch {
                producer: h.producer_id,
                seq: h.producer_seq,
                record_count: h.record_count,
                base_offset: h.base_offset,
            });
        }
        off = h.end_offset();
        pos += format::stride(len, align);
    }
    Ok(ScanOut {
        end: off,
        end_pos: pos,
        entries,
        last_index_pos,
        batches,
    })
}

/// Zeroes every non-zero byte of `[from, cap)` (a torn tail, or garbage after a corrupt
/// batch) and syncs, so later appends never sit in front of stale bytes that could verify.
pub(crate) fn zero_tail(path: &Path, from: u64, cap: u64) -> Result<bool, StorageError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("open segment to zero its tail", path, e))?;
    let mut buf = vec![0u8; SCAN_CHUNK_BYTES];
    let mut at = from;
    let mut dirty = false;
    while at < cap {
        let n = ((cap - at) as usize).min(SCAN_CHUNK_BYTES);
        f.read_exact_at(&mut buf[..n], at)
            .map_err(|e| StorageError::io("read segment tail", path, e))?;
        if let Some(last) = last_nonzero(&buf[..n]) {
            disk::write_zeros(&f, at, last as u64 + 1)?;
            dirty = true;
        }
        at += n as u64;
    }
    if dirty {
        disk::fdatasync(&f)?;
    }
    Ok(dirty)
}

/// Index of the last non-zero byte. Compares whole pages against zeros first (a `memcmp`),
/// since tails are almost always entirely zero.
fn last_nonzero(b: &[u8]) -> Option<usize> {
    const PAGE: usize = 4096;
    static ZEROS: [u8; PAGE] = [0; PAGE];
    let mut end = b.len();
    while end > 0 {
        let start = end.saturating_sub(PAGE);
        let page = &b[start..end];
        if page != &ZEROS[..page.len()] {
            return page.iter().rposition(|&x| x != 0).map(|i| start + i);
        }
        end = start;
    }
    None
}

fn read_file_opt(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io("read", path, e)),
    }
}

fn remove_file_opt(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove", path, e)),
    }
}

/// Writes an index file without syncing: a lost or torn index (its CRC fails) only costs a
/// scan at the next recovery.
pub(crate) fn write_index(dir: &Path, idx: &SegmentIndex) -> Result<(), StorageError> {
    let tmp = dir.join(format!(
        "{}{}",
        format::TMP_PREFIX,
        format::index_name(idx.base)
    ));
    let dst = dir.join(format::index_name(idx.base));
    std::fs::write(&tmp, idx.encode()).map_err(|e| StorageError::io("write index", &tmp, e))?;
    std::fs::rename(&tmp, &dst).map_err(|e| StorageError::io("rename index", &dst, e))
}

/// Removes a segment's index durably (it is about to be appended to again, and a stale index
/// coming back after a crash would claim data that is gone).
pub(crate) fn remove_index_durably(dir: &Path, base: Offset) -> Result<(), StorageError> {
    let p = dir.join(format::index_name(base));
    if p.exists() {
        remove_file_opt(&p)?;
        disk::fsync_dir(dir)?;
    }
    Ok(())
}

pub(crate) fn read_meta(dir: &Path) -> Result<(LogId, String), StorageError> {
    let p = dir.join(META_FILE);
    let b = std::fs::read(&p).map_err(|e| StorageError::io("read log meta", &p, e))?;
    format::decode_meta(&b).ok_or_else(|| StorageError::Corruption {
        path: p.clone(),
        what: "log meta file does not verify".into(),
    })
}

/// Empties a segment whose header is unusable: zero data, fresh header, synced.
fn reset_segment(
    dir: &Path,
    log: LogId,
    base: Offset,
    align: u32,
) -> Result<SegState, StorageError> {
    let path = dir.join(format::segment_name(base));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io("open segment", &path, e))?;
    let cap = f
        .metadata()
        .map_err(|e| StorageError::io("stat segment", &path, e))?
        .len();
    if cap < SEGMENT_HEADER_BYTES {
        return Err(StorageError::Corruption {
            path,
            what: "first segment shorter than its header".into(),
        });
    }
    tracing::error!(%log, segment = %path.display(), "emptying the first segment: its header is unusable");
    zero_tail(&path, SEGMENT_HEADER_BYTES, cap)?;
    f.write_all_at(&SegmentHeader { base, log, align }.encode(), 0)
        .map_err(|e| StorageError::io("write segment header", &path, e))?;
    disk::fdatasync(&f)?;
    Ok(SegState {
        base,
        path: path.clone(),
        cap,
        align,
        end: base,
        end_pos: SEGMENT_HEADER_BYTES,
        index: Vec::new(),
        last_index_pos: None,
        read_file: Arc::new(
            File::open(&path).map_err(|e| StorageError::io("open segment", &path, e))?,
        ),
        modified: SystemTime::now(),
    })
}

/// Recovers one log directory. `align` is the alignment new segments get (4096 in O_DIRECT
/// mode, 1 in buffered mode); `interval` the index spacing.
pub(crate) fn recover_log(
    dir: &Path,
    align: u32,
    interval: u32,
) -> Result<Recovered, StorageError> {
    let (log, name) = read_meta(dir)?;
    let expect_dir = format::log_dir_name(log);
    if dir.file_name().and_then(|n| n.to_str()) != Some(expect_dir.as_str()) {
        return Err(StorageError::Corruption {
            path: dir.to_path_buf(),
            what: format!(
                "meta names log {name:?} ({log}) which does not belong in this directory"
            ),
        });
    }
    let (hint_seq, committed_hint) = match read_file_opt(&dir.join(HINT_FILE))? {
        Some(b) => format::decode_hint(&b).unwrap_or((0, Offset::ZERO)),
        None => (0, Offset::ZERO),
    };
    let trim_path = dir.join(format::TRIM_FILE);
    let trim_point = match read_file_opt(&trim_path)? {
        Some(b) => format::decode_trim(&b).unwrap_or_else(|| {
            // Written whole by a rename, so only rot damages it. Serving from the oldest
            // segment again is a lesser harm than refusing to start: all of it was committed.
            tracing::warn!(path = %trim_path.display(), "trim file is damaged: ignored, the log is served from its oldest segment");
            Offset::ZERO
        }),
        None => Offset::ZERO,
    };

    let mut bases = Vec::new();
    let listing = std::fs::read_dir(dir).map_err(|e| StorageError::io("list log dir", dir, e))?;
    for e in listing {
        let e = e.map_err(|e| StorageError::io("list log dir", dir, e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(format::TMP_PREFIX) {
            remove_file_opt(&e.path())?;
        } else if let Some(b) = format::parse_base(&n, SEGMENT_SUFFIX) {
            bases.push(b);
        }
    }
    bases.sort();

    let mut segs: Vec<SegState> = Vec::new();
    let mut producers = ProducerTable::default();
    let mut cut_at: Option<usize> = None;
    // Whether the newest kept segment was already loaded as the active one.
    let mut tail_done = false;
    for (i, &base) in bases.iter().enumerate() {
        let is_last = i + 1 == bases.len();
        let path = dir.join(format::segment_name(base));
        let read_file =
            File::open(&path).map_err(|e| StorageError::io("open segment", &path, e))?;
        let meta = read_file
            .metadata()
            .map_err(|e| StorageError::io("stat segment", &path, e))?;
        let cap = meta.len();
        let modified = meta.modified().unwrap_or_else(|_| SystemTime::now());
        if let Some(prev) = segs.last() {
            if prev.end != base {
                tracing::error!(
                    log = %log, segment = %path.display(), expected = %prev.end,
                    "segment does not continue the log; it and every later segment are dropped"
                );
                cut_at = Some(i);
                break;
            }
        }
        let mut hb = vec![0u8; SEGMENT_HEADER_BYTES as usize];
        let header = if cap < SEGMENT_HEADER_BYTES {
            Err(HeaderProblem::Corrupt(
                "segment shorter than its header".into(),
            ))
        } else {
            read_file
                .read_exact_at(&mut hb, 0)
                .map_err(|e| StorageError::io("read segment header", &path, e))?;
            SegmentHeader::decode(&hb)
        };
        let header = match header {
            Ok(h) if h.base == base && h.log == log => h,
            Ok(h) if is_last => {
                // A recycled segment (an old one of this or another log) whose roll crashed
                // before its new header was durable: the roll's first group syncs the whole
                // file before anything in it is reported durable, so nothing was ever
                // acknowledged in it. Use it empty; the scan below stops at once (its batches
                // do not continue this log) and the stale rest is zeroed.
                tracing::warn!(log = %log, segment = %path.display(), old = ?h, "newest segment still has the header of its previous use; using it empty");
                let h = SegmentHeader { base, log, align };
                write_segment_header(&path, &h, true)?;
                h
            }
            Ok(h) => {
                tracing::error!(log = %log, segment = %path.display(), ?h, "segment header names another log or base; dropping it and every later segment");
                cut_at = Some(i);
                break;
            }
            Err(HeaderProblem::Blank) if is_last => {
                // Created by a roll that crashed before its header was durable: nothing was
                // ever acknowledged in it. Give it a header and use it empty.
                let h = SegmentHeader { base, log, align };
                write_segment_header(&path, &h, true)?;
                h
            }
            Err(p) => {
                tracing::error!(log = %log, segment = %path.display(), problem = ?p, "unusable segment header; dropping it and every later segment");
                cut_at = Some(i);
                break;
            }
        };
        let idx = read_file_opt(&dir.join(format::index_name(base)))?
            .and_then(|b| SegmentIndex::decode(&b))
            .filter(|x| {
                x.base == base
                    && x.align == header.align
                    && x.end_pos <= cap
                    && x.end_pos >= SEGMENT_HEADER_BYTES
            });
        let mut seg = SegState {
            base,
            path: path.clone(),
            cap,
            align: header.align,
            end: base,
            end_pos: SEGMENT_HEADER_BYTES,
            index: Vec::new(),
            last_index_pos: None,
            read_file: Arc::new(read_file),
            modified,
        };
        if !is_last {
            if let Some(x) = idx {
                seg.end = x.end;
                seg.end_pos = x.end_pos;
                seg.last_index_pos = x.entries.last().map(|e| e.1);
                seg.index = x.entries;
                producers.reset_to(&x.producers);
            } else {
                let s = scan(
                    &seg.read_file,
                    log,
                    seg.align,
                    cap,
                    SEGMENT_HEADER_BYTES,
                    base,
                    interval,
                )
                .map_err(|e| StorageError::io("scan segment", &path, e))?;
                seg.end = s.end;
                seg.end_pos = s.end_pos;
                seg.index = s.entries;
                seg.last_index_pos = s.last_index_pos;
                for b in s.batches {
                    producers.add(b);
                }
                if let Err(e) = write_index(dir, &seg.to_index(&producers)) {
                    tracing::warn!("could not write index for {}: {e}", path.display());
                }
            }
            segs.push(seg);
            continue;
        }
        // The active segment: resume from the last index point that still verifies.
        let mut start = (SEGMENT_HEADER_BYTES, base, None);
        if let Some(x) = &idx {
            if let Some(&(o, p)) = x.entries.last() {
                let ok = {
                    let mut r = ChunkReader::new(&seg.read_file, cap);
                    match r.get(p, HEADER_LEN) {
                        Ok(Some(hb)) => BatchHeader::decode(hb)
                            .is_ok_and(|h| h.base_offset == o && h.log_id == log),
                        _ => false,
                    }
                };
                if ok {
                    seg.index = x.entries.clone();
                    producers.reset_to(&x.producers);
                    start = (p, o, Some(p));
                    // The scan re-adds the entry's batch; drop it here to keep entries unique.
                    seg.index.pop();
                }
            }
        }
        let s = scan(
            &seg.read_file,
            log,
            seg.align,
            cap,
            start.0,
            start.1,
            interval,
        )
        .map_err(|e| StorageError::io("scan segment", &path, e))?;
        seg.index.extend(s.entries);
        seg.last_index_pos = s.last_index_pos.or(start.2);
        seg.end = s.end;
        seg.end_pos = s.end_pos;
        for b in s.batches {
            producers.add(b);
        }
        if zero_tail(&path, seg.end_pos, cap)? {
            tracing::warn!(log = %log, segment = %path.display(), end = %seg.end, "cut a torn tail");
        }
        remove_index_durably(dir, base)?;
        segs.push(seg);
        tail_done = true;
    }

    if let Some(i) = cut_at {
        // The oldest segment's name is the only record of where the log starts: rather than
        // delete it, it is emptied and kept, so offsets never restart from zero.
        let keep_first = i == 0;
        // Drop newest first, so a crash in between never leaves a hole in the log.
        for &b in bases[i..].iter().rev() {
            remove_file_opt(&dir.join(format::index_name(b)))?;
            if !(keep_first && b == bases[0]) {
                remove_file_opt(&dir.join(format::segment_name(b)))?;
            }
        }
        disk::fsync_dir(dir)?;
        if keep_first {
            segs.push(reset_segment(dir, log, bases[0], align)?);
            tail_done = true;
        }
    }
    if !tail_done {
        if let Some(seg) = segs.last_mut() {
            // Loaded as sealed but it is the newest kept: make it appendable again.
            if zero_tail(&seg.path, seg.end_pos, seg.cap)? {
                tracing::warn!(log = %log, segment = %seg.path.display(), "zeroed garbage after the last good batch");
            }
            remove_index_durably(dir, seg.base)?;
        }
    }
    let end = segs
        .last()
        .map_or(bases.first().copied().unwrap_or(Offset::ZERO), |s| s.end);
    Ok(Recovered {
        log,
        name,
        dir: dir.to_path_buf(),
        segs,
        producers,
        hint_seq,
        committed_hint,
        trim_point,
        end,
    })
}

/// Writes a segment's header in place; with `sync`, durably. Without, the segment's first
/// group commit makes it durable (fdatasync covers the whole file) and a crash before that
/// leaves a zero header, which recovery treats as an empty segment named by its file name.
pub(crate) fn write_segment_header(
    path: &std::path::Path,
    h: &SegmentHeader,
    sync: bool,
) -> Result<(), StorageError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("open segment", path, e))?;
    f.write_all_at(&h.encode(), 0)
        .map_err(|e| StorageError::io("write segment header", path, e))?;
    if sync {
        disk::fdatasync(&f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::last_nonzero;

    #[test]
    fn finds_last_nonzero() {
        let mut b = vec![0u8; 10_000];
        assert_eq!(last_nonzero(&b), None);
        for i in [0, 1, 4095, 4096, 8191, 9999] {
            b[i] = 1;
            assert_eq!(last_nonzero(&b), Some(i));
        }
        assert_eq!(last_nonzero(&[]), None);
    }
}
