//! A simulated node disk: written-but-unsynced vs synced batches, group-commit syncs that
//! cover every write issued before them, crashes that lose (or tear) the unsynced suffix, bit
//! rot caught by checksums at recovery, and the saved commit hint.

use crate::rng::Rng;
use bytes::Bytes;
use chainlog_core::effects::{ProducerBatch, RecoveredLog, PRODUCER_BATCHES_KEPT};
use chainlog_core::record::{self, BatchHeader};
use chainlog_core::{ErrorCode, LogId, Offset};
use std::collections::BTreeMap;

/// One stored batch. After a crash its bytes may be torn or flipped until recovery cuts it.
#[derive(Clone, Debug)]
pub struct StoredBatch {
    pub base: Offset,
    pub end: Offset,
    pub bytes: Bytes,
}

/// Offsets per simulated segment (trims drop whole segments).
const SEGMENT_OFFSETS: u64 = 32;

#[derive(Clone, Debug)]
pub struct LogDisk {
    pub name: String,
    pub start: Offset,
    pub batches: Vec<StoredBatch>,
    /// Batches covered by a completed sync.
    pub synced: usize,
    /// Commit hint persisted by a completed sync.
    pub hint_saved: Offset,
    /// Latest `SaveCommitted`, persisted by the next sync.
    pub hint_pending: Offset,
    /// Highest `before` of a trim: durable at once, like the real storage's trim file.
    pub trim_point: Offset,
}

impl LogDisk {
    pub fn end(&self) -> Offset {
        self.batches.last().map_or(self.start, |b| b.end)
    }

    pub fn synced_end(&self) -> Offset {
        match self.synced {
            0 => self.start,
            n => self.batches[n - 1].end,
        }
    }

    /// The producer table storage rebuilds from the synced batches (as recovery does).
    pub fn producers(&self) -> Vec<ProducerBatch> {
        let mut per: BTreeMap<u64, Vec<ProducerBatch>> = BTreeMap::new();
        for b in &self.batches[..self.synced] {
            let Ok(h) = BatchHeader::decode(&b.bytes) else {
                continue;
            };
            if h.producer_id.0 == 0 {
                continue;
            }
            let v = per.entry(h.producer_id.0).or_default();
            v.push(ProducerBatch {
                producer: h.producer_id,
                seq: h.producer_seq,
                record_count: h.record_count,
                base_offset: h.base_offset,
            });
            if v.len() > PRODUCER_BATCHES_KEPT {
                v.remove(0);
            }
        }
        per.into_values().flatten().collect()
    }

    /// Index of the batch starting at `base`.
    pub fn find(&self, base: Offset) -> Option<usize> {
        let i = self.batches.partition_point(|b| b.base < base);
        (i < self.batches.len() && self.batches[i].base == base).then_some(i)
    }
}

/// What a crash or a recovery removed: (log, base) of each batch no longer held.
pub type Removed = Vec<(LogId, StoredBatch)>;

#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    pub logs: BTreeMap<LogId, LogDisk>,
    /// Batch counts (and hints) captured when the in-flight sync started.
    sync_in_flight: Option<BTreeMap<LogId, (usize, Offset)>>,
    sync_again: bool,
}

impl SimDisk {
    /// Creates a log (idempotent for the same name). Creation is durable at once.
    pub fn create(&mut self, log: LogId, name: &str) -> Result<(), ErrorCode> {
        if let Some(l) = self.logs.get(&log) {
            return if l.name == name {
                Ok(())
            } else {
                Err(ErrorCode::LogExists)
            };
        }
        self.logs.insert(
            log,
            LogDisk {
                name: name.to_string(),
                start: Offset::ZERO,
                batches: vec![],
                synced: 0,
                hint_saved: Offset::ZERO,
                hint_pending: Offset::ZERO,
                trim_point: Offset::ZERO,
            },
        );
        Ok(())
    }

    /// Appends batches at `base`, which must be the log's end (offsets dense). Returns the
    /// stored copies (cut to their batch length).
    pub fn append(
        &mut self,
        log: LogId,
        base: Offset,
        batches: &[Bytes],
    ) -> Result<Vec<StoredBatch>, String> {
        let l = self
            .logs
            .get_mut(&log)
            .ok_or_else(|| format!("append to log {log} that storage does not have"))?;
        if base != l.end() {
            return Err(format!(
                "append to {log} at {base} but the log ends at {} (offsets not dense)",
                l.end()
            ));
        }
        let mut next = base;
        let mut stored = Vec::with_capacity(batches.len());
        for b in batches {
            let h = record::verify(b).map_err(|e| format!("append of a bad batch: {e}"))?;
            if h.base_offset != next || h.log_id != log {
                return Err(format!(
                    "append batch at {} of log {} where {next} of {log} was expected",
                    h.base_offset, h.log_id
                ));
            }
            let s = StoredBatch {
                base: next,
                end: h.end_offset(),
                bytes: b.slice(..h.batch_len()),
            };
            next = s.end;
            l.batches.push(s.clone());
            stored.push(s);
        }
        Ok(stored)
    }

    /// A write arrived: start a sync unless one is running (it will be followed by another).
    /// Returns true when the caller must schedule the sync's completion.
    pub fn want_sync(&mut self) -> bool {
        if self.sync_in_flight.is_some() {
            self.sync_again = true;
            return false;
        }
        self.sync_in_flight = Some(
            self.logs
                .iter()
                .map(|(id, l)| (*id, (l.batches.len(), l.hint_pending)))
                .collect(),
        );
        self.sync_again = false;
        true
    }

    /// The running sync completed: everything written before it started is durable. Returns
    /// the new durable ends and whether another sync must start.
    pub fn sync_done(&mut self) -> (Vec<(LogId, Offset)>, bool) {
        let mut durable = vec![];
        if let Some(snap) = self.sync_in_flight.take() {
            for (id, (count, hint)) in snap {
                let Some(l) = self.logs.get_mut(&id) else {
                    continue;
                };
                // A truncation may have shortened the log since the sync started.
                let count = count.min(l.batches.len());
                l.hint_saved = l.hint_saved.max(hint);
                if count > l.synced {
                    l.synced = count;
                    durable.push((id, l.synced_end()));
                }
            }
        }
        let again = self.sync_again;
        self.sync_again = false;
        (durable, again && self.want_sync())
    }

    pub fn save_committed(&mut self, log: LogId, end: Offset) {
        if let Some(l) = self.logs.get_mut(&log) {
            l.hint_pending = l.hint_pending.max(end);
        }
    }

    /// Whole batches from the one containing `from`, none past `end`, at most `max_bytes`
    /// (at least one). With `pad`, each comes back with zero padding, like an aligned read.
    pub fn read(
        &self,
        log: LogId,
        from: Offset,
        end: Offset,
        max_bytes: usize,
        pad: bool,
    ) -> Result<Vec<Bytes>, ErrorCode> {
        let l = self.logs.get(&log).ok_or(ErrorCode::UnknownLog)?;
        if from < l.start {
            return Err(ErrorCode::OffsetTrimmed);
        }
        let mut i = l.batches.partition_point(|b| b.end <= from);
        let mut out = vec![];
        let mut bytes = 0usize;
        while i < l.batches.len() {
            let b = &l.batches[i];
            if b.end > end || (!out.is_empty() && bytes + b.bytes.len() > max_bytes) {
                break;
            }
            bytes += b.bytes.len();
            if pad {
                let mut v = b.bytes.to_vec();
                v.resize(v.len().next_multiple_of(512), 0);
                out.push(Bytes::from(v));
            } else {
                out.push(b.bytes.clone());
            }
            i += 1;
        }
        Ok(out)
    }

    /// Drops every batch at or past `end`.
    pub fn truncate(&mut self, log: LogId, end: Offset) -> Removed {
        let Some(l) = self.logs.get_mut(&log) else {
            return vec![];
        };
        let keep = l.batches.partition_point(|b| b.end <= end);
        let removed = l.batches.split_off(keep);
        l.synced = l.synced.min(keep);
        removed.into_iter().map(|b| (log, b)).collect()
    }

    /// A write of `log` failed (disk full): like the real writer once its in-flight groups
    /// came back failed, every unsynced batch of the log is discarded (the failed range is
    /// zeroed there), and the running sync no longer covers them. Returns what went and the
    /// durable end the log is back at.
    pub fn fail_writes(&mut self, log: LogId) -> (Offset, Removed) {
        let Some(l) = self.logs.get_mut(&log) else {
            return (Offset::ZERO, vec![]);
        };
        let keep = l.synced;
        let removed = l.batches.split_off(keep);
        if let Some((count, _)) = self.sync_in_flight.as_mut().and_then(|m| m.get_mut(&log)) {
            *count = (*count).min(keep);
        }
        (
            l.synced_end(),
            removed.into_iter().map(|b| (log, b)).collect(),
        )
    }

    /// Keeps `point` as the trim point if higher and drops whole segments entirely below
    /// `before`; returns the new start, the trim point and what went.
    /// `before` past the end empties the log and restarts it at `before` (a replica whose
    /// predecessor trimmed past everything it holds). Durable at once, like the real
    /// storage's trim, which deletes and fsyncs the directory before it reports.
    pub fn trim(&mut self, log: LogId, before: Offset, point: Offset) -> (Offset, Offset, Removed) {
        let Some(l) = self.logs.get_mut(&log) else {
            return (Offset::ZERO, Offset::ZERO, vec![]);
        };
        l.trim_point = l.trim_point.max(point);
        let mut n = l.batches.partition_point(|b| b.end <= before);
        if let Some(kept) = l.batches.get(n) {
            // Whole segments only, like the real storage: the batches sharing a segment with
            // the first one kept stay too, so a node may hold (and must not serve) offsets
            // well below the trim point.
            let seg = kept.base.0 / SEGMENT_OFFSETS;
            while n > 0 && l.batches[n - 1].base.0 / SEGMENT_OFFSETS == seg {
                n -= 1;
            }
        }
        let gone: Vec<StoredBatch> = l.batches.drain(..n).collect();
        l.synced = l.synced.saturating_sub(n);
        // The running sync counted batches from the old front: it covers `n` fewer now (else
        // batches written after it started would be reported durable by it).
        if let Some((count, _)) = self.sync_in_flight.as_mut().and_then(|m| m.get_mut(&log)) {
            *count = count.saturating_sub(n);
        }
        if let Some(last) = gone.last() {
            l.start = last.end;
        }
        if l.batches.is_empty() && before > l.start {
            l.start = before;
        }
        (
            l.start,
            l.trim_point,
            gone.into_iter().map(|b| (log, b)).collect(),
        )
    }

    /// Power loss: each log keeps its synced batches and a random prefix of the rest, maybe
    /// with a torn last batch (a prefix of its bytes). Returns batches lost outright.
    pub fn crash(&mut self, rng: &mut Rng) -> Removed {
        self.sync_in_flight = None;
        self.sync_again = false;
        let mut removed = vec![];
        for (id, l) in self.logs.iter_mut() {
            let unsynced = l.batches.len() - l.synced;
            let keep = l.synced + rng.range(0, unsynced as u64) as usize;
            let mut lost = l.batches.split_off(keep);
            if !lost.is_empty() && rng.chance(0.5) {
                // Torn: part of the next batch reached the platter; recovery will cut it (and
                // report it then).
                let b = lost.remove(0);
                let cut = rng.range(1, b.bytes.len() as u64 - 1) as usize;
                l.batches.push(StoredBatch {
                    bytes: b.bytes.slice(..cut),
                    ..b
                });
            }
            removed.extend(lost.into_iter().map(|b| (*id, b)));
            l.hint_pending = l.hint_saved;
        }
        removed
    }

    /// Bit rot in a synced batch of some log. Returns (log, base) of the damaged batch.
    pub fn flip_bit(&mut self, rng: &mut Rng) -> Option<(LogId, Offset)> {
        let candidates: Vec<LogId> = self
            .logs
            .iter()
            .filter(|(_, l)| l.synced > 0)
            .map(|(id, _)| *id)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let id = candidates[rng.index(candidates.len())];
        let l = self.logs.get_mut(&id)?;
        let i = rng.index(l.synced);
        let b = &mut l.batches[i];
        let mut v = b.bytes.to_vec();
        let at = rng.index(v.len());
        v[at] ^= 1 << rng.range(0, 7);
        b.bytes = Bytes::from(v);
        Some((id, b.base))
    }

    /// Start-up: verify every batch, cut each log at the first invalid one, rebuild the
    /// producer table and hand back what the replica needs. Returns what was cut (batches that
    /// were torn or corrupt, and everything after them).
    pub fn recover(&mut self) -> (Vec<RecoveredLog>, Removed) {
        let mut removed = vec![];
        let mut out = vec![];
        for (id, l) in self.logs.iter_mut() {
            let mut next = l.start;
            let mut valid = 0;
            for b in &l.batches {
                match record::verify(&b.bytes) {
                    Ok(h) if h.base_offset == next && h.log_id == *id => {
                        next = h.end_offset();
                        valid += 1;
                    }
                    _ => break,
                }
            }
            let cut = l.batches.split_off(valid);
            removed.extend(cut.into_iter().map(|b| (*id, b)));
            // What survived is on the platter: durable from now on.
            l.synced = l.batches.len();
            out.push(RecoveredLog {
                log: *id,
                name: l.name.clone(),
                start: l.start,
                end: l.end(),
                producers: l.producers(),
                committed_hint: l.hint_saved,
                trim_point: l.trim_point,
            });
        }
        (out, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chainlog_core::Epoch;

    fn b(base: u64, n: usize) -> Bytes {
        let payloads: Vec<&[u8]> = (0..n).map(|_| &b"xyz"[..]).collect();
        record::build(LogId(1), Offset(base), Epoch(1), &payloads).expect("build")
    }

    #[test]
    fn sync_covers_writes_before_it_and_crash_keeps_them() {
        let mut d = SimDisk::default();
        d.create(LogId(1), "a").expect("create");
        d.append(LogId(1), Offset(0), &[b(0, 2)]).expect("append");
        assert!(d.want_sync());
        d.append(LogId(1), Offset(2), &[b(2, 1)]).expect("append");
        assert!(!d.want_sync());
        let (durable, again) = d.sync_done();
        assert_eq!(durable, vec![(LogId(1), Offset(2))]);
        assert!(again, "the second write needs its own sync");
        assert!(d.append(LogId(1), Offset(9), &[b(9, 1)]).is_err());
        let mut rng = Rng::new(1, 1);
        d.crash(&mut rng);
        let (rec, _) = d.recover();
        assert!(rec[0].end >= Offset(2), "synced data survives a crash");
    }

    #[test]
    fn trim_past_the_end_restarts_the_log_there_and_a_running_sync_covers_no_new_write() {
        let mut d = SimDisk::default();
        d.create(LogId(1), "a").expect("create");
        for i in 0..3 {
            d.append(LogId(1), Offset(i), &[b(i, 1)]).expect("append");
        }
        assert!(d.want_sync());
        let (start, _, removed) = d.trim(LogId(1), Offset(10), Offset(10));
        assert_eq!((start, removed.len()), (Offset(10), 3));
        d.append(LogId(1), Offset(10), &[b(10, 1)])
            .expect("append at the new start");
        assert!(!d.want_sync());
        let (durable, again) = d.sync_done();
        assert!(
            durable.is_empty(),
            "the sync began before the write: {durable:?}"
        );
        assert!(again);
        let (rec, _) = d.recover();
        assert_eq!((rec[0].start, rec[0].end), (Offset(10), Offset(11)));
    }

    #[test]
    fn recovery_cuts_at_a_flipped_bit() {
        let mut d = SimDisk::default();
        d.create(LogId(1), "a").expect("create");
        for i in 0..5 {
            d.append(LogId(1), Offset(i), &[b(i, 1)]).expect("append");
        }
        d.want_sync();
        d.sync_done();
        let mut rng = Rng::new(3, 3);
        let (_, at) = d.flip_bit(&mut rng).expect("flip");
        let (rec, removed) = d.recover();
        assert_eq!(rec[0].end, at);
        assert_eq!(removed.len() as u64, 5 - at.0);
    }
}
